"""Following a run's final results as they become final: :func:`follow_results`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from .._aio import sleep_or_set
from .._clock import Clock
from ._config import RunResult
from ._journal import Journal
from ._output import next_results

__all__ = ["follow_results"]


async def follow_results(
    runner: asyncio.Task[Any],
    *,
    order: str,
    clock: Clock,
    ingested: Callable[[], bool],
    open_reader: Callable[[], Awaitable[Journal]],
    changed: asyncio.Event,
    finished: asyncio.Event,
) -> AsyncGenerator[RunResult, None]:
    """The final results of the run ``runner`` drives, each request's once, in
    ``order``, until it ends (then its error, if it failed).

    They are read from the journal through a reader of their own (opened by
    ``open_reader`` once the run ``ingested()`` its source), whenever the run sets
    ``changed`` (or ``finished``), so a slow reader holds no results in memory and
    misses none.
    """
    reader: Journal | None = None
    cursor = -1
    try:
        while True:
            done = runner.done()
            if reader is None and ingested():
                reader = await open_reader()
            if reader is not None:
                changed.clear()
                batch, cursor = await next_results(reader, order=order, cursor=cursor)
                for result in batch:
                    yield result
                if batch:
                    continue
            if done:
                runner.result()  # the run's error, if it failed
                return
            await sleep_or_set(clock, None, changed, finished)
    finally:
        if reader is not None:
            await reader.close()
