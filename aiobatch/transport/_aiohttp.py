"""Real HTTP over one pooled :class:`aiohttp.ClientSession`.

The transport turns our :class:`~aiobatch.transport.Request` into an aiohttp call and the
answer back into our :class:`~aiobatch.transport.Response`. No aiohttp type crosses the
seam: every aiohttp, asyncio and OS exception is translated in one place
(:func:`_guarded`) into the :mod:`aiobatch.errors` tree, chained with ``raise ... from
exc`` unless the exception holds the request's headers (then not chained at all).
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import ssl
import stat
from collections.abc import Awaitable
from contextlib import ExitStack
from types import TracebackType
from typing import IO, Any, TypeVar

import aiohttp
from aiohttp.payload import Payload

from .._aio import in_thread
from ..errors import (
    ClosedError,
    ConnectError,
    InputError,
    TransportError,
    TransportTimeoutError,
)
from ._base import Multipart, Request, Response
from ._memory import check_upload_files

__all__ = ["AiohttpTransport"]

CHUNK_SIZE = 64 * 1024

_T = TypeVar("_T")


async def _guarded(awaitable: Awaitable[_T], method: str, url: str) -> _T:
    """Await ``awaitable``, translating aiohttp / asyncio / OS exceptions.

    The most specific class wins: a failure to connect (the request never left) is a
    :class:`ConnectError`, a timeout a :class:`TransportTimeoutError`, anything else a
    :class:`TransportError` (the request may have reached the server). Messages name the
    method and URL and never the headers, which carry credentials.

    The aiohttp exception is kept as ``__cause__`` unless it carries the request
    (``ClientResponseError`` and its subclasses hold ``request_info`` with every request
    header, API key included): then the error is raised outside the ``except`` block,
    so the aiohttp exception is neither its ``__cause__`` nor its ``__context__``, and
    the useful part (type, status, message) is in our message instead.
    """
    error: TransportError
    try:
        return await awaitable
    except TransportError:
        raise
    except Exception as exc:
        if isinstance(exc.__cause__, _FileCutShort):
            # The caller's file changed under the upload: not a network failure, and
            # not worth another attempt (the server never got the whole body).
            raise InputError(str(exc.__cause__)) from exc.__cause__
        mapped = _translate(exc, method, url)
        if mapped is None:
            raise
        if not _carries_request(exc):
            raise mapped from exc
        error = mapped
    try:
        raise error
    except TransportError:
        # Python 3.10 chains the exception thrown into this coroutine even out here:
        # cut it, then re-raise (a bare raise chains nothing new).
        error.__context__ = None
        raise


def _carries_request(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception chained to it holds the request (its headers)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, aiohttp.ClientResponseError):
            return True
        if getattr(current, "request_info", None) is not None:
            return True
        todo += (current.__cause__, current.__context__)
    return False


def _translate(exc: BaseException, method: str, url: str) -> TransportError | None:
    """The aiobatch error for ``exc``, or None when it is not a network error."""
    url = _safe_url(url)
    where = f"{method} {url}"
    # Order matters: ConnectionTimeoutError is also a TimeoutError, and
    # ClientConnectorError is also an OSError.
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ConnectError(
            f"connect timeout ({where})", method=method, url=url, reason="connect timeout"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectError(
            f"cannot connect ({where}): {_detail(exc)}",
            method=method,
            url=url,
            reason=_connect_reason(exc),
        )
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return TransportTimeoutError(f"timed out ({where})", method=method, url=url)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return TransportError(f"server disconnected ({where})", method=method, url=url)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return TransportError(f"broken response body ({where})", method=method, url=url)
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return TransportError(f"network error ({where}): {_detail(exc)}", method=method, url=url)
    return None


def _connect_reason(exc: aiohttp.ClientConnectorError) -> str | None:
    """Why a connection could not be made, in plain words (None when unclear)."""
    cause = exc.os_error
    if isinstance(exc, aiohttp.ClientConnectorDNSError) or isinstance(cause, socket.gaierror):
        return "name does not resolve"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, TimeoutError):
        return "connect timeout"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "TLS handshake failed"
    return cause.strerror.lower() if cause.strerror else None


def _detail(exc: BaseException) -> str:
    """A short description of ``exc`` that cannot contain request headers."""
    if isinstance(exc, aiohttp.ClientResponseError):
        # Its str() and repr() carry request_info (URL with query, headers): rebuild the
        # useful part from the status, the message and the redirects followed.
        bits = [str(exc.status)] if exc.status else []
        if exc.message:
            bits.append(str(exc.message))
        if exc.history:
            hops = len(exc.history)
            bits.append(
                f"after {hops} redirect{'s' if hops != 1 else ''} "
                f"(last status {exc.history[-1].status})"
            )
        return f"{type(exc).__name__}: {' '.join(bits)}" if bits else type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"{type(exc).__name__}: {exc.os_error}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _safe_url(url: str) -> str:
    """``url`` without user info (``user:password@``), if it has any."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
        return f"{scheme}://{rest}"
    return url


