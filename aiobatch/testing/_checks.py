"""Checking what a request sent, as OpenAI's Files and Batches API does.

The query parameters, JSON bodies, metadata and expiry policies of the fake's endpoints
are checked here; a problem is raised as ``_Reply`` (a 400 or 404 in OpenAI's error
envelope, with OpenAI's messages, ``param`` and ``code``), which the service answers in
the dialect's error shape. Pure functions: no engine, no clock.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..transport import Multipart, Request
from ._wire import error_envelope

_MIN_EXPIRY, _MAX_EXPIRY = 3600, 2_592_000
_METADATA_PAIRS, _METADATA_KEY, _METADATA_VALUE = 16, 64, 512


class _Reply(Exception):
    """Raised inside a handler to answer early with an error response."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _bad(message: str, *, param: str | None = None, code: str | None = None) -> _Reply:
    return _Reply(400, error_envelope(message, param=param, code=code))


def _not_found(message: str, *, param: str | None = None, code: str | None = None) -> _Reply:
    return _Reply(404, error_envelope(message, param=param, code=code))


def _int_param(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _bad(
            f"Invalid '{name}': expected an integer, but got {raw!r} instead.",
            param=name,
            code="invalid_type",
        ) from None
    if not low <= value <= high:
        raise _bad(
            f"Invalid '{name}': integer out of range. Expected a value between {low} and "
            f"{high}, but got {value} instead.",
            param=name,
            code="integer_out_of_range",
        )
    return value


def _required_str(data: Mapping[str, Any], name: str) -> str:
    if name not in data or data[name] is None:
        raise _bad(
            f"Missing required parameter: '{name}'.",
            param=name,
            code="missing_required_parameter",
        )
    value = data[name]
    if not isinstance(value, str):
        raise _bad(
            f"Invalid type for '{name}': expected a string, but got "
            f"{type(value).__name__} instead.",
            param=name,
            code="invalid_type",
        )
    return value


def _check_metadata(raw: Any) -> dict[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _bad(
            "Invalid type for 'metadata': expected an object, "
            f"but got {type(raw).__name__} instead.",
            param="metadata",
            code="invalid_type",
        )
    if len(raw) > _METADATA_PAIRS:
        raise _bad(
            f"Invalid 'metadata': too many properties. Expected an object with at most "
            f"{_METADATA_PAIRS} properties, but got an object with {len(raw)} properties "
            "instead.",
            param="metadata",
            code="object_above_max_properties",
        )
    for key, value in raw.items():
        if len(key) > _METADATA_KEY:
            raise _bad(
                f"Invalid 'metadata': key too long. Expected keys of at most {_METADATA_KEY} "
                f"characters, but got a key with {len(key)} characters instead.",
                param="metadata",
                code="string_above_max_length",
            )
        if not isinstance(value, str):
            raise _bad(
                f"Invalid type for 'metadata.{key}': expected a string, but got "
                f"{type(value).__name__} instead.",
                param=f"metadata.{key}",
                code="invalid_type",
            )
        if len(value) > _METADATA_VALUE:
            raise _bad(
                f"Invalid 'metadata.{key}': string too long. Expected a string with maximum "
                f"length {_METADATA_VALUE}, but got a string with length {len(value)} instead.",
                param=f"metadata.{key}",
                code="string_above_max_length",
            )
    return dict(raw)


def _check_expiry(anchor: Any, seconds: Any, *, param: str) -> int:
    """Validate an ``{anchor, seconds}`` expiration policy; returns the seconds."""
    if anchor != "created_at":
        raise _bad(
            f"Invalid value for '{param}.anchor': {anchor!r}. Supported values are: 'created_at'.",
            param=f"{param}.anchor",
            code="invalid_value",
        )
    if isinstance(seconds, str) and seconds.strip().lstrip("-").isdigit():
        seconds = int(seconds)
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise _bad(
            f"Invalid type for '{param}.seconds': expected an integer.",
            param=f"{param}.seconds",
            code="invalid_type",
        )
    if not _MIN_EXPIRY <= seconds <= _MAX_EXPIRY:
        raise _bad(
            f"Invalid '{param}.seconds': expected a value between {_MIN_EXPIRY} and "
            f"{_MAX_EXPIRY}, but got {seconds} instead.",
            param=f"{param}.seconds",
            code="integer_out_of_range",
        )
    return seconds


def _json_object(request: Request) -> dict[str, Any]:
    body = request.body
    if isinstance(body, Multipart) or not body:
        raise _bad("The request needs a JSON body.")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _bad(
            "We could not parse the JSON body of your request. The API expects a JSON "
            "payload, but what was sent was not valid JSON."
        ) from None
    if not isinstance(data, dict):
        raise _bad("The JSON body of the request must be an object.")
    return data
