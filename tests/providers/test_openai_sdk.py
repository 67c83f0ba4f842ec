"""Wire compatibility: the official ``openai`` SDK as a client of the fake HTTP server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from openai import AsyncOpenAI
from openai.types import Batch, FileObject

from aiobatch.testing import (
    FakeBatchService,
    FakeConfig,
    Fault,
    LineErrorRule,
    VirtualClock,
    chat_requests,
)

KEY = "sk-test"
CONFIG = FakeConfig(
    validation_seconds=10,
    lines_per_second=2,
    finalizing_seconds=5,
    cancel_seconds=30,
    line_errors=(LineErrorRule(status=400, predicate=lambda custom_id: custom_id == "req-3"),),
)


@pytest.fixture
def service(clock: VirtualClock) -> FakeBatchService:
    return FakeBatchService(clock=clock, config=CONFIG, api_key=KEY)


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[AsyncOpenAI]:
    # Strict validation makes the SDK check every response against its own pydantic types.
    async with AsyncOpenAI(
        api_key=KEY, base_url=base_url, max_retries=0, _strict_response_validation=True
    ) as sdk:
        yield sdk


async def _upload(client: AsyncOpenAI, tmp_path: Path, lines: int = 4) -> FileObject:
    path = tmp_path / "input.jsonl"
    path.write_bytes(chat_requests(lines))
    return await client.files.create(file=path, purpose="batch")


async def _create(client: AsyncOpenAI, file_id: str) -> Batch:
    return await client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "sdk-test"},
    )


async def test_files_create_and_retrieve(client: AsyncOpenAI, tmp_path: Path) -> None:
    """files.create(purpose='batch') and files.retrieve decode as FileObject."""
    uploaded = await _upload(client, tmp_path)
    assert isinstance(uploaded, FileObject)
    assert (uploaded.purpose, uploaded.filename, uploaded.status) == (
        "batch",
        "input.jsonl",
        "processed",
    )
    assert uploaded.bytes == len(chat_requests(4))
    assert await client.files.retrieve(uploaded.id) == uploaded
    content = await client.files.content(uploaded.id)
    assert content.content == chat_requests(4)


async def test_batches_create_and_retrieve_through_the_lifecycle(
    client: AsyncOpenAI, clock: VirtualClock, tmp_path: Path
) -> None:
    """batches.create then retrieve decode as Batch at every stage up to completed."""
    uploaded = await _upload(client, tmp_path)
    batch = await _create(client, uploaded.id)
    assert isinstance(batch, Batch)
    assert batch.status == "validating"
    assert batch.metadata == {"job": "sdk-test"}
    assert batch.expires_at == batch.created_at + 86_400
    seen: list[str] = [batch.status]
    for step in (10, 2, 10):
        clock.advance(step)
        seen.append((await client.batches.retrieve(batch.id)).status)
    assert seen == ["validating", "in_progress", "finalizing", "completed"]
    done = await client.batches.retrieve(batch.id)
    assert done.request_counts is not None
    assert (
        done.request_counts.total,
        done.request_counts.completed,
        done.request_counts.failed,
    ) == (
        4,
        3,
        1,
    )
    assert done.completed_at is not None
    assert done.in_progress_at is not None
    assert done.finalizing_at is not None


async def test_download_output_and_error_files(
    client: AsyncOpenAI, clock: VirtualClock, tmp_path: Path
) -> None:
    """files.content of the output and error files gives JSONL lines keyed by custom_id."""
    uploaded = await _upload(client, tmp_path)
    batch = await _create(client, uploaded.id)
    clock.advance(3600)
    done = await client.batches.retrieve(batch.id)
    assert done.output_file_id is not None
    assert done.error_file_id is not None
    output = await client.files.content(done.output_file_id)
    ok = [json.loads(line) for line in output.text.splitlines()]
    assert sorted(line["custom_id"] for line in ok) == ["req-0", "req-1", "req-2"]
    assert all(line["response"]["status_code"] == 200 for line in ok)
    errors = await client.files.content(done.error_file_id)
    (failed,) = [json.loads(line) for line in errors.text.splitlines()]
    assert failed["custom_id"] == "req-3"
    assert failed["response"]["status_code"] == 400
    out_file = await client.files.retrieve(done.output_file_id)
    assert out_file.purpose == "batch_output"
    written = tmp_path / "out.jsonl"
    output.write_to_file(written)
    assert written.read_bytes() == output.content


async def test_batches_list_auto_paginates(client: AsyncOpenAI, tmp_path: Path) -> None:
    """Async iteration over batches.list(limit=2) walks every page, newest first."""
    uploaded = await _upload(client, tmp_path, lines=1)
    created = [(await _create(client, uploaded.id)).id for _ in range(5)]
    listed = [batch.id async for batch in client.batches.list(limit=2)]
    assert listed == created[::-1]
    first_page = await client.batches.list(limit=2)
    assert first_page.has_more
    assert len(first_page.data) == 2


async def test_files_list_and_delete(client: AsyncOpenAI, tmp_path: Path) -> None:
    """files.list pages by purpose; files.delete answers deleted and the file is gone."""
    uploaded = await _upload(client, tmp_path)
    listed = [f.id async for f in client.files.list(purpose="batch")]
    assert listed == [uploaded.id]
    deleted = await client.files.delete(uploaded.id)
    assert (deleted.id, deleted.deleted) == (uploaded.id, True)
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(uploaded.id)


async def test_batches_cancel(client: AsyncOpenAI, clock: VirtualClock, tmp_path: Path) -> None:
    """batches.cancel answers cancelling; after cancel_seconds the batch is cancelled."""
    uploaded = await _upload(client, tmp_path, lines=100)
    batch = await _create(client, uploaded.id)
    clock.advance(11)
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    assert cancelling.cancelling_at is not None
    clock.advance(30)
    cancelled = await client.batches.retrieve(batch.id)
    assert cancelled.status == "cancelled"
    assert cancelled.request_counts is not None
    assert cancelled.request_counts.completed + cancelled.request_counts.failed <= 100


async def test_sdk_error_classes(client: AsyncOpenAI, base_url: str) -> None:
    """Errors decode into the SDK's classes: 404 NotFoundError with request id, 401 auth error."""
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.batches.retrieve("batch_missing")
    assert not_found.value.code == "batch_not_found"
    assert not_found.value.request_id is not None
    async with AsyncOpenAI(api_key="sk-wrong", base_url=base_url, max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as denied:
            await wrong.batches.list()
    assert denied.value.code == "invalid_api_key"


async def test_sdk_sees_injected_faults(
    client: AsyncOpenAI, service: FakeBatchService, tmp_path: Path
) -> None:
    """A 429 fault is a RateLimitError; a dropped connection is an APIConnectionError."""
    service.faults.add(Fault.http(429, retry_after=1, method="GET", path="/batches"))
    with pytest.raises(openai.RateLimitError) as limited:
        await client.batches.list()
    assert limited.value.response.headers["retry-after"] == "1"
    uploaded = await _upload(client, tmp_path, lines=1)
    service.faults.add(Fault.drop(method="POST", path="/batches"))
    with pytest.raises(openai.APIConnectionError):
        await _create(client, uploaded.id)
