"""The virtual clock: sleepers wake in time order, only when time moves."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiobatch._aio import in_thread
from aiobatch._clock import Clock, SystemClock
from aiobatch.testing import VirtualClock


def test_both_clocks_satisfy_the_protocol() -> None:
    """SystemClock and VirtualClock are Clocks."""
    assert isinstance(SystemClock(), Clock)
    assert isinstance(VirtualClock(), Clock)


async def test_sleepers_wake_only_when_time_reaches_them() -> None:
    """advance() wakes exactly the sleepers whose time has come."""
    clock = VirtualClock(start=100.0)
    woke: list[float] = []

    async def sleeper(seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(clock.now())

    tasks = [asyncio.ensure_future(sleeper(s)) for s in (5, 1, 3)]
    await asyncio.sleep(0)
    assert clock.next_wakeup == 101.0
    clock.advance(2)
    await asyncio.sleep(0)
    assert woke == [102.0]
    clock.advance(10)
    await asyncio.gather(*tasks)
    assert woke == [102.0, 112.0, 112.0]
    assert clock.next_wakeup is None


async def test_run_for_wakes_in_order_at_their_own_times() -> None:
    """run_for() steps through wake-ups so each sleeper sees its own wake time."""
    clock = VirtualClock(start=0.0)
    seen: list[tuple[str, float]] = []

    async def chain(name: str, step: float) -> None:
        for _ in range(3):
            await clock.sleep(step)
            seen.append((name, clock.now()))

    tasks = [asyncio.ensure_future(chain("a", 2)), asyncio.ensure_future(chain("b", 5))]
    await clock.run_for(10)
    assert [t for n, t in seen if n == "a"] == [2, 4, 6]
    assert [t for n, t in seen if n == "b"] == [5, 10]
    assert clock.now() == 10
    await clock.run_for(5)
    await asyncio.gather(*tasks)
    assert [t for n, t in seen if n == "b"] == [5, 10, 15]


async def test_auto_advance_runs_many_sleepers_without_wall_time() -> None:
    """Inside auto_advance, a thousand staggered sleepers finish at their virtual times."""
    clock = VirtualClock(start=0.0)

    async def nap(i: int) -> float:
        await clock.sleep(i % 10 + 1)
        await clock.sleep(60)
        return clock.now()

    async with clock.auto_advance():
        ends = await asyncio.gather(*(nap(i) for i in range(1000)))
    assert ends == [i % 10 + 61 for i in range(1000)]
    assert clock.now() == 70


#: Turns of the loop the tests below spin while a thread call is pending: three times
#: the rounds after which the clock's settling stops waiting for the loop to be idle.
_SPINS = 30_000


async def _spin_then_release(
    release: threading.Event, clock: VirtualClock, waiter: asyncio.Future[Any]
) -> tuple[float, bool]:
    """Spin the loop ``_SPINS`` turns, then release the held call (also on failure); the
    clock's time and whether ``waiter`` was done by then."""
    try:
        for _ in range(_SPINS):
            await asyncio.sleep(0)
        return clock.now(), waiter.done()
    finally:
        release.set()


def _held_call(clock: VirtualClock, release: threading.Event) -> asyncio.Future[float]:
    """An in_thread call that waits for ``release``, then reads the virtual time."""

    def work() -> float:
        release.wait()
        return clock.now()

    return in_thread(None, work)


async def test_auto_advance_waits_for_work_in_a_thread() -> None:
    """Inside auto_advance, time does not move while an in_thread call is pending."""
    clock = VirtualClock(start=0.0)
    release = threading.Event()
    async with clock.auto_advance():
        sleeper = asyncio.ensure_future(clock.sleep(5))
        call = _held_call(clock, release)
        assert await _spin_then_release(release, clock, sleeper) == (0.0, False)
        assert await call == 0.0
        await sleeper
    assert clock.now() == 5.0


async def test_run_for_waits_for_work_in_a_thread() -> None:
    """run_for() moves time only once a pending in_thread call is done."""
    clock = VirtualClock(start=0.0)
    release = threading.Event()
    call = _held_call(clock, release)
    runner = asyncio.ensure_future(clock.run_for(5))
    assert await _spin_then_release(release, clock, runner) == (0.0, False)
    assert await call == 0.0
    await runner
    assert clock.now() == 5.0


async def test_time_never_goes_backwards() -> None:
    """advance_to an earlier time leaves the clock where it is."""
    clock = VirtualClock(start=50.0)
    clock.advance_to(10.0)
    assert clock.now() == 50.0
    assert clock.monotonic() == 50.0


async def test_cancelled_sleeper_is_forgotten() -> None:
    """A cancelled sleep does not keep a wake-up pending."""
    clock = VirtualClock(start=0.0)
    task = asyncio.ensure_future(clock.sleep(5))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert clock.next_wakeup is None