class _Chunks:
    """The body of a streamed response as an async iterator of ``chunk_size`` pieces.

    Like ``resp.content.iter_chunked(chunk_size)``, with errors mapped.
    """

    __slots__ = ("_content", "_method", "_size", "_url")

    def __init__(self, resp: aiohttp.ClientResponse, method: str, url: str, size: int) -> None:
        self._content = resp.content
        self._method = method
        self._url = url
        self._size = size

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = await _guarded(self._content.read(self._size), self._method, self._url)
        if not chunk:
            raise StopAsyncIteration
        return chunk


class AiohttpTransport:
    """Send requests over HTTP with one pooled :class:`aiohttp.ClientSession`.

    The session is created on the first :meth:`send` (inside the running event loop)
    unless one is borrowed with ``session``; a borrowed session stays open when the
    transport closes, and its connector settings (``limit``...) are the caller's.

    Timeouts: ``timeout`` bounds a whole exchange (connecting, sending, reading the
    answer); ``Request.timeout`` overrides it per request. For a streamed response
    (``send(..., stream=True)``) the timeout instead bounds each wait for data, so a large
    download is never cut off while bytes keep arriving. ``connect_timeout`` bounds
    opening one TCP/TLS connection (waiting for a free slot in the pool does not count).

    Args:
        session: a session to borrow instead of creating one.
        limit: the most connections open at once (0 = no limit).
        limit_per_host: the most connections open to one host (0 = no limit).
        timeout: default seconds per exchange; None waits forever.
        connect_timeout: seconds to open a connection; None waits forever.
        chunk_size: bytes per chunk of a streamed body.
        ssl_context: TLS settings for ``https`` URLs (None = the default verification).
        trust_env: read proxy settings from the environment, like aiohttp does.
        follow_redirects: follow 3xx answers. Off by default: a redirect to another
            host would carry credential headers with it.
    """

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession | None = None,
        limit: int = 100,
        limit_per_host: int = 0,
        timeout: float | None = 600.0,
        connect_timeout: float | None = 5.0,
        chunk_size: int = CHUNK_SIZE,
        ssl_context: ssl.SSLContext | None = None,
        trust_env: bool = False,
        follow_redirects: bool = False,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self._session = session
        self._owns_session = session is None
        self._limit = limit
        self._limit_per_host = limit_per_host
        self._connect_timeout = connect_timeout
        self._chunk_size = chunk_size
        self._ssl_context = ssl_context
        self._trust_env = trust_env
        self._follow_redirects = follow_redirects
        self._closed = False
        self._default_timeout = self._client_timeout(timeout, stream=False)
        self._default_stream_timeout = self._client_timeout(timeout, stream=True)
        self._timeouts: dict[tuple[float, bool], aiohttp.ClientTimeout] = {}

    def _client_timeout(self, seconds: float | None, *, stream: bool) -> aiohttp.ClientTimeout:
        if stream:
            return aiohttp.ClientTimeout(sock_read=seconds, sock_connect=self._connect_timeout)
        return aiohttp.ClientTimeout(total=seconds, sock_connect=self._connect_timeout)

    def _timeout_for(self, seconds: float | None, stream: bool) -> aiohttp.ClientTimeout:
        if seconds is None:
            return self._default_stream_timeout if stream else self._default_timeout
        key = (seconds, stream)
        found = self._timeouts.get(key)
        if found is None:
            if len(self._timeouts) > 64:
                self._timeouts.clear()
            found = self._timeouts[key] = self._client_timeout(seconds, stream=stream)
        return found

    def _open_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._limit,
            limit_per_host=self._limit_per_host,
            ssl=self._ssl_context if self._ssl_context is not None else True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._default_timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=self._trust_env,
        )
        return self._session

    async def send(self, request: Request, *, stream: bool = False) -> Response:
        """Send ``request`` and return the answer, whatever its status.

        Args:
            request: what to send. A :class:`Multipart` body's file parts are streamed
                from their ``path``.
            stream: return before reading the body; the caller reads
                :meth:`Response.iter_chunks` and must close the response.

        Returns:
            The response, its body read unless ``stream`` is true.

        Raises:
            FileNotFoundError: a file part's ``path`` does not exist (nothing was sent).
            ConnectError: the request was never sent (no connection could be made).
            TransportTimeoutError: no complete answer in time.
            TransportError: any other network failure; the server may have acted.
            ClosedError: the transport, or a borrowed session, is closed (never retried).
        """
        if self._closed:
            raise ClosedError(
                f"the transport is closed ({request.method} {_safe_url(request.url)})"
            )
        check_upload_files(request)
        session = self._session
        if session is None:
            session = self._open_session()
        elif session.closed:  # a borrowed session closed by its owner
            raise ClosedError(
                f"the borrowed aiohttp session is closed ({request.method} "
                f"{_safe_url(request.url)})"
            )
        files: ExitStack | None = None
        data: Any = request.body
        if isinstance(data, Multipart):
            files = ExitStack()
            try:
                data = _form(data, files)
            except BaseException:
                files.close()
                raise
        method, url = request.method, request.url
        try:
            resp = await _guarded(
                session.request(
                    method,
                    url,
                    params=request.params or None,
                    headers=request.headers,
                    data=data,
                    timeout=self._timeout_for(request.timeout, stream),
                    allow_redirects=self._follow_redirects,
                ),
                method,
                url,
            )
        except BaseException:
            if files is not None:
                files.close()
            raise
        if stream:
            return Response(
                resp.status,
                resp.headers,
                chunks=_Chunks(resp, method, url, self._chunk_size),
                release=_Releaser(resp, files),
            )
        try:
            content = await _guarded(resp.read(), method, url)
        finally:
            resp.release()
            if files is not None:
                files.close()
        return Response(resp.status, resp.headers, content)

    async def aclose(self) -> None:
        """Close the session if this transport created it. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()

    async def __aenter__(self) -> AiohttpTransport:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        owner = "own" if self._owns_session else "borrowed"
        state = "closed" if self._closed else "open"
        return f"AiohttpTransport({owner} session, {state})"


class _Releaser:
    """Release a streamed response's connection, then close the files it uploaded."""

    __slots__ = ("_files", "_resp")

    def __init__(self, resp: aiohttp.ClientResponse, files: ExitStack | None) -> None:
        self._resp = resp
        self._files = files

    async def __call__(self) -> None:
        try:
            self._resp.release()
        finally:
            if self._files is not None:
                self._files.close()


