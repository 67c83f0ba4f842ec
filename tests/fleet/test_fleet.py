"""The fleet: many batches tracked by one scheduler under one request budget, also under
the sequences a long-running service meets (broken list endpoints, a client closed
underneath, deadlines on failing servers, thousands of reschedules, readers stopped from
another task, servers that do not list newest first).

Every test drives the fake service on a virtual clock; request times come from the
service's own log, so what is checked is what a server would have seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from conftest import within

from aiobatch import (
    BatchDone,
    BatchStatus,
    DeadlinePassed,
    DoneReason,
    Fleet,
    FleetConfig,
    FleetEvent,
    ProgressChanged,
    RequestBudget,
    StatusChanged,
    TrackingError,
)
from aiobatch.errors import (
    ClosedError,
    NotFoundError,
    ServerError,
    UnexpectedTransitionError,
    UnknownStatusError,
)
from aiobatch.testing import Fault, chat_requests
from aiobatch.transport import Request, Response

ENDPOINT = "/v1/chat/completions"


def quiet(**overrides: Any) -> FleetConfig:
    """A fleet config without jitter, for exact expectations."""
    return FleetConfig(**{"jitter": 0.0, "seed": 0, **overrides})


def assert_within_budget(times: list[float], rate: float, burst: int) -> None:
    """Over every span [t_i, t_j] at most burst + rate * (t_j - t_i) requests arrived."""
    times = sorted(times)
    for i in range(len(times)):
        for j in range(i, len(times)):
            allowed = burst + rate * (times[j] - times[i] + 1e-5) + 1e-9
            assert j - i + 1 <= allowed, (i, j, times[i], times[j])


async def test_tracks_every_batch_to_its_terminal_status(make_env: Callable[..., Any]) -> None:
    """Every added batch ends with a FINISHED outcome holding its terminal snapshot."""
    async with make_env() as env, env.clock.auto_advance():
        batches = await env.create(12)
        async with Fleet(env.client, config=quiet()) as fleet:
            fleet.add_many(batches)
            outcomes = await fleet.wait_all()
    assert set(outcomes) == {b.id for b in batches}
    for done in outcomes.values():
        assert done.finished
        assert done.batch is not None
        assert done.batch.status is BatchStatus.COMPLETED
        assert done.batch.request_counts is not None
        assert done.batch.request_counts.completed == 5


async def test_budget_is_never_exceeded(make_env: Callable[..., Any]) -> None:
    """With retrieves only, the fleet's calls never exceed burst + rate * span."""
    async with make_env() as env, env.clock.auto_advance():
        batches = await env.create(40)
        start = env.clock.now()
        config = quiet(requests_per_second=2.0, burst=3, list_when_cheaper=False)
        async with Fleet(env.client, config=config) as fleet:
            fleet.add_many(batches)
            await fleet.wait_all()
    times = env.fleet_requests(start)
    assert len(times) >= 80  # every batch was polled more than once
    assert fleet.stats.requests == len(times)
    assert_within_budget(times, rate=2.0, burst=3)


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


async def test_a_429_pauses_the_whole_fleet_for_its_retry_after(
    make_env: Callable[..., Any],
) -> None:
    """After a 429 with retry-after 30, no call of the fleet reaches the server for 30 s."""
    async with make_env() as env, env.clock.auto_advance():
        batches = await env.create(8)
        start = env.clock.now()
        env.service.faults.add(Fault.http(429, retry_after=30, method="GET", path="/batches/*"))
        config = quiet(list_when_cheaper=False)
        async with Fleet(env.client, config=config) as fleet:
            fleet.add_many(batches)
            outcomes = await fleet.wait_all()
    limited = [r for r in env.service.requests if r.status == 429]
    assert len(limited) == 1
    after = [t for t in env.fleet_requests(start) if t > limited[0].at]
    assert after, "the fleet went on polling"
    assert min(after) >= limited[0].at + 30
    assert fleet.stats.rate_limited == 1
    assert all(done.finished for done in outcomes.values())


