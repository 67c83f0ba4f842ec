"""The fake's Anthropic Message Batches endpoints over the same engine.

:class:`AnthropicRoutes` serves what the ``anthropic`` dialect plays (reference/batch-api.md
§5; the official SDK's ``resources/messages/batches.py``):

* ``POST /v1/messages/batches`` with ``{"requests": [{"custom_id", "params"}]}``: the
  requests become the engine's input (lines for ``/v1/messages``), so faults, rate
  limits, expiry and cancel behave as in every other dialect;
* ``GET /v1/messages/batches`` (``limit`` 1-1000, default 20; ``after_id`` /
  ``before_id``; newest first; ``{data, has_more, first_id, last_id}``);
* ``GET /v1/messages/batches/{id}``, ``POST .../{id}/cancel``, ``DELETE .../{id}``
  (only once processing ended; ``{"id", "type": "message_batch_deleted"}``);
* ``GET .../{id}/results``: JSONL, one ``{"custom_id", "result"}`` per request, once the
  batch has ended (errors first, then successes: results come in any order).

The engine's statuses are written as ``processing_status``: ``validating``,
``in_progress`` and ``finalizing`` are ``in_progress``; ``cancelling`` is
``canceling``; every terminal status is ``ended``. Counts are all ``processing`` until
the batch ends (as Anthropic's are). Errors use Anthropic's envelope
``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from .._convert import decode_result_line
from .._lifecycle import TERMINAL, BatchStatus
from .._models import Batch, ResultError, ResultHTTPError, ResultSuccess
from ..transport import Request
from ._checks import _Reply
from ._config import FakeConfig
from ._dialects import FakeDialect
from ._engine import BatchRecord, CancelRefused, Engine

__all__ = ["ANTHROPIC_MAX_REQUESTS", "AnthropicRoutes", "anthropic_error"]

#: Requests per batch Anthropic accepts.
ANTHROPIC_MAX_REQUESTS = 100_000
_CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_PREFIX = "msg"  # engine ids are batch_<hex>; Anthropic's are msgbatch_<hex>
_S = BatchStatus

#: The Anthropic error type of each HTTP status a line may end with.
_ERROR_TYPES: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error envelope for ``status``."""
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _reply(status: int, message: str) -> _Reply:
    return _Reply(status, anthropic_error(status, message))


