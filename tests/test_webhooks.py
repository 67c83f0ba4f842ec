"""Webhooks: verifying and parsing Standard Webhooks deliveries, and the aiohttp receiver
that hands batch events to a fleet (answers, repeats, refusals, counts)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from pytest_aiohttp import AiohttpClient

from aiobatch import Fleet, FleetConfig, Secret, SystemClock
from aiobatch.errors import (
    AiobatchError,
    ConfigurationError,
    WebhookHeaderError,
    WebhookPayloadError,
    WebhookSignatureError,
    WebhookTimestampError,
)
from aiobatch.testing import VirtualClock
from aiobatch.transport import Request, Response
from aiobatch.webhooks import (
    WebhookEvent,
    WebhookReceiver,
    WebhookVerifier,
    make_webhook_app,
    sign,
    unwrap,
)

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
OTHER = "whsec_" + base64.b64encode(b"another-secret-another-secret-!!").decode()
T = 1_750_000_000.0


def event_body(
    batch_id: str = "batch_1", kind: str = "batch.completed", event_id: str = "evt_1"
) -> bytes:
    """The JSON body OpenAI sends for a batch event."""
    payload = {
        "id": event_id,
        "object": "event",
        "type": kind,
        "created_at": int(T),
        "data": {"id": batch_id},
    }
    return json.dumps(payload).encode()


def signed(
    body: bytes, *, secret: str = SECRET, webhook_id: str = "msg_1", at: float = T
) -> dict[str, str]:
    """Headers of a delivery of ``body`` signed with ``secret`` at ``at``."""
    return sign(body, secret=secret, webhook_id=webhook_id, timestamp=at)


def verifier(clock: VirtualClock, *secrets: str) -> WebhookVerifier:
    return WebhookVerifier(list(secrets) or [SECRET], clock=clock)


# --- verify and parse ----------------------------------------------------------------------


def test_signs_like_the_standard_webhooks_test_vector() -> None:
    """sign() reproduces the Standard Webhooks specification's published example."""
    headers = sign(
        b'{"test": 2432232314}',
        secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        webhook_id="msg_p5jXN8AQM9LWM0D4loKWxJek",
        timestamp=1614265330,
    )
    assert headers["webhook-signature"] == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert headers["webhook-timestamp"] == "1614265330"


def test_the_official_sdk_accepts_what_sign_makes() -> None:
    """openai's webhooks.unwrap verifies a delivery signed by aiobatch (wire compatible)."""
    body = event_body()
    now = SystemClock().now()
    client = openai.OpenAI(api_key="sk-test", webhook_secret=SECRET)
    event = client.webhooks.unwrap(body, signed(body, at=now))
    assert event.type == "batch.completed"
    assert event.data.id == "batch_1"


def test_unwraps_a_batch_event(clock: VirtualClock) -> None:
    """A correctly signed delivery gives a typed event naming the batch."""
    body = event_body("batch_42", "batch.failed", "evt_9")
    event = verifier(clock).unwrap(signed(body, webhook_id="msg_7"), body)
    assert event == WebhookEvent(
        id="evt_9",
        type="batch.failed",
        created_at=int(T),
        data={"id": "batch_42"},
        webhook_id="msg_7",
        timestamp=int(T),
    )
    assert event.batch_id == "batch_42"
    assert event.is_batch_end


def test_unknown_event_types_are_parsed_not_refused(clock: VirtualClock) -> None:
    """An event of a type aiobatch does not know is returned with its type string."""
    body = event_body("resp_1", "response.completed")
    event = verifier(clock).unwrap(signed(body), body)
    assert event.type == "response.completed"
    assert event.batch_id is None
    assert event.object_id == "resp_1"
    assert not event.is_batch_end


def test_header_names_match_in_any_case(clock: VirtualClock) -> None:
    """Headers given in a plain dict with other capitals still verify."""
    body = event_body()
    headers = {k.title(): v for k, v in signed(body).items()}
    assert verifier(clock).unwrap(headers, body).id == "evt_1"


def test_any_of_several_signatures_passes(clock: VirtualClock) -> None:
    """webhook-signature with several space-separated values passes when one matches."""
    body = event_body()
    good = signed(body)
    headers = {**good, "webhook-signature": "v1,bm90LWl0 " + good["webhook-signature"]}
    assert verifier(clock).unwrap(headers, body).id == "evt_1"


