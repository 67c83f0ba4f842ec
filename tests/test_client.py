"""BatchClient against the fake batch service: every endpoint, retries, and safe creates.

Time is a VirtualClock shared by the client and the service; nothing waits on wall time.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path

import pytest

from aiobatch import (
    CREATE_KEY_METADATA,
    Batch,
    BatchClient,
    BatchStatus,
    File,
    FileDeleted,
    RetryPolicy,
    set_retry_testing,
)
from aiobatch.errors import (
    AiobatchError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    DecodeError,
    NotFoundError,
    RateLimitError,
    ServerError,
    TransportError,
    TransportTimeoutError,
    UnprocessableEntityError,
    WaitTimeoutError,
)
from aiobatch.testing import FakeBatchService, FakeConfig, Fault, VirtualClock, chat_requests
from aiobatch.transport import InMemoryTransport, Multipart, Request, Response

KEY = "sk-proj-TESTKEY-0123456789abcdefghijklmnop"
BASE = "https://fake.test/v1"
ENDPOINT = "/v1/chat/completions"
CONFIG = FakeConfig(
    validation_seconds=10.0, lines_per_second=1.0, finalizing_seconds=5.0, cancel_seconds=20.0
)


@pytest.fixture(autouse=True)
def _no_global_testing_mode() -> Iterator[None]:
    """Every test starts and ends with the global retry testing mode off."""
    with set_retry_testing(False):
        yield


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def service(clock: VirtualClock) -> FakeBatchService:
    return FakeBatchService(clock=clock, config=CONFIG, api_key=KEY)


def make_client(
    service: FakeBatchService,
    clock: VirtualClock,
    *,
    retry: RetryPolicy | None = None,
    transport: InMemoryTransport | None = None,
    timeout: float | None = 120.0,
    api_key: str = KEY,
) -> BatchClient:
    return BatchClient(
        api_key=api_key,
        base_url=BASE,
        transport=transport or service.transport(),
        retry=retry or RetryPolicy(jitter=None),
        clock=clock,
        timeout=timeout,
    )


@pytest.fixture
async def client(service: FakeBatchService, clock: VirtualClock) -> AsyncIterator[BatchClient]:
    async with make_client(service, clock) as c:
        yield c


async def new_batch(client: BatchClient, lines: int = 3, **kwargs: object) -> Batch:
    uploaded = await client.upload_file(chat_requests(lines))
    return await client.create_batch(uploaded.id, ENDPOINT, **kwargs)  # type: ignore[arg-type]


def last_request_id(service: FakeBatchService) -> str:
    return service.requests[-1].request_id


# --- files -------------------------------------------------------------------------------


async def test_file_endpoints_round_trip(
    client: BatchClient, service: FakeBatchService, tmp_path: Path
) -> None:
    """Upload (bytes and path), retrieve, list, content and delete all work on the fake."""
    path = tmp_path / "requests.jsonl"
    path.write_bytes(chat_requests(2, prefix="p"))
    from_bytes = await client.upload_file(chat_requests(3), filename="mine.jsonl")
    from_path = await client.upload_file(path, expires_after_seconds=7200)
    assert isinstance(from_bytes, File)
    assert (from_bytes.filename, from_bytes.purpose, from_bytes.bytes) == (
        "mine.jsonl",
        "batch",
        len(chat_requests(3)),
    )
    assert from_path.filename == "requests.jsonl"
    assert from_path.expires_at == from_path.created_at + 7200
    assert await client.retrieve_file(from_path.id) == from_path
    assert await client.file_content(from_path.id) == path.read_bytes()

    listed = [f.id async for f in client.list_files(purpose="batch", page_size=1)]
    assert listed == [from_path.id, from_bytes.id]  # newest first, over two pages
    assert service.request_count("GET", "/files") == 2
    ascending = [f.id async for f in client.list_files(order="asc")]
    assert ascending == [from_bytes.id, from_path.id]
    page = await client.list_files_page(limit=1)
    assert (len(page.data), page.has_more) == (1, True)

    deleted = await client.delete_file(from_bytes.id)
    assert deleted == FileDeleted(id=from_bytes.id, deleted=True)
    with pytest.raises(NotFoundError) as info:
        await client.retrieve_file(from_bytes.id)
    assert info.value.request_id == last_request_id(service)
    assert from_bytes.id in info.value.message


async def test_upload_from_a_path_is_streamed(
    service: FakeBatchService, clock: VirtualClock, tmp_path: Path
) -> None:
    """A path upload hands the transport a FilePart with the path, not the bytes."""
    path = tmp_path / "big.jsonl"
    path.write_bytes(chat_requests(5))
    seen: list[Request] = []

    async def handler(request: Request) -> Response:
        seen.append(request)
        return await service.handle(request)

    client = make_client(service, clock, transport=InMemoryTransport(handler))
    uploaded = await client.upload_file(str(path))
    body = seen[0].body
    assert isinstance(body, Multipart)
    ((name, part),) = body.files
    assert (name, part.path, part.content) == ("file", str(path), None)
    assert ("purpose", "batch") in body.fields
    assert service.file_content(uploaded.id) == path.read_bytes()


async def test_file_lines_are_streamed(service: FakeBatchService) -> None:
    """iter_file_lines yields every line of a multi-chunk file; stopping early is fine."""
    small_chunks = FakeBatchService(clock=service.clock, config=FakeConfig(chunk_size=7))
    async with BatchClient(
        api_key=KEY, base_url=BASE, transport=small_chunks.transport(), clock=service.clock
    ) as c:
        content = chat_requests(20)
        uploaded = await c.upload_file(content)
        lines = [line async for line in c.iter_file_lines(uploaded.id)]
        assert lines == content.splitlines()
        async with aclosing(c.iter_file_lines(uploaded.id)) as it:
            first = await it.__anext__()
        assert first == content.splitlines()[0]


# --- batches -----------------------------------------------------------------------------


async def test_batch_endpoints_round_trip(
    client: BatchClient, service: FakeBatchService, clock: VirtualClock
) -> None:
    """Create, retrieve, list (all pages and one page) and cancel work on the fake."""
    uploaded = await client.upload_file(chat_requests(3))
    created = [
        await client.create_batch(
            uploaded.id,
            ENDPOINT,
            metadata={"shard": str(i)},
            output_expires_after_seconds=3600,
        )
        for i in range(5)
    ]
    first = created[0]
    assert first.status is BatchStatus.VALIDATING
    assert first.input_file_id == uploaded.id
    assert first.metadata is not None
    assert first.metadata["shard"] == "0"
    assert len(first.metadata[CREATE_KEY_METADATA]) == 32
    assert len({b.metadata[CREATE_KEY_METADATA] for b in created if b.metadata}) == 5
    assert (await client.retrieve_batch(first.id)).id == first.id

    before = service.request_count("GET", "/batches")
    listed = [b.id async for b in client.list_batches(page_size=2)]
    assert listed == [b.id for b in reversed(created)]
    assert service.request_count("GET", "/batches") - before == 3
    after_second = [b.id async for b in client.list_batches(after=created[3].id)]
    assert after_second == [b.id for b in reversed(created[:3])]
    page = await client.list_batches_page(limit=2)
    assert ([b.id for b in page.data], page.has_more) == ([created[4].id, created[3].id], True)

    cancelling = await client.cancel_batch(first.id)
    assert cancelling.status is BatchStatus.CANCELLING
    async with clock.auto_advance():
        done = await client.wait(first.id, poll_interval=5.0)
    assert done.status is BatchStatus.CANCELLED
    with pytest.raises(BadRequestError):
        await client.cancel_batch(first.id)


async def test_unknown_batch_is_not_found(client: BatchClient, service: FakeBatchService) -> None:
    """Retrieving a batch that does not exist raises NotFoundError with the server's code."""
    with pytest.raises(NotFoundError) as info:
        await client.retrieve_batch("batch_nope")
    assert info.value.error_code == "batch_not_found"
    assert info.value.request_id == last_request_id(service)