def _iso(seconds: int | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000000Z")


class AnthropicRoutes:
    """Anthropic's Message Batches endpoints, on one engine.

    Args:
        engine: the simulation the endpoints read and change.
        config: the service's configuration.
        dialect: the ``anthropic`` dialect.
    """

    def __init__(self, engine: Engine, config: FakeConfig, dialect: FakeDialect) -> None:
        self._engine = engine
        self.config = config
        self.dialect = dialect
        self._custom_ids: dict[str, tuple[str, ...]] = {}
        self._deleted: set[str] = set()

    async def route(
        self,
        method: str,
        parts: list[str],
        params: Mapping[str, str],
        request: Request,
        now: float,
    ) -> Any:
        """Run the handler for a path; returns JSON-ready data or JSONL bytes."""
        count = len(parts)
        if count >= 2 and parts[0] == "messages" and parts[1] == "batches":
            if count == 2 and method == "POST":
                return await self._create(request, now)
            if count == 2 and method == "GET":
                return await self._list(params, request, now)
            if count >= 3:
                record = self._batch(parts[2])
                if count == 3 and method == "GET":
                    return await self._wire(record, request, now)
                if count == 3 and method == "DELETE":
                    return await self._delete(record, now)
                if count == 4 and parts[3] == "cancel" and method == "POST":
                    with contextlib.suppress(CancelRefused):  # an ended batch: as it is
                        await self._engine.cancel(record, now)
                    return await self._wire(record, request, now)
                if count == 4 and parts[3] == "results" and method == "GET":
                    return await self._results(record, now)
        raise _reply(404, f"Not found: {method} /v1/{'/'.join(parts)}")

    # -- helpers ------------------------------------------------------------------------

    def _batch(self, wire_id: str) -> BatchRecord:
        engine_id = wire_id[len(_PREFIX) :] if wire_id.startswith(_PREFIX + "batch_") else None
        record = self._engine.batches.get(engine_id) if engine_id else None
        if record is None or record.id in self._deleted:
            raise _reply(404, f"No Message Batch found with id '{wire_id}'.")
        return record

    async def _wire(self, record: BatchRecord, request: Request, now: float) -> dict[str, Any]:
        return self._batch_json(await self._engine.snapshot(record, now), request)

    def _batch_json(self, batch: Batch, request: Request) -> dict[str, Any]:
        ended = batch.status in TERMINAL
        if batch.status is _S.CANCELLING:
            processing = "canceling"
        else:
            processing = "ended" if ended else "in_progress"
        ids = self._custom_ids.get(batch.id, ())
        counts = {"processing": len(ids), "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if ended:
            counts = self._counts(batch, ids)
        ended_at = batch.completed_at or batch.failed_at or batch.expired_at or batch.cancelled_at
        wire_id = _PREFIX + batch.id
        origin = urlsplit(request.url)
        return {
            "id": wire_id,
            "type": "message_batch",
            "processing_status": processing,
            "request_counts": counts,
            "ended_at": _iso(ended_at) if ended else None,
            "created_at": _iso(batch.created_at),
            "expires_at": _iso(batch.expires_at),
            "archived_at": None,
            "cancel_initiated_at": _iso(batch.cancelling_at),
            "results_url": (
                f"{origin.scheme}://{origin.netloc}/v1/messages/batches/{wire_id}/results"
                if ended
                else None
            ),
        }

    def _counts(self, batch: Batch, ids: tuple[str, ...]) -> dict[str, int]:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for line in self._result_lines(batch, ids):
            counts[line["result"]["type"]] += 1
        return counts

    def _result_lines(self, batch: Batch, ids: tuple[str, ...]) -> list[dict[str, Any]]:
        """Every request's Anthropic result line (errors first, then successes)."""
        lines: list[dict[str, Any]] = []
        seen: set[str] = set()
        for file_id in (batch.error_file_id, batch.output_file_id):
            if file_id is None:
                continue
            file = self._engine.files.get(file_id)
            if file is None:
                continue
            for raw in file.content.splitlines():
                if raw.strip():
                    result = decode_result_line(raw)
                    seen.add(result.custom_id)
                    lines.append({"custom_id": result.custom_id, "result": _result(result)})
        failure = batch.errors.data[0].message if batch.errors and batch.errors.data else None
        for custom_id in ids:  # a batch that failed as a whole ran none of its requests
            if custom_id not in seen:
                message = failure or "The request was not processed."
                error = {"type": "error", "error": anthropic_error(400, message)["error"]}
                lines.append(
                    {"custom_id": custom_id, "result": {"type": "errored", "error": error}}
                )
        return lines

    # -- endpoints ----------------------------------------------------------------------

    async def _create(self, request: Request, now: float) -> dict[str, Any]:
        body = request.body
        try:
            data = json.loads(body) if isinstance(body, bytes) else None
        except ValueError:
            data = None
        requests = data.get("requests") if isinstance(data, dict) else None
        if not isinstance(requests, list) or not requests:
            raise _reply(400, "requests: Field required (a non-empty list)")
        if len(requests) > ANTHROPIC_MAX_REQUESTS:
            raise _reply(400, f"requests: at most {ANTHROPIC_MAX_REQUESTS:,} requests per batch")
        ids: list[str] = []
        lines: list[bytes] = []
        for index, item in enumerate(requests):
            custom_id = item.get("custom_id") if isinstance(item, dict) else None
            params = item.get("params") if isinstance(item, dict) else None
            if not isinstance(custom_id, str) or not _CUSTOM_ID.fullmatch(custom_id):
                raise _reply(
                    400,
                    f"requests.{index}.custom_id: String should match pattern "
                    "'^[a-zA-Z0-9_-]{1,64}$'",
                )
            if not isinstance(params, dict):
                raise _reply(400, f"requests.{index}.params: Field required")
            ids.append(custom_id)
            line = {"custom_id": custom_id, "method": "POST", "url": "/v1/messages"}
            lines.append(json.dumps({**line, "body": params}).encode())
        if len(set(ids)) != len(ids):
            raise _reply(400, "requests: custom_id values must be unique within a batch")
        engine = self._engine
        staged = engine.add_file(
            filename="inline-requests.jsonl",
            purpose="batch",
            content=b"\n".join(lines) + b"\n",
            now=now,
            expires_at=None,
        )
        record = engine.create_batch(
            endpoint="/v1/messages",
            input_file=staged,
            completion_window="24h",
            metadata=None,
            output_expiry_seconds=None,
            now=now,
        )
        engine.delete_file(staged)  # the record keeps its content; no file is visible
        self._custom_ids[record.id] = tuple(ids)
        return await self._wire(record, request, now)

    async def _list(self, params: Mapping[str, str], request: Request, now: float) -> Any:
        raw_limit = params.get("limit", "20")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000:
            raise _reply(400, "limit: Input should be between 1 and 1000")
        limit = int(raw_limit)
        engine = self._engine
        newest_first = [i for i in reversed(engine.batch_order) if i not in self._deleted]
        after, before = params.get("after_id"), params.get("before_id")
        if after is not None:
            engine_id = self._batch(after).id
            start = newest_first.index(engine_id) + 1
            chosen = newest_first[start : start + limit]
            has_more = start + limit < len(newest_first)
        elif before is not None:
            engine_id = self._batch(before).id
            end = newest_first.index(engine_id)
            chosen = newest_first[max(0, end - limit) : end]
            has_more = end - limit > 0
        else:
            chosen = newest_first[:limit]
            has_more = limit < len(newest_first)
        data = [await self._wire(engine.batches[i], request, now) for i in chosen]
        return {
            "data": data,
            "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }

    async def _delete(self, record: BatchRecord, now: float) -> dict[str, Any]:
        batch = await self._engine.snapshot(record, now)
        if batch.status not in TERMINAL:
            raise _reply(
                400,
                f"Message Batch {_PREFIX + record.id} cannot be deleted while it is "
                "processing; cancel it first.",
            )
        self._deleted.add(record.id)
        return {"id": _PREFIX + record.id, "type": "message_batch_deleted"}

    async def _results(self, record: BatchRecord, now: float) -> bytes:
        batch = await self._engine.snapshot(record, now)
        if batch.status not in TERMINAL:
            raise _reply(400, f"Message Batch {_PREFIX + record.id} has not ended; no results yet.")
        lines = self._result_lines(batch, self._custom_ids.get(record.id, ()))
        return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _result(line: ResultSuccess | ResultHTTPError | ResultError) -> dict[str, Any]:
    """The Anthropic ``result`` of one engine result line."""
    if isinstance(line, ResultSuccess):
        return {"type": "succeeded", "message": line.body}
    if isinstance(line, ResultHTTPError):
        body = line.response.body
        message = "The request failed."
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = str(body["error"].get("message", message))
        error = anthropic_error(line.status_code, message)
        return {"type": "errored", "error": error}
    if line.code == "batch_cancelled":
        return {"type": "canceled"}
    if line.code == "batch_expired":
        return {"type": "expired"}
    error = anthropic_error(500, line.error.message or "The request failed.")
    return {"type": "errored", "error": error}