def test_old_and_new_secret_both_pass_during_a_rotation(clock: VirtualClock) -> None:
    """A verifier given two secrets accepts deliveries signed with either."""
    body = event_body()
    both = verifier(clock, SECRET, OTHER)
    assert both.unwrap(signed(body, secret=OTHER), body).id == "evt_1"
    assert both.unwrap(signed(body, secret=SECRET), body).id == "evt_1"
    with pytest.raises(WebhookSignatureError):
        verifier(clock, SECRET).unwrap(signed(body, secret=OTHER), body)


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda h, b: (h, b.replace(b"batch_1", b"batch_2")), id="body"),
        pytest.param(lambda h, b: ({**h, "webhook-id": "msg_other"}, b), id="webhook-id"),
        pytest.param(lambda h, b: ({**h, "webhook-timestamp": str(int(T) + 1)}, b), id="time"),
        pytest.param(lambda h, b: ({**h, "webhook-signature": "v2,abcd"}, b), id="scheme"),
    ],
)
def test_tampered_deliveries_are_refused(
    clock: VirtualClock, tamper: Callable[[dict[str, str], bytes], tuple[dict[str, str], bytes]]
) -> None:
    """A change to the body, the id, the timestamp or the scheme breaks the signature."""
    body = event_body()
    headers, changed = tamper(signed(body), body)
    with pytest.raises(WebhookSignatureError) as info:
        verifier(clock).unwrap(headers, changed)
    assert info.value.webhook_id == headers["webhook-id"]


def test_a_forgery_with_another_secret_is_refused(clock: VirtualClock) -> None:
    """A delivery signed with a secret the verifier does not hold is refused."""
    body = event_body()
    with pytest.raises(WebhookSignatureError):
        verifier(clock).unwrap(signed(body, secret=OTHER), body)


@pytest.mark.parametrize("offset", [-301.0, 301.0, -86_400.0])
def test_stale_and_future_timestamps_are_refused(clock: VirtualClock, offset: float) -> None:
    """A timestamp more than 300 s from the clock's wall time is refused, even when
    correctly signed (a replay, or a future-dated delivery)."""
    body = event_body()
    with pytest.raises(WebhookTimestampError) as info:
        verifier(clock).unwrap(signed(body, at=T + offset), body)
    assert info.value.tolerance == 300.0
    assert info.value.timestamp == int(T + offset)


def test_tolerance_follows_the_injected_clock(clock: VirtualClock) -> None:
    """The same delivery passes at its time and is refused once the clock moved on."""
    body = event_body()
    headers = signed(body, at=T)
    check = verifier(clock)
    clock.advance(299)
    assert check.unwrap(headers, body).id == "evt_1"
    clock.advance(2)
    with pytest.raises(WebhookTimestampError):
        check.unwrap(headers, body)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_headers_are_refused(clock: VirtualClock, missing: str) -> None:
    """A delivery without one of the three headers is unsigned: refused."""
    body = event_body()
    headers = {k: v for k, v in signed(body).items() if k != missing}
    with pytest.raises(WebhookHeaderError, match=missing):
        verifier(clock).unwrap(headers, body)


def test_an_unreadable_timestamp_is_a_header_error(clock: VirtualClock) -> None:
    """A webhook-timestamp that is not whole seconds is refused as a bad header."""
    body = event_body()
    with pytest.raises(WebhookHeaderError, match="timestamp"):
        verifier(clock).unwrap({**signed(body), "webhook-timestamp": "soon"}, body)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"type": "batch.completed", "created_at": 1, "data": {"id": "b"}}',
        b'{"id": "evt", "type": "batch.completed", "created_at": "1", "data": {"id": "b"}}',
        b'{"id": "evt", "type": "batch.completed", "created_at": 1, "data": {}}',
        b'{"id": "evt", "type": "batch.completed", "created_at": 1}',
        b"\xff\xfe",
    ],
)
def test_signed_bodies_that_are_not_events_are_payload_errors(
    clock: VirtualClock, body: bytes
) -> None:
    """A correctly signed body that is not an event is refused as malformed."""
    with pytest.raises(WebhookPayloadError):
        verifier(clock).unwrap(signed(body), body)


def test_the_secret_never_appears_in_errors_or_reprs(clock: VirtualClock) -> None:
    """No error message or repr shows the secret or its decoded key."""
    body = event_body()
    check = WebhookVerifier(Secret(SECRET), clock=clock)
    raw_key = base64.b64decode(SECRET[6:]).decode()
    shown = [repr(check), repr(WebhookReceiver(SECRET, clock=clock))]
    for headers, data in [
        (signed(body, secret=OTHER), body),
        (signed(body, at=T - 1000), body),
        ({}, body),
        (signed(b"{"), b"{"),
    ]:
        with pytest.raises(AiobatchError) as info:
            check.unwrap(headers, data)
        shown.append(str(info.value))
    with pytest.raises(ConfigurationError) as bad:
        WebhookVerifier("whsec_%%%not-base64%%%")
    shown.append(str(bad.value))
    for text in shown:
        assert SECRET not in text and SECRET[6:] not in text and raw_key not in text
        assert "%%%not-base64" not in text


