"""The seam between aiobatch and the network: one small protocol, our own message types.

A transport sends a :class:`Request` and returns a :class:`Response`; it knows nothing of
providers, retries or batches. Network failures leave a transport only as
:class:`~aiobatch.errors.TransportError` (or its subclasses), never as a backend's own
exception type. A file part whose path does not exist raises :class:`FileNotFoundError`
before anything is sent (the caller's fault, never retried). The in-memory transport
passes a handler's own bugs through unchanged: a crash in a fake must be loud, not
retried as if the network had failed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Protocol, runtime_checkable

import attrs

__all__ = [
    "FilePart",
    "Multipart",
    "Request",
    "Response",
    "Transport",
]


def _lower_keys(headers: Mapping[str, str]) -> Mapping[str, str]:
    return {k.lower(): v for k, v in headers.items()}


@attrs.frozen
class FilePart:
    """A file field of a multipart body, read from ``path`` (streamed) or from ``content``.

    Exactly one of ``path`` and ``content`` is set.
    """

    filename: str
    path: str | os.PathLike[str] | None = None
    content: bytes | None = None
    content_type: str = "application/octet-stream"

    def __attrs_post_init__(self) -> None:
        if (self.path is None) == (self.content is None):
            raise ValueError("FilePart needs exactly one of path and content")

    def size(self) -> int:
        """The file's size in bytes."""
        if self.content is not None:
            return len(self.content)
        assert self.path is not None
        return os.path.getsize(self.path)

    def read(self) -> bytes:
        """The whole file (for in-memory use; transports stream ``path`` instead)."""
        if self.content is not None:
            return self.content
        assert self.path is not None
        with open(self.path, "rb") as fh:
            return fh.read()


@attrs.frozen
class Multipart:
    """A ``multipart/form-data`` body: plain fields, then file fields."""

    fields: tuple[tuple[str, str], ...] = ()
    files: tuple[tuple[str, FilePart], ...] = ()


@attrs.frozen
class Request:
    """One HTTP request.

    Attributes:
        method: ``GET``, ``POST``, ``DELETE``...
        url: the absolute URL, without the query string.
        params: query parameters.
        headers: request headers (credentials among them: never shown by repr).
        body: raw bytes (JSON), a :class:`Multipart` form, or None.
        timeout: seconds for the whole exchange, or None for the transport's default.
    """

    method: str
    url: str
    params: Mapping[str, str] = attrs.field(factory=dict)
    headers: Mapping[str, str] = attrs.field(factory=dict, repr=False, converter=_lower_keys)
    body: bytes | Multipart | None = attrs.field(default=None, repr=False)
    timeout: float | None = None


class Response:
    """One HTTP response: status, headers with lower-cased names, and a body.

    The body is either already read (``content``) or a stream of chunks; a streamed
    response must be closed with :meth:`aclose` (or read to the end).
    """

    __slots__ = ("_chunks", "_content", "_release", "headers", "status")

    def __init__(
        self,
        status: int,
        headers: Mapping[str, str],
        content: bytes | None = None,
        *,
        chunks: AsyncIterator[bytes] | None = None,
        release: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if content is not None and chunks is not None:
            raise ValueError("a Response has content or chunks, not both")
        self.status = status
        self.headers: Mapping[str, str] = _lower_keys(headers)
        self._content = content if content is not None or chunks is not None else b""
        self._chunks = chunks
        self._release = release

    @property
    def is_streamed(self) -> bool:
        """Whether the body is still to be read from a stream."""
        return self._content is None

    async def read(self) -> bytes:
        """The whole body (reads and closes a stream)."""
        if self._content is None:
            parts = [chunk async for chunk in self.iter_chunks()]
            self._content = b"".join(parts)
        return self._content

    async def iter_chunks(self) -> AsyncGenerator[bytes, None]:
        """The body in chunks as they arrive; closes the response at the end.

        Closing the generator early (``aclose()``, or leaving an ``async for`` by
        ``break`` inside ``contextlib.aclosing``) releases the connection too.
        """
        if self._content is not None:
            if self._content:
                yield self._content
            return
        assert self._chunks is not None
        chunks = self._chunks
        try:
            async for chunk in chunks:
                if chunk:
                    yield chunk
        finally:
            closer = getattr(chunks, "aclose", None)
            if closer is not None:
                await closer()
            await self.aclose()

    async def aclose(self) -> None:
        """Release the connection behind a streamed body. Safe to call twice."""
        release, self._release = self._release, None
        if release is not None:
            await release()

    def __repr__(self) -> str:
        return f"<Response {self.status}>"


@runtime_checkable
class Transport(Protocol):
    """What aiobatch needs from the network.

    ``send`` returns with the body read unless ``stream`` is true, in which case the
    caller reads :meth:`Response.iter_chunks` and must close the response.
    """

    async def send(self, request: Request, *, stream: bool = False) -> Response:
        """Send one request.

        Raises:
            FileNotFoundError: a file part's path does not exist; nothing was sent.
            ConnectError: the request was never sent.
            TransportTimeoutError: no complete answer in time.
            TransportError: anything else that went wrong in the network.
        """
        ...

    async def aclose(self) -> None:
        """Release every connection. Safe to call twice."""
        ...
