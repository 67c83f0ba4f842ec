"""The fleet under the sequences a long-running service meets: broken list endpoints,
a client closed underneath, deadlines on failing servers, thousands of reschedules,
readers stopped from another task, servers that do not list newest first.

Every test drives the fake service on a virtual clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest

from aiobatch import (
    BatchDone,
    DoneReason,
    Fleet,
    FleetConfig,
    FleetEvent,
    RequestBudget,
)
from aiobatch.errors import ClosedError
from aiobatch.testing import Fault, VirtualClock
from aiobatch.transport import Request, Response

T = TypeVar("T")


def quiet(**overrides: Any) -> FleetConfig:
    """A fleet config without jitter, for exact expectations."""
    return FleetConfig(**{"jitter": 0.0, "seed": 0, **overrides})


async def within(clock: VirtualClock, seconds: float, awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result, failing the test if it takes over ``seconds`` of virtual
    time (a hang shows as a failure, not as a test that never ends)."""
    work = asyncio.ensure_future(awaitable)
    timer = asyncio.ensure_future(clock.sleep(seconds))
    try:
        await asyncio.wait((work, timer), return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
    if not work.done():
        work.cancel()
        with pytest.raises(asyncio.CancelledError):
            await work
        pytest.fail(f"still waiting after {seconds:g} virtual seconds")
    return work.result()


# --- a list endpoint that does not work ---------------------------------------------------------


@pytest.mark.parametrize("status", [404, 500])
async def test_a_list_endpoint_that_keeps_failing_falls_back_to_retrieve(
    make_env: Callable[..., Any], status: int
) -> None:
    """When every list page fails (a server without GET /batches, or one that keeps
    answering 500), the batches are still tracked to the end, by retrieve."""
    async with make_env() as env, env.clock.auto_advance():
        batches = await env.create(150)
        env.service.faults.add(Fault.http(status, method="GET", path="/batches", times=None))
        async with Fleet(env.client, config=quiet()) as fleet:
            fleet.add_many(batches)
            outcomes = await within(env.clock, 3600.0, fleet.wait_all())
    assert len(outcomes) == 150
    assert all(done.finished for done in outcomes.values())
    assert fleet.stats.retrieves >= 150


async def test_sweep_failures_back_off_no_longer_than_max_interval(
    make_env: Callable[..., Any],
) -> None:
    """After list pages fail several times in a row, the next try comes within
    max_interval, as for every other failure."""
    async with make_env(lines_per_second=0.01) as env, env.clock.auto_advance():
        batches = await env.create(150)
        env.service.faults.add(Fault.http(503, method="GET", path="/batches", times=4))
        config = quiet(max_interval=10.0, min_interval=1.0, report_after_errors=100)
        async with Fleet(env.client, config=config) as fleet:
            fleet.add_many(batches)
            await env.clock.sleep(200.0)
            times = sorted(
                r.at
                for r in env.service.requests
                if r.method == "GET" and r.path.startswith("/batches")
            )
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) <= 10.0 + 1.0


# --- the client closed under the fleet ----------------------------------------------------------


async def test_a_client_closed_under_the_fleet_fails_waiters_and_aclose_still_cleans_up(
    make_env: Callable[..., Any],
) -> None:
    """Closing the client while the fleet tracks makes wait_all raise ClosedError; the
    fleet's aclose() then returns quietly and leaves nothing running."""
    async with make_env() as env, env.clock.auto_advance():
        batches = await env.create(3)
        before = asyncio.all_tasks()
        fleet = Fleet(env.client, config=quiet(list_when_cheaper=False))
        stream = fleet.events()
        fleet.add_many(batches)
        await env.clock.sleep(20.0)
        await env.client.aclose()
        with pytest.raises(ClosedError):
            await within(env.clock, 600.0, fleet.wait_all())
        assert sorted(fleet.open_ids) == sorted(b.id for b in batches)  # none lost
        with pytest.raises(ClosedError):
            fleet.add("batch_x")
        await fleet.aclose()  # must not raise the scheduler's failure again
        await asyncio.sleep(0)
        assert asyncio.all_tasks() <= before
        remaining = await within(env.clock, 1.0, _drain(stream))  # the iterator ends
        assert not any(isinstance(e, BatchDone) for e in remaining)