def test_bad_secrets_are_configuration_errors() -> None:
    """No secret, an empty one, or bad base64 after whsec_ is refused up front."""
    for secrets in ([], "", "whsec_", "whsec_***"):
        with pytest.raises(ConfigurationError):
            WebhookVerifier(secrets)


def test_unwrap_function_checks_like_the_verifier(clock: VirtualClock) -> None:
    """The module-level unwrap() verifies with the given secret and clock."""
    body = event_body()
    assert unwrap(body, signed(body), secret=SECRET, clock=clock).batch_id == "batch_1"
    with pytest.raises(WebhookSignatureError):
        unwrap(body, signed(body), secret=OTHER, clock=clock)


# --- the receiver ----------------------------------------------------------------------------


class Notified:
    """Plays a fleet: records notify() calls, tracks the given ids."""

    def __init__(self, *tracked: str) -> None:
        self.tracked = set(tracked)
        self.calls: list[str] = []

    def notify(self, batch_id: str) -> bool:
        self.calls.append(batch_id)
        return batch_id in self.tracked


async def post(client: Any, headers: dict[str, str], body: bytes) -> int:
    async with client.post("/webhooks", data=body, headers=headers) as response:
        return int(response.status)


async def test_receiver_notifies_the_fleet_and_answers_200(
    aiohttp_client: AiohttpClient, clock: VirtualClock
) -> None:
    """A valid batch event is answered 200 and handed to the fleet once."""
    fleet = Notified("batch_1")
    receiver = WebhookReceiver(SECRET, fleet=fleet, clock=clock)
    client = await aiohttp_client(make_webhook_app(receiver))
    body = event_body()
    assert await post(client, signed(body), body) == 200
    assert fleet.calls == ["batch_1"]
    assert receiver.stats.accepted == 1
    assert receiver.stats.notified == 1


async def test_repeated_deliveries_are_acted_on_once(
    aiohttp_client: AiohttpClient, clock: VirtualClock
) -> None:
    """A retry of the same webhook-id (re-signed later) is answered 200 and dropped."""
    fleet = Notified("batch_1")
    receiver = WebhookReceiver(SECRET, fleet=fleet, clock=clock)
    client = await aiohttp_client(make_webhook_app(receiver))
    body = event_body()
    assert await post(client, signed(body, webhook_id="msg_a"), body) == 200
    clock.advance(60)
    assert await post(client, signed(body, webhook_id="msg_a", at=T + 60), body) == 200
    assert fleet.calls == ["batch_1"]
    assert receiver.stats.duplicates == 1