async def test_wait_until_completed_then_read_results(
    client: BatchClient, service: FakeBatchService, clock: VirtualClock, tmp_path: Path
) -> None:
    """wait() polls on the virtual clock to completed; results stream, parse and download."""
    batch = await new_batch(client, lines=4)
    start = clock.now()
    async with clock.auto_advance():
        done = await client.wait(batch.id, poll_interval=2.0, max_interval=8.0)
    assert done.status is BatchStatus.COMPLETED
    assert done.request_counts is not None
    assert done.request_counts.completed == 4
    # 10 s validating + 4 s of lines + 5 s finalizing, seen at the next poll
    assert 19.0 <= clock.now() - start <= 19.0 + 8.0
    polls = service.request_count("GET", f"/batches/{batch.id}")
    assert 4 <= polls <= 10

    assert done.output_file_id is not None
    results = [r async for r in client.iter_results(done.output_file_id)]
    assert sorted(r.custom_id for r in results) == [f"req-{i}" for i in range(4)]
    assert all(r.kind == "success" for r in results)

    target = tmp_path / "out" / "results.jsonl"
    target.parent.mkdir()
    written = await client.download_file(done.output_file_id, target)
    assert target.read_bytes() == service.file_content(done.output_file_id)
    assert written == target.stat().st_size
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.jsonl"]


