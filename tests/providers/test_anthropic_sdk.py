"""Wire compatibility with Anthropic: the official ``anthropic`` SDK's Message Batches
(``AsyncAnthropic().messages.batches``) against the fake's ``anthropic`` dialect over HTTP,
and aiobatch's own client against the same fake."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import pytest
from anthropic import AsyncAnthropic
from pytest_aiohttp import AiohttpServer

from aiobatch import AnthropicProvider, BatchClient, BatchStatus
from aiobatch._models import BatchRequest
from aiobatch.testing import FakeBatchService, FakeConfig, VirtualClock, make_app

KEY = "sk-ant-fake-0123456789abcdef"
CONFIG = FakeConfig(validation_seconds=10, lines_per_second=2, finalizing_seconds=5)


def _requests(count: int, *, start: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"req-{i}",
            "params": {
                "model": "claude-test",
                "max_tokens": 64,
                "messages": [{"role": "user", "content": f"question {i}"}],
            },
        }
        for i in range(start, start + count)
    ]


@pytest.fixture
def service(clock: VirtualClock) -> FakeBatchService:
    """The fake in the anthropic dialect, accepting only KEY."""
    return FakeBatchService(clock=clock, config=CONFIG, api_key=KEY, dialect="anthropic")


@pytest.fixture
async def sdk(
    aiohttp_server: AiohttpServer, service: FakeBatchService
) -> AsyncIterator[AsyncAnthropic]:
    """An AsyncAnthropic client against the fake over HTTP."""
    server = await aiohttp_server(make_app(service))
    client = AsyncAnthropic(
        api_key=KEY, base_url=str(server.make_url("")).rstrip("/"), max_retries=0
    )
    yield client
    await client.close()


async def test_sdk_creates_polls_and_reads_results(
    sdk: AsyncAnthropic, clock: VirtualClock
) -> None:
    """batches.create answers in_progress; once ended, retrieve has counts and a
    results_url, and batches.results yields one succeeded result per request."""
    batch = await sdk.messages.batches.create(requests=_requests(3))  # type: ignore[arg-type]
    assert batch.id.startswith("msgbatch_")
    assert batch.type == "message_batch"
    assert batch.processing_status == "in_progress"
    assert batch.request_counts.processing == 3
    assert batch.results_url is None
    clock.advance(3600)
    done = await sdk.messages.batches.retrieve(batch.id)
    assert done.processing_status == "ended"
    assert done.request_counts.succeeded == 3
    assert done.ended_at is not None
    assert done.results_url is not None
    results = [r async for r in await sdk.messages.batches.results(batch.id)]
    assert sorted(r.custom_id for r in results) == ["req-0", "req-1", "req-2"]
    assert {r.result.type for r in results} == {"succeeded"}
    first = results[0].result
    assert first.type == "succeeded"
    assert first.message.content[0].type == "text"


async def test_sdk_lists_pages_newest_first(sdk: AsyncAnthropic) -> None:
    """batches.list pages with limit and after_id, newest first, and auto-pages to the end."""
    made = [(await sdk.messages.batches.create(requests=_requests(1))).id for _ in range(5)]  # type: ignore[arg-type]
    page = await sdk.messages.batches.list(limit=2)
    assert [b.id for b in page.data] == made[::-1][:2]
    assert page.has_more is True
    assert page.last_id == made[3]
    everything = [b.id async for b in sdk.messages.batches.list(limit=2)]
    assert everything == made[::-1]


async def test_sdk_cancel_then_results_and_delete(sdk: AsyncAnthropic, clock: VirtualClock) -> None:
    """batches.cancel answers canceling; the ended batch has canceled results; delete
    refuses a batch still processing and removes an ended one."""
    batch = await sdk.messages.batches.create(requests=_requests(40))  # type: ignore[arg-type]
    with pytest.raises(anthropic.BadRequestError):
        await sdk.messages.batches.delete(batch.id)
    clock.advance(12)  # a few requests done
    cancelling = await sdk.messages.batches.cancel(batch.id)
    assert cancelling.processing_status == "canceling"
    assert cancelling.cancel_initiated_at is not None
    clock.advance(3600)
    ended = await sdk.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended"
    counts = ended.request_counts
    assert counts.canceled > 0
    assert counts.succeeded + counts.canceled == 40
    results = [r async for r in await sdk.messages.batches.results(batch.id)]
    assert len(results) == 40
    assert sum(r.result.type == "canceled" for r in results) == counts.canceled
    deleted = await sdk.messages.batches.delete(batch.id)
    assert deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        await sdk.messages.batches.retrieve(batch.id)


async def test_sdk_errors_are_anthropic_shaped(
    aiohttp_server: AiohttpServer, service: FakeBatchService
) -> None:
    """A wrong key is a 401 authentication_error; a bad custom_id a 400 naming the request."""
    server = await aiohttp_server(make_app(service))
    root = str(server.make_url("")).rstrip("/")
    async with AsyncAnthropic(api_key="wrong", base_url=root, max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError) as auth:
            await bad.messages.batches.list()
    assert auth.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid x-api-key"},
    }
    async with AsyncAnthropic(api_key=KEY, base_url=root, max_retries=0) as sdk:
        requests = _requests(2)
        requests[1]["custom_id"] = "has space"
        with pytest.raises(anthropic.BadRequestError) as bad_id:
            await sdk.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    assert "requests.1.custom_id" in str(bad_id.value)


# --- aiobatch's own client --------------------------------------------------------------------


def _batch_requests(count: int) -> list[BatchRequest]:
    return [
        BatchRequest(custom_id=r["custom_id"], url="/v1/messages", body=r["params"])
        for r in _requests(count)
    ]


async def test_batch_client_runs_an_anthropic_batch(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """BatchClient with AnthropicProvider: inline create, wait, list, results as ResultLines."""
    provider = AnthropicProvider(api_key=KEY, base_url="http://fake")
    async with BatchClient(provider=provider, transport=service.transport(), clock=clock) as c:
        created = await c.create_inline_batch(_batch_requests(3))
        assert created.status is BatchStatus.IN_PROGRESS
        assert created.request_counts is not None and created.request_counts.total == 3
        async with clock.auto_advance():
            done = await c.wait(created, poll_interval=30, jitter=0)
        assert done.status is BatchStatus.COMPLETED
        assert done.raw_status == "ended"
        assert done.output_file_id is not None
        listed = [b.id async for b in c.list_batches(page_size=1)]
        assert listed == [created.id]
        results = [r async for r in c.iter_results(done.output_file_id)]
    assert sorted(r.custom_id for r in results) == ["req-0", "req-1", "req-2"]
    assert {r.kind for r in results} == {"success"}
    assert results[0].response.status_code == 200  # type: ignore[union-attr]
    assert results[0].body["type"] == "message"  # type: ignore[union-attr]
