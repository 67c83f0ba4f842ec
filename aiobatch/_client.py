"""BatchClient: typed calls for the Files and Batch APIs.

The client builds requests (the provider says where and with which headers), sends them
through the retry policy and the transport, and turns answers into models with the
converter; error statuses become the :mod:`aiobatch.errors` tree. It parses and builds
no wire format itself: every body goes through :mod:`aiobatch._convert`.

Safe creates
------------
``create_batch`` never blindly re-sends a create: after a failure that may have made
the batch it settles, looks the create's key up, and sends again only when the lookup
proved no batch carries it. The machinery, and its theory of operation, live in
:mod:`aiobatch._create`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import types
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote

from ._clock import Clock, SystemClock
from ._convert import (
    decode,
    decode_batch_output_line,
    decode_json,
    decode_result_line,
    encode_create_batch,
    encode_inline_create,
    parse_error_body,
    upload_form_fields,
)
from ._create import LOOKUP_MAX_PAGES, Creator, keyed_metadata
from ._lifecycle import BatchLifecycle, BatchStatus, parse_status_aliases
from ._models import (
    Batch,
    BatchErrors,
    BatchPage,
    BatchRequest,
    File,
    FileDeleted,
    FilePage,
    ResultLine,
    alias_status,
)
from ._provider import (
    OpenAIProvider,
    Provider,
    Secret,
    _Headers,
    provider_from_env,
    require_key,
)
from ._retry import (
    RETRYABLE_STATUSES,
    RetryPolicy,
    RetryState,
    parse_retry_after,
    poll_intervals,
)
from .errors import (
    APIStatusError,
    ClosedError,
    DecodeError,
    FileProcessingError,
    FileWaitTimeoutError,
    NoOutputError,
    NotFoundError,
    TransportError,
    UnknownStatusError,
    UnsupportedError,
    WaitTimeoutError,
    describe,
    status_error_class,
)
from .transport._base import FilePart, Multipart, Request, Response, Transport

__all__ = ["DEFAULT_CREATE_SETTLE", "BatchClient"]

T = TypeVar("T")

logger = logging.getLogger("aiobatch")

#: Seconds to wait, after a create the server may still be working on, before looking
#: its key up (see :class:`BatchClient`).
DEFAULT_CREATE_SETTLE = 10.0

#: How much of a wait's timeout is kept for its last poll (at most _FINAL_POLL_MAX s).
_FINAL_POLL_SHARE = 0.1
_FINAL_POLL_MAX = 10.0

_NO_PARAMS: Mapping[str, str] = types.MappingProxyType({})

#: Default seconds :meth:`BatchClient.wait_for_file` waits for an upload to be processed.
DEFAULT_FILE_WAIT = 600.0


class _Keep:
    """The type of :data:`_KEEP`: "leave this option as it is"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<keep>"


_KEEP = _Keep()


def _quote(object_id: str) -> str:
    if not object_id:
        raise ValueError("an object id must be a non-empty string")
    return quote(object_id, safe="%:@")


def _redact_error(error: DecodeError, secrets: tuple[Secret, ...]) -> DecodeError:
    """A copy of a decode error with the secret masked in every text, and nothing chained.

    A new exception object, never the caught one: re-raising the caught one would bring
    back the frames (and their locals, the raw body among them) it was caught with.
    """
    cls = type(error)
    copy = cls.__new__(cls)
    copy.__dict__.update(error.__dict__)
    copy.what = _redact(secrets, error.what)
    copy.detail = _redact(secrets, error.detail)
    if error.path is not None:
        copy.path = _redact(secrets, error.path)
    if isinstance(copy, UnknownStatusError) and isinstance(copy.value, str):
        copy.value = _redact(secrets, copy.value)
    copy.args = tuple(_redact(secrets, a) if isinstance(a, str) else a for a in error.args)
    copy.__suppress_context__ = True
    return copy


def _redact(secrets: tuple[Secret, ...], text: str) -> str:
    for secret in secrets:
        text = secret.redact(text)
    return text


async def _lines(response: Response) -> AsyncGenerator[bytes, None]:
    """A streamed body's lines, without their line ends; closes the response at the end.

    A last line without a newline is yielded too. Each byte is looked at a bounded
    number of times, however long a line is and however the chunks cut it.
    """
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


