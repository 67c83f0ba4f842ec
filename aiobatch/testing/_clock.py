"""A virtual clock: time moves only when a test (or the auto-advance driver) moves it."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .._aio import cancel_and_wait, threads_done

__all__ = ["VirtualClock"]


class VirtualClock:
    """A :class:`~aiobatch.Clock` whose time moves only when told to.

    ``sleep`` parks the caller until virtual time reaches its wake-up time. Time moves
    with :meth:`advance` / :meth:`advance_to`, or by itself inside :meth:`auto_advance`,
    which jumps to the next wake-up whenever the event loop has nothing else to run;
    that way thousands of concurrent sleepers wake in the right order, instantly. Work
    that aiobatch hands to a thread and waits for (its journal's worker, an upload's
    reads) counts as the loop's own: :meth:`auto_advance` and :meth:`run_for` move time
    only once it is done (:meth:`advance` and :meth:`advance_to` move it at once).

    Args:
        start: the initial time, in Unix seconds.
    """

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self._now = float(start)
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        """The virtual time, in Unix seconds."""
        return self._now

    def monotonic(self) -> float:
        """The same virtual time (it never goes backwards)."""
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Wait until virtual time has moved ``seconds`` forward."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        await fut

    @property
    def next_wakeup(self) -> float | None:
        """When the earliest sleeper wakes, or None when nobody sleeps."""
        self._drop_cancelled()
        return self._sleepers[0][0] if self._sleepers else None

    def _drop_cancelled(self) -> None:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)

    def advance_to(self, when: float) -> None:
        """Move time to ``when`` (never backwards) and wake every sleeper due by then."""
        if when > self._now:
            self._now = when
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and wake every sleeper due by then."""
        self.advance_to(self._now + seconds)

    async def run_for(self, seconds: float) -> None:
        """Let everything run while time moves ``seconds``, waking sleepers in order."""
        end = self._now + seconds
        while True:
            await _settle()
            nxt = self.next_wakeup
            if nxt is None or nxt > end:
                break
            self.advance_to(nxt)
        self.advance_to(end)
        await _settle()

    @asynccontextmanager
    async def auto_advance(self) -> AsyncIterator[VirtualClock]:
        """Inside this block, time jumps to the next wake-up whenever the loop is idle.

        Meant for code that waits only on this clock, on in-memory transports and on
        aiobatch's own work in threads: a wait on real IO looks idle too, and time would
        jump past it.
        """
        driver = asyncio.ensure_future(self._drive())
        try:
            yield self
        finally:
            await cancel_and_wait([driver])

    async def _drive(self) -> None:
        while True:
            await _settle()
            nxt = self.next_wakeup
            if nxt is None:
                # Nobody sleeps on this clock: something waits on other work. Do not spin.
                await asyncio.sleep(0.0005)
                continue
            self.advance_to(nxt)

    def __repr__(self) -> str:
        return f"VirtualClock(now={self._now!r}, sleepers={len(self._sleepers)})"


async def _settle(max_rounds: int = 10_000) -> None:
    """Yield to the event loop until it has nothing else ready to run and no work it
    waits for in a thread."""
    while True:
        await _settle_loop(max_rounds)
        if not await threads_done():
            return


async def _settle_loop(max_rounds: int) -> None:
    """Yield to the event loop until it has nothing else ready to run."""
    loop = asyncio.get_running_loop()
    ready = getattr(loop, "_ready", None)
    for _ in range(max_rounds):
        await asyncio.sleep(0)
        if ready is None:
            # Another loop implementation: fall back to a fixed number of rounds.
            if _ >= 50:
                return
        elif not ready:
            return
