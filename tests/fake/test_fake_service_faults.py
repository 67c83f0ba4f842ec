"""The fake batch service: fault injection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest
from conftest import BASE_URL, FakeApi, chat_line, jsonl

from aiobatch.errors import TransportError, TransportTimeoutError
from aiobatch.testing import Fault, FaultKind, FaultPlan, VirtualClock
from aiobatch.transport import Request

CREATE = {"endpoint": "/v1/chat/completions", "completion_window": "24h"}


async def _input_file(api: FakeApi) -> str:
    return str((await api.upload(jsonl([chat_line("a")])))["id"])


async def test_rate_limit_fault_has_retry_headers_and_no_effect(api: FakeApi) -> None:
    """A 429 fault sends retry headers and an OpenAI body, and the request has no effect."""
    file_id = await _input_file(api)
    api.service.faults.add(
        Fault.http(
            429,
            retry_after=2,
            retry_after_ms=1500,
            should_retry=True,
            method="POST",
            path="/batches",
        )
    )
    response = await api.raw("POST", "/batches", json_body={"input_file_id": file_id, **CREATE})
    assert response.status == 429
    assert response.headers["retry-after"] == "2"
    assert response.headers["retry-after-ms"] == "1500"
    assert response.headers["x-should-retry"] == "true"
    assert response.headers["x-request-id"].startswith("req_")
    body = json.loads(await response.read())
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert api.service.batch_ids == []
    await api.create(file_id)
    assert len(api.service.batch_ids) == 1


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_error_faults(api: FakeApi, status: int) -> None:
    """5xx faults answer that status with a server_error body and no retry headers."""
    api.service.faults.add(Fault.http(status, should_retry=False))
    response = await api.raw("GET", "/batches")
    assert response.status == status
    assert response.headers["x-should-retry"] == "false"
    assert "retry-after" not in response.headers
    body = json.loads(await response.read())
    assert body["error"]["type"] == "server_error"
    assert (await api.call("GET", "/batches"))[0] == 200


async def test_fault_message_override(api: FakeApi) -> None:
    """An HTTP fault can carry its own message."""
    api.service.faults.add(Fault.http(503, message="slow down please"))
    status, body = await api.call("GET", "/files")
    assert status == 503
    assert body["error"]["message"] == "slow down please"


async def test_drop_before_raises_and_has_no_effect(api: FakeApi) -> None:
    """A drop-before fault raises TransportError and the request never takes effect."""
    file_id = await _input_file(api)
    api.service.faults.add(Fault.drop(method="POST", path="/batches"))
    with pytest.raises(TransportError, match="before"):
        await api.raw("POST", "/batches", json_body={"input_file_id": file_id, **CREATE})
    assert api.service.batch_ids == []
    (record,) = [r for r in api.service.requests if r.path == "/batches"]
    assert record.status is None
    assert record.fault is FaultKind.DROP_BEFORE


async def test_drop_after_creates_exactly_one_batch(api: FakeApi) -> None:
    """A drop-after fault loses the create response but the batch exists, exactly once."""
    file_id = await _input_file(api)
    api.service.faults.add(Fault.drop(after=True, method="POST", path="/batches"))
    transport = api.service.transport()
    request = Request(
        "POST",
        f"{BASE_URL}/batches",
        headers=api.headers(),
        body=json.dumps({"input_file_id": file_id, **CREATE}).encode(),
    )
    with pytest.raises(TransportError, match="after"):
        await transport.send(request)
    assert len(api.service.batch_ids) == 1
    page = await api.ok("GET", "/batches")
    assert [b["id"] for b in page["data"]] == api.service.batch_ids


async def test_drop_after_on_cancel_still_cancels(api: FakeApi) -> None:
    """A cancel whose answer is lost has still taken effect."""
    batch = await api.submit([chat_line("a")])
    api.service.faults.add(Fault.drop(after=True, path="/batches/*/cancel"))
    with pytest.raises(TransportError):
        await api.raw("POST", f"/batches/{batch['id']}/cancel")
    assert (await api.batch(batch["id"]))["status"] == "cancelling"


async def test_slow_fault_delays_on_the_clock(api: FakeApi, clock: VirtualClock) -> None:
    """A slow fault answers normally after its delay on the service clock."""
    api.service.faults.add(Fault.slow(30, path="/batches"))
    start = clock.now()
    async with clock.auto_advance():
        response = await api.raw("GET", "/batches")
    assert response.status == 200
    assert clock.now() - start == pytest.approx(30)


async def test_slow_fault_trips_a_client_timeout(api: FakeApi, clock: VirtualClock) -> None:
    """A response slower than the transport timeout becomes a TransportTimeoutError."""
    api.service.faults.add(Fault.slow(30))
    transport = api.service.transport(timeout=5)
    async with clock.auto_advance():
        with pytest.raises(TransportTimeoutError):
            await transport.send(Request("GET", f"{BASE_URL}/batches", headers=api.headers()))
        response = await transport.send(
            Request("GET", f"{BASE_URL}/batches", headers=api.headers())
        )
    assert response.status == 200
    await transport.aclose()


async def test_slow_create_that_times_out_still_creates_the_batch(
    api: FakeApi, clock: VirtualClock
) -> None:
    """A slow answer is slow after the fact: a create the client gave up on still exists."""
    file_id = await _input_file(api)
    api.service.faults.add(Fault.slow(60, method="POST", path="/batches"))
    transport = api.service.transport(timeout=5)
    request = Request(
        "POST",
        f"{BASE_URL}/batches",
        headers=api.headers(),
        body=json.dumps({"input_file_id": file_id, **CREATE}).encode(),
    )
    start = clock.now()
    task = asyncio.ensure_future(transport.send(request))
    await clock.run_for(5)
    with pytest.raises(TransportTimeoutError):
        await task
    assert len(api.service.batch_ids) == 1
    (record,) = [r for r in api.service.requests if r.path == "/batches"]
    assert record.status == 200
    assert record.fault is FaultKind.SLOW
    assert record.at == start
    assert transport.abandoned == 1  # the service is still holding back the answer
    await clock.run_for(55)
    assert transport.abandoned == 0
    assert len(api.service.batch_ids) == 1
    await transport.aclose()


async def _create_request(api: FakeApi) -> Request:
    file_id = await _input_file(api)
    return Request(
        "POST",
        f"{BASE_URL}/batches",
        headers=api.headers(),
        body=json.dumps({"input_file_id": file_id, **CREATE}).encode(),
    )


async def test_late_commit_takes_effect_only_after_the_delay(
    api: FakeApi, clock: VirtualClock
) -> None:
    """act_after_delay: the client times out first, the batch appears when the delay ends."""
    request = await _create_request(api)
    api.service.faults.add(Fault.slow(60, act_after_delay=True, method="POST", path="/batches"))
    transport = api.service.transport(timeout=5)
    start = clock.now()
    task = asyncio.ensure_future(transport.send(request))
    await clock.run_for(5)
    with pytest.raises(TransportTimeoutError):
        await task
    assert api.service.batch_ids == []
    assert api.service.request_count("POST", "/batches") == 0  # not processed yet
    await clock.run_for(54)
    assert api.service.batch_ids == []
    await clock.run_for(1)
    (batch_id,) = api.service.batch_ids
    assert (await api.batch(batch_id))["created_at"] == int(start + 60)
    (record,) = [r for r in api.service.requests if r.path == "/batches"]
    assert (record.status, record.fault, record.at) == (200, FaultKind.SLOW, start)
    assert transport.abandoned == 0
    await transport.aclose()


async def test_late_commit_answers_a_patient_client(api: FakeApi, clock: VirtualClock) -> None:
    """act_after_delay with no client timeout: the answer is the batch made at the end."""
    request = await _create_request(api)
    api.service.faults.add(Fault.slow(60, act_after_delay=True, method="POST", path="/batches"))
    start = clock.now()
    async with clock.auto_advance():
        response = await api.service.handle(request)
    assert response.status == 200
    assert json.loads(await response.read())["created_at"] == int(start + 60)
    assert clock.now() == start + 60


async def test_late_commit_then_drop(api: FakeApi, clock: VirtualClock) -> None:
    """drop(after=True, act_after_delay=True): the batch appears at the end, the answer is lost."""
    request = await _create_request(api)
    api.service.faults.add(
        Fault.drop(after=True, delay=30, act_after_delay=True, method="POST", path="/batches")
    )
    task = asyncio.ensure_future(api.service.handle(request))
    await clock.run_for(29)
    assert api.service.batch_ids == []
    await clock.run_for(1)
    with pytest.raises(TransportError):
        await task
    assert len(api.service.batch_ids) == 1


def test_act_after_delay_defaults_to_off() -> None:
    """Fault.slow keeps processing on arrival unless act_after_delay is asked for."""
    assert Fault.slow(5).act_after_delay is False
    assert Fault.slow(5, act_after_delay=True).act_after_delay is True
    assert Fault.malformed(delay=1, act_after_delay=True).act_after_delay is True


async def test_malformed_fault_sends_truncated_json_after_acting(api: FakeApi) -> None:
    """A malformed fault answers 200 with invalid JSON, but the request took effect."""
    file_id = await _input_file(api)
    api.service.faults.add(Fault.malformed(method="POST", path="/v1/batches"))
    response = await api.raw("POST", "/batches", json_body={"input_file_id": file_id, **CREATE})
    assert response.status == 200
    raw = await response.read()
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)
    assert raw.startswith(b'{"id":"batch_')
    assert len(api.service.batch_ids) == 1


async def test_faults_match_method_and_path(api: FakeApi) -> None:
    """A fault hits only requests with its method and a path matching its pattern."""
    api.service.faults.add(Fault.http(500, method="POST", path="/batches/*/cancel", times=None))
    assert (await api.call("GET", "/batches"))[0] == 200
    assert (await api.call("GET", "/batches/batch_x"))[0] == 404
    assert (await api.call("POST", "/batches/batch_x/cancel"))[0] == 500
    assert (await api.call("POST", "/batches/batch_y/cancel"))[0] == 500


async def test_times_limits_how_often_a_fault_fires(api: FakeApi) -> None:
    """A fault with times=3 breaks exactly three matching requests."""
    api.service.faults.add(Fault.http(500, times=3))
    statuses = [(await api.call("GET", "/files"))[0] for _ in range(5)]
    assert statuses == [500, 500, 500, 200, 200]
    assert api.service.faults.pending == ()


async def test_first_matching_fault_wins(api: FakeApi) -> None:
    """Rules are checked in order; the first that matches fires."""
    api.service.faults.add(Fault.http(502, path="/files"))
    api.service.faults.add(Fault.http(503))
    assert (await api.call("GET", "/batches"))[0] == 503
    assert (await api.call("GET", "/files"))[0] == 502


async def test_probability_is_seeded(make_api: Callable[..., FakeApi]) -> None:
    """Probabilistic faults fire about that often, identically for the same seed."""
    runs = []
    for seed in (11, 11, 12):
        api = make_api(seed=seed)
        api.service.faults.add(Fault.http(500, probability=0.4, times=None))
        runs.append([(await api.call("GET", "/batches"))[0] for _ in range(200)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert 40 <= runs[0].count(500) <= 120


async def test_fired_faults_are_recorded(api: FakeApi) -> None:
    """FaultPlan.fired and the request log record which requests a fault broke."""
    fault = api.service.faults.add(Fault.http(500, path="/files"))
    await api.call("GET", "/files")
    assert [(f.fault, f.method, f.path) for f in api.service.faults.fired] == [
        (fault, "GET", "/files")
    ]
    assert api.service.requests[-1].fault is FaultKind.HTTP
    assert api.service.requests[-1].status == 500


def test_fault_plan_clear_and_validation() -> None:
    """clear() disarms every rule; nonsense rules are refused."""
    plan = FaultPlan()
    plan.add(Fault.http(500, times=None))
    assert plan.take("GET", "/batches") is not None
    plan.clear()
    assert plan.take("GET", "/batches") is None
    with pytest.raises(ValueError, match="error status"):
        Fault.http(200)
    with pytest.raises(ValueError, match="probability"):
        Fault.http(500, probability=1.5)
    with pytest.raises(ValueError, match="times"):
        Fault.drop(times=0)


async def test_fault_delay_applies_before_an_http_error(api: FakeApi, clock: VirtualClock) -> None:
    """An HTTP fault with a delay answers its error after the delay."""
    api.service.faults.add(Fault.http(503, delay=12))
    start = clock.now()
    async with clock.auto_advance():
        assert (await api.call("GET", "/batches"))[0] == 503
    assert clock.now() - start == pytest.approx(12)


async def test_faults_apply_before_auth(make_api: Callable[..., FakeApi]) -> None:
    """Faults act at the network edge: an unauthenticated request can still be dropped."""
    api = make_api(key=None)
    api.service.faults.add(Fault.drop())
    with pytest.raises(TransportError):
        await api.raw("GET", "/batches")