async def _drain(stream: AsyncIterator[FleetEvent]) -> list[FleetEvent]:
    return [event async for event in stream]


# --- deadlines on a failing server --------------------------------------------------------------


async def test_a_deadline_passing_during_a_cancel_on_a_failing_server_does_not_hammer_it(
    make_env: Callable[..., Any],
) -> None:
    """A batch being cancelled whose deadline passes while every retrieve fails ends at its
    deadline; the fleet does not retry it back to back at the budget's full rate."""
    async with (
        make_env(lines_per_second=0.0, cancel_seconds=600.0) as env,
        env.clock.auto_advance(),
    ):
        (batch,) = await env.create(1)
        async with Fleet(env.client, config=quiet()) as fleet:
            fleet.add(batch, timeout=100.0)
            fleet.cancel(batch.id)
            await env.clock.sleep(50.0)  # the cancel was sent; the batch is cancelling
            assert env.calls("POST", "/batches/*/cancel") == 1
            env.service.faults.add(Fault.http(500, method="GET", path="/batches/*", times=None))
            outcomes = await within(env.clock, 600.0, fleet.wait_all())
    assert outcomes[batch.id].reason is DoneReason.DEADLINE
    assert env.calls("GET", f"/batches/{batch.id}") < 20


# --- memory ------------------------------------------------------------------------------------


async def test_the_schedule_stays_proportional_to_the_open_batches(
    make_env: Callable[..., Any],
) -> None:
    """Frequent sweeps (for a few fast-polled batches) that re-observe many slow-polled
    ones leave the schedule (heap) within a small multiple of the open batches."""
    async with make_env(lines_per_second=0.0) as env, env.clock.auto_advance():
        batches = await env.create(200)
        for batch in batches[-50:]:
            env.service.override_status(batch.id, "validating")  # polled every 5 s
        config = quiet(
            validating_interval=5.0, growth=1.0, in_progress_interval=600.0, max_interval=600.0
        )
        sizes: list[int] = []
        async with Fleet(env.client, config=config) as fleet:
            fleet.add_many(batches)
            for _ in range(20):
                await env.clock.sleep(30.0)
                sizes.append(len(fleet._due))  # the schedule: what a leak would grow
            assert len(fleet) == 200
        assert fleet.stats.sweeps >= 100
    assert max(sizes) <= 3 * 200, sizes


# --- subscriptions -----------------------------------------------------------------------------


async def test_closing_a_subscription_ends_a_reader_waiting_on_it(
    make_env: Callable[..., Any],
) -> None:
    """aclose() on an event subscription ends the loop of a task reading it."""
    async with make_env(lines_per_second=0.0) as env, env.clock.auto_advance():
        (batch,) = await env.create(1)
        async with Fleet(env.client, config=quiet()) as fleet:
            stream = fleet.events()
            fleet.add(batch)

            async def read() -> list[FleetEvent]:
                return [event async for event in stream]

            reader = asyncio.ensure_future(read())
            await env.clock.sleep(100.0)
            await stream.aclose()
            got = await within(env.clock, 10.0, reader)
    assert all(not isinstance(e, BatchDone) for e in got)


# --- servers that do not list newest first ------------------------------------------------------


async def oldest_first(
    request: Request, handle: Callable[[Request], Awaitable[Response]]
) -> Response:
    """In front of the fake (``handle``): a server whose GET /batches lists oldest first (a
    cursor over the reversed list), everything else answered by the fake."""
    import json

    from aiobatch.transport import Response as Resp

    if request.method != "GET" or not request.url.rstrip("/").endswith("/batches"):
        return await handle(request)
    every: list[Any] = []
    after: str | None = None
    while True:
        params = {"limit": "100"} if after is None else {"limit": "100", "after": after}
        page = await handle(
            Request("GET", request.url, params, request.headers, None, request.timeout)
        )
        body = json.loads(await page.read())
        every.extend(body["data"])
        if not body["has_more"] or not body["data"]:
            break
        after = body["data"][-1]["id"]
    every.reverse()
    limit = int(request.params.get("limit", "20"))
    start = 0
    if "after" in request.params:
        ids = [b["id"] for b in every]
        start = ids.index(request.params["after"]) + 1
    data = every[start : start + limit]
    answer = {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": start + limit < len(every),
    }
    return Resp(200, {"content-type": "application/json"}, json.dumps(answer).encode())


