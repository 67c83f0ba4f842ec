"""Small asyncio helpers shared by the fleet and the runner."""

from __future__ import annotations

import asyncio
import sys
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

from ._clock import Clock

__all__ = [
    "cancel_and_wait",
    "first_of",
    "in_thread",
    "run_all",
    "run_bounded",
    "sleep_or_set",
    "threads_done",
]

T = TypeVar("T")

#: While the loop waits for a thread (:func:`in_thread`), its own thread sleeps
#: ``_HAND_OVER_FOR`` seconds every ``_HAND_OVER_EVERY`` seconds. Python before 3.11 on
#: Windows sleeps at least a millisecond, in practice a tick of the system timer (about
#: 15.6 ms; bpo-21302, python/cpython#89592), so there it only yields (``sleep(0)``; on
#: Linux that kept most of the gain: 5,000 requests beside a busy task took 2.03 s,
#: against 1.60 s with 0.1 ms and 1.24 s with a calm loop).
_HAND_OVER_EVERY = 0.002
_HAND_OVER_FOR = 0.0 if sys.platform == "win32" and sys.version_info < (3, 11) else 0.0001


async def first_of(*futures: asyncio.Future[Any]) -> None:
    """Wait until one of ``futures`` is done; cancel the others and wait for them to end
    (also when this wait itself is cancelled), so none is left running. The error of a
    future that ended by failing is raised; a cancel of this wait is never swallowed."""
    try:
        await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(futures)
    for future in futures:
        error = None if future.cancelled() else future.exception()
        if error is not None:
            raise error


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel every task, then wait for each to end; their errors are not raised (the
    caller is closing down). A cancel of this wait itself is passed on, not swallowed
    (``asyncio.wait`` raises only for its caller's own cancel)."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: not logged as "never retrieved"


async def wait_out(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done, however often this wait is cancelled meanwhile
    (work in a thread cannot be stopped, and what it uses must stay held until it
    ends); a cancel that came meanwhile is raised once it is done."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


async def sleep_or_set(clock: Clock, seconds: float | None, *events: asyncio.Event) -> None:
    """Wait ``seconds`` on ``clock`` (None: no time limit) or until one of ``events`` is
    set, whichever comes first."""
    waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(event.wait()) for event in events]
    if seconds is not None:
        waits.append(asyncio.ensure_future(clock.sleep(max(seconds, 0.0))))
    await first_of(*waits)


async def run_all(coroutines: list[Coroutine[Any, Any, None]]) -> None:
    """Run coroutines concurrently; if one fails (or this is cancelled), cancel the rest
    and wait for them, so nothing is left running."""
    if len(coroutines) == 1:
        await coroutines[0]
        return
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def run_bounded(jobs: Sequence[Callable[[], Awaitable[None]]], limit: int) -> None:
    """Run ``jobs`` (each makes an awaitable when called), in order, on at most
    ``limit`` workers; as :func:`run_all` when one fails."""
    if not jobs:
        return
    queue = deque(jobs)

    async def worker() -> None:
        while queue:
            await queue.popleft()()

    await run_all([worker() for _ in range(min(len(jobs), limit))])


def in_thread(
    executor: Executor | None, function: Callable[..., T], *args: Any, start_now: bool = False
) -> asyncio.Future[T]:
    """``function(*args)`` in a thread of ``executor`` (None: the loop's default one), as
    a future of the running loop; until it is done, the loop's thread lets Python's GIL
    go now and then (it asks for a sleep of ``_HAND_OVER_FOR`` seconds every
    ``_HAND_OVER_EVERY``, once for all the calls pending on the loop). ``start_now``: it
    also lets the GIL go once right away, so that the thread starts before the loop next
    waits.

    Why: the thread lets the GIL go at each step of a SQLite statement and each read or
    write of a file, and must take it back to go on. Beside a loop that never waits
    long (a task that does some work, then ``await asyncio.sleep(0)``: an eval harness
    that scores in the loop), the loop's thread lets the GIL go at each turn (in its
    ``select``) but mostly takes it back before the waiting thread wakes up, so the
    thread can wait seconds each time (as in python/cpython#90204).
    ``benchmarks/bench_busy_loop.py``, 1,000 requests beside such a task: 172-236 s
    before on an otherwise idle machine (1.1-29.5 s in runs made while other programs
    ran on it), 0.91-0.96 s after, 0.80 s with a calm loop."""
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(executor, function, *args)
    hand_over = _HAND_OVERS.get(loop)
    if hand_over is None:
        hand_over = _HAND_OVERS[loop] = _HandOver()
    hand_over.wait_for(loop, future)
    if start_now:
        # The journal's calls: a new run's ingest inspects a batch of lines in the loop
        # while the one before goes into the journal in its thread, and without this the
        # thread began only as the loop waited for it (300,000 requests: 2.9-3.2 s with
        # it, 3.7-4.2 s without). Not for every call: an upload reads its file a chunk a
        # call, and 800 reads of 64 KiB one after the other took 0.18-0.19 s so, against
        # 0.10-0.11 s.
        time.sleep(_HAND_OVER_FOR)
    return future


class _HandOver:
    """The hand-over of :func:`in_thread` on one loop: while any of its calls is
    pending, the loop's thread sleeps ``_HAND_OVER_FOR`` every ``_HAND_OVER_EVERY``.

    It holds no reference to the futures: a closure over one (and its timer over the
    closure) kept the results of finished calls for the cyclic garbage collector, and
    the runner's peak memory at 100,000 requests rose from 20 MB to 33 MB. Nor to the
    loop, but through its timer and its ``idle`` future (for :func:`threads_done`)
    while calls are pending (the loop is the key of ``_HAND_OVERS``). One timer serves
    every pending call: a timer per call slowed the loop with each more call."""

    __slots__ = ("_handle", "_idle", "_pending")

    def __init__(self) -> None:
        self._pending = 0
        self._handle: asyncio.TimerHandle | None = None
        self._idle: asyncio.Future[None] | None = None

    def wait_for(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> None:
        """Hand over until ``future`` is done (and the others pending)."""
        self._pending += 1
        if self._handle is None:
            self._handle = loop.call_later(_HAND_OVER_EVERY, self._sleep)
        future.add_done_callback(self._done)

    def _sleep(self) -> None:
        time.sleep(_HAND_OVER_FOR)
        self._handle = asyncio.get_running_loop().call_later(_HAND_OVER_EVERY, self._sleep)

    def _done(self, _future: asyncio.Future[Any]) -> None:
        self._pending -= 1
        if not self._pending:
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None
            if self._idle is not None:
                if not self._idle.done():
                    self._idle.set_result(None)
                self._idle = None

    def idle(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None] | None:
        """A future done once no call is pending; None when none is."""
        if not self._pending:
            return None
        if self._idle is None:
            self._idle = loop.create_future()
        return self._idle


async def threads_done() -> bool:
    """Wait until no :func:`in_thread` call of the running loop is pending; whether one
    was. (A :class:`~aiobatch.testing.VirtualClock` moves time only once the loop is idle
    and this is done: the loop waits for that work, as it would for work of its own.)"""
    loop = asyncio.get_running_loop()
    hand_over = _HAND_OVERS.get(loop)
    idle = hand_over.idle(loop) if hand_over is not None else None
    if idle is None:
        return False
    await asyncio.shield(idle)
    return True


#: Each running loop's hand-over (it goes with its loop).
_HAND_OVERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _HandOver] = (
    weakref.WeakKeyDictionary()
)
