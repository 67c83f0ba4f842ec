"""The fake service's webhook sender: signed batch events as batches end, retries of
failed deliveries, injected faults, and the whole path into a fleet over HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping
from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpServer

from aiobatch import (
    BatchClient,
    BatchDone,
    BatchRun,
    Fleet,
    FleetConfig,
    FleetEvent,
    RetryPolicy,
    RunConfig,
)
from aiobatch.testing import (
    FakeBatchService,
    FakeConfig,
    VirtualClock,
    WebhookFaults,
    WebhookSender,
    chat_requests,
)
from aiobatch.webhooks import WebhookReceiver, WebhookVerifier, make_webhook_app

SECRET = "whsec_" + base64.b64encode(b"fake-service-webhook-secret-0001").decode()
URL = "http://receiver.invalid/webhooks"


class Inbox:
    """Plays the receiving endpoint: records each delivery, answers from a script."""

    def __init__(self, clock: VirtualClock, answers: list[int] | None = None) -> None:
        self.clock = clock
        self.answers = list(answers or [])
        self.got: list[tuple[float, Mapping[str, str], bytes]] = []

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> int | None:
        self.got.append((self.clock.now(), dict(headers), body))
        return self.answers.pop(0) if self.answers else 200

    def events(self) -> list[dict[str, object]]:
        return [json.loads(body) for _, _, body in self.got]


def service_on(clock: VirtualClock) -> FakeBatchService:
    config = FakeConfig(validation_seconds=10, lines_per_second=1.0, finalizing_seconds=10)
    return FakeBatchService(clock=clock, config=config)


async def submit(client: BatchClient, lines: int = 5) -> str:
    uploaded = await client.upload_file(chat_requests(lines))
    batch = await client.create_batch(uploaded.id, "/v1/chat/completions")
    return batch.id


def client_of(service: FakeBatchService, clock: VirtualClock) -> BatchClient:
    return BatchClient(
        api_key="sk-test",
        base_url="http://fake/v1",
        transport=service.transport(),
        clock=clock,
        retry=RetryPolicy.for_testing(max_attempts=3),
    )


async def test_sends_a_signed_event_when_a_batch_ends(clock: VirtualClock) -> None:
    """With no request made, a batch's end (10 + 5 + 10 s) is announced at that moment,
    signed so that a verifier on the same clock accepts it."""
    service, inbox = service_on(clock), Inbox(clock)
    sender = WebhookSender(service, [URL], SECRET, post=inbox.post)
    async with client_of(service, clock) as client, clock.auto_advance(), sender:
        start = clock.now()
        batch_id = await submit(client)
        await clock.sleep(100)
    assert len(inbox.got) == 1
    at, headers, body = inbox.got[0]
    assert at - start == pytest.approx(25.0)
    event = WebhookVerifier(SECRET, clock=clock).unwrap(headers, body)
    assert (event.type, event.batch_id) == ("batch.completed", batch_id)
    assert json.loads(body)["object"] == "event"


async def test_each_terminal_status_has_its_event_type(clock: VirtualClock) -> None:
    """Completed, failed, cancelled and expired batches give the four batch.* types."""
    service, inbox = service_on(clock), Inbox(clock)
    sender = WebhookSender(service, [URL], SECRET, post=inbox.post)
    async with client_of(service, clock) as client, clock.auto_advance(), sender:
        done = await submit(client)
        service.fail_next_batches("invalid_json_line")
        failed = await submit(client)
        cancelled = await submit(client, lines=500)
        await clock.sleep(20)
        await client.cancel_batch(cancelled)
        await clock.sleep(24 * 3600)
        await client.aclose()
    kinds = {e["data"]["id"]: e["type"] for e in inbox.events()}  # type: ignore[index]
    assert kinds == {done: "batch.completed", failed: "batch.failed", cancelled: "batch.cancelled"}

    clock2 = VirtualClock()
    config = FakeConfig(validation_seconds=10, lines_per_second=0.0, completion_window_seconds=60)
    slow = FakeBatchService(clock=clock2, config=config)
    inbox2 = Inbox(clock2)
    sender = WebhookSender(slow, [URL], SECRET, post=inbox2.post)
    async with client_of(slow, clock2) as client, clock2.auto_advance(), sender:
        expired = await submit(client)
        await clock2.sleep(120)
    assert [(e["type"], e["data"]) for e in inbox2.events()] == [("batch.expired", {"id": expired})]


async def test_failed_deliveries_are_retried_with_backoff(clock: VirtualClock) -> None:
    """A non-2xx answer or none is retried after 5 s, then 10 s, re-signed each time
    with the same webhook-id; a 2xx ends it."""
    service, inbox = service_on(clock), Inbox(clock, answers=[500, 0, 503, 204])
    async with client_of(service, clock) as client, clock.auto_advance():
        sender = WebhookSender(service, [URL], SECRET, post=inbox.post)
        async with sender:
            await submit(client)
            await clock.sleep(200)
    times = [at - inbox.got[0][0] for at, _, _ in inbox.got]
    assert times == [0.0, 5.0, 15.0, 35.0]
    assert len({h["webhook-id"] for _, h, _ in inbox.got}) == 1
    assert len({h["webhook-timestamp"] for _, h, _ in inbox.got}) == 4
    assert (sender.stats.attempts, sender.stats.retries, sender.stats.delivered) == (4, 3, 1)


async def test_a_delivery_is_given_up_after_retry_for(clock: VirtualClock) -> None:
    """An endpoint that keeps failing is tried until retry_for, then given up."""
    service, inbox = service_on(clock), Inbox(clock, answers=[500] * 1000)
    async with client_of(service, clock) as client, clock.auto_advance():
        sender = WebhookSender(service, [URL], SECRET, post=inbox.post, retry_for=3600.0)
        async with sender:
            await submit(client)
            await clock.sleep(10_000)
    assert inbox.got[-1][0] - inbox.got[0][0] <= 3600.0
    assert sender.stats.gave_up == 1 and sender.stats.delivered == 0


async def test_dropped_and_duplicated_deliveries(clock: VirtualClock) -> None:
    """drop=1 sends nothing; duplicate=1 sends each event twice with one webhook-id."""
    for faults, sent in ((WebhookFaults(drop=1.0), 0), (WebhookFaults(duplicate=1.0), 2)):
        service, inbox = service_on(clock), Inbox(clock)
        sender = WebhookSender(service, [URL], SECRET, post=inbox.post, faults=faults)
        async with client_of(service, clock) as client, clock.auto_advance(), sender:
            await submit(client)
            await clock.sleep(100)
        assert len(inbox.got) == sent
        assert len({h["webhook-id"] for _, h, _ in inbox.got}) == min(sent, 1)


async def test_reordered_and_delayed_deliveries_arrive_out_of_order(clock: VirtualClock) -> None:
    """With reorder and delay faults, events reach the endpoint in another order than
    the batches ended in, every one of them still once."""
    service, inbox = service_on(clock), Inbox(clock)
    faults = WebhookFaults(reorder=0.5, delay=0.3, max_delay=30.0)
    sender = WebhookSender(service, [URL], SECRET, post=inbox.post, faults=faults, seed=3)
    async with client_of(service, clock) as client, clock.auto_advance(), sender:
        ids = []
        for n in range(20):
            ids.append(await submit(client, lines=1 + n * 3))
        await clock.sleep(500)
    arrived = [e["data"]["id"] for e in inbox.events()]  # type: ignore[index]
    assert sorted(arrived) == sorted(ids)
    assert arrived != ids  # batches end in creation order here (more lines, later)


async def test_webhooks_over_http_let_a_fleet_detect_ends_at_once(
    aiohttp_server: AiohttpServer, clock: VirtualClock
) -> None:
    """The sender posts over loopback HTTP to a receiver, which notifies a fleet polling
    only every 10 minutes: the batch is done within a second of its end (virtual)."""
    service = service_on(clock)
    async with client_of(service, clock) as client:
        detected: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        def on_event(event: FleetEvent) -> None:
            if isinstance(event, BatchDone) and not detected.done():
                detected.set_result(clock.now())

        config = FleetConfig(webhook_interval=600.0, jitter=0.0)
        async with Fleet(client, config=config, on_event=on_event) as fleet:
            receiver = WebhookReceiver(SECRET, fleet=fleet, clock=clock)
            server = await aiohttp_server(make_webhook_app(receiver))
            async with WebhookSender(service, [str(server.make_url("/webhooks"))], SECRET):
                start = clock.now()
                fleet.add(await submit(client))
                await clock.run_for(25.0)  # the batch ends now; the sender posts it
                done_at = await asyncio.wait_for(detected, timeout=30)
    assert done_at - start == pytest.approx(25.0)
    assert receiver.stats.notified == 1
    assert fleet.stats.requests == 2  # the first look (added by id), the one asked for


async def test_a_run_given_a_receiver_learns_each_end_from_webhooks(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """BatchRun(webhooks=receiver): every batch is detected through its webhook, and the
    fleet polls only as a 10-minute safety net: at most one look per batch."""
    service = service_on(clock)
    requests = [
        {
            "custom_id": f"r{n}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        }
        for n in range(30)
    ]
    receiver = WebhookReceiver(SECRET, clock=clock)

    async def deliver(url: str, headers: Mapping[str, str], body: bytes) -> int | None:
        return receiver.receive(headers, body)

    sender = WebhookSender(service, [URL], SECRET, post=deliver)
    async with client_of(service, clock) as client, clock.auto_advance(), sender:
        start = clock.now()
        run = BatchRun(
            client,
            requests,
            journal=tmp_path / "run.journal",
            config=RunConfig(max_lines=10),
            webhooks=receiver,
        )
        report = await run.run()
    assert report.state == "done"
    assert receiver.stats.notified == 3
    assert 1 <= service.request_count("GET", "/batches*") <= 3  # retrieves or one list page
    assert clock.now() - start < 100  # 10 s validating, 10 lines at 1/s, 10 s finalizing