async def test_a_server_listing_oldest_first_loses_no_batch(make_env: Callable[..., Any]) -> None:
    """Against a server whose list is oldest first, every batch still ends (retrieved
    when the pages do not show it)."""
    async with make_env(front=oldest_first) as env, env.clock.auto_advance():
        await env.create(250)  # someone else's, older
        mine = await env.create(150)
        async with Fleet(env.client, config=quiet()) as fleet:
            fleet.add_many(mine)
            outcomes = await within(env.clock, 3600.0, fleet.wait_all())
    assert len(outcomes) == 150
    assert all(done.finished for done in outcomes.values())


# --- a budget shared by two fleets --------------------------------------------------------------


async def test_two_fleets_sharing_one_budget_stay_within_it(make_env: Callable[..., Any]) -> None:
    """Two fleets on one RequestBudget together never exceed its rate and burst."""
    async with make_env() as env, env.clock.auto_advance():
        batches = await env.create(40)
        start = env.clock.now()
        budget = RequestBudget(2.0, 3, clock=env.clock)
        config = quiet(list_when_cheaper=False)
        async with (
            Fleet(env.client, config=config, budget=budget) as one,
            Fleet(env.client, config=config, budget=budget) as two,
        ):
            one.add_many(batches[:20])
            two.add_many(batches[20:])
            await asyncio.gather(one.wait_all(), two.wait_all())
    times = sorted(
        r.at
        for r in env.service.requests
        if r.at >= start and r.method == "GET" and r.path.startswith("/batches")
    )
    assert len(times) == one.stats.requests + two.stats.requests
    for i in range(len(times)):
        for j in range(i, len(times)):
            assert j - i + 1 <= 3 + 2.0 * (times[j] - times[i] + 1e-5) + 1e-9


# --- callbacks ---------------------------------------------------------------------------------


async def test_an_async_callback_may_close_the_fleet(make_env: Callable[..., Any]) -> None:
    """A coroutine callback that closes the fleet on the first outcome runs to its end."""
    closing: list[str] = []
    finished: list[str] = []
    async with make_env() as env, env.clock.auto_advance():
        batches = await env.create(3)
        fleets: list[Fleet] = []

        async def on_event(event: FleetEvent) -> None:
            fleet = fleets[0]
            if isinstance(event, BatchDone) and not closing:
                closing.append(event.batch_id)
                await fleet.aclose()
                await asyncio.sleep(0)
                finished.append(event.batch_id)

        fleet = Fleet(env.client, config=quiet(list_when_cheaper=False), on_event=on_event)
        fleets.append(fleet)
        fleet.add_many(batches)
        with contextlib.suppress(ClosedError):
            await within(env.clock, 600.0, fleet.wait_all())
        await env.clock.sleep(1.0)
        await asyncio.sleep(0)
    assert len(finished) == 1


# --- the sweep cost model ----------------------------------------------------------------------


async def test_a_dear_sweep_long_ago_does_not_stop_sweeps_for_new_batches(
    make_env: Callable[..., Any],
) -> None:
    """After a sweep under many untracked batches taught the fleet that listing is dear
    down there, new batches added a few at a time at the top of the list are still swept
    rather than retrieved one by one."""
    async with make_env(lines_per_second=0.01) as env, env.clock.auto_advance():
        old = await env.create(4)
        await env.create(900)  # someone else's, newer than the old ones
        async with Fleet(env.client, config=FleetConfig(seed=0)) as fleet:
            fleet.add_many(old)
            await env.clock.sleep(60.0)
            assert fleet.stats.sweeps == 1  # it learnt that listing is dear down there
            before = fleet.stats.requests
            for _ in range(100):
                fleet.add_many(await env.create(5))
                await env.clock.sleep(5.0)
            await env.clock.sleep(300.0)
            spent = fleet.stats.requests - before
    # Without the 4 old batches this costs under 200 calls; retrieving each of the 500
    # new batches every poll costs over 5,000.
    assert spent < 500, fleet.stats
