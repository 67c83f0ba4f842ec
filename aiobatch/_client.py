"""BatchClient: typed calls for the Files and Batch APIs.

The client builds requests (the provider says where and with which headers), sends them
through the retry policy and the transport, and turns answers into models with the
converter; error statuses become the :mod:`aiobatch.errors` tree. It parses no wire
format itself: every body goes through :mod:`aiobatch._convert`.

Creating a batch is never blindly re-sent. Each logical create carries a client-made
key in its metadata (``aiobatch_create_key``). After an *ambiguous* failure (a timeout,
a dropped connection after sending, a 5xx: the server may have made the batch) the
client lists recent batches and returns the one carrying the key; only when there is
none does it send again, with the same key. So one call makes at most one batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import types
import uuid
from collections.abc import AsyncGenerator, Mapping
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote

from ._clock import Clock, SystemClock
from ._convert import decode, decode_json, decode_result_line, parse_error_body
from ._lifecycle import BatchLifecycle
from ._models import Batch, BatchPage, File, FileDeleted, FilePage, ResultLine
from ._provider import OpenAIProvider, Secret
from ._retry import RetryPolicy, RetryState, is_ambiguous, parse_retry_after, poll_intervals
from .errors import (
    DecodeError,
    RateLimitError,
    TransportError,
    WaitTimeoutError,
    status_error_class,
)
from .transport._base import FilePart, Multipart, Request, Response, Transport

__all__ = ["CREATE_KEY_METADATA", "BatchClient"]

T = TypeVar("T")

#: The metadata key that tags each logical create with a client-made key.
CREATE_KEY_METADATA = "aiobatch_create_key"

#: OpenAI's metadata limits: pairs, key length, value length.
_METADATA_MAX_PAIRS = 16

#: How far before the first send a batch found by the create lookup may be dated
#: (the server's clock and ours may disagree).
_LOOKUP_SKEW = 300.0
#: The most list pages the create lookup reads.
_LOOKUP_MAX_PAGES = 20

_NO_PARAMS: Mapping[str, str] = types.MappingProxyType({})


def _quote(object_id: str) -> str:
    if not object_id:
        raise ValueError("an object id must be a non-empty string")
    return quote(object_id, safe="%:@")


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
        retry: the retry policy; default :class:`~aiobatch.RetryPolicy()`.
        clock: the time source for retries, waits and deadlines.
        timeout: seconds per control request (create, retrieve, list...; for a streamed
            download, per wait for data); uploads use the transport's default. None
            leaves every request to the transport's default.
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
    ) -> None:
        if provider is None:
            provider = OpenAIProvider.from_env(
                api_key=api_key, base_url=base_url, organization=organization, project=project
            )
        elif api_key is not None or base_url is not None or organization or project:
            raise TypeError("pass either provider or api_key/base_url/organization/project")
        self._provider = provider
        self._owns_transport = transport is None
        if transport is None:
            from .transport._aiohttp import AiohttpTransport

            transport = AiohttpTransport()
        self._transport: Transport = transport
        self._retry = retry if retry is not None else RetryPolicy()
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._timeout = timeout
        self._headers: Mapping[str, str] = dict(provider.headers())
        self._json_headers: Mapping[str, str] = {
            **self._headers,
            "content-type": "application/json",
        }
        key = provider.api_key.reveal() if provider.api_key else ""
        self._secret_text = key if len(key) >= 4 else ""

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

    async def aclose(self) -> None:
        """Close the transport if the client created it. Safe to call twice."""
        if self._owns_transport:
            await self._transport.aclose()

    async def __aenter__(self) -> BatchClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"BatchClient(base_url={self._provider.base_url!r}, transport={self._transport!r})"

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

    async def _send(self, request: Request, *, stream: bool = False) -> Response:
        response = await self._retry.send(
            self._transport, request, clock=self._clock, stream=stream
        )
        if response.status >= 400:
            await self._raise_for_status(response, request)
        return response

    async def _call(
        self,
        cls: type[T],
        method: str,
        path: str,
        *,
        params: Mapping[str, str] = _NO_PARAMS,
    ) -> T:
        request = Request(
            method, self._provider.url(path), params, self._headers, None, self._timeout
        )
        response = await self._retry.send(self._transport, request, clock=self._clock)
        if response.status >= 400:
            await self._raise_for_status(response, request)
        return decode(await response.read(), cls)

    async def _raise_for_status(self, response: Response, request: Request) -> NoReturn:
        """Turn an error response into the matching :class:`APIStatusError`."""
        raw = await response.read()
        secret = self._secret_text
        if secret and secret.encode() in raw:
            raw = raw.replace(secret.encode(), b"***")
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
        raise cls(message, **fields)

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
        fields: tuple[tuple[str, str], ...] = (("purpose", purpose),)
        if expires_after_seconds is not None:
            fields += (
                ("expires_after[anchor]", "created_at"),
                ("expires_after[seconds]", str(int(expires_after_seconds))),
            )
        request = self._request(
            "POST", "/files", body=Multipart(fields=fields, files=(("file", part),))
        )
        response = await self._send(request)
        return decode(await response.read(), File)

    async def retrieve_file(self, file_id: str) -> File:
        """Get one file's metadata (``GET /files/{id}``)."""
        return await self._call(File, "GET", f"/files/{_quote(file_id)}")

    async def delete_file(self, file_id: str) -> FileDeleted:
        """Delete a file (``DELETE /files/{id}``)."""
        return await self._call(FileDeleted, "DELETE", f"/files/{_quote(file_id)}")

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
        iterator, e.g. with :func:`contextlib.aclosing`) closes the response.
        """
        response = await self._open_content(file_id)
        try:
            pending = b""
            async for chunk in response.iter_chunks():
                if pending:
                    chunk = pending + chunk
                lines = chunk.split(b"\n")
                pending = lines.pop()
                for line in lines:
                    yield line[:-1] if line.endswith(b"\r") else line
            if pending:
                yield pending[:-1] if pending.endswith(b"\r") else pending
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
                yield decode_result_line(line, what=f"line {number} of file {file_id}")

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
        caller put there, e.g. recorded in a journal before the call). After a failure
        that may have created the batch it looks the key up before sending again. When
        the metadata already has 16 pairs no key fits: then an ambiguous failure is
        raised, never re-sent.

        Args:
            input_file_id: the uploaded input file (purpose ``batch``).
            endpoint: the endpoint of every line, e.g. ``/v1/chat/completions``.
            completion_window: ``24h``.
            metadata: up to 16 string pairs.
            output_expires_after_seconds: expire the output files this long after
                their creation (3600 to 2592000).

        Raises:
            APIStatusError: the server refused (after the retries the policy allows).
            TransportError: the network failed and no batch with the key was found.
        """
        meta = dict(metadata) if metadata else {}
        key = meta.get(CREATE_KEY_METADATA)
        if key is None and len(meta) < _METADATA_MAX_PAIRS:
            key = meta[CREATE_KEY_METADATA] = uuid.uuid4().hex
        payload: dict[str, Any] = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": completion_window,
            "metadata": meta or None,
        }
        if output_expires_after_seconds is not None:
            payload["output_expires_after"] = {
                "anchor": "created_at",
                "seconds": int(output_expires_after_seconds),
            }
        body = json.dumps(payload, separators=(",", ":")).encode()
        request = self._request("POST", "/batches", body=body, timeout=self._timeout)
        return await self._create(request, key)

    async def _create(self, request: Request, key: str | None) -> Batch:
        clock = self._clock
        since = clock.now() - _LOOKUP_SKEW
        state = RetryState(self._retry, clock, request.method, request.url)
        maybe_created = False
        while True:
            error: TransportError | None = None
            response: Response | None = None
            try:
                response = await self._transport.send(request)
            except TransportError as exc:
                error = exc
            else:
                if response.status < 400:
                    return await self._created(response, key, since)
            if is_ambiguous(error, response.status if response is not None else None):
                if key is None:
                    break  # the metadata is full: no way to tell, so never re-send
                maybe_created = True
            if not await state.backoff(error=error, response=response):
                break
            if response is not None:
                await response.aclose()
            if maybe_created:
                assert key is not None
                found = await self.find_created_batch(key, since=since)
                if found is not None:
                    return found
        if maybe_created and key is not None:
            found = await self.find_created_batch(key, since=since)
            if found is not None:
                return found
        if error is not None:
            raise error
        assert response is not None
        await self._raise_for_status(response, request)

    async def _created(self, response: Response, key: str | None, since: float) -> Batch:
        """Decode a successful create; if the body is unreadable, find the batch by key."""
        try:
            return decode(await response.read(), Batch)
        except DecodeError:
            # The server made the batch and garbled the answer: never make a second one.
            if key is not None:
                found = await self.find_created_batch(key, since=since)
                if found is not None:
                    return found
            raise

    async def find_created_batch(
        self, create_key: str, *, since: float | None = None, max_pages: int = _LOOKUP_MAX_PAGES
    ) -> Batch | None:
        """Find the batch a create tagged with ``create_key`` made, if any.

        Reads recent batches newest first and stops at the first one created before
        ``since``, after ``max_pages`` pages, or at the end of the list.

        Args:
            create_key: the ``aiobatch_create_key`` metadata value.
            since: Unix time before which the batch cannot have been created (allow
                for clock skew); None reads up to ``max_pages`` pages.
            max_pages: the most pages to read (100 batches each).
        """
        after: str | None = None
        for _ in range(max_pages):
            page = await self.list_batches_page(after=after, limit=100)
            for batch in page.data:
                if batch.metadata and batch.metadata.get(CREATE_KEY_METADATA) == create_key:
                    return batch
            if not page.has_more or not page.data:
                return None
            first, last = page.data[0], page.data[-1]
            newest_first = first.created_at >= last.created_at
            if since is not None and newest_first and last.created_at < since:
                return None
            after = last.id
        return None

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
    ) -> Batch:
        """Poll a batch until it reaches a terminal status, and return it.

        Intervals start at ``poll_interval`` and grow by half each poll up to
        ``max_interval``, on the client's clock. Every observation is checked by a
        :class:`~aiobatch.BatchLifecycle`. A failed, expired or cancelled batch is
        returned, not raised: inspect ``batch.status``.

        Args:
            batch: the batch id, or a Batch just returned by the server (such as the
                answer to :meth:`create_batch`), which then counts as the first poll.
            poll_interval: seconds before the second poll.
            max_interval: the longest pause between polls.
            timeout: seconds to wait in all; None waits as long as it takes.

        Raises:
            WaitTimeoutError: the deadline passed first (after one last poll).
            UnexpectedTransitionError: the server reported an impossible move.
        """
        clock = self._clock
        deadline = None if timeout is None else clock.monotonic() + timeout
        intervals = poll_intervals(poll_interval, max_interval)
        if isinstance(batch, str):
            batch_id = batch
            batch = await self.retrieve_batch(batch_id)
        else:
            batch_id = batch.id
        lifecycle = BatchLifecycle(status=batch.status, batch_id=batch_id)
        while not batch.is_terminal:
            delay = intervals()
            if deadline is not None:
                remaining = deadline - clock.monotonic()
                if remaining <= 0:
                    raise WaitTimeoutError(
                        f"batch {batch_id} still {batch.status.value!r} after {timeout:g}s",
                        batch_id=batch_id,
                        last_status=batch.status.value,
                    )
                delay = min(delay, remaining)
            await clock.sleep(delay)
            batch = await self.retrieve_batch(batch_id)
            lifecycle.observe(batch.status)
        return batch
