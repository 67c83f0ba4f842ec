"""RequestBudget: a token bucket on the injected clock, with fleet-wide pauses."""

from __future__ import annotations

import asyncio

import pytest
from conftest import within_bucket
from hypothesis import given, settings
from hypothesis import strategies as st

from aiobatch import RequestBudget
from aiobatch.testing import RateLimit, RateLimiter, VirtualClock


async def grant_times(
    clock: VirtualClock, budget: RequestBudget, arrivals: list[float]
) -> list[float]:
    """Start one acquirer at each arrival offset; return when each was granted."""
    granted: list[float] = []
    start = clock.now()

    async def one(at: float) -> None:
        await clock.sleep(at)
        await budget.acquire()
        granted.append(clock.now() - start)

    async with clock.auto_advance():
        await asyncio.gather(*(one(at) for at in arrivals))
    return granted


async def test_burst_is_granted_at_once_then_rate_applies() -> None:
    """A full bucket grants `burst` at once; the rest follow at `rate` per second."""
    clock = VirtualClock()
    budget = RequestBudget(2.0, 3, clock=clock)
    granted = sorted(await grant_times(clock, budget, [0.0] * 7))
    assert granted == pytest.approx([0, 0, 0, 0.5, 1.0, 1.5, 2.0])
    assert budget.granted == 7


async def test_pause_holds_everyone_and_drains_the_bucket() -> None:
    """After pause(10) nothing is granted for 10 s, and then no burst: one per 1/rate."""
    clock = VirtualClock()
    budget = RequestBudget(1.0, 5, clock=clock)
    budget.pause(10.0)
    assert budget.paused_until == pytest.approx(clock.monotonic() + 10.0)
    granted = sorted(await grant_times(clock, budget, [0.0] * 3))
    assert granted == pytest.approx([11.0, 12.0, 13.0])
    assert budget.pauses == 1
    assert budget.paused_until is None


async def test_a_shorter_pause_does_not_cut_a_longer_one() -> None:
    """pause() keeps the later end when pauses overlap."""
    clock = VirtualClock()
    budget = RequestBudget(100.0, 1, clock=clock)
    budget.pause(30.0)
    budget.pause(5.0)
    granted = await grant_times(clock, budget, [0.0])
    assert granted[0] >= 30.0


async def test_waiters_are_served_first_come_first_served() -> None:
    """Acquirers are granted in the order they started waiting."""
    clock = VirtualClock()
    budget = RequestBudget(1.0, 1, clock=clock)
    order: list[int] = []

    async def one(n: int) -> None:
        await clock.sleep(n * 0.01)
        await budget.acquire()
        order.append(n)

    async with clock.auto_advance():
        await asyncio.gather(*(one(n) for n in range(6)))
    assert order == list(range(6))


async def test_rounding_never_adds_up_against_a_server_with_the_same_limit() -> None:
    """At Unix-epoch clock values, 2,000 grants at full rate never get ahead of a server
    bucket with the same rate and burst (float rounding is carried, not forgiven)."""
    clock = VirtualClock(start=1_750_000_000.0)
    budget = RequestBudget(20.0, 20, clock=clock)
    server = RateLimiter(RateLimit(20.0, burst=20))
    async with clock.auto_advance():
        for _ in range(2000):
            await budget.acquire()
            verdict = server.admit("GET", "/batches", clock.now())
            assert verdict is not None and verdict.allowed, clock.now()
    assert server.refused == 0


@settings(max_examples=60, deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=50.0),
    burst=st.integers(min_value=1, max_value=10),
    arrivals=st.lists(st.floats(min_value=0.0, max_value=20.0), min_size=1, max_size=40),
    pause_at=st.one_of(st.none(), st.floats(min_value=0.0, max_value=10.0)),
    pause_for=st.floats(min_value=0.1, max_value=30.0),
)
def test_no_arrival_pattern_beats_the_bucket(
    rate: float, burst: int, arrivals: list[float], pause_at: float | None, pause_for: float
) -> None:
    """Whatever the arrivals and pauses, grants never exceed burst + rate * span, none
    falls inside a pause, and every acquirer is served."""

    async def run() -> tuple[list[float], tuple[float, float] | None]:
        clock = VirtualClock()
        budget = RequestBudget(rate, burst, clock=clock)
        window: list[tuple[float, float]] = []

        async def pauser() -> None:
            if pause_at is None:
                return
            await clock.sleep(pause_at)
            window.append((pause_at, pause_at + pause_for))
            budget.pause(pause_for)

        start = clock.now()
        granted: list[float] = []

        async def one(at: float) -> None:
            await clock.sleep(at)
            await budget.acquire()
            granted.append(clock.now() - start)

        async with clock.auto_advance():
            await asyncio.gather(pauser(), *(one(at) for at in arrivals))
        return granted, window[0] if window else None

    granted, window = asyncio.run(run())
    assert len(granted) == len(arrivals)
    assert within_bucket(granted, rate, burst)
    if window is not None:
        low, high = window
        assert not any(low + 1e-6 < t < high - 1e-6 for t in granted)


def test_rejects_a_budget_that_cannot_work() -> None:
    """A non-positive rate or a burst below one is refused, naming the argument."""
    clock = VirtualClock()
    with pytest.raises(ValueError, match="rate"):
        RequestBudget(0.0, 1, clock=clock)
    with pytest.raises(ValueError, match="burst"):
        RequestBudget(1.0, 0, clock=clock)


async def test_a_lowered_rate_applies_from_then_on_even_to_a_waiter() -> None:
    """set_rate lowers the rate and the burst at once: a waiter and everyone after it are
    granted at the new rate, and tokens saved above the new burst are gone."""
    clock = VirtualClock()
    budget = RequestBudget(10.0, 5, clock=clock)
    clock.advance(1.0)  # the bucket is full: 5 tokens
    budget.set_rate(1.0, 2)
    granted = await grant_times(clock, budget, [0.0] * 4)
    assert sorted(granted) == pytest.approx([0.0, 0.0, 1.0, 2.0])
    assert budget.rate == 1.0 and budget.burst == 2
