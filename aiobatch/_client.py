"""BatchClient: typed calls for the Files and Batch APIs.

The client builds requests (the provider says where and with which headers), sends them
through the retry policy and the transport, and turns answers into models with the
converter; error statuses become the :mod:`aiobatch.errors` tree. It parses and builds
no wire format itself: every body goes through :mod:`aiobatch._convert`.

Safe creates
------------
Creating a batch is never blindly re-sent. Each logical create carries a key in its
metadata (``aiobatch_create_key``). After an *ambiguous* failure (a timeout, a
connection lost after sending, a 5xx, a 2xx whose body cannot be read: the server may
have made the batch) the client

1. waits for the server to settle: at least the backoff delay, and at least
   ``create_settle`` seconds after a failure the server may still be working on (a
   timeout, a lost connection, a 502/504), since a server keeps running its handler
   after the client has gone and may commit the batch late;
2. looks the key up in the batch list, newest first. The walk has three outcomes:

   * *found*: the batch is returned and nothing is sent again;
   * *proved absent*: the walk went down, in non-increasing ``created_at`` order, past a
     lower bound on the batch's possible ``created_at`` in *server time* (the list
     response's ``date`` header, minus the time measured since the first send, minus a
     margin), or to the end of the list, or down to the newest batch an earlier lookup
     of the same create had already proved clear. Only then is the create sent again,
     with the same key;
   * *unknown* (the page limit was reached, the server does not list newest first, no
     ``date`` header to bound the walk): nothing is sent again and
     :class:`~aiobatch.errors.AmbiguousCreateError` is raised with the key.

Every failure after an ambiguous attempt (the lookup failing, attempts running out)
raises :class:`~aiobatch.errors.AmbiguousCreateError` carrying ``create_key``, chained
to its cause. When a create succeeds after an ambiguous attempt, the key is looked up
once more: if the server committed an earlier attempt late, every batch with the key
but the earliest created is cancelled (free while ``validating``) with a WARNING, and
the earliest is returned. A server that does not echo ``metadata`` makes lookups
impossible: the client notices on the first create, logs a WARNING once, and from then
on raises :class:`~aiobatch.errors.AmbiguousCreateError` instead of re-sending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import types
import uuid
from collections.abc import AsyncGenerator, Iterable, Mapping
from typing import Any, Literal, NoReturn, TypeVar
from urllib.parse import quote

import attrs

from ._clock import Clock, SystemClock
from ._convert import (
    decode,
    decode_json,
    decode_result_line,
    encode_create_batch,
    parse_error_body,
    upload_form_fields,
)
from ._lifecycle import BatchLifecycle, BatchStatus
from ._models import Batch, BatchPage, File, FileDeleted, FilePage, ResultLine
from ._provider import OpenAIProvider, Secret, _Headers
from ._retry import (
    RETRYABLE_STATUSES,
    RetryPolicy,
    RetryState,
    is_ambiguous,
    may_commit_late,
    parse_http_date,
    parse_retry_after,
    poll_intervals,
)
from .errors import (
    AiobatchError,
    AmbiguousCreateError,
    APIStatusError,
    ClosedError,
    DecodeError,
    LookupIncompleteError,
    RateLimitError,
    TransportError,
    UnknownStatusError,
    WaitTimeoutError,
    status_error_class,
)
from .transport._base import FilePart, Multipart, Request, Response, Transport

__all__ = ["CREATE_KEY_METADATA", "DEFAULT_CREATE_SETTLE", "BatchClient"]

T = TypeVar("T")

logger = logging.getLogger("aiobatch")

#: The metadata key that tags each logical create with a client-made key.
CREATE_KEY_METADATA = "aiobatch_create_key"

#: Seconds to wait, after a create the server may still be working on, before looking
#: its key up (see :class:`BatchClient`).
DEFAULT_CREATE_SETTLE = 10.0

#: OpenAI's metadata limit: pairs.
_METADATA_MAX_PAIRS = 16

#: The most list pages one key lookup reads, and the batches per page.
_LOOKUP_MAX_PAGES = 20
_LOOKUP_PAGE_SIZE = 100
#: Seconds taken off the server-time lower bound of a create's ``created_at``: the
#: ``date`` header and ``created_at`` may come from different hosts, whose clocks may
#: disagree a little (``created_at`` is also truncated to whole seconds).
_LOOKUP_MARGIN = 30.0

#: How much of a wait's timeout is kept for its last poll (at most _FINAL_POLL_MAX s).
_FINAL_POLL_SHARE = 0.1
_FINAL_POLL_MAX = 10.0

_NO_PARAMS: Mapping[str, str] = types.MappingProxyType({})


def _quote(object_id: str) -> str:
    if not object_id:
        raise ValueError("an object id must be a non-empty string")
    return quote(object_id, safe="%:@")


def _carries(batch: Batch, key: str) -> bool:
    return bool(batch.metadata) and batch.metadata.get(CREATE_KEY_METADATA) == key  # type: ignore[union-attr]


def _earliest(batches: Iterable[Batch]) -> Batch:
    """The earliest created batch; on a tie the one listed last (lists are newest first)."""
    return min(reversed(list(batches)), key=lambda b: b.created_at)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _redact_error(error: DecodeError, secret: Secret) -> DecodeError:
    """Mask the secret in a decode error's texts, and cut what could still hold it."""
    error.what = secret.redact(error.what)
    error.detail = secret.redact(error.detail)
    if error.path is not None:
        error.path = secret.redact(error.path)
    if isinstance(error, UnknownStatusError) and isinstance(error.value, str):
        error.value = secret.redact(error.value)
    error.args = tuple(secret.redact(a) if isinstance(a, str) else a for a in error.args)
    # The chained exceptions and the frames below hold the raw body: drop them.
    error.__cause__ = None
    error.__context__ = None
    error.__suppress_context__ = True
    return error.with_traceback(None)


