"""Anthropic's Message Batches wire, read into (and written from) our models.

Part of the converter (:mod:`aiobatch._convert` calls it; nothing else should): it
turns Anthropic's JSON into the OpenAI-shaped data the converter's models are built
from, so that nothing Anthropic-specific reaches the client, the fleet or the run layer
(reference/batch-api.md §5; the official SDK's ``types/messages/*``).

Status rule
-----------
Anthropic has three processing statuses; :func:`batch_status` maps them onto
:class:`~aiobatch.BatchStatus`, keeping the original in ``Batch.raw_status``:

=================  ==========================================  =================
``processing_``    and                                         status
``status``
=================  ==========================================  =================
``in_progress``    (always)                                    ``in_progress``
``canceling``      (always)                                    ``cancelling``
``ended``          ``cancel_initiated_at`` is set              ``cancelled``
``ended``          no cancel, ``request_counts.expired`` > 0   ``expired``
``ended``          otherwise                                   ``completed``
anything else                                                  ``unknown``
=================  ==========================================  =================

The rest of a batch
-------------------
* ``request_counts``: ``total`` is the sum of the five counts, ``completed`` is
  ``succeeded``, ``failed`` is ``errored + canceled + expired``;
* times (RFC 3339 strings): ``created_at`` (also ``in_progress_at``: a batch starts
  at once), ``expires_at``, ``cancel_initiated_at`` as ``cancelling_at``, and
  ``ended_at`` as ``completed_at``, ``cancelled_at`` or ``expired_at`` by the status;
* ``results_url``: once it is set, ``output_file_id`` is the batch id (the provider
  reads it at ``/v1/messages/batches/{id}/results``); ``error_file_id`` stays None
  (one results file holds every line);
* ``endpoint`` is ``/v1/messages``, ``completion_window`` ``24h``, ``input_file_id``
  ``""`` (the requests went inline).

Result lines
------------
``{"custom_id", "result": {"type": ...}}`` becomes the :data:`~aiobatch.ResultLine`
the run layer's retry rules already know: ``succeeded`` a success (status 200, the
message as body); ``errored`` an HTTP error whose status is the one Anthropic uses for
the error's ``type`` (``invalid_request_error`` 400, ``overloaded_error`` 529...) and
whose body is the error envelope; ``canceled`` the error ``batch_cancelled``;
``expired`` the error ``batch_expired``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from ._lifecycle import BatchStatus
from ._models import BatchRequest

__all__ = [
    "ANTHROPIC_ENDPOINT",
    "ERROR_STATUS",
    "batch_status",
    "encode_inline_create",
    "is_anthropic_batch",
    "is_anthropic_result",
    "openai_batch_data",
    "openai_result_data",
]

#: The endpoint every Anthropic batch request goes to.
ANTHROPIC_ENDPOINT = "/v1/messages"

#: The HTTP status Anthropic answers each error ``type`` with (its errors page).
ERROR_STATUS: Mapping[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

_COUNTS = ("processing", "succeeded", "errored", "canceled", "expired")
_S = BatchStatus


def is_anthropic_batch(value: Mapping[str, Any]) -> bool:
    """Whether a JSON object is an Anthropic MessageBatch."""
    return value.get("type") == "message_batch"


def is_anthropic_result(value: Mapping[str, Any]) -> bool:
    """Whether a JSON object is an Anthropic result line."""
    return "result" in value and "response" not in value and "error" not in value


def _count(counts: Any, name: str) -> int:
    value = counts.get(name) if isinstance(counts, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def batch_status(
    processing_status: Any, cancel_initiated_at: Any, counts: Any
) -> tuple[BatchStatus, str | None]:
    """The status an Anthropic batch stands for by the rule in the module notes, and
    the server's string to keep as ``raw_status`` (None when it is the status's own)."""
    if processing_status == "in_progress":
        return _S.IN_PROGRESS, None
    if processing_status == "canceling":
        return _S.CANCELLING, "canceling"
    if processing_status == "ended":
        if cancel_initiated_at is not None:
            return _S.CANCELLED, "ended"
        if _count(counts, "expired") > 0:
            return _S.EXPIRED, "ended"
        return _S.COMPLETED, "ended"
    return _S.UNKNOWN, processing_status if isinstance(processing_status, str) else None


def openai_batch_data(value: Mapping[str, Any], raw_status_key: str) -> dict[str, Any]:
    """An Anthropic MessageBatch as the OpenAI-shaped data a ``Batch`` is built from
    (the status already mapped, the server's string under ``raw_status_key``)."""
    counts = value.get("request_counts")
    cancel_at = value.get("cancel_initiated_at")
    status, raw = batch_status(value.get("processing_status"), cancel_at, counts)
    ended_at = value.get("ended_at")
    data: dict[str, Any] = {
        "id": value.get("id"),
        "object": "batch",
        "endpoint": ANTHROPIC_ENDPOINT,
        "input_file_id": "",
        "completion_window": "24h",
        "status": status,
        raw_status_key: raw,
        "created_at": value.get("created_at"),
        "in_progress_at": value.get("created_at"),
        "expires_at": value.get("expires_at"),
        "cancelling_at": cancel_at,
        "output_file_id": value.get("id") if value.get("results_url") else None,
    }
    if ended_at is not None:
        column = {
            _S.CANCELLED: "cancelled_at",
            _S.EXPIRED: "expired_at",
        }.get(status, "completed_at")
        data[column] = ended_at
    if isinstance(counts, dict):
        failed = sum(_count(counts, name) for name in ("errored", "canceled", "expired"))
        data["request_counts"] = {
            "total": sum(_count(counts, name) for name in _COUNTS),
            "completed": _count(counts, "succeeded"),
            "failed": failed,
        }
    return data


def openai_result_data(value: Mapping[str, Any]) -> dict[str, Any]:
    """An Anthropic result line as the OpenAI-shaped data a ``ResultLine`` is built
    from (see the module notes).

    Raises:
        ValueError: the ``result`` is not one of Anthropic's four types.
    """
    result = value.get("result")
    kind = result.get("type") if isinstance(result, dict) else None
    custom_id = value.get("custom_id")
    if kind == "succeeded":
        assert isinstance(result, dict)
        response = {"status_code": 200, "body": result.get("message"), "request_id": None}
        return {"custom_id": custom_id, "response": response}
    if kind == "errored":
        assert isinstance(result, dict)
        envelope = result.get("error")
        inner = envelope.get("error") if isinstance(envelope, dict) else None
        error_type = inner.get("type") if isinstance(inner, dict) else None
        request_id = envelope.get("request_id") if isinstance(envelope, dict) else None
        status = ERROR_STATUS.get(error_type, 500) if isinstance(error_type, str) else 500
        response = {
            "status_code": status,
            "body": envelope,
            "request_id": request_id if isinstance(request_id, str) else None,
        }
        return {"custom_id": custom_id, "response": response}
    if kind == "canceled":
        message = "The batch was cancelled before this request ran."
        return {"custom_id": custom_id, "error": {"code": "batch_cancelled", "message": message}}
    if kind == "expired":
        message = "The batch expired before this request ran."
        return {"custom_id": custom_id, "error": {"code": "batch_expired", "message": message}}
    raise ValueError(
        f"an Anthropic result's type is succeeded, errored, canceled or expired, not {kind!r}"
    )


def encode_inline_create(requests: Iterable[BatchRequest]) -> bytes:
    """The JSON body of ``POST /v1/messages/batches``: each request's ``custom_id``
    and its Messages API ``body`` as ``params``."""
    payload = {
        "requests": [{"custom_id": r.custom_id, "params": r.body} for r in requests],
    }
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
