"""What a result line, a failed batch or a refused create means for a request: its
final result, or another round. Pure: no IO.

A line that failed for a retryable reason (the batch expired or was cancelled, an HTTP
408, 429 or 5xx, a line that never came back) runs again in a new batch, up to
``max_rounds`` rounds; other errors are final. A line that was not at fault (its batch
failed because of other lines, or the run itself cancelled its batch) runs again without
spending a round.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from .._models import Batch, ResultSummary

__all__ = [
    "CANCELLED_CODES",
    "PERMANENT_BATCH_CODES",
    "RETRYABLE_LINE_CODES",
    "RETRYABLE_LINE_STATUSES",
    "TOKEN_LIMIT_CODE",
    "Fate",
    "classify",
    "describe_errors",
    "dumps_compact",
    "fate",
    "own_error",
    "token_limited",
    "undecodable",
]

#: Error-file codes (``error.code``) of lines that never ran and may run again.
RETRYABLE_LINE_CODES = frozenset(
    {
        "batch_expired",
        "batch_cancelled",
        "batch_canceled",
        "rate_limit_exceeded",
        "server_error",
        "internal_error",
        "timeout",
        "service_unavailable",
    }
)
#: Batch-level error codes (``errors.data[].code``) that say the input itself is bad:
#: running it again cannot help.
PERMANENT_BATCH_CODES = frozenset(
    {
        "invalid_json_line",
        "duplicate_custom_id",
        "url_mismatch",
        "model_mismatch",
        "missing_required_parameter",
        "invalid_request",
        "invalid_url",
        "invalid_method",
        "empty_file",
        "too_many_requests_in_file",
        "file_too_large",
        "too_many_tasks",
        "streaming_unsupported",
        "model_not_found",
        "unsupported_model",
    }
)
TOKEN_LIMIT_CODE = "token_limit_exceeded"
#: HTTP statuses of a result line that may succeed when sent again (and every 5xx).
#: Not an API call's rule (``aiobatch._retry.is_transient``): a line's 409 is final.
RETRYABLE_LINE_STATUSES = frozenset({408, 429})
#: The codes of a cancelled line (OpenAI writes ``batch_cancelled``; some servers
#: ``batch_canceled``).
CANCELLED_CODES = frozenset({"batch_cancelled", "batch_canceled"})


class Fate(enum.Enum):
    """What happens to a request after an outcome."""

    #: it runs again as if for the first time (not its fault: no round spent)
    AGAIN_FREE = "again_free"
    #: it runs again, spending one of its rounds
    AGAIN = "again"
    #: the outcome is its final result
    FINAL = "final"


def fate(*, attempts: int, retryable: bool, free: bool, max_rounds: int) -> Fate:
    """What happens to a request with ``attempts`` retryable failures so far after an
    outcome: a retryable one runs it again (free when it was not at fault) while it has
    rounds left; a request runs at most ``1 + max_rounds`` times."""
    if retryable and free:
        return Fate.AGAIN_FREE
    if retryable and attempts < max_rounds:
        return Fate.AGAIN
    return Fate.FINAL


def dumps_compact(value: Any) -> bytes:
    """JSON bytes with no spaces (result lines aiobatch writes itself)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def own_error(custom_id: str, code: str, message: str) -> bytes:
    """A result line aiobatch writes itself (no batch produced one)."""
    return dumps_compact(
        {
            "id": None,
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
    )


def classify(result: ResultSummary) -> tuple[str, str | None, bool]:
    """(kind, code, retryable) of a result line."""
    if result.kind == "success":
        return "success", None, False
    if result.kind == "http_error":
        status = result.status_code
        assert status is not None
        retryable = status in RETRYABLE_LINE_STATUSES or status >= 500
        return "http_error", result.code or f"http_{status}", retryable
    code = result.code
    return "error", code, code in RETRYABLE_LINE_CODES


def undecodable(raw: bytes) -> str | None:
    """The ``custom_id`` a result line that does not decode names, if it is JSON with a
    ``custom_id`` string at all."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    cid = value.get("custom_id") if isinstance(value, dict) else None
    return cid if isinstance(cid, str) else None


def describe_errors(batch: Batch, most: int = 5) -> str:
    """A failed batch's errors (``errors.data``) in one line: code, line, message."""
    errors = batch.errors.data if batch.errors is not None else ()
    parts = [
        f"{error.code or 'error'}"
        + (f" at line {error.line}" if error.line is not None else "")
        + (f": {error.message}" if error.message else "")
        for error in errors
    ]
    if not parts:
        return "no errors given"
    shown = "; ".join(parts[:most])
    return shown + (f" (and {len(parts) - most} more)" if len(parts) > most else "")


def token_limited(batch: Batch) -> bool:
    errors = batch.errors.data if batch.errors is not None else ()
    return any(error.code == TOKEN_LIMIT_CODE for error in errors)
