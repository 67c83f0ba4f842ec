"""The small asyncio helpers the fleet and the runner wait with: a cancel that reaches
them while they clean up still cancels their caller."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from aiobatch import _aio
from aiobatch._aio import cancel_and_wait, first_of, in_thread, wait_out


def _slow_to_end(release: asyncio.Event) -> asyncio.Task[None]:
    """A task that, once cancelled, takes until ``release`` to end."""

    async def body() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.shield(release.wait())
            raise

    return asyncio.ensure_future(body())


async def _turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_first_of_passes_on_a_cancel_that_comes_while_the_losers_end() -> None:
    """A task cancelled while first_of waits for the other futures to end is cancelled,
    not left running as if nothing happened."""
    release = asyncio.Event()
    winner = asyncio.ensure_future(asyncio.sleep(0))
    loser = _slow_to_end(release)
    after: list[str] = []

    async def waiter() -> None:
        await first_of(winner, loser)
        after.append("went on")
        await asyncio.Event().wait()

    task = asyncio.ensure_future(waiter())
    await _turns()  # the winner is done; first_of waits for the loser to end
    assert not task.done() and loser.cancelled() is False
    task.cancel()
    await _turns()
    release.set()
    await _turns()
    assert task.cancelled()
    assert after == []


async def test_cancel_and_wait_passes_on_a_cancel_that_comes_while_it_waits() -> None:
    """A task cancelled while cancel_and_wait waits for the tasks to end is cancelled."""
    release = asyncio.Event()
    slow = _slow_to_end(release)
    after: list[str] = []

    async def closer() -> None:
        await cancel_and_wait([slow])
        after.append("went on")
        await asyncio.Event().wait()

    await _turns()
    task = asyncio.ensure_future(closer())
    await _turns()
    task.cancel()
    await _turns()
    release.set()
    await _turns()
    assert task.cancelled()
    assert after == []
    assert slow.done()


async def test_first_of_raises_the_error_of_the_future_that_ended_first() -> None:
    """When the first future to end failed, first_of raises its error."""

    async def fails() -> None:
        raise ValueError("boom")

    failing = asyncio.ensure_future(fails())
    idle = asyncio.ensure_future(asyncio.Event().wait())
    try:
        await first_of(failing, idle)
    except ValueError as exc:
        assert str(exc) == "boom"
    else:
        raise AssertionError("first_of did not raise")
    assert idle.cancelled()


async def test_in_thread_gives_the_functions_result_and_raises_its_error() -> None:
    """in_thread's future has the function's result, or raises what it raised."""
    with ThreadPoolExecutor(1) as pool:
        assert await in_thread(pool, sum, [1, 2, 3]) == 6
        with pytest.raises(ZeroDivisionError):
            await in_thread(pool, divmod, 1, 0)


async def test_a_thread_that_lets_the_gil_go_at_each_step_finishes_beside_a_busy_loop() -> None:
    """A thread that lets the GIL go 300 times finishes while a task keeps the loop busy."""
    # Without the hand-over the busy task made 373 to 1.6 million turns before the
    # thread was done (its waits for the GIL depend on the scheduling); with it, about
    # 470 to 4,600 (runs on one machine).

    def steps() -> int:
        for _ in range(300):
            time.sleep(0)  # lets the GIL go, and takes it back
        return 300

    turns = 0
    with ThreadPoolExecutor(1) as pool:
        future = in_thread(pool, steps)
        while not future.done() and turns < 200_000:
            total = 0
            for number in range(2000):
                total += number
            turns += 1
            await asyncio.sleep(0)
        finished = future.done()
        await future
    assert finished, f"the thread was not done after {turns} turns of the busy task"


class _Result:
    """A result that can be watched with a weak reference."""


async def test_in_thread_keeps_no_result_once_the_caller_drops_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A finished call's result is freed when its caller drops it, without the cyclic GC."""
    monkeypatch.setattr(_aio, "_HAND_OVER_EVERY", 0.0)
    release = threading.Event()

    def work() -> _Result:
        release.wait()
        return _Result()

    gc.disable()
    try:
        with ThreadPoolExecutor(1) as pool:
            future = in_thread(pool, work)
            await _turns(5)  # the hand-over runs a few times meanwhile
            release.set()
            result = weakref.ref(await future)
            del future
            await _turns(5)
            assert result() is None
    finally:
        gc.enable()


async def test_the_loop_hands_the_gil_over_once_a_turn_however_many_calls_are_pending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While calls to in_thread are pending, the loop's thread sleeps once per hand-over."""
    sleeps: list[float] = []
    monkeypatch.setattr(_aio, "_HAND_OVER_EVERY", 0.0)  # a hand-over at every turn
    monkeypatch.setattr(_aio, "time", SimpleNamespace(sleep=sleeps.append))
    release = threading.Event()
    with ThreadPoolExecutor(10) as pool:
        futures = [in_thread(pool, release.wait) for _ in range(10)]
        assert sleeps == []  # none at the calls themselves
        await _turns(5)
        during = len(sleeps)
        release.set()
        await asyncio.gather(*futures)
        sleeps.clear()
        await _turns(5)
    assert 1 <= during <= 6
    assert sleeps == []


async def test_a_call_that_starts_now_hands_the_gil_over_as_it_is_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An in_thread call with start_now lets the GIL go once as it is made, before any turn."""
    sleeps: list[float] = []
    monkeypatch.setattr(_aio, "time", SimpleNamespace(sleep=sleeps.append))
    with ThreadPoolExecutor(2) as pool:
        first = in_thread(pool, int, "1", start_now=True)
        second = in_thread(pool, int, "2", start_now=True)
        assert sleeps == [_aio._HAND_OVER_FOR] * 2
        assert await asyncio.gather(first, second) == [1, 2]


async def test_wait_out_waits_through_cancels_and_then_raises_one() -> None:
    """wait_out cancelled twice still waits until its future is done, then raises the cancel."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()
    waiting = asyncio.ensure_future(wait_out(future))
    for _ in range(2):
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.sleep(0)
        assert not waiting.done()
    future.set_result(1)
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert future.result() == 1
