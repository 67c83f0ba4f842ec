"""The fleet's webhook fast path: notify() makes a batch due at once, webhook_interval
stretches the polls into a safety net."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from aiobatch import BatchDone, BatchStatus, Fleet, FleetConfig, FleetEvent
from aiobatch.testing import chat_requests

#: Batches take 30 s validating, 2 s per line, 10 s finalizing (see FLEET_TIMINGS).
WEBHOOKS = FleetConfig(jitter=0.0, seed=0, webhook_interval=600.0)


async def test_notify_detects_the_end_at_once(make_env: Callable[..., Any]) -> None:
    """With polls 10 minutes apart, a notify at the batch's end makes its BatchDone
    arrive without waiting for the next poll, with one retrieve."""
    async with make_env() as env, env.clock.auto_advance():
        (batch,) = await env.create(1, lines=5)
        done_at: list[float] = []

        def on_event(event: FleetEvent) -> None:
            if isinstance(event, BatchDone):
                done_at.append(env.clock.now())

        async with Fleet(env.client, config=WEBHOOKS, on_event=on_event) as fleet:
            fleet.add(batch)
            await env.clock.sleep(50.0)  # ended at 30 + 10 + 10 s: nobody polled since
            assert fleet.open_ids == [batch.id]
            before = env.calls("GET", "/batches/*")
            notified_at = env.clock.now()
            assert fleet.notify(batch.id)
            await fleet.wait_all()
        assert done_at and done_at[0] - notified_at <= 1.0
        assert env.calls("GET", "/batches/*") == before + 1
        assert fleet.outcome(batch.id) is not None
        assert fleet.stats.notifications == 1


async def test_webhook_interval_polls_as_a_safety_net(make_env: Callable[..., Any]) -> None:
    """Without any notify, a batch is still detected by the poll webhook_interval apart."""
    async with make_env() as env, env.clock.auto_advance():
        (batch,) = await env.create(1, lines=5)
        start = env.clock.now()
        async with Fleet(env.client, config=WEBHOOKS) as fleet:
            fleet.add(batch)
            outcomes = await fleet.wait_all()
        polls = env.fleet_requests(start)
    assert outcomes[batch.id].batch is not None
    assert outcomes[batch.id].batch.status is BatchStatus.COMPLETED
    assert [round(t - start) for t in polls] == [600]


async def test_safety_net_polls_of_batches_added_apart_share_one_sweep(
    make_env: Callable[..., Any],
) -> None:
    """Open batches added minutes apart are polled on one shared webhook_interval beat,
    jitter or not: each safety-net poll is one list page for all, never a retrieve each."""
    config = FleetConfig(seed=0, webhook_interval=600.0)  # the default jitter, 0.1
    async with make_env() as env, env.clock.auto_advance():
        batches = await env.create(20, lines=1000)  # each runs ~2,000 s
        async with Fleet(env.client, config=config) as fleet:
            for batch in batches:
                fleet.add(batch)
                await env.clock.sleep(15.0)
            await env.clock.sleep(1_900.0 - 15.0 * len(batches))
            assert len(fleet.open_ids) == len(batches)
            stats = fleet.stats
            assert (stats.retrieves, stats.list_pages) == (0, 3)  # at 600, 1,200, 1,800 s
            for batch in batches:
                fleet.remove(batch.id)


async def test_notify_of_an_unknown_batch_is_counted_and_ignored(
    make_env: Callable[..., Any],
) -> None:
    """notify() for an id the fleet does not track sends nothing and is counted."""
    async with make_env() as env, env.clock.auto_advance():
        (batch,) = await env.create(1)
        start = env.clock.now()
        async with Fleet(env.client, config=WEBHOOKS) as fleet:
            fleet.add(batch)
            assert not fleet.notify("batch_not_ours")
            await env.clock.sleep(5.0)
            assert env.fleet_requests(start) == []
            assert fleet.stats.unknown_notifications == 1
            assert fleet.stats.notifications == 0


async def test_a_notify_before_its_batch_is_added_is_acted_on_when_added(
    make_env: Callable[..., Any],
) -> None:
    """A webhook that arrives before its batch is added (it outran the create's answer)
    makes the batch due as soon as it is added, not at the next safety-net poll."""
    async with make_env() as env, env.clock.auto_advance():
        (batch,) = await env.create(1, lines=5)
        async with Fleet(env.client, config=WEBHOOKS) as fleet:
            await env.clock.sleep(50.0)  # ended at 30 + 10 + 10 s
            assert not fleet.notify(batch.id)
            added_at = env.clock.now()
            fleet.add(batch)  # the create's snapshot: still validating
            await fleet.wait_all()
            assert env.clock.now() - added_at <= 1.0
            done = fleet.outcome(batch.id)
        assert done is not None and done.batch.status is BatchStatus.COMPLETED


async def test_a_notify_that_outruns_the_server_looks_again_soon(
    make_env: Callable[..., Any],
) -> None:
    """A notify for a batch still running (the event came before the read side shows
    the end) brings a retrieve now and another after min_interval, not 10 minutes."""
    async with make_env() as env, env.clock.auto_advance():
        (batch,) = await env.create(1, lines=50)  # runs ~130 s
        start = env.clock.now()
        async with Fleet(env.client, config=WEBHOOKS) as fleet:
            fleet.add(batch)
            await env.clock.sleep(40.0)
            fleet.notify(batch.id)
            await env.clock.sleep(30.0)
            polls = [round(t - start) for t in env.fleet_requests(start)]
            fleet.remove(batch.id)
    assert polls == [40, 45]


async def test_many_notified_batches_share_a_sweep(make_env: Callable[..., Any]) -> None:
    """When many batches are notified together, one list page observes them all."""
    async with make_env() as env, env.clock.auto_advance():
        batches = await env.create(30, lines=1)
        async with Fleet(env.client, config=WEBHOOKS) as fleet:
            fleet.add_many(batches)
            await env.clock.sleep(60.0)
            for batch in batches:
                fleet.notify(batch.id)
            await fleet.wait_all()
        assert fleet.stats.list_pages == 1
        assert fleet.stats.retrieves == 0


async def test_a_burst_of_notifies_costs_a_list_page_per_hundred_batches(
    make_env: Callable[..., Any],
) -> None:
    """250 batches notified at once (deliveries queued while a receiver was down) are
    observed with ceil(250 / 100) = 3 list pages, no retrieve, each BatchDone carrying
    the batch as a retrieve would (status, output file, counts)."""
    async with make_env() as env, env.clock.auto_advance():
        batches = await env.create(250, lines=1)
        async with Fleet(env.client, config=WEBHOOKS) as fleet:
            fleet.add_many(batches)
            await env.clock.sleep(60.0)  # every batch ended at 30 + 2 + 10 s
            start = env.clock.now()
            for batch in batches:
                fleet.notify(batch.id)
            outcomes = await fleet.wait_all()
            took = env.clock.now() - start
        assert (fleet.stats.list_pages, fleet.stats.retrieves) == (3, 0)
    assert took <= WEBHOOKS.coalesce + 1.0
    for batch in batches:
        done = outcomes[batch.id].batch
        assert done is not None and done.status is BatchStatus.COMPLETED
        assert done.output_file_id and done.request_counts is not None
        assert done.request_counts.completed == 1


async def test_notifies_for_ended_or_unknown_batches_cost_no_request(
    make_env: Callable[..., Any],
) -> None:
    """Repeated notifies after a batch's end, and notifies for ids never tracked, send
    nothing: one retrieve in all for one batch notified 50 times over."""
    async with make_env() as env, env.clock.auto_advance():
        (batch,) = await env.create(1, lines=1)
        async with Fleet(env.client, config=WEBHOOKS) as fleet:
            fleet.add(batch)
            await env.clock.sleep(60.0)
            start = env.clock.now()
            fleet.notify(batch.id)
            await fleet.wait_all()
            for n in range(50):
                fleet.notify(batch.id)
                fleet.notify(f"batch_stranger_{n}")
            await env.clock.sleep(1_200.0)
            assert len(env.fleet_requests(start)) == 1
            assert fleet.stats.unknown_notifications == 100


async def test_dropped_notifies_are_caught_by_the_safety_net_in_time(
    make_env: Callable[..., Any],
) -> None:
    """Of batches ending at scattered times, the notified ones are done at their end
    and the others (their webhook lost) within one webhook_interval of it."""
    async with make_env() as env, env.clock.auto_advance():
        sizes = [5, 40, 300, 700, 1200, 2000]  # ending ~50 s to ~4,000 s in
        uploaded = [await env.client.upload_file(chat_requests(n)) for n in sizes]
        batches = [await env.client.create_batch(u.id, "/v1/chat/completions") for u in uploaded]
        ends = {
            b.id: env.clock.now() + 30.0 + 2.0 * n + 10.0
            for b, n in zip(batches, sizes, strict=True)
        }
        lost = {batches[1].id, batches[3].id, batches[5].id}
        delays: dict[str, float] = {}

        def on_event(event: FleetEvent) -> None:
            if isinstance(event, BatchDone):
                delays[event.batch_id] = env.clock.now() - ends[event.batch_id]

        async def webhooks(fleet: Fleet) -> None:
            for batch_id, end in sorted(ends.items(), key=lambda item: item[1]):
                await env.clock.sleep(max(0.0, end - env.clock.now()))
                if batch_id not in lost:
                    fleet.notify(batch_id)

        async with Fleet(env.client, config=WEBHOOKS, on_event=on_event) as fleet:
            fleet.add_many(batches)
            sender = asyncio.ensure_future(webhooks(fleet))
            outcomes = await fleet.wait_all()
            await sender
    assert all(done.finished for done in outcomes.values())
    assert all(delays[b] <= 1.0 for b in ends if b not in lost)
    assert all(0.0 <= delays[b] <= WEBHOOKS.webhook_interval for b in lost)  # type: ignore[operator]


def test_webhook_interval_may_not_be_shorter_than_min_interval() -> None:
    """A safety-net interval below min_interval is refused."""
    with pytest.raises(ValueError, match="webhook_interval"):
        FleetConfig(min_interval=5.0, webhook_interval=1.0)
