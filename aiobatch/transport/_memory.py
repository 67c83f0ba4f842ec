"""A transport with no sockets: requests go straight to an async handler.

The handler is usually :meth:`aiobatch.testing.FakeBatchService.handle`, but any
``async (Request) -> Response`` function works (like httpx's ``MockTransport``).
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Awaitable, Callable

from .._clock import Clock, SystemClock
from ..errors import ClosedError, TransportError, TransportTimeoutError
from ._base import Multipart, Request, Response

__all__ = ["InMemoryTransport"]

Handler = Callable[[Request], Awaitable[Response]]


def check_upload_files(request: Request) -> None:
    """Raise :class:`FileNotFoundError` if a file part's ``path`` does not exist.

    Called before a request is sent, so a missing upload is a caller error raised
    before anything reaches the server (never a retryable network failure).
    """
    body = request.body
    if not isinstance(body, Multipart):
        return
    for _, part in body.files:
        if part.path is not None and not os.path.exists(part.path):
            path = os.fspath(part.path)
            raise FileNotFoundError(
                errno.ENOENT, f"the file to upload as {part.filename!r} does not exist", path
            )


class InMemoryTransport:
    """Hand each request to ``handler`` in the same event loop.

    The in-memory transport is a test seam, so a bug must be loud: only a
    :class:`~aiobatch.errors.TransportError` raised by the handler counts as a network
    failure; any other exception propagates unchanged.

    Timeouts behave like a real server's: when the caller gives up (``timeout``
    passed), the handler is *not* cancelled. It runs to completion in the background,
    so a request can still take effect after its caller timed out (a late commit); its
    response, if any, is closed unread. :meth:`aclose` cancels those that are still
    running. A caller that is cancelled cancels its handler too, and without a timeout
    the handler simply runs in the caller's task.

    Args:
        handler: answers one request; may raise :class:`~aiobatch.errors.TransportError`
            to play a network failure.
        clock: measures timeouts (a virtual clock makes them virtual too).
        timeout: default seconds per request; None waits forever.
    """

    def __init__(
        self, handler: Handler, *, clock: Clock | None = None, timeout: float | None = None
    ) -> None:
        self._handler = handler
        self._clock: Clock = clock or SystemClock()
        self._timeout = timeout
        self._closed = False
        # Handlers whose caller timed out, kept alive (and referenced) until they end.
        self._abandoned: set[asyncio.Task[None]] = set()
        # Exceptions other than TransportError raised by abandoned handlers.
        self._failures: list[BaseException] = []

    @property
    def abandoned(self) -> int:
        """How many handlers whose caller timed out are still running."""
        return len(self._abandoned)

    async def send(self, request: Request, *, stream: bool = False) -> Response:
        """Answer ``request`` through the handler.

        Raises:
            FileNotFoundError: a file part's ``path`` does not exist (nothing was sent).
            TransportTimeoutError: no answer within the timeout, on the clock; the
                handler keeps running.
            ClosedError: the transport is closed (never retried).
            TransportError: the handler raised one (a simulated network failure).
        """
        if self._closed:
            raise ClosedError(f"the transport is closed ({request.method} {request.url})")
        check_upload_files(request)
        timeout = request.timeout if request.timeout is not None else self._timeout
        if timeout is None:
            return await self._handler(request)
        work = asyncio.ensure_future(self._handler(request))
        timer = asyncio.ensure_future(self._clock.sleep(timeout))
        try:
            done, _ = await asyncio.wait({work, timer}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # The caller was cancelled: its handler goes with it (an answer already
            # there is closed in the background).
            if work.done():
                self._abandon(work)
            else:
                work.cancel()
            raise
        finally:
            timer.cancel()
        if work in done:
            return work.result()
        self._abandon(work)
        raise TransportTimeoutError(
            f"no answer within {timeout:g}s", method=request.method, url=request.url
        )

    def _abandon(self, work: asyncio.Future[Response]) -> None:
        """Let ``work`` finish in the background, holding a reference to it."""
        reaper = asyncio.ensure_future(self._reap(work))
        self._abandoned.add(reaper)
        reaper.add_done_callback(self._abandoned.discard)

    async def _reap(self, work: asyncio.Future[Response]) -> None:
        """Wait for an abandoned handler; close its response, keep any bug for aclose."""
        try:
            response = await work
        except TransportError:
            return  # a network failure nobody is left to see
        except Exception as exc:
            self._failures.append(exc)
            return
        await response.aclose()

    async def aclose(self) -> None:
        """Refuse further requests and cancel the handlers still running in the background.

        Raises:
            Exception: the first exception (other than TransportError) that a handler
                raised after its caller had timed out, so a bug is never silent.
        """
        self._closed = True
        while self._abandoned:
            pending = list(self._abandoned)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._failures:
            failure, self._failures = self._failures[0], []
            raise failure

    def __repr__(self) -> str:
        return f"InMemoryTransport({self._handler!r})"
