"""Small helpers the fake service uses to write JSON bodies (models go through the converter)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .._convert import to_wire
from .._models import ErrorBody

__all__ = ["error_envelope", "http_error_body", "json_bytes", "stable_hex"]


def json_bytes(data: Any) -> bytes:
    """Encode JSON-ready data compactly as UTF-8."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def error_envelope(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error body, ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        message: what went wrong, for a human.
        type: the error type (``invalid_request_error``, ``server_error``...).
        param: the request parameter at fault, if any.
        code: a machine-readable code, if any.

    Returns:
        JSON-ready data with all four keys present.
    """
    body = ErrorBody(message=message, type=type, param=param, code=code)
    return {"error": to_wire(body)}


#: status -> (type, code, message) of the bodies the fake sends for injected HTTP errors.
_DEFAULT_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "The request was invalid."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", None, "Not found."),
    409: ("invalid_request_error", None, "The request conflicted with another request."),
    422: ("invalid_request_error", None, "The request could not be processed."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests. Please try again later.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The server is overloaded or not ready yet."),
    504: ("server_error", None, "Gateway timeout."),
}


def http_error_body(
    status: int, *, message: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The error body OpenAI would send with ``status``.

    Args:
        status: the HTTP status (>= 400).
        message: overrides the default message.
        code: overrides the default code.

    Returns:
        JSON-ready data in OpenAI's error envelope.
    """
    default = _DEFAULT_ERRORS.get(status)
    if default is None:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        default = (kind, None, f"HTTP {status}.")
    kind, default_code, default_message = default
    return error_envelope(
        message if message is not None else default_message,
        type=kind,
        code=code if code is not None else default_code,
    )


def stable_hex(*parts: object, size: int = 16) -> str:
    """A hex digest of ``parts`` that is the same in every process (2 * size characters)."""
    text = "\x00".join(str(p) for p in parts)
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()
