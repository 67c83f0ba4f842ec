"""The whole BatchClient over real HTTP: AiohttpTransport against the fake service's app.

The service runs on a :class:`VirtualClock` that the test moves; the client shares the
clock, so ``wait()`` sleeps on it. ``clock.auto_advance()`` works here because nothing
but the client's poll interval sleeps on the clock while HTTP requests are in flight
(a request waiting on real IO only looks idle, and nobody is due to wake meanwhile).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from aiobatch import (
    CREATE_KEY_METADATA,
    BatchClient,
    BatchStatus,
    ResultError,
    ResultSuccess,
    RetryPolicy,
)
from aiobatch.errors import AuthenticationError
from aiobatch.testing import (
    FakeBatchService,
    FakeConfig,
    Fault,
    FaultKind,
    VirtualClock,
    chat_requests,
)
from aiobatch.transport import AiohttpTransport, Request

KEY = "sk-test-over-http-0123456789abcdef"
ENDPOINT = "/v1/chat/completions"
CONFIG = FakeConfig(
    validation_seconds=10,
    lines_per_second=2,
    finalizing_seconds=5,
    cancel_seconds=30,
    chunk_size=1000,
)
CONTENT = chat_requests(10)


@pytest.fixture
def service(clock: VirtualClock) -> FakeBatchService:
    """The fake service, accepting only KEY."""
    return FakeBatchService(clock=clock, config=CONFIG, api_key=KEY)


@pytest.fixture
async def transport() -> AsyncIterator[AiohttpTransport]:
    """One real HTTP transport, closed after the test."""
    t = AiohttpTransport(timeout=10.0)
    yield t
    await t.aclose()


def make_client(
    base_url: str, transport: AiohttpTransport, clock: VirtualClock, key: str = KEY
) -> BatchClient:
    """A client with zero-wait retries on the shared clock."""
    return BatchClient(
        api_key=key,
        base_url=base_url,
        transport=transport,
        retry=RetryPolicy.for_testing(max_attempts=3),
        clock=clock,
    )


@pytest.fixture
def client(base_url: str, transport: AiohttpTransport, clock: VirtualClock) -> BatchClient:
    """The client under test."""
    return make_client(base_url, transport, clock)


@pytest.fixture
def input_path(tmp_path: Path) -> Path:
    """An input file of 10 chat requests on disk (uploads stream from the path)."""
    path = tmp_path / "requests.jsonl"
    path.write_bytes(CONTENT)
    return path


async def test_upload_create_list_and_retrieve(
    client: BatchClient, service: FakeBatchService, input_path: Path
) -> None:
    """A path upload, a create, then list and retrieve all see the same objects."""
    uploaded = await client.upload_file(input_path)
    assert (uploaded.filename, uploaded.bytes, uploaded.purpose) == (
        "requests.jsonl",
        len(CONTENT),
        "batch",
    )
    assert service.file_content(uploaded.id) == CONTENT
    assert (await client.retrieve_file(uploaded.id)).id == uploaded.id
    assert [f.id async for f in client.list_files(purpose="batch")] == [uploaded.id]
    batch = await client.create_batch(uploaded.id, ENDPOINT, metadata={"job": "nightly"})
    assert batch.status is BatchStatus.VALIDATING
    assert batch.metadata is not None
    assert batch.metadata["job"] == "nightly"
    assert CREATE_KEY_METADATA in batch.metadata
    second = await client.create_batch(uploaded.id, ENDPOINT)
    assert [b.id async for b in client.list_batches(page_size=1)] == [second.id, batch.id]
    assert (await client.retrieve_batch(batch.id)).id == batch.id
    assert service.batch_ids == [batch.id, second.id]


async def test_polling_with_retrieve_follows_the_clock(
    client: BatchClient, clock: VirtualClock, input_path: Path
) -> None:
    """Retrieve after each clock move sees validating, in_progress, finalizing, completed."""
    uploaded = await client.upload_file(input_path)
    batch = await client.create_batch(uploaded.id, ENDPOINT)
    seen = [batch.status]
    for step in (10, 4, 1, 4, 1):  # validation 10 s, 10 lines at 2/s, finalizing 5 s
        clock.advance(step)
        seen.append((await client.retrieve_batch(batch.id)).status)
    assert seen == [
        BatchStatus.VALIDATING,
        BatchStatus.IN_PROGRESS,
        BatchStatus.IN_PROGRESS,
        BatchStatus.FINALIZING,
        BatchStatus.FINALIZING,
        BatchStatus.COMPLETED,
    ]


async def test_wait_then_results_and_download(
    client: BatchClient,
    service: FakeBatchService,
    clock: VirtualClock,
    input_path: Path,
    tmp_path: Path,
) -> None:
    """wait() polls on the shared virtual clock to completed; results stream and download."""
    uploaded = await client.upload_file(input_path)
    batch = await client.create_batch(uploaded.id, ENDPOINT)
    start = clock.now()
    async with clock.auto_advance():
        done = await client.wait(batch, poll_interval=2, max_interval=10)
    assert done.status is BatchStatus.COMPLETED
    assert clock.now() - start >= 10 + 5 + 5  # validation, 10 lines at 2/s, finalizing
    assert (done.request_counts.total, done.request_counts.completed) == (10, 10)
    assert done.output_file_id is not None
    results = [line async for line in client.iter_results(done.output_file_id)]
    assert all(isinstance(line, ResultSuccess) for line in results)
    assert sorted(line.custom_id for line in results) == sorted(f"req-{i}" for i in range(10))
    target = tmp_path / "out" / "results.jsonl"
    target.parent.mkdir()
    written = await client.download_file(done.output_file_id, target)
    expected = service.file_content(done.output_file_id)
    assert written == len(expected) > CONFIG.chunk_size  # several chunks on the wire
    assert target.read_bytes() == expected


async def test_cancel_keeps_partial_results(
    client: BatchClient, clock: VirtualClock, input_path: Path
) -> None:
    """Cancel mid-run answers cancelling; later the batch is cancelled with partial results."""
    uploaded = await client.upload_file(input_path)
    batch = await client.create_batch(uploaded.id, ENDPOINT)
    clock.advance(12)  # in progress for 2 s: 4 lines done
    cancelling = await client.cancel_batch(batch.id)
    assert cancelling.status is BatchStatus.CANCELLING
    clock.advance(30)
    cancelled = await client.retrieve_batch(batch.id)
    assert cancelled.status is BatchStatus.CANCELLED
    assert cancelled.output_file_id is not None
    assert cancelled.error_file_id is not None
    done = [line async for line in client.iter_results(cancelled.output_file_id)]
    not_run = [line async for line in client.iter_results(cancelled.error_file_id)]
    assert len(done) == 4
    assert len(not_run) == 6
    assert all(isinstance(line, ResultError) for line in not_run)
    assert {line.error.code for line in not_run if isinstance(line, ResultError)} == {
        "batch_cancelled"
    }


async def test_wrong_key_is_an_authentication_error(
    base_url: str, transport: AiohttpTransport, clock: VirtualClock
) -> None:
    """A 401 from the server is AuthenticationError with its request id and no key in sight."""
    wrong = "sk-wrong-0123456789abcdefXYZ"
    client = make_client(base_url, transport, clock, key=wrong)
    with pytest.raises(AuthenticationError) as info:
        await client.list_batches_page()
    err = info.value
    assert err.status_code == 401
    assert err.error_code == "invalid_api_key"
    assert err.request_id is not None
    assert err.request_id.startswith("req_")
    assert wrong not in str(err)
    assert wrong not in repr(err)
    assert KEY not in str(err)


async def test_dropped_create_answer_leaves_exactly_one_batch(
    client: BatchClient, service: FakeBatchService, clock: VirtualClock, input_path: Path
) -> None:
    """The connection drops after the create took effect: the client finds it, no second one."""
    uploaded = await client.upload_file(input_path)
    service.faults.add(Fault.drop(after=True, method="POST", path="/batches"))
    async with clock.auto_advance():  # the client may wait on its clock before looking
        batch = await client.create_batch(uploaded.id, ENDPOINT)
    assert service.batch_ids == [batch.id]
    assert service.request_count("POST", "/batches") == 1
    (dropped,) = [r for r in service.requests if r.method == "POST" and r.path == "/batches"]
    assert (dropped.fault, dropped.status) == (FaultKind.DROP_AFTER, None)
    stored = await service.get_batch(batch.id)
    assert stored.metadata == batch.metadata


async def test_missing_upload_path_sends_nothing(
    client: BatchClient, service: FakeBatchService, tmp_path: Path
) -> None:
    """Uploading a path that does not exist raises FileNotFoundError before any request."""
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(FileNotFoundError) as info:
        await client.upload_file(missing)
    assert info.value.filename == str(missing)
    assert service.requests == ()


async def test_server_time_is_in_the_date_header(
    base_url: str, transport: AiohttpTransport, clock: VirtualClock
) -> None:
    """Every answer over HTTP carries the service clock's time in its date header."""
    clock.advance(86_400)
    response = await transport.send(
        Request("GET", f"{base_url}/batches", headers={"authorization": f"Bearer {KEY}"})
    )
    assert json.loads(await response.read())["object"] == "list"
    assert parsedate_to_datetime(response.headers["date"]).timestamp() == int(clock.now())