async def test_a_huge_retry_after_pauses_the_fleet_at_most_max_retry_wait(
    make_env: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A 429 asking for 99,999 s pauses the fleet for max_retry_wait only (then it polls
    again), and a WARNING says what was asked and what is waited."""
    caplog.set_level(logging.WARNING, logger="aiobatch")
    async with make_env() as env, env.clock.auto_advance():
        batches = await env.create(2)
        start = env.clock.now()
        env.service.faults.add(Fault.http(429, retry_after=99999, method="GET", path="/batches/*"))
        config = quiet(list_when_cheaper=False, max_retry_wait=120.0)
        async with Fleet(env.client, config=config) as fleet:
            fleet.add_many(batches)
            outcomes = await fleet.wait_all()
    limited = [r for r in env.service.requests if r.status == 429]
    assert len(limited) == 1
    after = [t for t in env.fleet_requests(start) if t > limited[0].at]
    assert min(after) == pytest.approx(limited[0].at + 120.0, abs=1.0)
    assert all(done.finished for done in outcomes.values())
    assert env.clock.now() - start < 3600
    said = [r.getMessage() for r in caplog.records if "99999" in r.getMessage()]
    assert said == [
        "fleet: server asked to wait 99999 s; waiting 120 s (max_retry_wait) then trying again"
    ]


async def test_a_429_without_retry_after_still_pauses_the_fleet(
    make_env: Callable[..., Any],
) -> None:
    """A bare 429 pauses every call for rate_limit_pause, doubling while 429s repeat (one
    call at a time, so each 429 answers a call sent after the previous pause)."""
    async with make_env() as env, env.clock.auto_advance():
        batches = await env.create(4)
        start = env.clock.now()
        env.service.faults.add(Fault.http(429, method="GET", path="/batches/*", times=2))
        config = quiet(list_when_cheaper=False, rate_limit_pause=4.0, max_concurrency=1)
        async with Fleet(env.client, config=config) as fleet:
            fleet.add_many(batches)
            await fleet.wait_all()
    limited = sorted(r.at for r in env.service.requests if r.status == 429)
    assert len(limited) == 2
    later = [t for t in env.fleet_requests(start) if t > limited[-1]]
    assert limited[1] >= limited[0] + 4.0
    assert min(later) >= limited[1] + 8.0


async def test_a_503_with_retry_after_pauses_the_budget(make_env: Callable[..., Any]) -> None:
    """Any answer with retry-after pauses the fleet, not only a 429."""
    async with make_env() as env, env.clock.auto_advance():
        batches = await env.create(3)
        start = env.clock.now()
        env.service.faults.add(Fault.http(503, retry_after=20, method="GET", path="/batches/*"))
        async with Fleet(env.client, config=quiet(list_when_cheaper=False)) as fleet:
            fleet.add_many(batches)
            await fleet.wait_all()
    failed = next(r for r in env.service.requests if r.status == 503)
    later = [t for t in env.fleet_requests(start) if t > failed.at]
    assert min(later) >= failed.at + 20


async def test_small_fleets_retrieve_and_large_ones_sweep_the_list(
    make_env: Callable[..., Any],
) -> None:
    """Two batches are polled by retrieve; 250 by list pages (3 per sweep), no retrieves."""
    async with make_env() as env, env.clock.auto_advance():
        few = await env.create(1)
        async with Fleet(env.client, config=quiet()) as fleet:
            fleet.add_many(few)
            await fleet.wait_all()
        assert fleet.stats.list_pages == 0
        assert fleet.stats.retrieves > 0

        many = await env.create(250)
        async with Fleet(env.client, config=quiet()) as fleet:
            fleet.add_many(many)
            outcomes = await fleet.wait_all()
    assert all(done.finished for done in outcomes.values())
    assert fleet.stats.retrieves == 0
    assert fleet.stats.sweeps > 0
    assert fleet.stats.list_pages <= 3 * fleet.stats.sweeps
    # Far fewer calls than polling each batch once per sweep.
    assert fleet.stats.requests * 50 < 250 * fleet.stats.sweeps


async def test_a_sweep_covers_every_batch_across_pages_while_others_create_batches(
    make_env: Callable[..., Any],
) -> None:
    """Batches created by someone else between list pages do not hide tracked ones."""
    async with make_env() as env, env.clock.auto_advance():
        tracked = await env.create(230)
        stranger = await env.client.upload_file(chat_requests(1))
        # Every list page answers 3 s late; meanwhile someone else creates batches.
        env.service.faults.add(Fault.slow(3.0, method="GET", path="/batches", times=None))

        async def someone_else() -> None:
            for _ in range(60):
                await env.client.create_batch(stranger.id, ENDPOINT)
                await env.clock.sleep(0.5)

        other = asyncio.ensure_future(someone_else())
        seen: dict[str, int] = {}

        def count(event: FleetEvent) -> None:
            if isinstance(event, StatusChanged):
                seen[event.batch_id] = seen.get(event.batch_id, 0) + 1

        async with Fleet(env.client, config=quiet(), on_event=count) as fleet:
            fleet.add_many(tracked)
            outcomes = await fleet.wait_all()
        await other
    assert fleet.stats.retrieves == 0
    assert set(outcomes) == {b.id for b in tracked}
    assert all(done.finished for done in outcomes.values())
    assert all(seen.get(b.id, 0) >= 1 for b in tracked)  # each seen moving, by sweeps
    # Someone else's batches really were created between two pages of one sweep.
    log = env.service.requests
    between = [
        i
        for i in range(1, len(log) - 1)
        if log[i].method == "POST"
        and log[i].path == "/batches"
        and any(r.path == "/batches" and r.method == "GET" for r in log[:i])
        and any(r.path == "/batches" and "after" in r.params for r in log[i + 1 :])
    ]
    assert between


async def test_batches_the_pages_do_not_show_fall_back_to_retrieve(
    make_env: Callable[..., Any],
) -> None:
    """Tracked batches deeper than the sweep may go are retrieved one by one."""
    async with make_env() as env, env.clock.auto_advance():
        old = await env.create(5)
        await env.create(300)  # someone else's, newer than the old ones
        new = await env.create(5)
        config = quiet(max_list_pages=2)
        async with Fleet(env.client, config=config) as fleet:
            fleet.add_many(old + new)
            outcomes = await fleet.wait_all()
    assert all(done.finished for done in outcomes.values())
    assert fleet.stats.sweeps > 0
    assert fleet.stats.retrieves > 0
    retrieved = {
        r.path.rsplit("/", 1)[-1]
        for r in env.service.requests
        if r.method == "GET" and r.path.count("/") == 2 and r.path.startswith("/batches/")
    }
    assert retrieved <= {b.id for b in old}
    assert retrieved


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


async def oldest_first(
    request: Request, handle: Callable[[Request], Awaitable[Response]]
) -> Response:
    """In front of the fake (``handle``): a server whose GET /batches lists oldest first (a
    cursor over the reversed list), everything else answered by the fake."""
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
    return Response(200, {"content-type": "application/json"}, json.dumps(answer).encode())


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


async def test_sweeps_learn_when_others_batches_make_them_dear(
    make_env: Callable[..., Any],
) -> None:
    """Under 900 newer batches of someone else's, one sweep gives up within the cost of
    the retrieves it replaces; after it the fleet retrieves."""
    async with make_env() as env, env.clock.auto_advance():
        old = await env.create(4)
        await env.create(900)
        async with Fleet(env.client, config=quiet()) as fleet:
            fleet.add_many(old)
            outcomes = await fleet.wait_all()
    assert all(done.finished for done in outcomes.values())
    assert fleet.stats.sweeps == 1
    assert fleet.stats.list_pages <= 3  # fewer than the 4 retrieves it tried to replace
    assert fleet.stats.requests <= fleet.stats.observations + 3


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


async def test_deadline_ends_tracking_at_the_deadline(make_env: Callable[..., Any]) -> None:
    """A batch still open at its deadline ends with DEADLINE, on time, after a last look."""
    events: list[FleetEvent] = []
    async with make_env(lines_per_second=0.0) as env, env.clock.auto_advance():
        (batch,) = await env.create(1)
        start = env.clock.now()
        async with Fleet(env.client, config=quiet(), on_event=events.append) as fleet:
            fleet.add(batch, timeout=100.0)
            outcomes = await fleet.wait_all()
            ended = env.clock.now()
    done = outcomes[batch.id]
    assert done.reason is DoneReason.DEADLINE
    assert done.batch is not None and done.batch.status is BatchStatus.IN_PROGRESS
    assert start + 100.0 <= ended <= start + 101.0
    assert any(isinstance(e, DeadlinePassed) and not e.cancelling for e in events)
    # Nothing was cancelled on the server.
    assert (await env.service.get_batch(batch.id)).status is BatchStatus.IN_PROGRESS


async def test_deadline_can_cancel_and_salvage(make_env: Callable[..., Any]) -> None:
    """With cancel_on_deadline the batch is cancelled and tracked until cancelled."""
    async with (
        make_env(lines_per_second=0.0, cancel_seconds=600.0) as env,
        env.clock.auto_advance(),
    ):
        (batch,) = await env.create(1)
        start = env.clock.now()
        config = quiet(timeout=50.0, cancel_on_deadline=True)
        async with Fleet(env.client, config=config) as fleet:
            fleet.add(batch)
            outcomes = await fleet.wait_all()
            ended = env.clock.now()
    done = outcomes[batch.id]
    assert done.reason is DoneReason.FINISHED
    assert done.batch is not None and done.batch.status is BatchStatus.CANCELLED
    assert ended >= start + 650.0
    assert env.service.request_count("POST", "/batches/*/cancel") == 1


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


async def test_cancel_all_reaches_cancelled_for_every_batch(
    make_env: Callable[..., Any],
) -> None:
    """cancel_all cancels each open batch once and tracks all of them to cancelled, however
    long cancelling takes."""
    async with (
        make_env(cancel_seconds=900.0, lines_per_second=0.01) as env,
        env.clock.auto_advance(),
    ):
        batches = await env.create(150)
        async with Fleet(env.client, config=quiet()) as fleet:
            fleet.add_many(batches)
            await env.clock.sleep(45.0)  # some in_progress, polled at least once
            start = env.clock.now()
            outcomes = await fleet.cancel_all()
            ended = env.clock.now()
    assert {done.batch.status for done in outcomes.values() if done.batch} == {
        BatchStatus.CANCELLED
    }
    assert len(outcomes) == 150
    assert env.service.request_count("POST", "/batches/*/cancel") == 150
    assert ended >= start + 900.0


async def test_cancel_of_a_batch_that_finished_meanwhile_is_harmless(
    make_env: Callable[..., Any],
) -> None:
    """A cancel the server refuses (the batch completed) ends with the real outcome."""
    async with (
        make_env(validation_seconds=1.0, lines_per_second=10.0) as env,
        env.clock.auto_advance(),
    ):
        (batch,) = await env.create(1)
        async with Fleet(env.client, config=quiet(validating_interval=60.0)) as fleet:
            fleet.add(batch)
            await env.clock.sleep(20.0)  # completed on the server, not yet seen
            outcomes = await fleet.cancel_all()
    done = outcomes[batch.id]
    assert done.finished
    assert done.batch is not None and done.batch.status is BatchStatus.COMPLETED


async def test_a_status_regression_is_reported_and_tracking_continues(
    make_env: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A server that moves a batch backwards yields a TrackingError and a log record; the
    batch is still tracked to its end."""
    events: list[FleetEvent] = []
    async with make_env() as env:
        (batch,) = await env.create(1, lines=20)

        def on_event(event: FleetEvent) -> None:
            events.append(event)
            if isinstance(event, StatusChanged) and event.batch.status is BatchStatus.IN_PROGRESS:
                env.service.override_status(batch.id, "validating")
            if isinstance(event, TrackingError):
                env.service.override_status(batch.id, None)

        caplog.set_level(logging.WARNING, logger="aiobatch")
        async with (
            env.clock.auto_advance(),
            Fleet(env.client, config=quiet(), on_event=on_event) as fleet,
        ):
            fleet.add(batch)
            outcomes = await fleet.wait_all()
    errors = [e for e in events if isinstance(e, TrackingError)]
    assert len(errors) == 1
    assert isinstance(errors[0].error, UnexpectedTransitionError)
    assert errors[0].batch_id == batch.id
    assert outcomes[batch.id].finished
    assert any("impossible" in r.getMessage() for r in caplog.records)


async def test_an_unknown_status_is_reported_not_fatal(make_env: Callable[..., Any]) -> None:
    """A status string aiobatch does not know is reported, and tracking goes on."""
    events: list[FleetEvent] = []
    async with make_env() as env:
        (batch,) = await env.create(1)
        env.service.override_status(batch.id, "warming_up")

        def on_event(event: FleetEvent) -> None:
            events.append(event)
            if isinstance(event, TrackingError):
                env.service.override_status(batch.id, None)

        async with (
            env.clock.auto_advance(),
            Fleet(env.client, config=quiet(), on_event=on_event) as fleet,
        ):
            fleet.add(batch.id)
            outcomes = await fleet.wait_all()
    (error,) = [e for e in events if isinstance(e, TrackingError)]
    assert isinstance(error.error, UnknownStatusError)
    assert "warming_up" in str(error.error)
    assert outcomes[batch.id].finished


async def test_events_follow_the_lifecycle_in_order(make_env: Callable[..., Any]) -> None:
    """A batch added by id yields status changes in lifecycle order, progress, then done."""
    async with make_env() as env, env.clock.auto_advance():
        (batch,) = await env.create(1, lines=10)
        async with Fleet(env.client, config=quiet()) as fleet:
            stream = fleet.events()
            fleet.add(batch.id)
            await fleet.wait_all()
            events: list[FleetEvent] = []
            async for event in stream:
                events.append(event)
                if isinstance(event, BatchDone):
                    break
    statuses = [(e.previous, e.batch.status) for e in events if isinstance(e, StatusChanged)]
    assert statuses[0] == (None, BatchStatus.VALIDATING)
    seen = [new for _, new in statuses]
    assert seen[-1] is BatchStatus.COMPLETED
    order = [BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING]
    assert seen == sorted(seen, key=lambda s: ([*order, BatchStatus.COMPLETED]).index(s))
    progress = [e for e in events if isinstance(e, ProgressChanged)]
    assert progress
    counts = [e.batch.request_counts for e in progress]
    assert all(c is not None for c in counts)
    done_counts = [c.completed + c.failed for c in counts if c is not None]
    assert done_counts == sorted(done_counts)
    assert isinstance(events[-1], BatchDone)


async def test_in_progress_polls_follow_the_progress_estimate(
    make_env: Callable[..., Any],
) -> None:
    """A 100-line batch is polled a handful of times and its end is seen soon after."""
    finished_at: list[float] = []
    async with (
        make_env(lines_per_second=1.0, finalizing_seconds=10.0) as env,
        env.clock.auto_advance(),
    ):
        (batch,) = await env.create(1, lines=100)
        start = env.clock.now()

        def on_event(event: FleetEvent) -> None:
            if isinstance(event, BatchDone):
                finished_at.append(env.clock.now())

        async with Fleet(env.client, config=quiet(), on_event=on_event) as fleet:
            fleet.add(batch)
            await fleet.wait_all()
    # validating 30 s, 100 lines at 1/s, finalizing 10 s: completed at start + 140.
    completed = start + 30 + 100 + 10
    assert completed <= finished_at[0] <= completed + fleet.config.finalizing_interval
    # A poll every min_interval (5 s) would take 28 polls.
    assert fleet.stats.retrieves <= 14


async def test_transient_failures_are_reported_after_several_in_a_row(
    make_env: Callable[..., Any],
) -> None:
    """Five 500s in a row for one batch produce one TrackingError; it is still tracked."""
    events: list[FleetEvent] = []
    async with make_env() as env, env.clock.auto_advance():
        (batch,) = await env.create(1)
        env.service.faults.add(Fault.http(500, method="GET", path="/batches/*", times=5))
        config = quiet(report_after_errors=5)
        async with Fleet(env.client, config=config, on_event=events.append) as fleet:
            fleet.add(batch)
            outcomes = await fleet.wait_all()
    errors = [e for e in events if isinstance(e, TrackingError)]
    assert len(errors) == 1
    assert isinstance(errors[0].error, ServerError)
    assert outcomes[batch.id].finished


async def test_a_passing_list_page_failure_is_retried_quietly(
    make_env: Callable[..., Any],
) -> None:
    """One 503 on a list page is retried without a TrackingError; a 401 is reported."""
    events: list[FleetEvent] = []
    async with make_env() as env, env.clock.auto_advance():
        batches = await env.create(150)
        env.service.faults.add(Fault.http(503, method="GET", path="/batches"))
        async with Fleet(env.client, config=quiet(), on_event=events.append) as fleet:
            fleet.add_many(batches)
            outcomes = await fleet.wait_all()
        assert all(done.finished for done in outcomes.values())
        assert not any(isinstance(e, TrackingError) for e in events)
        assert fleet.stats.failures == 1

        more = await env.create(150)
        env.service.faults.add(Fault.http(401, method="GET", path="/batches"))
        async with Fleet(env.client, config=quiet(), on_event=events.append) as fleet:
            fleet.add_many(more)
            await fleet.wait_all()
    reported = [e for e in events if isinstance(e, TrackingError)]
    assert len(reported) == 1
    assert reported[0].batch_id is None


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


async def test_a_batch_the_server_does_not_know_ends_as_not_found(
    make_env: Callable[..., Any],
) -> None:
    """An id the server keeps answering 404 for ends with NOT_FOUND after not_found_limit."""
    async with (
        make_env() as env,
        env.clock.auto_advance(),
        Fleet(env.client, config=quiet(not_found_limit=3)) as fleet,
    ):
        fleet.add("batch_does_not_exist")
        outcomes = await fleet.wait_all()
    done = outcomes["batch_does_not_exist"]
    assert done.reason is DoneReason.NOT_FOUND
    assert isinstance(done.error, NotFoundError)
    assert env.service.request_count("GET", "/batches/batch_does_not_exist") == 3


async def test_as_completed_yields_each_outcome_once_including_late_additions(
    make_env: Callable[..., Any],
) -> None:
    """as_completed yields every batch once, also those added while iterating."""
    async with make_env() as env, env.clock.auto_advance():
        first = await env.create(3)
        later = await env.create(2, lines=1)
        got: list[str] = []
        async with Fleet(env.client, config=quiet()) as fleet:
            fleet.add_many(first)
            async for done in fleet.as_completed():
                got.append(done.batch_id)
                if len(got) == 1:
                    fleet.add_many(later)
    assert sorted(got) == sorted(b.id for b in first + later)


async def test_removed_batches_are_no_longer_polled(make_env: Callable[..., Any]) -> None:
    """remove() stops tracking: no outcome, no more calls for that batch."""
    async with make_env() as env, env.clock.auto_advance():
        keep, drop = await env.create(2)
        async with Fleet(env.client, config=quiet(list_when_cheaper=False)) as fleet:
            fleet.add_many([keep, drop])
            assert fleet.remove(drop.id)
            assert not fleet.remove(drop.id)
            outcomes = await fleet.wait_all()
    assert set(outcomes) == {keep.id}
    assert env.service.request_count("GET", f"/batches/{drop.id}") == 0


async def test_callback_errors_are_logged_and_async_callbacks_awaited(
    make_env: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A raising callback never stops the fleet; a coroutine callback runs for each event."""
    seen: list[FleetEvent] = []

    async def record(event: FleetEvent) -> None:
        await asyncio.sleep(0)
        seen.append(event)
        raise RuntimeError("callback bug")

    caplog.set_level(logging.ERROR, logger="aiobatch")
    async with make_env() as env, env.clock.auto_advance():
        batches = await env.create(2)
        async with Fleet(env.client, config=quiet(), on_event=record) as fleet:
            fleet.add_many(batches)
            outcomes = await fleet.wait_all()
            await asyncio.sleep(0)
    assert all(done.finished for done in outcomes.values())
    assert sum(isinstance(e, BatchDone) for e in seen) == 2
    assert any("callback" in r.getMessage() for r in caplog.records)


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


async def test_nothing_is_left_running_after_close(make_env: Callable[..., Any]) -> None:
    """Closing mid-flight stops the scheduler and its calls, ends iterators, clears sleeps."""
    async with make_env() as env, env.clock.auto_advance():
        batches = await env.create(30)
        before = asyncio.all_tasks()
        env.service.faults.add(Fault.slow(50.0, method="GET", times=None))
        fleet = Fleet(env.client, config=quiet(list_when_cheaper=False))
        stream = fleet.events()
        fleet.add_many(batches)
        await env.clock.run_for(40.0)  # polls are now in flight, waiting on slow answers
        assert fleet.stats.requests > 0
        await fleet.aclose()
        await asyncio.sleep(0)
        assert asyncio.all_tasks() <= before
        remaining = [e async for e in stream]  # the iterator ends, it does not hang
        assert not any(isinstance(e, BatchDone) for e in remaining)
        with pytest.raises(ClosedError):
            fleet.add("batch_x")
        with pytest.raises(ClosedError):
            await fleet.wait_all()
        # Only the fake's own slow answers may still sleep on the clock; none of the fleet.
        await env.clock.run_for(100.0)
        assert env.clock.next_wakeup is None


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


async def test_fleet_does_not_close_the_client(make_env: Callable[..., Any]) -> None:
    """The client stays usable after its fleet is closed."""
    async with make_env() as env, env.clock.auto_advance():
        (batch,) = await env.create(1)
        async with Fleet(env.client) as fleet:
            fleet.add(batch)
        assert (await env.client.retrieve_batch(batch.id)).id == batch.id


def test_config_rejects_nonsense() -> None:
    """FleetConfig refuses values that cannot work, naming the field."""
    with pytest.raises(ValueError, match="min_interval"):
        FleetConfig(min_interval=10.0, max_interval=5.0)
    with pytest.raises(ValueError, match="requests_per_second"):
        FleetConfig(requests_per_second=0)
    with pytest.raises(ValueError, match="page_size"):
        FleetConfig(page_size=500)
    with pytest.raises(ValueError, match="jitter"):
        FleetConfig(jitter=1.5)


async def test_a_batch_added_again_yields_its_new_outcome_and_forget_drops_outcomes(
    make_env: Callable[..., Any],
) -> None:
    """as_completed yields the second outcome of a batch tracked again; forget() drops an
    outcome so a long-running service does not keep them all."""
    async with make_env() as env, env.clock.auto_advance():
        (batch,) = await env.create(1)
        async with Fleet(env.client, config=quiet(timeout=20.0)) as fleet:
            fleet.add(batch)
            first = (await fleet.wait_all())[batch.id]
            assert first.reason is DoneReason.DEADLINE
            got: list[BatchDone] = []
            async for done in fleet.as_completed():
                got.append(done)
                if len(got) == 1:
                    fleet.add(batch, timeout=3600.0)
            assert got[0] is first
            assert len(got) == 2 and got[1].finished
            assert fleet.forget(batch.id) is got[1]
            assert fleet.outcome(batch.id) is None
            assert fleet.forget(batch.id) is None
            assert await fleet.wait_all() == {}
