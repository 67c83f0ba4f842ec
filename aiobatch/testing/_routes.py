"""The fake's OpenAI-shaped endpoints: ``/files`` and ``/batches`` over the engine.

:class:`OpenAIRoutes` is what every dialect the fake speaks today (OpenAI, Portkey,
Azure) serves: upload, list, retrieve, delete and read files; create, list, retrieve
and cancel batches; Portkey's ``GET /batches/{id}/output`` when the dialect has it. The
service calls :meth:`OpenAIRoutes.route` once a request has passed the dialect's checks,
holding the engine's lock with the simulation moved to ``now``; a handler returns
JSON-ready data (rewritten by the dialect) or file bytes, or raises ``_Reply``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from .._convert import to_wire
from .._models import BatchErrors, BatchPage, BatchRequest, FileDeleted, FilePage
from ..transport import Multipart, Request
from ._checks import (
    _bad,
    _check_expiry,
    _check_metadata,
    _int_param,
    _json_object,
    _not_found,
    _Reply,
    _required_str,
)
from ._config import FakeConfig
from ._dialects import FakeDialect
from ._engine import BatchRecord, CancelRefused, Engine, FileRecord
from ._validate import ENDPOINTS, LEGACY_ENDPOINTS

__all__ = ["ONLINE_ENDPOINTS", "UPLOAD_PURPOSES", "OpenAIRoutes"]

#: The ordinary endpoints the fake answers online (``POST``), with the service's responder.
ONLINE_ENDPOINTS: frozenset[str] = frozenset(
    {
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/completions",
        "/v1/moderations",
    }
)

#: Purposes accepted by ``POST /v1/files``.
UPLOAD_PURPOSES: tuple[str, ...] = (
    "assistants",
    "batch",
    "fine-tune",
    "vision",
    "user_data",
    "evals",
)


class OpenAIRoutes:
    """The Files and Batches endpoints of the fake, on one engine, and the online
    endpoints of :data:`ONLINE_ENDPOINTS`, answered at once by the engine's responder.

    Args:
        engine: the simulation the endpoints read and change.
        config: the service's configuration (upload limits, file lifetimes).
        dialect: the provider the service plays (how files and batches are written,
            Azure's pending files, Portkey's output endpoint).
    """

    def __init__(self, engine: Engine, config: FakeConfig, dialect: FakeDialect) -> None:
        self._engine = engine
        self.config = config
        self.dialect = dialect
        self._online_count = 0

    async def route(
        self,
        method: str,
        parts: list[str],
        params: Mapping[str, str],
        request: Request,
        now: float,
    ) -> Any:
        """Run the handler for a path; returns JSON-ready data or file bytes."""
        head, count = parts[0], len(parts)
        online = "/v1/" + "/".join(parts)
        if method == "POST" and online in ONLINE_ENDPOINTS:
            return await self._online(online, request)
        if head == "files":
            if count == 1 and method == "POST":
                return self._upload(request, now)
            if count == 1 and method == "GET":
                return self._list_files(params, now)
            if count == 2 and method == "GET":
                return self._file_wire(self._file(parts[1], now), now)
            if count == 2 and method == "DELETE":
                file = self._file(parts[1], now)
                self._engine.delete_file(file)
                return to_wire(FileDeleted(id=file.id, deleted=True))
            if count == 3 and parts[2] == "content" and method == "GET":
                return self._file(parts[1], now).content
        elif head == "batches":
            if count == 1 and method == "POST":
                return await self._create_batch(request, now)
            if count == 1 and method == "GET":
                return await self._list_batches(params, now)
            if count == 2 and method == "GET":
                return await self._batch_wire(self._batch(parts[1]), now)
            if count == 3 and parts[2] == "cancel" and method == "POST":
                record = self._batch(parts[1])
                try:
                    await self._engine.cancel(record, now)
                except CancelRefused as refused:
                    raise _bad(
                        f"Cannot cancel batch {record.id}: it has already finished with "
                        f"status '{refused.status.value}'."
                    ) from None
                return await self._batch_wire(record, now)
            if (
                count == 3
                and parts[2] == "output"
                and method == "GET"
                and self.dialect.batch_output_endpoint
            ):
                return await self._batch_output(self._batch(parts[1]), now)
        raise _not_found(f"Invalid URL ({method} /v1/{'/'.join(parts)})")

    async def _online(self, url: str, request: Request) -> Any:
        """One online request, answered by the responder as a batch line would be."""
        self._online_count += 1
        line = BatchRequest(
            custom_id=f"online-{self._online_count}", url=url, body=_json_object(request)
        )
        result = self._engine.responder(line)
        if inspect.isawaitable(result):
            result = await result
        status, body = result
        if not 200 <= status < 300:
            raise _Reply(status, body)
        return body

    async def _batch_wire(self, record: BatchRecord, now: float) -> dict[str, Any]:
        """A batch's JSON now, as the dialect sends it."""
        return self.dialect.batch_wire(await self._engine.snapshot_wire(record, now))

    def _file_wire(self, record: FileRecord, now: float) -> dict[str, Any]:
        """A file's JSON now, as the dialect sends it (``pending`` at first on Azure)."""
        wire: dict[str, Any] = to_wire(record.model())
        return self.dialect.file_wire(wire, pending=self._pending(record, now))

    def _pending(self, record: FileRecord, now: float) -> bool:
        wait = self.dialect.file_pending_seconds
        return wait > 0 and record.purpose == "batch" and now < record.created_at + wait

    async def _batch_output(self, record: BatchRecord, now: float) -> Any:
        """Portkey's ``GET /batches/{id}/output``: the output file's content; the batch's
        ``errors`` as JSON when it has no output file but errors (as the gateway does);
        otherwise the provider's 404 for the missing file, wrapped by the gateway (it
        asks the provider for the content of a null file id)."""
        await self._engine.snapshot(record, now)
        if record.output_file_id is not None:
            output = self._engine.get_file(record.output_file_id, now)
            if output is not None:
                return output.content
        elif record.errors:
            return to_wire(BatchErrors(data=record.errors))
        # The gateway (TypeScript) puts the null id in the file URL as "null".
        raise _not_found(f"No such File object: {record.output_file_id or 'null'}", param="id")

    # -- files ------------------------------------------------------------------------------

    def _file(self, file_id: str, now: float) -> FileRecord:
        record = self._engine.get_file(file_id, now)
        if record is None:
            raise _not_found(f"No such File object: {file_id}", param="id")
        return record

    def _upload(self, request: Request, now: float) -> dict[str, Any]:
        body = request.body
        if not isinstance(body, Multipart):
            raise _bad("POST /v1/files needs a multipart/form-data body with 'file' and 'purpose'.")
        fields = dict(body.fields)
        purpose = fields.get("purpose")
        if purpose is None:
            raise _bad(
                "Missing required parameter: 'purpose'.",
                param="purpose",
                code="missing_required_parameter",
            )
        if purpose not in UPLOAD_PURPOSES:
            supported = ", ".join(repr(p) for p in UPLOAD_PURPOSES)
            raise _bad(
                f"Invalid value for 'purpose': {purpose!r}. Supported values are: {supported}.",
                param="purpose",
                code="invalid_value",
            )
        parts = [part for name, part in body.files if name == "file"]
        if not parts:
            raise _bad(
                "Missing required parameter: 'file'.",
                param="file",
                code="missing_required_parameter",
            )
        part = parts[0]
        config = self.config
        if purpose == "batch" and not part.filename.lower().endswith(".jsonl"):
            raise _bad("Invalid file format for Batch API. Must be .jsonl")
        size = part.size()
        limit = config.max_batch_file_bytes if purpose == "batch" else config.max_file_bytes
        if size > limit:
            what = "Batch API input files" if purpose == "batch" else "files"
            raise _bad(
                f"File is too large: {size:,} bytes. The maximum size of {what} is "
                f"{limit:,} bytes.",
                param="file",
                code="file_too_large",
            )
        anchor = fields.get("expires_after[anchor]")
        seconds = fields.get("expires_after[seconds]")
        if anchor is not None or seconds is not None:
            lifetime: int | None = _check_expiry(anchor, seconds, param="expires_after")
        elif purpose == "batch":
            lifetime = config.batch_file_expiry_seconds
        else:
            lifetime = None
        expires_at = int(now) + lifetime if lifetime is not None else None
        record = self._engine.add_file(
            filename=part.filename,
            purpose=purpose,
            content=part.read(),
            now=now,
            expires_at=expires_at,
        )
        return self._file_wire(record, now)

    def _list_files(self, params: Mapping[str, str], now: float) -> Any:
        limit = _int_param(params, "limit", 10_000, 1, 10_000)
        order = params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise _bad(
                f"Invalid value for 'order': {order!r}. Supported values are: 'asc', 'desc'.",
                param="order",
                code="invalid_value",
            )
        purpose = params.get("purpose")
        engine = self._engine
        ids = engine.file_order
        after = params.get("after")
        if after is not None:
            if after not in engine.file_index:
                raise _bad(f"Invalid 'after': no file with id {after!r}.", param="after")
            cursor = engine.file_index[after]
            indices = range(cursor + 1, len(ids)) if order == "asc" else range(cursor - 1, -1, -1)
        else:
            indices = range(len(ids)) if order == "asc" else range(len(ids) - 1, -1, -1)
        page: list[FileRecord] = []
        has_more = False
        for index in indices:
            record = engine.get_file(ids[index], now)
            if record is None or (purpose is not None and record.purpose != purpose):
                continue
            if len(page) == limit:
                has_more = True
                break
            page.append(record)
        wire = to_wire(
            FilePage(
                data=(),
                has_more=has_more,
                first_id=page[0].id if page else None,
                last_id=page[-1].id if page else None,
            )
        )
        wire["data"] = [self._file_wire(record, now) for record in page]
        return wire

    # -- batches ----------------------------------------------------------------------------

    def _batch(self, batch_id: str) -> BatchRecord:
        record = self._engine.batches.get(batch_id)
        if record is None:
            raise _not_found(f"No batch found with id '{batch_id}'.", code="batch_not_found")
        return record

    async def _create_batch(self, request: Request, now: float) -> dict[str, Any]:
        data = _json_object(request)
        input_file_id = _required_str(data, "input_file_id")
        endpoint = _required_str(data, "endpoint")
        legacy = self.dialect.legacy_endpoints and endpoint in LEGACY_ENDPOINTS
        if endpoint not in ENDPOINTS and not legacy:
            supported = ", ".join(repr(e) for e in ENDPOINTS)
            raise _bad(
                f"Invalid value: {endpoint!r}. Supported values are: {supported}.",
                param="endpoint",
                code="invalid_value",
            )
        window = _required_str(data, "completion_window")
        if not self.dialect.accepts_window(window):
            supported = (
                "'24h'"
                if self.dialect.max_completion_window_hours <= 24
                else f"durations from '24h' to {self.dialect.max_completion_window_hours}h"
            )
            raise _bad(
                f"Invalid value: {window!r}. Supported values are: {supported}.",
                param="completion_window",
                code="invalid_value",
            )
        metadata = _check_metadata(data.get("metadata"))
        output_expiry: int | None = None
        raw_expiry = data.get("output_expires_after")
        if raw_expiry is not None:
            if not isinstance(raw_expiry, dict):
                raise _bad(
                    "Invalid type for 'output_expires_after': expected an object.",
                    param="output_expires_after",
                    code="invalid_type",
                )
            output_expiry = _check_expiry(
                raw_expiry.get("anchor"), raw_expiry.get("seconds"), param="output_expires_after"
            )
        input_file = self._engine.get_file(input_file_id, now)
        if input_file is None:
            raise _not_found(f"No such File object: {input_file_id}", param="input_file_id")
        if input_file.purpose != "batch":
            raise _bad(
                f"The input file {input_file_id} has purpose {input_file.purpose!r}; a batch "
                "needs a file uploaded with purpose 'batch'.",
                param="input_file_id",
            )
        if self._pending(input_file, now):
            # Azure's wording for this is not documented; the status code and the
            # parameter are what a client can rely on.
            raise _bad(
                f"The input file {input_file_id} is not ready: its status is 'pending'. "
                "Wait until it is 'processed' before creating a batch.",
                param="input_file_id",
            )
        record = self._engine.create_batch(
            endpoint=endpoint,
            input_file=input_file,
            completion_window=window,
            metadata=metadata,
            output_expiry_seconds=output_expiry,
            now=now,
        )
        return await self._batch_wire(record, now)

    async def _list_batches(self, params: Mapping[str, str], now: float) -> Any:
        limit = _int_param(params, "limit", 20, 1, 100)
        engine = self._engine
        after = params.get("after")
        if after is not None:
            if after not in engine.batch_index:
                raise _bad(f"Invalid 'after': no batch with id {after!r}.", param="after")
            start = engine.batch_index[after] - 1
        else:
            start = len(engine.batch_order) - 1
        stop = max(-1, start - limit)
        records = [engine.batches[engine.batch_order[i]] for i in range(start, stop, -1)]
        data = [await self._batch_wire(record, now) for record in records]
        # The envelope comes from the converter; the items are the cached wire forms.
        page = to_wire(
            BatchPage(
                data=(),
                has_more=stop >= 0,
                first_id=records[0].id if records else None,
                last_id=records[-1].id if records else None,
            )
        )
        page["data"] = data
        return page