async def test_wait_on_a_batch_object_skips_the_first_retrieve(
    client: BatchClient, service: FakeBatchService, clock: VirtualClock
) -> None:
    """wait(batch) takes the given snapshot as its first poll: one GET fewer than wait(id)."""
    by_object = await new_batch(client, lines=2)
    by_id = await new_batch(client, lines=2)
    async with clock.auto_advance():
        done_object, done_id = await asyncio.gather(
            client.wait(by_object, poll_interval=3.0, max_interval=3.0),
            client.wait(by_id.id, poll_interval=3.0, max_interval=3.0),
        )
    assert done_object.status is done_id.status is BatchStatus.COMPLETED
    polls_object = service.request_count("GET", f"/batches/{by_object.id}")
    polls_id = service.request_count("GET", f"/batches/{by_id.id}")
    assert polls_object == polls_id - 1


async def test_wait_returns_failed_batches(
    client: BatchClient, service: FakeBatchService, clock: VirtualClock
) -> None:
    """A batch that fails validation is returned by wait(), not raised."""
    service.fail_next_batches("token_limit_exceeded")
    batch = await new_batch(client)
    async with clock.auto_advance():
        done = await client.wait(batch.id)
    assert done.status is BatchStatus.FAILED
    assert done.errors is not None
    assert done.errors.data[0].code == "token_limit_exceeded"


async def test_wait_times_out_on_the_virtual_clock(
    client: BatchClient, clock: VirtualClock
) -> None:
    """wait() raises WaitTimeoutError at its deadline, after a last poll."""
    batch = await new_batch(client)
    start = clock.now()
    async with clock.auto_advance():
        with pytest.raises(WaitTimeoutError) as info:
            await client.wait(batch.id, poll_interval=1.0, timeout=7.0)
    assert info.value.batch_id == batch.id
    assert info.value.last_status == "validating"
    assert clock.now() - start == 7.0
    assert isinstance(info.value, TimeoutError)


# --- errors and retries ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (404, NotFoundError),
        (409, ConflictError),
        (422, UnprocessableEntityError),
        (429, RateLimitError),
        (500, ServerError),
        (503, ServerError),
    ],
)
async def test_error_status_mapping_against_the_fake(
    service: FakeBatchService, clock: VirtualClock, status: int, cls: type[APIStatusError]
) -> None:
    """An injected HTTP error becomes its error class, with the fake's message and request id."""
    client = make_client(service, clock, retry=RetryPolicy.never())
    service.faults.add(Fault.http(status, message=f"injected {status}", path="/batches/*"))
    with pytest.raises(cls) as info:
        await client.retrieve_batch("batch_x")
    assert info.value.status_code == status
    assert info.value.message == f"injected {status}"
    assert info.value.request_id == last_request_id(service)
    assert info.value.request_id is not None
    assert info.value.request_id.startswith("req_")