@attrs.frozen
class _Scan:
    """What one walk of the batch list found."""

    outcome: Literal["found", "absent", "unknown"]
    #: Every batch carrying the key that the walk saw, in list order.
    matches: tuple[Batch, ...]
    #: The first batch of a walk that was newest first (a later walk may stop there).
    newest_id: str | None
    #: How the walk ended.
    reason: str


class _Create:
    """The state of one logical create."""

    __slots__ = ("ambiguous", "cause", "key", "lost", "sent", "state", "stop_at")

    def __init__(self, key: str | None, state: RetryState) -> None:
        self.key = key
        self.state = state
        #: Whether an attempt may have made the batch.
        self.ambiguous = False
        #: The last failure that made the create ambiguous, and what it means.
        self.cause: BaseException | None = None
        self.lost = ""
        #: Attempts sent so far (two or more can make twins).
        self.sent = 0
        #: The newest batch of the last walk that proved the key absent: everything
        #: from there down has been checked, so the next walk may stop there.
        self.stop_at: str | None = None


class BatchClient:
    """An async client for the Files and Batch APIs of one provider.

    Use it as an async context manager (or call :meth:`aclose`)::

        async with BatchClient(api_key=...) as client:
            f = await client.upload_file("requests.jsonl")
            batch = await client.create_batch(f.id, "/v1/chat/completions")
            batch = await client.wait(batch.id)

    Args:
        api_key: the API key; default ``$OPENAI_API_KEY``. Never shown in any repr,
            log or error.
        base_url: the API root; default ``$OPENAI_BASE_URL`` or OpenAI's.
        organization: the ``OpenAI-Organization`` header.
        project: the ``OpenAI-Project`` header.
        provider: a ready provider instead of the four arguments above.
        transport: how requests travel; default a new
            :class:`~aiobatch.transport.AiohttpTransport`, closed with the client.
            A transport passed in stays open (it may be shared).
        retry: the retry policy; default :class:`~aiobatch.RetryPolicy()`. Its
            ``timeout`` bounds each logical call, attempts and waits included: every
            attempt's timeout is cut to what is left of it.
        clock: the time source for retries, waits and deadlines.
        timeout: seconds per control request (create, retrieve, list...; for a streamed
            download, per wait for data); uploads use the transport's default. None
            leaves every request to the transport's default.
        create_settle: seconds to wait, after a create that timed out or lost its
            connection (the server may still be working on it), before looking its key
            up; see :meth:`create_batch`. Zero in the retry testing mode, like every
            retry wait (test late commits with a policy that is not in testing mode).
    """

    def __init__(
        self,
        *,
        api_key: str | Secret | None = None,
        base_url: str | None = None,
        organization: str | None = None,
        project: str | None = None,
        provider: OpenAIProvider | None = None,
        transport: Transport | None = None,
        retry: RetryPolicy | None = None,
        clock: Clock | None = None,
        timeout: float | None = 120.0,
        create_settle: float = DEFAULT_CREATE_SETTLE,
    ) -> None:
        if provider is None:
            provider = OpenAIProvider.from_env(
                api_key=api_key, base_url=base_url, organization=organization, project=project
            )
        elif api_key is not None or base_url is not None or organization or project:
            raise TypeError("pass either provider or api_key/base_url/organization/project")
        if not create_settle >= 0:
            raise ValueError(f"create_settle must be >= 0, got {create_settle!r}")
        self._provider = provider
        self._owns_transport = transport is None
        if transport is None:
            from .transport._aiohttp import AiohttpTransport

            transport = AiohttpTransport()
        self._transport: Transport = transport
        self._retry = retry if retry is not None else RetryPolicy()
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._timeout = timeout
        self._create_settle = float(create_settle)
        self._closed = False
        # Whether the server keeps batch metadata (None: not seen yet). When it does
        # not, a create whose answer is lost can never be looked up.
        self._echoes_metadata: bool | None = None
        headers = _Headers(provider.headers())
        self._headers: Mapping[str, str] = headers
        self._json_headers: Mapping[str, str] = _Headers(
            {**headers, "content-type": "application/json"}
        )

    # --- plumbing --------------------------------------------------------------------------

    @property
    def provider(self) -> OpenAIProvider:
        """The provider requests go to."""
        return self._provider

    @property
    def retry_policy(self) -> RetryPolicy:
        """The retry policy in force."""
        return self._retry

    @property
    def clock(self) -> Clock:
        """The client's clock."""
        return self._clock

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called; every call then raises ClosedError."""
        return self._closed

    async def aclose(self) -> None:
        """Close the client, and the transport if the client created it. Safe to call twice.

        Every later call raises :class:`~aiobatch.errors.ClosedError` without sending.
        """
        self._closed = True
        if self._owns_transport:
            await self._transport.aclose()

    async def __aenter__(self) -> BatchClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"BatchClient(base_url={self._provider.base_url!r}, transport={self._transport!r})"

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the client is closed; make a new BatchClient")

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] = _NO_PARAMS,
        body: bytes | Multipart | None = None,
        timeout: float | None = None,
    ) -> Request:
        headers = self._json_headers if isinstance(body, bytes) else self._headers
        return Request(method, self._provider.url(path), params, headers, body, timeout)

    async def _send(
        self,
        request: Request,
        *,
        stream: bool = False,
        deadline: float | None = None,
        state: RetryState | None = None,
    ) -> Response:
        self._check_open()
        response = await self._retry.send(
            self._transport,
            request,
            clock=self._clock,
            stream=stream,
            deadline=deadline,
            state=state,
        )
        if response.status >= 400:
            await self._raise_for_status(response, request)
        return response

    async def _fetch(
        self,
        cls: type[T],
        method: str,
        path: str,
        *,
        params: Mapping[str, str] = _NO_PARAMS,
        deadline: float | None = None,
    ) -> tuple[T, Response]:
        request = Request(
            method, self._provider.url(path), params, self._headers, None, self._timeout
        )
        response = await self._send(request, deadline=deadline)
        return self._decode(await response.read(), cls), response

    async def _call(
        self,
        cls: type[T],
        method: str,
        path: str,
        *,
        params: Mapping[str, str] = _NO_PARAMS,
        deadline: float | None = None,
    ) -> T:
        value, _ = await self._fetch(cls, method, path, params=params, deadline=deadline)
        return value

    def _decode(self, raw: bytes, cls: type[T], *, what: str | None = None) -> T:
        """Decode a success body; a decode error never shows an echoed API key."""
        try:
            return decode(raw, cls, what=what)
        except DecodeError as exc:
            error = self._scrubbed(exc, raw)
            if error is exc:
                raise
        del raw
        raise error

    def _scrubbed(self, error: DecodeError, raw: bytes | str) -> DecodeError:
        """``error`` itself, or (when the body held the API key) a redacted copy of it."""
        secret = self._provider.api_key
        if secret is None or secret.redact(raw) is raw:
            return error
        return _redact_error(error, secret)

    async def _status_error(self, response: Response, request: Request) -> APIStatusError:
        """The :class:`APIStatusError` for an error response (the API key masked)."""
        raw = await response.read()
        if self._provider.api_key is not None:
            raw = self._provider.api_key.redact(raw)
        status = response.status
        body: Any
        try:
            body = decode_json(raw, what="error body") if raw else None
        except DecodeError:
            body = raw[:2000].decode("utf-8", "replace")
        envelope = parse_error_body(body)
        if envelope is not None:
            message = envelope.message
        elif isinstance(body, str) and body.strip():
            message = body.strip()[:200]
        else:
            message = f"HTTP {status} with no error message"
        fields: dict[str, Any] = {
            "status_code": status,
            "request_id": response.headers.get("x-request-id"),
            "body": body,
            "error_type": envelope.type if envelope else None,
            "error_code": envelope.code if envelope else None,
            "error_param": envelope.param if envelope else None,
            "method": request.method,
            "url": request.url,
        }
        cls = status_error_class(status)
        if cls is RateLimitError:
            fields["retry_after"] = parse_retry_after(response.headers, now=self._clock.now())
        return cls(message, **fields)

    async def _raise_for_status(self, response: Response, request: Request) -> NoReturn:
        """Turn an error response into the matching :class:`APIStatusError`."""
        raise await self._status_error(response, request)

    # --- files -----------------------------------------------------------------------------

    async def upload_file(
        self,
        file: str | os.PathLike[str] | bytes,
        *,
        purpose: str = "batch",
        filename: str | None = None,
        expires_after_seconds: int | None = None,
    ) -> File:
        """Upload a file (``POST /files``). A path is streamed, never read whole.

        An upload is retried like any call. Uploads cannot be looked up reliably (file
        names need not be unique), so when an attempt's answer was lost and a retry
        then succeeded, the server may hold an extra copy: a WARNING names the file
        kept, and the extra copy (same name, same size) can be deleted by hand. It is
        never used by a batch, and costs only storage.

        Args:
            file: a path, or the content itself.
            purpose: the file's purpose (``batch`` for batch input).
            filename: the name the server records; default the path's base name, or
                ``input.jsonl`` for bytes.
            expires_after_seconds: delete the file this long after its creation.

        Returns:
            The stored file.
        """
        if isinstance(file, bytes | bytearray | memoryview):
            part = FilePart(filename=filename or "input.jsonl", content=bytes(file))
        else:
            path = os.fspath(file)
            part = FilePart(filename=filename or os.path.basename(path), path=path)
        fields = upload_form_fields(purpose, expires_after_seconds)
        request = self._request(
            "POST", "/files", body=Multipart(fields=fields, files=(("file", part),))
        )
        state = RetryState(self._retry, self._clock, request.method, request.url)
        response = await self._send(request, state=state)
        uploaded = self._decode(await response.read(), File)
        if state.ambiguous:
            logger.warning(
                "upload of %r succeeded as %s after an attempt whose answer was lost; the "
                "server may also hold an extra copy of it (same name and size), which "
                "can be deleted",
                uploaded.filename,
                uploaded.id,
            )
        return uploaded

    async def retrieve_file(self, file_id: str) -> File:
        """Get one file's metadata (``GET /files/{id}``)."""
        return await self._call(File, "GET", f"/files/{_quote(file_id)}")

    async def delete_file(self, file_id: str) -> FileDeleted:
        """Delete a file (``DELETE /files/{id}``).

        When an attempt's answer was lost and the retry finds the file gone (404), the
        first attempt did the work: the file is reported deleted.
        """
        request = self._request("DELETE", f"/files/{_quote(file_id)}", timeout=self._timeout)
        self._check_open()
        state = RetryState(self._retry, self._clock, request.method, request.url)
        response = await self._retry.send(self._transport, request, clock=self._clock, state=state)
        if response.status == 404 and state.ambiguous:
            await response.aclose()
            logger.info(
                "file %s: 404 after a delete whose answer was lost; that delete did it",
                file_id,
            )
            return FileDeleted(id=file_id, deleted=True)
        if response.status >= 400:
            await self._raise_for_status(response, request)
        return self._decode(await response.read(), FileDeleted)

    async def list_files_page(
        self,
        *,
        purpose: str | None = None,
        order: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> FilePage:
        """One page of ``GET /files``.

        Args:
            purpose: only files with this purpose.
            order: ``asc`` or ``desc`` by creation time (server default ``desc``).
            after: the id of the last file of the previous page.
            limit: files per page (server default 10,000).
        """
        params: dict[str, str] = {}
        if purpose is not None:
            params["purpose"] = purpose
        if order is not None:
            params["order"] = order
        if after is not None:
            params["after"] = after
        if limit is not None:
            params["limit"] = str(limit)
        return await self._call(FilePage, "GET", "/files", params=params)

    async def list_files(
        self,
        *,
        purpose: str | None = None,
        order: str | None = None,
        page_size: int | None = None,
    ) -> AsyncGenerator[File, None]:
        """Every file, over all pages (next page ``after`` the last item's id)."""
        after: str | None = None
        while True:
            page = await self.list_files_page(
                purpose=purpose, order=order, after=after, limit=page_size
            )
            for item in page.data:
                yield item
            if not page.has_more or not page.data:
                return
            after = page.data[-1].id

    async def file_content(self, file_id: str) -> bytes:
        """A file's whole content (``GET /files/{id}/content``); for small files."""
        request = self._request("GET", f"/files/{_quote(file_id)}/content", timeout=self._timeout)
        response = await self._send(request)
        return await response.read()

    async def _open_content(self, file_id: str) -> Response:
        request = self._request("GET", f"/files/{_quote(file_id)}/content", timeout=self._timeout)
        return await self._send(request, stream=True)

    async def iter_file_lines(self, file_id: str) -> AsyncGenerator[bytes, None]:
        """A file's lines as they arrive, without their line ends, in constant memory.

        A last line without a newline is yielded too. Stopping early (closing the
        iterator, e.g. with :func:`contextlib.aclosing`) closes the response. Each byte
        is looked at a bounded number of times, however long a line is and however the
        chunks cut it.
        """
        response = await self._open_content(file_id)
        try:
            pending: list[bytes] = []  # the start of a line cut by chunk boundaries
            async for chunk in response.iter_chunks():
                lines = chunk.split(b"\n")
                if len(lines) == 1:
                    pending.append(chunk)
                    continue
                if pending:
                    pending.append(lines[0])
                    lines[0] = b"".join(pending)
                    pending.clear()
                tail = lines.pop()
                if tail:
                    pending.append(tail)
                for line in lines:
                    yield line[:-1] if line.endswith(b"\r") else line
            if pending:
                last = b"".join(pending)
                pending.clear()
                if last:
                    yield last[:-1] if last.endswith(b"\r") else last
        finally:
            await response.aclose()

    async def iter_results(self, file_id: str) -> AsyncGenerator[ResultLine, None]:
        """The decoded lines of a batch output or error file, streamed; blank lines skipped.

        Raises:
            DecodeError: a line does not decode; the message names the file and the
                1-based line number.
        """
        number = 0
        async with contextlib.aclosing(self.iter_file_lines(file_id)) as lines:
            async for line in lines:
                number += 1
                if not line.strip():
                    continue
                try:
                    result = decode_result_line(line, what=f"line {number} of file {file_id}")
                except DecodeError as exc:
                    error = self._scrubbed(exc, line)
                    if error is exc:
                        raise
                    del line
                    raise error from None
                yield result

    async def download_file(self, file_id: str, path: str | os.PathLike[str]) -> int:
        """Stream a file's content to ``path``, atomically.

        The bytes go to a temporary file beside ``path`` (created with mode 0600) that
        replaces ``path`` only once complete, so ``path`` never holds a partial file.

        Returns:
            The number of bytes written.
        """
        target = os.fspath(path)
        directory = os.path.dirname(target) or os.curdir
        fd, temp = tempfile.mkstemp(prefix=".aiobatch-", suffix=".part", dir=directory)
        written = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                response = await self._open_content(file_id)
                try:
                    async for chunk in response.iter_chunks():
                        fh.write(chunk)
                        written += len(chunk)
                finally:
                    await response.aclose()
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return written

    # --- batches ---------------------------------------------------------------------------

    async def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        *,
        completion_window: str = "24h",
        metadata: Mapping[str, str] | None = None,
        output_expires_after_seconds: int | None = None,
    ) -> Batch:
        """Create a batch (``POST /batches``); one call makes at most one batch.

        The call adds ``aiobatch_create_key`` to the metadata (or uses the one the
        caller put there). After a failure that may have created the batch it waits for
        the server to settle and looks the key up (see the module notes); it sends
        again only when the lookup *proved* that no batch carries the key, and raises
        :class:`~aiobatch.errors.AmbiguousCreateError` when it could not tell. When the
        metadata already has 16 pairs no key fits: then an ambiguous failure is raised
        at once, never re-sent.

        A caller-supplied key is looked up only after an ambiguous failure *within this
        call*: calling ``create_batch`` twice with the same key makes two batches. To
        resume after a crash (the key recorded in a journal before the call), call
        :meth:`find_created_batch` with the key first, and create only when it returns
        None.

        Args:
            input_file_id: the uploaded input file (purpose ``batch``).
            endpoint: the endpoint of every line, e.g. ``/v1/chat/completions``.
            completion_window: ``24h``.
            metadata: up to 16 string pairs.
            output_expires_after_seconds: expire the output files this long after
                their creation (3600 to 2592000).

        Raises:
            APIStatusError: the server refused (after the retries the policy allows),
                and no attempt may have made a batch.
            TransportError: the network failed before any attempt could reach the server.
            AmbiguousCreateError: an attempt may have made a batch, and it could not be
                found nor proved absent; ``create_key`` says what to look up later.
            ClosedError: the client is closed.
        """
        meta = dict(metadata) if metadata else {}
        key = meta.get(CREATE_KEY_METADATA)
        if key is None and len(meta) < _METADATA_MAX_PAIRS:
            key = meta[CREATE_KEY_METADATA] = uuid.uuid4().hex
        body = encode_create_batch(
            input_file_id,
            endpoint,
            completion_window=completion_window,
            metadata=meta or None,
            output_expires_after_seconds=output_expires_after_seconds,
        )
        request = self._request("POST", "/batches", body=body, timeout=self._timeout)
        self._check_open()
        create = _Create(key, RetryState(self._retry, self._clock, request.method, request.url))
        try:
            return await self._create(request, create)
        except AmbiguousCreateError:
            raise
        except Exception as exc:
            if not create.ambiguous:
                raise
            raise self._ambiguous(create, f"then {_describe(exc)}") from exc
        except asyncio.CancelledError:
            if create.ambiguous:
                logger.warning(
                    "a create was cancelled after an attempt whose answer was lost; a batch "
                    "may exist: look up create key %s with find_created_batch()",
                    key,
                )
            raise

    def _ambiguous(self, create: _Create, why: str) -> AmbiguousCreateError:
        lost = create.lost or "an attempt's answer was lost"
        if create.key is None:
            advice = (
                "the metadata had no room for an aiobatch_create_key, so it cannot be "
                "looked up: check your batch list before creating again"
            )
        else:
            advice = (
                f"look the key up later with find_created_batch({create.key!r}) before "
                "creating again"
            )
        return AmbiguousCreateError(
            f"a create may have made a batch: {lost}, {why}. It was never sent again "
            f"without proof that no batch carried its key; {advice}",
            create_key=create.key,
        )

    async def _create(self, request: Request, create: _Create) -> Batch:
        """The create loop: send, and after an ambiguous failure settle, look, re-send."""
        state = create.state
        clock = self._clock
        while True:
            self._check_open()
            error: TransportError | None = None
            response: Response | None = None
            create.sent += 1
            try:
                response = await self._transport.send(state.bound(request))
            except TransportError as exc:
                error = exc
            else:
                if response.status < 400:
                    return await self._created(response, create)
            status = response.status if response is not None else None
            decision = state.next_delay(error=error, response=response)
            cause: AiobatchError
            if error is not None:
                cause = error
            else:
                assert response is not None
                cause = await self._status_error(response, request)
            if not is_ambiguous(error, status):
                if decision is not None:
                    await state.wait(*decision)
                    continue
                if create.ambiguous:  # an earlier attempt may still have made it
                    found = await self._look_up(create)
                    if found is not None:
                        return found
                    raise self._ambiguous(create, f"then {_describe(cause)}") from cause
                raise cause
            create.ambiguous = True
            create.cause = cause
            create.lost = f"an attempt's answer was lost ({_describe(cause)})"
            if create.key is None:
                raise self._ambiguous(create, "and there is no key to look it up by") from cause
            if self._echoes_metadata is False:
                raise self._ambiguous(
                    create,
                    "and this server does not keep batch metadata, so the key cannot be found",
                ) from cause
            late = may_commit_late(error, status) and not state.testing
            settle = self._create_settle if late else 0.0
            left = state.remaining()
            if decision is not None:
                delay = max(decision[0], settle)
                if left is not None and delay >= left:
                    decision = None  # no time left for another attempt after the wait
                else:
                    await state.wait(delay, decision[1])
            if decision is None:
                if left is not None:
                    if left <= 0:
                        raise self._ambiguous(
                            create, "and no time was left to look it up"
                        ) from cause
                    settle = min(settle, left / 2)
                if settle > 0:
                    await clock.sleep(settle)
            found = await self._look_up(create)
            if found is not None:
                return found
            if decision is None:
                raise self._ambiguous(
                    create, "no batch carried its key yet, and no attempt or time was left"
                ) from cause

    async def _created(self, response: Response, create: _Create) -> Batch:
        """A 2xx create: decode it (or, if unreadable, find it); check for a late twin."""
        try:
            batch = self._decode(await response.read(), Batch)
        except Exception as exc:  # any failure: the server said 2xx, so a batch exists
            create.ambiguous = True
            create.cause = exc
            create.lost = (
                f"the server answered {response.status}, so a batch exists, but its body "
                f"could not be read ({_describe(exc)})"
            )
            if create.key is None:
                raise self._ambiguous(create, "and there is no key to look it up by") from exc
            if self._echoes_metadata is False:
                raise self._ambiguous(
                    create, "and this server does not keep batch metadata"
                ) from exc
            found = await self._look_up(create)
            if found is None:
                raise self._ambiguous(create, "yet no listed batch carries its key") from exc
            return found
        key = create.key
        if key is None:
            return batch
        if not _carries(batch, key):
            self._no_metadata()
            return batch
        self._echoes_metadata = True
        if not create.ambiguous:
            return batch
        # An earlier attempt may have been committed after its lookup: look once more.
        try:
            scan = await self._scan(
                key,
                first_send=create.state.started,
                stop_at=create.stop_at,
                deadline=create.state.deadline,
            )
        except AiobatchError as exc:
            logger.warning(
                "create key %s: batch %s was made after an attempt whose answer was lost, and "
                "checking for a second batch from that attempt failed (%s); look the key up "
                "with find_created_batch() to be sure",
                key,
                batch.id,
                type(exc).__name__,
            )
            return batch
        if scan.outcome == "unknown":
            logger.warning(
                "create key %s: batch %s was made after an attempt whose answer was lost, and "
                "the check for a second batch was inconclusive (%s)",
                key,
                batch.id,
                scan.reason,
            )
        return await self._keep_one(key, scan.matches, batch)

    def _no_metadata(self) -> None:
        if self._echoes_metadata is not False:
            logger.warning(
                "the server at %s did not return the metadata of a created batch, so a "
                "create whose answer is lost cannot be looked up: such a create will raise "
                "AmbiguousCreateError instead of being sent again",
                self._provider.base_url,
            )
        self._echoes_metadata = False

    async def _look_up(self, create: _Create) -> Batch | None:
        """Look the create's key up: the batch, None when proved absent; else raise."""
        assert create.key is not None
        scan = await self._scan(
            create.key,
            first_send=create.state.started,
            stop_at=create.stop_at,
            deadline=create.state.deadline,
            twins=create.sent > 1,  # one attempt cannot have made two batches
        )
        if scan.outcome == "unknown":
            raise self._ambiguous(
                create, f"and the lookup could not prove it absent ({scan.reason})"
            ) from create.cause
        if scan.outcome == "absent":
            create.stop_at = scan.newest_id
            return None
        return await self._keep_one(create.key, scan.matches)

    async def _keep_one(
        self, key: str, matches: Iterable[Batch], made: Batch | None = None
    ) -> Batch:
        """Keep the earliest batch carrying the key; cancel the others (late commits)."""
        batches = list(matches)
        if made is not None and all(b.id != made.id for b in batches):
            batches.append(made)
        if len(batches) == 1:
            return batches[0]
        kept = _earliest(batches)
        extras = [b for b in batches if b.id != kept.id]
        logger.warning(
            "create key %s: the server made %d batches for one create (it finished an "
            "attempt after the client had given up on it); keeping %s, the earliest, and "
            "cancelling %s",
            key,
            len(batches),
            kept.id,
            ", ".join(b.id for b in extras),
        )
        for extra in extras:
            if extra.is_terminal or extra.status is BatchStatus.CANCELLING:
                continue
            try:
                await self.cancel_batch(extra.id)
            except AiobatchError as exc:
                logger.warning(
                    "could not cancel batch %s, a second batch for create key %s (%s): "
                    "cancel it by hand",
                    extra.id,
                    key,
                    type(exc).__name__,
                )
        return kept

    async def _scan(
        self,
        key: str,
        *,
        since: float | None = None,
        first_send: float | None = None,
        stop_at: str | None = None,
        deadline: float | None = None,
        max_pages: int = _LOOKUP_MAX_PAGES,
        twins: bool = True,
    ) -> _Scan:
        """Walk the batch list newest first, collecting the batches that carry ``key``.

        The walk stops (and can prove the key absent) at the end of the list, at
        ``stop_at`` (a batch an earlier walk started from, everything below it checked)
        or at the end of a page holding a batch older than a lower bound on the key's
        ``created_at``: ``since``, or the server's ``date`` minus the time since
        ``first_send`` (``clock.monotonic()`` before the first create was sent) minus a
        margin. Stopping early needs the list to be newest first, which is checked on
        every batch and must be shown (some batch older than the one before it), not
        assumed: a list that is oldest first starts with old batches too. With
        ``twins`` a match does not end the walk: other batches carrying the key are
        looked for down to the same stopping points.
        """
        clock = self._clock
        matches: list[Batch] = []
        newest_id: str | None = None
        newest_first = True  # no batch so far was newer than the one before it
        descended = False  # and at least one was older: the order is shown, not assumed
        previous: int | None = None
        bound = since
        after: str | None = None

        def done(reason: str, *, ordered: bool | None = None) -> _Scan:
            if ordered is None:
                ordered = newest_first and descended
            return _Scan(
                "found" if matches else "absent",
                tuple(matches),
                newest_id if ordered else None,
                reason,
            )

        for _ in range(max_pages):
            params = {"limit": str(_LOOKUP_PAGE_SIZE)}
            if after is not None:
                params["after"] = after
            page, response = await self._fetch(
                BatchPage, "GET", "/batches", params=params, deadline=deadline
            )
            if first_send is not None:
                server_now = parse_http_date(response.headers.get("date"))
                if server_now is not None:
                    elapsed = clock.monotonic() - first_send
                    floor = server_now - elapsed - _LOOKUP_MARGIN
                    bound = floor if bound is None else max(bound, floor)
            passed = False
            for batch in page.data:
                if newest_id is None:
                    newest_id = batch.id
                if previous is not None:
                    if batch.created_at > previous:
                        newest_first = False
                    elif batch.created_at < previous:
                        descended = True
                previous = batch.created_at
                if newest_first and batch.id == stop_at:
                    # The order below was shown by the walk that set stop_at.
                    return done("reached the batches an earlier lookup checked", ordered=True)
                if _carries(batch, key):
                    matches.append(batch)
                    if not twins:
                        return done("found")
                if bound is not None and batch.created_at < bound:
                    passed = True
            if not page.data:
                if page.has_more:
                    return _Scan("unknown", tuple(matches), None, "an empty page claims more")
                return done("read the whole list")
            if not page.has_more:
                return done("read the whole list")
            # Past the bound, with the whole page (and all before) in newest-first order:
            # every batch further down is older still.
            if passed and newest_first and descended:
                return done("passed the earliest time the batch can have been made")
            if matches and bound is None and stop_at is None:
                return done("found, with no bound to look further for twins")
            after = page.data[-1].id
        if matches:
            return done(f"found within the {max_pages}-page limit")
        if not newest_first:
            reason = "the server does not list batches newest first"
        elif bound is None:
            reason = (
                f"read {max_pages} pages; with no server date there is no bound on the "
                "batch's creation time"
            )
        else:
            reason = f"read {max_pages} pages without passing the batch's earliest creation time"
        return _Scan("unknown", (), None, reason)

    async def find_created_batch(
        self, create_key: str, *, since: float | None = None, max_pages: int = _LOOKUP_MAX_PAGES
    ) -> Batch | None:
        """Find the batch a create tagged with ``create_key`` made, if any.

        Reads the batch list newest first, ``max_pages`` pages at most. Use it to
        resume after a crash, or after an :class:`~aiobatch.errors.AmbiguousCreateError`.
        When more than one batch carries the key (a server finished an attempt after the
        client gave up on it), the earliest created is returned: the one
        :meth:`create_batch` keeps.

        Args:
            create_key: the ``aiobatch_create_key`` metadata value.
            since: Unix time, on the server's clock, before which the batch cannot have
                been created (e.g. when the key was journaled, less a few minutes for
                clock skew): the walk can stop there. None walks to the end of the list.
            max_pages: the most pages to read (100 batches each).

        Returns:
            The batch, or None when the walk proved that no batch carries the key.

        Raises:
            LookupIncompleteError: the walk could not prove the key absent (the page
                limit came first, or the server does not list newest first).
        """
        scan = await self._scan(create_key, since=since, max_pages=max_pages)
        if scan.outcome == "unknown":
            raise LookupIncompleteError(
                f"no batch with create key {create_key!r} in the part of the list read, but "
                f"one may exist further down: {scan.reason}",
                create_key=create_key,
                reason=scan.reason,
            )
        return _earliest(scan.matches) if scan.matches else None

    async def retrieve_batch(self, batch_id: str) -> Batch:
        """Get a batch (``GET /batches/{id}``)."""
        return await self._call(Batch, "GET", f"/batches/{_quote(batch_id)}")

    async def cancel_batch(self, batch_id: str) -> Batch:
        """Ask the server to cancel a batch (``POST /batches/{id}/cancel``).

        Returns:
            The batch, normally ``cancelling``; it reaches ``cancelled`` later.
        """
        return await self._call(Batch, "POST", f"/batches/{_quote(batch_id)}/cancel")

    async def list_batches_page(self, *, after: str | None = None, limit: int = 100) -> BatchPage:
        """One page of ``GET /batches``, newest first.

        Args:
            after: the id of the last batch of the previous page.
            limit: batches per page (1 to 100).
        """
        params = {"limit": str(limit)} if after is None else {"limit": str(limit), "after": after}
        return await self._call(BatchPage, "GET", "/batches", params=params)

    async def list_batches(
        self, *, after: str | None = None, page_size: int = 100
    ) -> AsyncGenerator[Batch, None]:
        """Every batch, over all pages (next page ``after`` the last item's id).

        Args:
            after: start after this batch id.
            page_size: batches per request (1 to 100).
        """
        cursor = after
        while True:
            page = await self.list_batches_page(after=cursor, limit=page_size)
            for item in page.data:
                yield item
            if not page.has_more or not page.data:
                return
            cursor = page.data[-1].id

    async def wait(
        self,
        batch: str | Batch,
        *,
        poll_interval: float = 5.0,
        max_interval: float = 60.0,
        timeout: float | None = None,
        jitter: float = 0.1,
    ) -> Batch:
        """Poll a batch until it reaches a terminal status, and return it.

        Intervals start at ``poll_interval`` and grow by half each poll up to
        ``max_interval``, on the client's clock; each is shortened by up to ``jitter``
        (a random share) so that waits started together do not poll in step. Every
        observation is checked by a :class:`~aiobatch.BatchLifecycle`. A failed, expired
        or cancelled batch is returned, not raised: inspect ``batch.status``.

        ``timeout`` is a deadline: each poll (its retries included) is cut to the time
        left, and the last poll starts early enough to finish by it.

        Args:
            batch: the batch id, or a Batch just returned by the server (such as the
                answer to :meth:`create_batch`), which then counts as the first poll.
            poll_interval: seconds before the second poll.
            max_interval: the longest pause between polls.
            timeout: seconds to wait in all; None waits as long as it takes.
            jitter: the largest share of an interval taken off at random (0 to 1; 0
                for an exact schedule).

        Raises:
            WaitTimeoutError: the deadline passed first (after one last poll).
            UnexpectedTransitionError: the server reported an impossible move.
            UnknownStatusError: the server reported a status aiobatch does not know
                (the error names the server's string).
        """
        clock = self._clock
        deadline: float | None = None
        reserve = 0.0
        if timeout is not None:
            deadline = clock.monotonic() + timeout
            reserve = min(timeout * _FINAL_POLL_SHARE, _FINAL_POLL_MAX)
            if self._timeout is not None:
                reserve = min(reserve, self._timeout)
        intervals = poll_intervals(poll_interval, max_interval, jitter=jitter)
        if isinstance(batch, str):
            batch_id = batch
            batch = await self._poll(batch_id, deadline, None)
        else:
            batch_id = batch.id
        lifecycle = BatchLifecycle(status=batch.wire_status, batch_id=batch_id)
        final = False
        while not batch.is_terminal:
            delay = intervals()
            if deadline is not None:
                room = deadline - clock.monotonic()
                if final or room <= 0:
                    raise self._wait_timeout(batch, timeout)
                if delay >= room - reserve:
                    delay = max(room - reserve, 0.0)
                    final = True
            await clock.sleep(delay)
            batch = await self._poll(batch_id, deadline, batch)
            lifecycle.observe(batch.wire_status)
        return batch

    @staticmethod
    def _wait_timeout(batch: Batch, timeout: float | None) -> WaitTimeoutError:
        return WaitTimeoutError(
            f"batch {batch.id} still {batch.wire_status!r} after {timeout:g}s",
            batch_id=batch.id,
            last_status=batch.wire_status,
        )

    async def _poll(self, batch_id: str, deadline: float | None, last: Batch | None) -> Batch:
        """Retrieve a batch within the wait's deadline; a retryable failure cut short by
        the deadline is the wait's timeout."""
        path = f"/batches/{_quote(batch_id)}"
        try:
            return await self._call(Batch, "GET", path, deadline=deadline)
        except (TransportError, APIStatusError) as exc:
            if deadline is None or self._clock.monotonic() < deadline:
                raise
            if isinstance(exc, APIStatusError) and not (
                exc.status_code in RETRYABLE_STATUSES or exc.status_code >= 500
            ):
                raise
            status = last.wire_status if last is not None else "unknown"
            raise WaitTimeoutError(
                f"batch {batch_id} still {status!r} at the deadline; the last poll failed: "
                f"{_describe(exc)}",
                batch_id=batch_id,
                last_status=status,
            ) from exc
