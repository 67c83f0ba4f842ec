"""The converter's outgoing side: models to wire data, request lines, and the bodies and
form fields of the calls that create files and batches (part of :mod:`aiobatch._convert`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ._convert_core import _FAST
from ._models import BatchRequest, ResultError, ResultHTTPError, ResultSuccess

__all__ = [
    "encode_create_batch",
    "encode_online_body",
    "encode_request_line",
    "to_wire",
    "upload_form_fields",
]


def to_wire(obj: Any) -> Any:
    """Turn a model into JSON-ready data, in the wire's shape (nulls kept)."""
    if isinstance(obj, ResultSuccess | ResultHTTPError):
        return {
            "id": obj.id,
            "custom_id": obj.custom_id,
            "response": _FAST.unstructure(obj.response),
            "error": None,
        }
    if isinstance(obj, ResultError):
        return {
            "id": obj.id,
            "custom_id": obj.custom_id,
            "response": None,
            "error": _FAST.unstructure(obj.error),
        }
    return _FAST.unstructure(obj)


def encode_request_line(request: BatchRequest) -> bytes:
    """Serialise one input line (no trailing newline)."""
    return json.dumps(
        {
            "custom_id": request.custom_id,
            "method": request.method,
            "url": request.url,
            "body": request.body,
        },
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()


def encode_online_body(body: Mapping[str, Any]) -> bytes:
    """The JSON body of one online request (what a batch line's ``body`` holds)."""
    return json.dumps(dict(body), separators=(",", ":"), ensure_ascii=False).encode()


def encode_create_batch(
    input_file_id: str,
    endpoint: str,
    *,
    completion_window: str = "24h",
    metadata: Mapping[str, str] | None = None,
    output_expires_after_seconds: int | None = None,
) -> bytes:
    """The JSON body of ``POST /batches``."""
    payload: dict[str, Any] = {
        "input_file_id": input_file_id,
        "endpoint": endpoint,
        "completion_window": completion_window,
        "metadata": dict(metadata) if metadata else None,
    }
    if output_expires_after_seconds is not None:
        payload["output_expires_after"] = {
            "anchor": "created_at",
            "seconds": int(output_expires_after_seconds),
        }
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def upload_form_fields(
    purpose: str, expires_after_seconds: int | None = None
) -> tuple[tuple[str, str], ...]:
    """The plain form fields of ``POST /files`` (nested fields in bracket notation)."""
    fields: tuple[tuple[str, str], ...] = (("purpose", purpose),)
    if expires_after_seconds is not None:
        fields += (
            ("expires_after[anchor]", "created_at"),
            ("expires_after[seconds]", str(int(expires_after_seconds))),
        )
    return fields
