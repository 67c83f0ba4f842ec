"""The aiobatch pytest plugin, used as a project that adopts aiobatch would use it.

Nothing private is imported, nothing from conftest: only the fixtures the ``pytest11``
entry point provides, the ``aiobatch`` marker, and public names.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import openai
import pytest

from aiobatch import BatchClient, BatchStatus
from aiobatch.testing import FakeSetup, Fault, RateLimit, chat_requests
from aiobatch.testing.pytest_plugin import FakeServer


async def run_batch(client: BatchClient, lines: int = 3) -> list[str]:
    """Upload ``lines`` chat requests, create a batch, wait for it; the custom_ids of
    its successful results."""
    uploaded = await client.upload_file(chat_requests(lines))
    batch = await client.create_batch(uploaded.id, "/v1/chat/completions")
    done = await client.wait(batch, poll_interval=1.0)
    assert done.status is BatchStatus.COMPLETED
    assert done.output_file_id is not None
    return sorted([line.custom_id async for line in client.iter_results(done.output_file_id)])


async def test_client_runs_a_batch_on_the_virtual_clock(aiobatch_client: BatchClient) -> None:
    """``aiobatch_client`` runs a batch end to end; its simulated time passes at once."""
    assert await run_batch(aiobatch_client) == ["req-0", "req-1", "req-2"]


@pytest.mark.aiobatch(dialect="portkey", validation_seconds=600.0)
async def test_marker_sets_the_dialect_and_timings(aiobatch_fake: FakeSetup) -> None:
    """The ``aiobatch`` marker sets the dialect and the fake's timings."""
    assert aiobatch_fake.service.dialect.name == "portkey"
    start = aiobatch_fake.clock.now()
    await run_batch(aiobatch_fake.client)
    assert aiobatch_fake.clock.now() - start >= 600.0


@pytest.mark.aiobatch(faults=[Fault.http(503, method="POST", path="/files", times=2)])
async def test_marker_arms_faults(aiobatch_fake: FakeSetup) -> None:
    """Faults given to the marker are answered (and retried by the client)."""
    await aiobatch_fake.client.upload_file(chat_requests(1))
    uploads = [r for r in aiobatch_fake.service.requests if r.path == "/files"]
    assert [r.status for r in uploads] == [503, 503, 200]


@pytest.mark.aiobatch(rate_limit=RateLimit(requests_per_second=1.0, burst=1))
async def test_marker_sets_a_rate_limit(aiobatch_fake: FakeSetup) -> None:
    """A rate limit given to the marker makes the service answer 429 beyond it."""
    for _ in range(3):
        await aiobatch_fake.client.list_batches_page()
    statuses = [r.status for r in aiobatch_fake.service.requests]
    assert 429 in statuses and statuses[-1] == 200


@pytest.mark.aiobatch(auto_advance=False)
async def test_clock_moves_only_when_told(aiobatch_fake: FakeSetup) -> None:
    """With ``auto_advance=False`` the test moves the clock itself."""
    client = aiobatch_fake.client
    uploaded = await client.upload_file(chat_requests(2))
    batch = await client.create_batch(uploaded.id, "/v1/chat/completions")
    assert (await client.retrieve_batch(batch.id)).status is BatchStatus.VALIDATING
    await aiobatch_fake.clock.run_for(3600.0)
    assert (await client.retrieve_batch(batch.id)).status is BatchStatus.COMPLETED


async def test_factory_builds_fakes_with_their_own_options(
    aiobatch_fake_factory: Callable[..., Awaitable[FakeSetup]],
) -> None:
    """``aiobatch_fake_factory(**options)`` builds independent fakes."""
    azure = await aiobatch_fake_factory(dialect="azure")
    plain = await aiobatch_fake_factory(lines_per_second=0.5)
    assert azure.service.dialect.name == "azure"
    assert plain.service.config.lines_per_second == 0.5
    assert await run_batch(azure.client, 2) == ["req-0", "req-1"]
    assert plain.service.requests == ()


async def test_server_serves_the_official_sdk(aiobatch_server: FakeServer) -> None:
    """``aiobatch_server`` is a real HTTP server the OpenAI SDK runs a batch against."""
    async with openai.AsyncOpenAI(
        base_url=aiobatch_server.base_url, api_key=aiobatch_server.api_key, max_retries=0
    ) as sdk:
        uploaded = await sdk.files.create(file=("in.jsonl", chat_requests(2)), purpose="batch")
        batch = await sdk.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = await sdk.batches.retrieve(batch.id)
        while done.status not in ("completed", "failed"):
            done = await sdk.batches.retrieve(batch.id)
        assert done.status == "completed" and done.output_file_id
        content = await sdk.files.content(done.output_file_id)
    ids = sorted(json.loads(line)["custom_id"] for line in content.text.splitlines())
    assert ids == ["req-0", "req-1"]
    assert aiobatch_server.env["OPENAI_BASE_URL"] == aiobatch_server.base_url


@pytest.mark.aiobatch(api_key="sk-mine")
async def test_server_client_sends_the_servers_key(
    aiobatch_server: FakeServer, aiobatch_server_client: BatchClient
) -> None:
    """``aiobatch_server_client`` runs a batch over HTTP with the key the server wants."""
    assert aiobatch_server.api_key == "sk-mine"
    assert await run_batch(aiobatch_server_client, 2) == ["req-0", "req-1"]
    assert aiobatch_server.service.requests


async def test_server_factory_serves_each_on_its_own_port(
    aiobatch_server_factory: Callable[..., Awaitable[FakeServer]],
) -> None:
    """``aiobatch_server_factory`` serves independent fakes on their own ports."""
    one = await aiobatch_server_factory()
    two = await aiobatch_server_factory(dialect="azure")
    assert one.base_url != two.base_url
    assert two.base_url.endswith("/openai/v1")