async def test_wrong_key_is_an_authentication_error(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """A key the server refuses gives AuthenticationError, and the key is nowhere in it."""
    wrong = "sk-wrong-key-0123456789abcdefghij"
    client = make_client(service, clock, api_key=wrong)
    with pytest.raises(AuthenticationError) as info:
        await client.retrieve_batch("batch_x")
    assert info.value.error_code == "invalid_api_key"
    assert wrong not in str(info.value)
    assert wrong not in repr(info.value.body)


async def test_retries_429_honouring_retry_after(
    client: BatchClient, service: FakeBatchService, clock: VirtualClock
) -> None:
    """Two 429s asking for 7 s and 2.5 s are waited out on the virtual clock, then it works."""
    batch = await new_batch(client)
    service.faults.add(Fault.http(429, retry_after=7, path="/batches/*"))
    service.faults.add(Fault.http(429, retry_after_ms=2500, path="/batches/*"))
    start = clock.now()
    async with clock.auto_advance():
        got = await client.retrieve_batch(batch.id)
    assert got.id == batch.id
    assert clock.now() - start == 9.5
    assert service.request_count("GET", f"/batches/{batch.id}") == 3


async def test_retries_server_errors_and_dropped_reads(
    client: BatchClient, service: FakeBatchService, clock: VirtualClock
) -> None:
    """A 503, a dropped connection and a malformed body on GETs are retried or reported."""
    batch = await new_batch(client)
    service.faults.add(Fault.http(503, path="/batches/*"))
    service.faults.add(Fault.drop(after=True, path="/batches/*"))
    async with clock.auto_advance():
        assert (await client.retrieve_batch(batch.id)).id == batch.id
    assert service.request_count("GET", f"/batches/{batch.id}") == 3
    service.faults.add(Fault.malformed(path="/batches/*"))
    with pytest.raises(DecodeError, match="Batch"):
        await client.retrieve_batch(batch.id)


async def test_rate_limit_beyond_the_cap_is_raised_for_the_caller(
    client: BatchClient, service: FakeBatchService, clock: VirtualClock
) -> None:
    """A 429 asking for 10 minutes is not waited: RateLimitError carries retry_after."""
    service.faults.add(Fault.http(429, retry_after=600, path="/batches"))
    start = clock.now()
    with pytest.raises(RateLimitError) as info:
        await client.list_batches_page()
    assert info.value.retry_after == 600.0
    assert info.value.request_id == last_request_id(service)
    assert clock.now() == start


async def test_slow_answer_times_out(service: FakeBatchService, clock: VirtualClock) -> None:
    """A GET slower than the client timeout raises TransportTimeoutError after the retries."""
    client = make_client(service, clock, timeout=5.0, retry=RetryPolicy.for_testing())
    service.faults.add(Fault.slow(30, path="/batches", times=None))
    async with clock.auto_advance():
        with pytest.raises(TransportTimeoutError):
            await client.list_batches_page()
    # Each attempt reached the server (a slow answer still takes effect there).
    assert service.request_count("GET", "/batches") == RetryPolicy.for_testing().max_attempts


# --- safe creates ------------------------------------------------------------------------


async def test_create_whose_response_is_lost_makes_one_batch(
    client: BatchClient, service: FakeBatchService, clock: VirtualClock
) -> None:
    """The create took effect but its answer was lost: the batch is found, not re-created."""
    uploaded = await client.upload_file(chat_requests(2))
    service.faults.add(Fault.drop(after=True, method="POST", path="/batches"))
    async with clock.auto_advance():
        batch = await client.create_batch(uploaded.id, ENDPOINT, metadata={"job": "a"})
    assert service.batch_ids == [batch.id]
    assert service.request_count("POST", "/batches") == 1
    assert batch.metadata is not None
    assert batch.metadata["job"] == "a"


async def test_create_5xx_after_processing_makes_one_batch(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """The server made the batch and then answered 500: the batch is found, not re-created."""
    broken: list[int] = []

    async def handler(request: Request) -> Response:
        response = await service.handle(request)
        if request.method == "POST" and request.url.endswith("/batches") and not broken:
            broken.append(response.status)
            return Response(500, {"x-request-id": "req_broken"}, b'{"error":{"message":"oops"}}')
        return response

    client = make_client(service, clock, transport=InMemoryTransport(handler))
    uploaded = await client.upload_file(chat_requests(2))
    async with clock.auto_advance():
        batch = await client.create_batch(uploaded.id, ENDPOINT)
    assert broken == [200]
    assert service.batch_ids == [batch.id]
    assert service.request_count("POST", "/batches") == 1


@pytest.mark.parametrize(
    "fault",
    [
        Fault.http(503, method="POST", path="/batches"),
        Fault.http(500, method="POST", path="/batches", times=2),
        Fault.drop(method="POST", path="/batches"),
        Fault.http(429, retry_after=1, method="POST", path="/batches"),
    ],
    ids=["503", "500x2", "drop-before", "429"],
)
async def test_create_that_did_not_take_effect_is_sent_again(
    client: BatchClient, service: FakeBatchService, clock: VirtualClock, fault: Fault
) -> None:
    """A create refused or lost before processing is re-sent (after a look) and makes one batch."""
    uploaded = await client.upload_file(chat_requests(2))
    service.faults.add(fault)
    async with clock.auto_advance():
        batch = await client.create_batch(uploaded.id, ENDPOINT)
    assert service.batch_ids == [batch.id]
    assert service.request_count("POST", "/batches") == (fault.times or 1) + 1


async def test_create_that_timed_out_is_looked_up_then_sent_again(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """A create that timed out (never processed) is looked for, then re-sent: one batch."""
    client = make_client(service, clock, timeout=5.0)
    uploaded = await client.upload_file(chat_requests(2))
    service.faults.add(Fault.slow(60, method="POST", path="/batches"))
    async with clock.auto_advance():
        batch = await client.create_batch(uploaded.id, ENDPOINT)
    assert service.batch_ids == [batch.id]
    assert service.request_count("GET", "/batches") == 1  # the look before re-sending


async def test_create_with_a_garbled_answer_returns_the_batch(
    client: BatchClient, service: FakeBatchService
) -> None:
    """A 200 create whose body is cut off is found by its key instead of raising."""
    uploaded = await client.upload_file(chat_requests(2))
    service.faults.add(Fault.malformed(method="POST", path="/batches"))
    batch = await client.create_batch(uploaded.id, ENDPOINT)
    assert service.batch_ids == [batch.id]


async def test_create_keeps_a_key_the_caller_chose(
    client: BatchClient, service: FakeBatchService, clock: VirtualClock
) -> None:
    """A caller-provided aiobatch_create_key is sent as is and used for the look-up."""
    uploaded = await client.upload_file(chat_requests(2))
    service.faults.add(Fault.drop(after=True, method="POST", path="/batches"))
    async with clock.auto_advance():
        batch = await client.create_batch(
            uploaded.id, ENDPOINT, metadata={CREATE_KEY_METADATA: "journal-17"}
        )
    assert batch.metadata == {CREATE_KEY_METADATA: "journal-17"}
    assert service.batch_ids == [batch.id]
    found = await client.find_created_batch("journal-17")
    assert found is not None
    assert found.id == batch.id
    assert await client.find_created_batch("no-such-key") is None


async def test_create_lookup_stops_at_older_batches(
    client: BatchClient, service: FakeBatchService, clock: VirtualClock
) -> None:
    """The look-up reads newest-first pages and stops at batches older than the first send."""
    uploaded = await client.upload_file(chat_requests(1))
    for _ in range(250):
        await client.create_batch(uploaded.id, ENDPOINT)
    clock.advance(3600)
    service.faults.add(Fault.drop(method="POST", path="/batches"))
    lists_before = service.request_count("GET", "/batches")
    async with clock.auto_advance():
        batch = await client.create_batch(uploaded.id, ENDPOINT)
    assert len(service.batch_ids) == 251
    assert service.batch_ids[-1] == batch.id
    assert service.request_count("GET", "/batches") - lists_before == 1


async def test_create_lookup_finds_the_batch_beyond_the_first_page(
    client: BatchClient, service: FakeBatchService, clock: VirtualClock
) -> None:
    """Batches made by others after ours push it to a later page; the look-up still finds it."""
    uploaded = await client.upload_file(chat_requests(1))
    others = make_client(service, clock, retry=RetryPolicy.never())
    made: list[str] = []

    async def handler(request: Request) -> Response:
        response = await service.handle(request)
        if request.method == "POST" and request.url.endswith("/batches") and not made:
            made.append(json.loads(await response.read())["id"])
            for _ in range(150):
                await others.create_batch(uploaded.id, ENDPOINT)
            raise TransportError("connection reset after the create", method="POST")
        return response

    client2 = make_client(service, clock, transport=InMemoryTransport(handler))
    async with clock.auto_advance():
        batch = await client2.create_batch(uploaded.id, ENDPOINT)
    assert batch.id == made[0]
    assert len(service.batch_ids) == 151
    assert service.request_count("POST", "/batches") == 151


async def test_ambiguous_create_without_room_for_a_key_is_raised(
    client: BatchClient, service: FakeBatchService
) -> None:
    """With full metadata a lost create answer is raised, never re-sent."""
    uploaded = await client.upload_file(chat_requests(1))
    service.faults.add(Fault.drop(after=True, method="POST", path="/batches"))
    with pytest.raises(TransportError):
        await client.create_batch(uploaded.id, ENDPOINT, metadata={f"k{i}": "v" for i in range(16)})
    assert service.request_count("POST", "/batches") == 1
    assert len(service.batch_ids) == 1


async def test_create_gives_up_after_the_last_attempt(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """When every attempt fails and no batch carries the key, the last error is raised."""
    client = make_client(service, clock, retry=RetryPolicy.for_testing(max_attempts=3))
    uploaded = await client.upload_file(chat_requests(1))
    service.faults.add(Fault.http(503, method="POST", path="/batches", times=None))
    with pytest.raises(ServerError) as info:
        await client.create_batch(uploaded.id, ENDPOINT)
    assert info.value.request_id == service.requests[-2].request_id  # the final look came last
    assert service.batch_ids == []
    assert service.request_count("POST", "/batches") == 3


# --- secrets -----------------------------------------------------------------------------


async def test_key_is_absent_from_reprs_logs_and_errors(
    service: FakeBatchService, clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Across a run with retries and failures, no repr, log record or error shows the key."""
    client = make_client(service, clock)
    errors: list[BaseException] = []
    with caplog.at_level(logging.DEBUG):
        async with clock.auto_advance():
            uploaded = await client.upload_file(chat_requests(2))
            service.faults.add(Fault.http(429, retry_after=1))
            service.faults.add(Fault.drop(after=True, method="POST", path="/batches"))
            service.faults.add(Fault.http(503, path="/batches/*"))
            batch = await client.create_batch(uploaded.id, ENDPOINT)
            await client.retrieve_batch(batch.id)
            for call in (
                client.retrieve_batch("batch_missing"),
                make_client(service, clock, api_key=KEY[::-1]).retrieve_batch(batch.id),
                client.cancel_batch("batch_missing"),
            ):
                try:
                    await call
                except AiobatchError as exc:
                    errors.append(exc)
    assert len(errors) == 3
    assert any("retrying" in r.getMessage() for r in caplog.records)
    texts = [repr(client), str(client), repr(client.provider), repr(service)]
    texts += [repr(r) for r in service.requests]
    texts += [r.getMessage() + repr(r.__dict__) for r in caplog.records]
    for err in errors:
        texts += [str(err), repr(err), repr(getattr(err, "body", None))]
    for text in texts:
        assert KEY not in text
        assert KEY[::-1] not in text