class BatchClient:
    """An async client for the Files and Batch APIs of one provider.

    Use it as an async context manager (or call :meth:`aclose`)::

        async with BatchClient(api_key=...) as client:
            f = await client.upload_file("requests.jsonl")
            batch = await client.create_batch(f.id, "/v1/chat/completions")
            batch = await client.wait(batch.id)

    Args:
        api_key: the API key; default ``$OPENAI_API_KEY``. Never shown in any repr,
            log or error. OpenAI's own API without one is refused
            (:class:`~aiobatch.errors.ConfigurationError`); a server of one's own, at
            another ``base_url``, may take none.
        base_url: the API root; default ``$OPENAI_BASE_URL`` or OpenAI's.
        organization: the ``OpenAI-Organization`` header.
        project: the ``OpenAI-Project`` header.
        provider: where requests go: a provider object (:class:`~aiobatch.OpenAIProvider`,
            :class:`~aiobatch.PortkeyProvider`, :class:`~aiobatch.AzureOpenAIProvider`,
            :class:`~aiobatch.CompatibleProvider` or your own
            :class:`~aiobatch.Provider`), or a name (``"openai"``, ``"portkey"``,
            ``"azure"``, ``"compatible"``) filled from the environment by
            :func:`~aiobatch.provider_from_env`, with the four arguments above where
            they apply. None is ``"openai"``.
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
        provider: Provider | str | None = None,
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
        elif isinstance(provider, str):
            provider = provider_from_env(
                provider,
                api_key=api_key,
                base_url=base_url,
                organization=organization,
                project=project,
            )
        elif api_key is not None or base_url is not None or organization or project:
            raise TypeError("pass either provider or api_key/base_url/organization/project")
        elif not isinstance(provider, Provider):
            raise TypeError(
                f"provider must be a provider object or a name, not {type(provider).__name__}"
            )
        if not create_settle >= 0:
            raise ValueError(f"create_settle must be >= 0, got {create_settle!r}")
        require_key(provider)
        self._provider: Provider = provider
        self._secrets = tuple(provider.secrets)
        query = provider.params()
        self._query: Mapping[str, str] | None = dict(query) if query else None
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
        self._parent: BatchClient | None = None
        headers = _Headers(provider.headers())
        self._headers: Mapping[str, str] = headers
        self._json_headers: Mapping[str, str] = _Headers(
            {**headers, "content-type": "application/json"}
        )
        self._creates = Creator(
            transport=transport,
            check_open=self._check_open,
            fetch=self._fetch,
            status_error=self._status_error,
            decode=self._decode,
            cancel=self.cancel_batch,
            retry=self._retry,
            clock=self._clock,
            settle=float(create_settle),
            server=provider.base_url,
            logger=logger,
        )

    # --- plumbing --------------------------------------------------------------------------

    @property
    def provider(self) -> Provider:
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
    def create_settle(self) -> float:
        """Seconds a create that may still be on its way is given to land before a
        lookup of its key is trusted."""
        return self._create_settle

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called (on this client, or on the one it was made
        from with :meth:`with_options`); every call then raises ClosedError."""
        return self._closed or (self._parent is not None and self._parent.closed)

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
        if self._closed or (self._parent is not None and self._parent.closed):
            raise ClosedError("the client is closed; make a new BatchClient")

    def with_options(
        self, *, retry: RetryPolicy | None = None, timeout: float | _Keep | None = _KEEP
    ) -> BatchClient:
        """A client for the same provider, over the same transport and clock, with other
        options (like the official SDK's ``with_options``).

        The new client shares this one's transport and never closes it; closing this
        client closes it too (its calls then raise
        :class:`~aiobatch.errors.ClosedError`). The fleet uses it to make single
        attempts under its own request budget.

        Args:
            retry: the retry policy of the new client (default: this one's).
            timeout: seconds per control request (default: this one's).
        """
        child = BatchClient(
            provider=self._provider,
            transport=self._transport,
            retry=retry if retry is not None else self._retry,
            clock=self._clock,
            timeout=self._timeout if isinstance(timeout, _Keep) else timeout,
            create_settle=self._create_settle,
        )
        child._parent = self
        return child

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
        if self._query is not None:
            params = {**self._query, **params}
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
        request = self._request(method, path, params=params, timeout=self._timeout)
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
        """``error`` itself, or (when the body held an API key) a redacted copy of it."""
        if not any(secret.redact(raw) is not raw for secret in self._secrets):
            return error
        return _redact_error(error, self._secrets)

    async def _status_error(self, response: Response, request: Request) -> APIStatusError:
        """The :class:`APIStatusError` for an error response (the API key masked)."""
        raw = await response.read()
        for secret in self._secrets:
            raw = secret.redact(raw)
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
            "retry_after": parse_retry_after(response.headers, now=self._clock.now()),
        }
        return status_error_class(status)(message, **fields)

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
        wait_processed: bool | None = None,
        processing_timeout: float = DEFAULT_FILE_WAIT,
    ) -> File:
        """Upload a file (``POST /files``). A path is streamed, never read whole.

        On a provider whose uploads are usable only once ``processed`` (Azure: see
        :attr:`Quirks.wait_for_processed_file <aiobatch.Quirks.wait_for_processed_file>`)
        the call then waits for that with :meth:`wait_for_file`, so the file it returns
        can go straight into :meth:`create_batch`.

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
            wait_processed: wait until the file is ``processed``; None (the default)
                waits when the provider needs it.
            processing_timeout: seconds that wait may take.

        Returns:
            The stored file.

        Raises:
            FileProcessingError: the server marked the file ``error``.
            FileWaitTimeoutError: it was still not ``processed`` after
                ``processing_timeout`` seconds.
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
        if wait_processed is None:
            wait_processed = self._provider.quirks.wait_for_processed_file
        if wait_processed:
            uploaded = await self.wait_for_file(uploaded, timeout=processing_timeout)
        return uploaded

    async def wait_for_file(
        self,
        file: str | File,
        *,
        timeout: float = DEFAULT_FILE_WAIT,
        poll_interval: float = 1.0,
        max_interval: float = 10.0,
    ) -> File:
        """Poll a file until it is ``processed`` (Azure answers an upload ``pending``).

        A file already ``processed`` (or with no status, as some compatible servers
        send) is returned at once, without a request. Polls go through the client's
        clock; intervals grow from ``poll_interval`` to ``max_interval``.

        Args:
            file: the file id, or the File the upload returned.
            timeout: seconds to wait in all.
            poll_interval: seconds before the first poll.
            max_interval: the longest pause between polls.

        Returns:
            The file, ``processed``.

        Raises:
            FileProcessingError: the server marked the file ``error`` (its
                ``status_details`` say why) or ``deleted``.
            FileWaitTimeoutError: still not ``processed`` at the deadline.
        """
        clock = self._clock
        deadline = clock.monotonic() + timeout
        intervals = poll_intervals(poll_interval, max_interval, jitter=0.0)
        current = file if isinstance(file, File) else await self.retrieve_file(file)
        while True:
            status = current.status
            if status is None or status == "processed":
                return current
            if status in ("error", "deleted"):
                details = f": {current.status_details}" if current.status_details else ""
                raise FileProcessingError(
                    f"file {current.id} ended {status!r} instead of 'processed'{details}; "
                    "upload it again",
                    file_id=current.id,
                    status=status,
                    status_details=current.status_details,
                )
            room = deadline - clock.monotonic()
            if room <= 0:
                raise FileWaitTimeoutError(
                    f"file {current.id} still {status!r} after {timeout:g}s",
                    file_id=current.id,
                    status=status,
                    status_details=current.status_details,
                )
            await clock.sleep(min(intervals(), room))
            current = await self._call(
                File, "GET", f"/files/{_quote(current.id)}", deadline=deadline
            )

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
        async with contextlib.aclosing(_lines(response)) as lines:
            async for line in lines:
                yield line

    async def iter_results(self, file_id: str) -> AsyncGenerator[ResultLine, None]:
        """The decoded lines of a batch output or error file, streamed; blank lines skipped.

        Raises:
            DecodeError: a line does not decode; the message names the file and the
                1-based line number.
        """
        decoded = self._decoded_lines(
            self.iter_file_lines(file_id), decode_result_line, f"file {file_id}"
        )
        async with contextlib.aclosing(decoded) as results:
            async for result in results:
                yield result

    async def _decoded_lines(
        self,
        lines: AsyncGenerator[bytes, None],
        decode_line: Callable[..., T],
        where: str,
    ) -> AsyncGenerator[T, None]:
        """Decode each non-blank line; a decode error names the 1-based line number and
        never shows an echoed API key. Closes ``lines`` when done or stopped early."""
        number = 0
        async with contextlib.aclosing(lines):
            async for line in lines:
                number += 1
                if not line.strip():
                    continue
                scrubbed: DecodeError | None = None
                try:
                    result = decode_line(line, what=f"line {number} of {where}")
                except DecodeError as exc:
                    scrubbed = self._scrubbed(exc, line)
                    if scrubbed is exc:
                        raise
                if scrubbed is not None:  # raised out here: nothing holding the line chained
                    del line
                    raise scrubbed
                yield result

    async def iter_batch_output(self, batch: str | Batch) -> AsyncGenerator[ResultLine, None]:
        """A finished batch's output lines, streamed in one call (Portkey's
        ``GET /batches/{id}/output``), in constant memory; blank lines skipped.

        It saves the retrieve that finding ``output_file_id`` takes elsewhere. The
        output file holds the successful requests only: read the error file
        (``error_file_id``) with :meth:`iter_results` for the rest. A finished batch
        without a successful request has no output file: it yields nothing (the
        gateway answers 404 for it, and a retrieve then tells it from an unfinished
        batch; some servers answer an empty ``{}``).

        Raises:
            UnsupportedError: the provider has no such endpoint (only Portkey does; see
                :attr:`Quirks.batch_output_endpoint <aiobatch.Quirks.batch_output_endpoint>`);
                nothing is sent. Elsewhere, read ``output_file_id`` with
                :meth:`iter_results`.
            NotFoundError: no such batch, or it has not finished yet.
            NoOutputError: the batch has no output file and the gateway answered with
                the batch's errors instead (it failed validation); ``errors`` holds them.
            DecodeError: a line does not decode; the message names the line.
        """
        batch_id = batch.id if isinstance(batch, Batch) else batch
        if not self._provider.quirks.batch_output_endpoint:
            raise UnsupportedError(
                f"the {self._provider.name} provider has no /batches/{{id}}/output endpoint "
                "(Portkey's); read the batch's output_file_id with iter_results()"
            )
        request = self._request("GET", f"/batches/{_quote(batch_id)}/output", timeout=self._timeout)
        missing: NotFoundError | None = None
        try:
            response = await self._send(request, stream=True)
        except NotFoundError as exc:
            missing = exc
        if missing is not None:
            # The gateway asks the provider for the content of the batch's output file:
            # a batch without one (no request succeeded) is a 404 too.
            known = batch if isinstance(batch, Batch) and batch.is_terminal else None
            if known is None:
                known = await self.retrieve_batch(batch_id)
            if known.is_terminal and known.output_file_id is None:
                return
            raise missing
        decoded = self._decoded_lines(
            _lines(response), decode_batch_output_line, f"the output of batch {batch_id}"
        )
        async with contextlib.aclosing(decoded) as results:
            async for result in results:
                if isinstance(result, BatchErrors):
                    if not result.data:
                        return  # no errors and no output: no request succeeded
                    first = result.data[0].message if result.data else None
                    raise NoOutputError(
                        f"batch {batch_id} has no output file; the gateway sent its errors"
                        + (f": {first}" if first else ""),
                        batch_id=batch_id,
                        errors=result,
                    )
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
        meta, key = keyed_metadata(metadata)
        body = encode_create_batch(
            input_file_id,
            endpoint,
            completion_window=completion_window,
            metadata=meta or None,
            output_expires_after_seconds=output_expires_after_seconds,
        )
        request = self._request("POST", "/batches", body=body, timeout=self._timeout)
        self._check_open()
        return await self._creates.create(request, key)

    async def create_inline_batch(self, requests: Iterable[BatchRequest]) -> Batch:
        """Create a batch with its requests in the call itself (Anthropic's
        ``POST /v1/messages/batches``, :attr:`Quirks.submission
        <aiobatch.Quirks.submission>` ``"inline"``); one call makes at most one batch.

        Such a batch carries no metadata, so a create whose answer was lost cannot be
        looked up by a key: it is never sent again, and
        :class:`~aiobatch.errors.AmbiguousCreateError` is raised at once (the run layer
        then looks for it by its request count and creation time).

        Args:
            requests: the requests (each line's ``body`` is a Messages API body).

        Raises:
            APIStatusError: the server refused, and no attempt may have made a batch.
            AmbiguousCreateError: an attempt may have made a batch.
        """
        body = encode_inline_create(requests)
        request = self._request("POST", "/batches", body=body, timeout=self._timeout)
        self._check_open()
        return await self._creates.create(request, None)

    async def find_created_batch(
        self, create_key: str, *, since: float | None = None, max_pages: int = LOOKUP_MAX_PAGES
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
        return await self._creates.find(create_key, since=since, max_pages=max_pages)

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
        params = {"limit": str(limit)}
        if after is not None:
            params[self._provider.quirks.list_cursor_param] = after
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
        status_aliases: Mapping[str, BatchStatus | str] | None = None,
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
            status_aliases: status strings aiobatch does not know, each mapped to the
                status it stands for (``{"succeeded": "completed"}``); the batch
                returned has the mapped ``status`` and the server's string in
                ``raw_status``.

        Raises:
            WaitTimeoutError: the deadline passed first (after one last poll).
            UnexpectedTransitionError: the server reported an impossible move.
            UnknownStatusError: the server reported a status aiobatch does not know and
                ``status_aliases`` does not map (the error names the batch, the
                server's string and how to map it).
            ValueError: a ``status_aliases`` target is not an aiobatch status.
        """
        aliases = parse_status_aliases(status_aliases or {})
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
        batch = alias_status(batch, aliases)
        lifecycle = BatchLifecycle(batch_id=batch_id)
        lifecycle.observe(batch.lifecycle_status)  # every status is reachable from the first
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
            batch = alias_status(await self._poll(batch_id, deadline, batch), aliases)
            lifecycle.observe(batch.lifecycle_status)
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
                f"{describe(exc)}",
                batch_id=batch_id,
                last_status=status,
            ) from exc