async def test_bad_deliveries_are_refused_counted_and_never_acted_on(
    aiohttp_client: AiohttpClient, clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Forged, tampered, replayed, future-dated and unsigned deliveries get 401, a signed
    non-event 400; none reaches the fleet, each is counted, and repeats log quietly."""
    fleet = Notified("batch_1")
    receiver = WebhookReceiver(SECRET, fleet=fleet, clock=clock)
    client = await aiohttp_client(make_webhook_app(receiver))
    body = event_body()
    good = signed(body)
    cases = [
        (signed(body, secret=OTHER), body, 401),
        (good, body.replace(b"batch_1", b"batch_2"), 401),
        (signed(body, at=T - 3600), body, 401),
        (signed(body, at=T + 3600), body, 401),
        ({"content-type": "application/json"}, body, 401),
        (signed(b"{oops", webhook_id="msg_x"), b"{oops", 400),
    ]
    with caplog.at_level(logging.WARNING, logger="aiobatch"):
        for _ in range(3):
            for headers, data, status in cases:
                assert await post(client, headers, data) == status
    assert fleet.calls == []
    stats = receiver.stats
    assert (stats.refused_signatures, stats.refused_timestamps) == (6, 6)
    assert (stats.refused_headers, stats.refused_bodies) == (3, 3)
    assert stats.refused == 18 and stats.accepted == 0
    assert len(caplog.records) == 4  # once per kind of refusal


async def test_an_event_for_an_untracked_batch_changes_nothing(
    aiohttp_client: AiohttpClient, clock: VirtualClock
) -> None:
    """A valid event for a batch no fleet tracks is answered 200 and counted."""
    receiver = WebhookReceiver(SECRET, fleet=Notified(), clock=clock)
    client = await aiohttp_client(make_webhook_app(receiver))
    body = event_body("batch_elsewhere")
    assert await post(client, signed(body), body) == 200
    assert receiver.stats.unknown_batches == 1
    assert receiver.stats.notified == 0


async def test_other_event_types_reach_on_event_but_not_the_fleet(
    aiohttp_client: AiohttpClient, clock: VirtualClock
) -> None:
    """A response.* event is taken (200), passed to on_event, never to the fleet."""
    fleet = Notified("resp_1")
    seen: list[WebhookEvent] = []

    async def on_event(event: WebhookEvent) -> None:
        seen.append(event)

    receiver = WebhookReceiver(SECRET, fleet=fleet, on_event=on_event, clock=clock)
    client = await aiohttp_client(make_webhook_app(receiver))
    body = event_body("resp_1", "response.completed")
    assert await post(client, signed(body), body) == 200
    await receiver.aclose()
    assert fleet.calls == []
    assert [e.type for e in seen] == ["response.completed"]
    assert receiver.stats.other_types == 1


async def test_an_oversized_body_is_refused_unread(
    aiohttp_client: AiohttpClient, clock: VirtualClock
) -> None:
    """A body over max_body is answered 413 and counted as a refused body."""
    receiver = WebhookReceiver(SECRET, fleet=Notified(), clock=clock, max_body=100)
    client = await aiohttp_client(make_webhook_app(receiver))
    body = b"x" * 1000
    assert await post(client, signed(body), body) == 413
    assert receiver.stats.refused_bodies == 1


async def test_a_flood_of_bad_deliveries_costs_no_api_request(
    make_env: Callable[..., Any],
) -> None:
    """Hundreds of forged, tampered, stale, future-dated, unsigned and unreadable
    deliveries naming a tracked batch are refused: the fleet sends no request for them."""
    async with make_env() as env:
        (batch,) = await env.create(1)
        async with Fleet(env.client, config=FleetConfig(webhook_interval=600.0)) as fleet:
            fleet.add(batch)
            receiver = WebhookReceiver(SECRET, fleet=fleet, clock=env.clock)
            body = event_body(batch.id)
            now = env.clock.now()
            cases = [
                (signed(body, secret=OTHER, at=now), body),
                (signed(body, at=now), body.replace(b"evt_1", b"evt_2")),
                (signed(body, at=now - 3600), body),
                (signed(body, at=now + 3600), body),
                ({}, body),
                (signed(b"[]", at=now), b"[]"),
            ]
            start = env.clock.now()
            async with env.clock.auto_advance():
                for n in range(600):
                    headers, data = cases[n % len(cases)]
                    assert receiver.receive(headers, data) in (400, 401)
                await env.clock.sleep(300.0)
            assert env.fleet_requests(start) == []
            assert fleet.stats.notifications == 0
            assert receiver.stats.refused == 600
            fleet.remove(batch.id)


async def test_the_answer_does_not_wait_for_the_retrieve(
    aiohttp_client: AiohttpClient, make_env: Callable[..., Any]
) -> None:
    """A valid delivery is answered 200 while the retrieve it prompts is still unanswered
    (a slow API never makes the sender time out and retry)."""
    release = asyncio.Event()
    held: list[str] = []

    async def hold_retrieves(
        request: Request, handle: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.method == "GET" and "/batches/" in request.url:
            held.append(request.url)
            await release.wait()
        return await handle(request)

    async with make_env(front=hold_retrieves) as env:
        (batch,) = await env.create(1)
        async with Fleet(env.client, config=FleetConfig(webhook_interval=600.0)) as fleet:
            fleet.add(batch)
            receiver = WebhookReceiver(SECRET, fleet=fleet, clock=env.clock)
            client = await aiohttp_client(make_webhook_app(receiver))
            body = event_body(batch.id)
            answer = post(client, signed(body, at=env.clock.now()), body)
            assert await asyncio.wait_for(answer, timeout=10) == 200
            for _ in range(100):  # let the fleet's scheduler send the retrieve
                if held:
                    break
                await asyncio.sleep(0)
            assert len(held) == 1 and fleet.stats.retrieves == 1
            assert fleet.stats.observations == 1  # the added snapshot; no answer yet
            release.set()
            fleet.remove(batch.id)


def test_the_id_memory_is_bounded(clock: VirtualClock) -> None:
    """Past ``remember`` ids the oldest is forgotten (a very late repeat acts again)."""
    fleet = Notified("batch_1")
    receiver = WebhookReceiver(SECRET, fleet=fleet, clock=clock, remember=2)
    body = event_body()
    for webhook_id in ("a", "b", "c", "a"):
        assert receiver.receive(signed(body, webhook_id=webhook_id), body) == 200
    assert len(fleet.calls) == 4
    assert receiver.receive(signed(body, webhook_id="a"), body) == 200
    assert len(fleet.calls) == 4