class _FileCutShort(OSError):
    """A file got shorter while it was uploaded (aiohttp reports it as the cause of a
    ``ClientOSError``; :func:`_guarded` raises it as an :class:`InputError`)."""


def _read_at(file: io.BufferedReader, buffer: bytearray, offset: int) -> int:
    """Fill ``buffer`` from ``offset`` of ``file``; the bytes read (0 at its end). With
    ``preadv`` the file's position is not used, so a read left running by a cancelled
    send cannot move the next send's reads."""
    if hasattr(os, "preadv"):
        return os.preadv(file.fileno(), [buffer], offset)
    file.seek(offset)
    return file.readinto(buffer)


class _FilePayload(Payload):
    """An uploaded regular file's content, read ``CHUNK_SIZE`` at a time as it is sent,
    with its length known from the start (the request has a ``Content-Length``).

    As in aiohttp's own file payload, the reads run in the loop's executor; unlike it,
    each chunk's buffer is allocated in the loop's thread, and the worker only fills it.
    Chunks allocated by the workers stayed in their malloc arenas, one per thread that
    ever read: a run uploading six shards at once kept about 6 MB more
    (``benchmarks/bench_run_100k.py --sizes``). Each chunk is a new buffer, never
    changed once written: the socket's transport may keep it rather than copy it.
    """

    _autoclose = True  # the file is the transport's: it closes it with the request

    def __init__(
        self, file: io.BufferedReader, size: int, *, filename: str, content_type: str
    ) -> None:
        super().__init__(file, filename=filename, content_type=content_type)
        self._file = file
        self._length = size
        self._size = size

    def _read_all(self) -> bytes:
        return os.pread(self._file.fileno(), self._length, 0)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._read_all().decode(encoding, errors)

    async def as_bytes(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return await in_thread(None, self._read_all)

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        file = self._file
        total = self._length if content_length is None else min(self._length, content_length)
        sent = 0  # from the first byte on every send (a redirect sends it again)
        while sent < total:
            buffer = bytearray(min(CHUNK_SIZE, total - sent))
            got = await in_thread(None, _read_at, file, buffer, sent)
            if not got:
                raise _FileCutShort(
                    f"{file.name}: the file got shorter while it was uploaded "
                    f"({sent} of {total} bytes sent); nothing was uploaded"
                )
            if got < len(buffer):
                del buffer[got:]
            await writer.write(buffer)
            sent += got


def _form(body: Multipart, files: ExitStack) -> aiohttp.FormData:
    """Encode ``body``; file parts with a path are opened here and streamed as they are
    sent (:class:`_FilePayload`)."""
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in body.fields:
        form.add_field(name, value)
    for name, part in body.files:
        content: bytes | IO[bytes] | Payload
        if part.path is not None:
            file = files.enter_context(open(part.path, "rb"))  # noqa: SIM115
            status = os.fstat(file.fileno())
            if stat.S_ISREG(status.st_mode):
                content = _FilePayload(
                    file, status.st_size, filename=part.filename, content_type=part.content_type
                )
            else:  # a pipe...: aiohttp streams it to its end (chunked, no length known)
                content = file
        else:
            assert part.content is not None
            content = part.content
        form.add_field(name, content, filename=part.filename, content_type=part.content_type)
    return form
