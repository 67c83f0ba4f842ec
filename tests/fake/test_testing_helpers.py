"""Helpers that aiobatch.testing gives users for their own tests."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import pytest

from aiobatch import Batch, BatchClient, RetryPolicy
from aiobatch.errors import ClosedError
from aiobatch.testing import (
    FakeBatchService,
    FakeConfig,
    FakeSetup,
    Fault,
    VirtualClock,
    chat_requests,
    fake_client,
)
from aiobatch.transport import Request, Response


def test_chat_requests_builds_valid_unique_lines() -> None:
    """chat_requests(n) gives n newline-terminated requests with distinct ids and bodies."""
    data = chat_requests(3, prefix="x", model="m", endpoint="/v1/chat/completions")
    lines = data.split(b"\n")
    assert lines[-1] == b""
    rows = [json.loads(line) for line in lines[:-1]]
    assert [r["custom_id"] for r in rows] == ["x-0", "x-1", "x-2"]
    assert {r["url"] for r in rows} == {"/v1/chat/completions"}
    assert {r["body"]["model"] for r in rows} == {"m"}
    assert len({json.dumps(r["body"]) for r in rows}) == 3
    assert chat_requests(0) == b""


async def test_chat_requests_pass_the_fakes_validation() -> None:
    """A file from chat_requests is a batch the fake service completes without errors."""
    clock = VirtualClock()
    service = FakeBatchService(clock=clock)
    async with BatchClient(
        api_key="sk-t", base_url="http://fake/v1", transport=service.transport(), clock=clock
    ) as client:
        uploaded = await client.upload_file(chat_requests(5))
        batch = await client.create_batch(uploaded.id, "/v1/chat/completions")
        async with clock.auto_advance():
            done = await client.wait(batch, poll_interval=1.0)
    assert done.status.value == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (5, 0)


async def _lifecycle(setup: FakeSetup, lines: int = 4) -> Batch:
    """Upload ``lines`` requests through the setup's client, create a batch, wait for it."""
    async with setup.clock.auto_advance():  # an Azure upload is processed after a while
        uploaded = await setup.client.upload_file(chat_requests(lines))
        batch = await setup.client.create_batch(uploaded.id, "/v1/chat/completions")
        return await setup.client.wait(batch, poll_interval=1.0, max_interval=1.0, jitter=0)


@pytest.mark.parametrize("dialect", ["openai", "portkey", "azure"])
async def test_fake_client_reaches_the_fake_on_the_virtual_clock(dialect: str) -> None:
    """fake_client's client talks to its service as that dialect's provider, and the
    batch runs its simulated minutes on the setup's virtual clock."""
    config = FakeConfig(validation_seconds=30.0, lines_per_second=0.1, finalizing_seconds=20.0)
    async with fake_client(config=config, dialect=dialect, seed=4) as setup:
        start = setup.clock.now()
        done = await _lifecycle(setup)
        assert done.status.value == "completed"
        assert setup.service.batch_ids == [done.id]
        assert setup.service.dialect.name == dialect
        assert setup.clock.now() - start >= 30.0 + 4 / 0.1 + 20.0
        assert [r.at for r in setup.service.requests][-1] == setup.clock.now()
        assert done.output_file_id is not None
        results = [r async for r in setup.client.iter_results(done.output_file_id)]
    assert sorted(r.custom_id for r in results) == [f"req-{i}" for i in range(4)]
    with pytest.raises(ClosedError):
        await setup.client.list_batches_page()


async def test_fake_client_arms_faults_and_retries_on_the_clock() -> None:
    """Faults given to fake_client answer the client's calls; its retry policy waits the
    server's retry-after on the virtual clock, not on wall time."""
    fault = Fault.http(429, retry_after=7.0, method="POST", path="/batches", times=2)
    async with fake_client(faults=[fault], retry=RetryPolicy(max_attempts=3)) as setup:
        uploaded = await setup.client.upload_file(chat_requests(1))
        start = setup.clock.now()
        async with setup.clock.auto_advance():
            batch = await setup.client.create_batch(uploaded.id, "/v1/chat/completions")
        assert len(setup.service.faults.fired) == 2
        assert setup.clock.now() - start == pytest.approx(14.0)
        assert setup.service.batch_ids == [batch.id]


async def test_fake_client_binds_a_service_built_beforehand_and_a_front() -> None:
    """A service given to fake_client is the one the client reaches, through ``front``."""
    clock = VirtualClock()
    service = FakeBatchService(clock=clock, api_key="sk-mine", dialect="azure")
    seen: list[str] = []

    async def front(request: Request, handle: Callable[[Request], Awaitable[Response]]) -> Response:
        seen.append(f"{request.method} {request.url}")
        return await handle(request)

    async with fake_client(service=service, api_key="sk-mine", front=front) as setup:
        assert setup.service is service and setup.clock is clock
        done = await _lifecycle(setup, lines=2)
    assert done.status.value == "completed"
    assert seen[0] == "POST http://fake.local/openai/v1/files"
    assert len(seen) == len(service.requests)


async def test_fake_client_refuses_contradictory_arguments() -> None:
    """A service together with the settings of another one, or a service on the wall
    clock, is refused before anything is built."""
    service = FakeBatchService(clock=VirtualClock())
    with pytest.raises(TypeError, match="either service or"):
        async with fake_client(service=service, seed=1):
            pass
    with pytest.raises(ValueError, match="VirtualClock"):
        async with fake_client(service=FakeBatchService()):
            pass
    with pytest.raises(ValueError, match="another clock"):
        async with fake_client(service=service, clock=VirtualClock()):
            pass
