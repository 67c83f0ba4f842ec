"""Small asyncio helpers shared by the fleet and the runner."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any

from ._clock import Clock

__all__ = ["cancel_and_wait", "first_of", "run_all", "run_bounded", "sleep_or_set"]


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
