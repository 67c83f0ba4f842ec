"""A transport with no sockets: requests go straight to an async handler.

The handler is usually :meth:`aiobatch.testing.FakeBatchService.handle`, but any
``async (Request) -> Response`` function works (like httpx's ``MockTransport``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from .._clock import Clock, SystemClock
from ..errors import TransportError, TransportTimeoutError
from ._base import Request, Response

__all__ = ["InMemoryTransport"]

Handler = Callable[[Request], Awaitable[Response]]


class InMemoryTransport:
    """Hand each request to ``handler`` in the same event loop.

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

    async def send(self, request: Request, *, stream: bool = False) -> Response:
        """Answer ``request`` through the handler."""
        if self._closed:
            raise TransportError("transport is closed", method=request.method, url=request.url)
        timeout = request.timeout if request.timeout is not None else self._timeout
        if timeout is None:
            return await self._call(request)
        work = asyncio.ensure_future(self._call(request))
        timer = asyncio.ensure_future(self._clock.sleep(timeout))
        try:
            done, _ = await asyncio.wait({work, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not work.done():
                work.cancel()
        if work in done:
            return work.result()
        raise TransportTimeoutError(
            f"no answer within {timeout:g}s", method=request.method, url=request.url
        )

    async def _call(self, request: Request) -> Response:
        try:
            return await self._handler(request)
        except TransportError:
            raise
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            raise TransportError(
                f"in-memory handler failed: {type(exc).__name__}: {exc}",
                method=request.method,
                url=request.url,
            ) from exc

    async def aclose(self) -> None:
        """Refuse further requests."""
        self._closed = True

    def __repr__(self) -> str:
        return f"InMemoryTransport({self._handler!r})"
