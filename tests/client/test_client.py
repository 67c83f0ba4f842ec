"""BatchClient against the fake batch service: every endpoint, retries, and safe creates.

Time is a VirtualClock shared by the client and the service; nothing waits on wall time.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from email.utils import formatdate
from pathlib import Path

import attrs
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
from aiobatch._client import DEFAULT_CREATE_SETTLE
from aiobatch._convert import to_wire
from aiobatch.errors import (
    AiobatchError,
    AmbiguousCreateError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ClosedError,
    ConflictError,
    DecodeError,
    LookupIncompleteError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    TransportError,
    TransportTimeoutError,
    UnknownStatusError,
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
            client.wait(by_object, poll_interval=3.0, max_interval=3.0, jitter=0),
            client.wait(by_id.id, poll_interval=3.0, max_interval=3.0, jitter=0),
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
    # The last poll starts early enough (10% of the timeout) to end by the deadline.
    assert 6.29 <= clock.now() - start <= 7.0
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


async def test_create_that_timed_out_after_taking_effect_is_found_not_resent(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """A create processed on arrival whose answer came too late is found after the settle."""
    client = make_client(service, clock, timeout=5.0)
    uploaded = await client.upload_file(chat_requests(2))
    service.faults.add(Fault.slow(60, method="POST", path="/batches"))
    start = clock.now()
    async with clock.auto_advance():
        batch = await client.create_batch(uploaded.id, ENDPOINT)
    assert service.batch_ids == [batch.id]
    assert service.request_count("POST", "/batches") == 1  # never re-sent
    (look,) = [r for r in service.requests if (r.method, r.path) == ("GET", "/batches")]
    assert look.at - start >= 5.0 + DEFAULT_CREATE_SETTLE  # the timeout, then the settle


async def test_create_the_server_commits_late_is_found_after_the_settle(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """A create committed at 8 s after a 5 s timeout is found by the lookup after the settle."""
    client = make_client(service, clock, timeout=5.0)
    uploaded = await client.upload_file(chat_requests(2))
    service.faults.add(Fault.slow(8, act_after_delay=True, method="POST", path="/batches"))
    async with clock.auto_advance():
        batch = await client.create_batch(uploaded.id, ENDPOINT)
    assert service.batch_ids == [batch.id]
    assert batch.created_at == int(clock.now()) - 7  # committed at 8 s, found at 15 s
    assert service.request_count("POST", "/batches") == 1


@pytest.mark.parametrize(
    ("resend_commits_late", "kept"),
    [(True, "first attempt"), (False, "re-send")],
    ids=["late-commit-is-earliest", "re-send-is-earliest"],
)
async def test_late_commit_after_the_lookup_leaves_one_live_batch(
    service: FakeBatchService,
    clock: VirtualClock,
    caplog: pytest.LogCaptureFixture,
    resend_commits_late: bool,
    kept: str,
) -> None:
    """A first attempt committed after its lookup is cancelled or kept: one live batch remains."""
    client = make_client(service, clock, timeout=5.0)
    uploaded = await client.upload_file(chat_requests(2))
    start = clock.now()
    # The first attempt times out at 5 s; the lookup at 15 s (after the settle) finds
    # nothing, so the create is sent again; the server commits the first attempt at 18 s.
    service.faults.add(Fault.slow(18, act_after_delay=True, method="POST", path="/batches"))
    # The re-send (at 15 s) answers at 19 s, committed then or on arrival; the check
    # after it sees both batches and keeps the earliest.
    resend = Fault.slow(4, act_after_delay=resend_commits_late, method="POST", path="/batches")
    service.faults.add(resend)
    with caplog.at_level(logging.WARNING, logger="aiobatch"):
        async with clock.auto_advance():
            batch = await client.create_batch(uploaded.id, ENDPOINT)
            await clock.sleep(60)  # the cancel completes
    assert service.request_count("POST", "/batches") == 2
    batches = [await service.get_batch(i) for i in service.batch_ids]
    assert len(batches) == 2
    keys = {(b.metadata or {}).get(CREATE_KEY_METADATA) for b in batches}
    assert keys == {(batch.metadata or {}).get(CREATE_KEY_METADATA)}
    live = [b for b in batches if b.status is not BatchStatus.CANCELLED]
    assert [b.id for b in live] == [batch.id]
    assert batch.created_at == min(b.created_at for b in batches)  # the earliest is kept
    first_attempt = batches[0] if batches[0].created_at - start == 18 else batches[1]
    assert (batch.id == first_attempt.id) is (kept == "first attempt")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"keeping {batch.id}" in m for m in warnings)
    assert all(KEY not in m for m in warnings)


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
    for i in range(250):
        await client.create_batch(uploaded.id, ENDPOINT)
        clock.advance(i % 2)
    clock.advance(3600)
    service.faults.add(Fault.drop(method="POST", path="/batches"))
    lists_before = service.request_count("GET", "/batches")
    async with clock.auto_advance():
        batch = await client.create_batch(uploaded.id, ENDPOINT)
    assert len(service.batch_ids) == 251
    assert service.batch_ids[-1] == batch.id
    # One page for the lookup before the re-send, one for the check after it (a first
    # attempt committed late would show up there); both stop at the hour-old batches.
    assert service.request_count("GET", "/batches") - lists_before == 2


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
    """With full metadata a lost create answer is raised at once, never re-sent."""
    uploaded = await client.upload_file(chat_requests(1))
    service.faults.add(Fault.drop(after=True, method="POST", path="/batches"))
    with pytest.raises(AmbiguousCreateError) as info:
        await client.create_batch(uploaded.id, ENDPOINT, metadata={f"k{i}": "v" for i in range(16)})
    assert info.value.create_key is None
    assert isinstance(info.value.__cause__, TransportError)
    assert "no room" in str(info.value)
    assert service.request_count("POST", "/batches") == 1
    assert len(service.batch_ids) == 1


async def test_create_gives_up_after_the_last_attempt(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """Only 503s and no batch with the key: AmbiguousCreateError with the key, from the last 503."""
    client = make_client(service, clock, retry=RetryPolicy.for_testing(max_attempts=3))
    uploaded = await client.upload_file(chat_requests(1))
    service.faults.add(Fault.http(503, method="POST", path="/batches", times=None))
    with pytest.raises(AmbiguousCreateError) as info:
        await client.create_batch(uploaded.id, ENDPOINT)
    cause = info.value.__cause__
    assert isinstance(cause, ServerError)
    assert cause.request_id == service.requests[-2].request_id  # the final look came last
    assert info.value.create_key is not None
    assert f"find_created_batch({info.value.create_key!r})" in str(info.value)
    assert service.batch_ids == []
    assert service.request_count("POST", "/batches") == 3
    assert service.request_count("GET", "/batches") == 3  # one look after each 503
    assert await client.find_created_batch(info.value.create_key) is None


async def test_non_ambiguous_failures_are_raised_as_they_are(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """A create refused (400) or never sent (connect error) raises its own error, no lookup."""
    client = make_client(service, clock, retry=RetryPolicy.for_testing(max_attempts=2))
    with pytest.raises(NotFoundError):
        await client.create_batch("file-missing", ENDPOINT)
    service.faults.add(Fault.http(429, method="POST", path="/batches", times=None))
    uploaded = await client.upload_file(chat_requests(1))
    with pytest.raises(RateLimitError):
        await client.create_batch(uploaded.id, ENDPOINT)
    assert service.request_count("GET", "/batches") == 0


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


# --- the create-key lookup: found, proved absent, unknown --------------------------------


def flood_after_first_create(
    service: FakeBatchService, others: int, *, server_clock: VirtualClock | None = None
) -> InMemoryTransport:
    """A transport whose first create takes effect, is followed by ``others`` creates of
    someone else, and then loses its answer."""
    done: list[bool] = []

    async def handler(request: Request) -> Response:
        if request.method == "POST" and request.url.endswith("/batches") and not done:
            done.append(True)
            await service.handle(request)
            body = json.loads(request.body)  # type: ignore[arg-type]
            for i in range(others):
                other = json.dumps({**body, "metadata": {"other": str(i)}}).encode()
                await service.handle(Request("POST", request.url, {}, request.headers, other))
            raise TransportError("connection reset after the create", method="POST")
        return await service.handle(request)

    return InMemoryTransport(handler, clock=service.clock)


async def keyed(service: FakeBatchService, key: str | None) -> list[Batch]:
    batches = [await service.get_batch(i) for i in service.batch_ids]
    return [b for b in batches if (b.metadata or {}).get(CREATE_KEY_METADATA) == key]


async def test_lookup_that_runs_out_of_pages_raises_instead_of_resending(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """Ours pushed past the page limit by 2000 newer batches: raised with the key, not re-sent."""
    client = make_client(service, clock, transport=flood_after_first_create(service, 2000))
    uploaded = await client.upload_file(chat_requests(1))
    async with clock.auto_advance():
        with pytest.raises(AmbiguousCreateError) as info:
            await client.create_batch(uploaded.id, ENDPOINT)
    key = info.value.create_key
    assert key is not None
    assert isinstance(info.value.__cause__, TransportError)
    assert "could not prove it absent" in str(info.value)
    assert service.request_count("POST", "/batches") == 2001  # ours once, never re-sent
    assert service.request_count("GET", "/batches") == 20
    (ours,) = await keyed(service, key)
    with pytest.raises(LookupIncompleteError) as lookup:
        await client.find_created_batch(key)
    assert lookup.value.create_key == key
    found = await client.find_created_batch(key, max_pages=30)
    assert found is not None
    assert found.id == ours.id


async def test_lookup_finds_the_batch_within_the_page_limit(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """1500 batches made after ours are read through (16 pages) and ours is returned."""
    client = make_client(service, clock, transport=flood_after_first_create(service, 1500))
    uploaded = await client.upload_file(chat_requests(1))
    async with clock.auto_advance():
        batch = await client.create_batch(uploaded.id, ENDPOINT)
    assert [b.id for b in await keyed(service, (batch.metadata or {})[CREATE_KEY_METADATA])] == [
        batch.id
    ]
    assert service.request_count("GET", "/batches") == 16


async def test_lookup_uses_the_server_clock_not_the_client_clock(
    clock: VirtualClock,
) -> None:
    """A server 20 minutes behind the client: the date header bounds the walk, ours is found."""
    server_clock = VirtualClock(clock.now() - 1200)
    service = FakeBatchService(clock=server_clock, config=CONFIG, api_key=KEY)
    transport = flood_after_first_create(service, 150)
    client = make_client(service, clock, transport=transport, retry=RetryPolicy.for_testing())
    uploaded = await client.upload_file(chat_requests(1))
    async with clock.auto_advance():
        batch = await client.create_batch(uploaded.id, ENDPOINT)
    assert len(await keyed(service, (batch.metadata or {})[CREATE_KEY_METADATA])) == 1
    assert service.request_count("POST", "/batches") == 151


async def test_lookup_of_a_server_listing_oldest_first_is_inconclusive(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """A server listing oldest first cannot prove absence: the create raises, never re-sent."""

    async def handler(request: Request) -> Response:
        if request.method == "GET" and request.url.endswith("/batches"):
            ids = service.batch_ids  # oldest first
            limit = int(request.params.get("limit", "20"))
            after = request.params.get("after")
            start = ids.index(after) + 1 if after else 0
            chunk = ids[start : start + limit]
            data = [to_wire(await service.get_batch(i)) for i in chunk]
            body = {"object": "list", "data": data, "has_more": start + limit < len(ids)}
            return Response(
                200, {"date": formatdate(clock.now(), usegmt=True)}, json.dumps(body).encode()
            )
        return await service.handle(request)

    client = make_client(service, clock, transport=InMemoryTransport(handler, clock=clock))
    uploaded = await client.upload_file(chat_requests(1))
    for i in range(2050):
        await client.create_batch(uploaded.id, ENDPOINT)
        clock.advance(i % 2)
    clock.advance(3600)
    service.faults.add(Fault.drop(after=True, method="POST", path="/batches"))
    async with clock.auto_advance():
        with pytest.raises(AmbiguousCreateError, match="newest first"):
            await client.create_batch(uploaded.id, ENDPOINT)
    assert len(service.batch_ids) == 2051


async def test_repeat_lookups_of_one_create_are_incremental(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """In a 503 storm each lookup after the first stops where the previous one started."""
    client = make_client(service, clock, retry=RetryPolicy(max_attempts=4, jitter=None))
    uploaded = await client.upload_file(chat_requests(1))
    for _ in range(250):  # one per 0.1 s, all within the margin of the server-time bound
        await client.create_batch(uploaded.id, ENDPOINT)
        clock.advance(0.1)
    service.faults.add(Fault.http(503, method="POST", path="/batches", times=None))
    before = service.request_count("GET", "/batches")
    async with clock.auto_advance():
        with pytest.raises(AmbiguousCreateError):
            await client.create_batch(uploaded.id, ENDPOINT)
    assert service.request_count("POST", "/batches") == 250 + 4
    assert service.request_count("GET", "/batches") - before == 3 + 1 + 1 + 1


async def test_lookup_failure_keeps_the_create_key(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """A lookup refused with 403 after a lost answer raises AmbiguousCreateError with the key."""
    client = make_client(service, clock, retry=RetryPolicy.for_testing())
    uploaded = await client.upload_file(chat_requests(1))
    service.faults.add(Fault.drop(after=True, method="POST", path="/batches"))
    service.faults.add(Fault.http(403, method="GET", path="/batches", times=None))
    async with clock.auto_advance():
        with pytest.raises(AmbiguousCreateError) as info:
            await client.create_batch(uploaded.id, ENDPOINT)
    assert isinstance(info.value.__cause__, PermissionDeniedError)
    assert "TransportError" in str(info.value)  # the create's own failure is named
    assert len(await keyed(service, info.value.create_key)) == 1
    assert service.request_count("POST", "/batches") == 1


async def test_lookup_ignores_other_batches_with_unknown_statuses(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """Another batch with an unknown status neither breaks the list nor the lookup."""

    async def handler(request: Request) -> Response:
        response = await service.handle(request)
        if request.method == "GET" and request.url.endswith("/batches"):
            body = json.loads(await response.read())
            if body["data"]:
                body["data"][-1] = {**body["data"][-1], "status": "frobnicating"}
            return Response(200, response.headers, json.dumps(body).encode())
        return response

    client = make_client(service, clock, transport=InMemoryTransport(handler, clock=clock))
    uploaded = await client.upload_file(chat_requests(1))
    older = await client.create_batch(uploaded.id, ENDPOINT)
    listed = [b async for b in client.list_batches()]
    assert (listed[-1].id, listed[-1].status, listed[-1].raw_status) == (
        older.id,
        BatchStatus.UNKNOWN,
        "frobnicating",
    )
    service.faults.add(Fault.drop(after=True, method="POST", path="/batches"))
    async with clock.auto_advance():
        batch = await client.create_batch(uploaded.id, ENDPOINT)
    assert service.batch_ids == [older.id, batch.id]


async def test_garbled_or_too_deep_create_answer_is_looked_up(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """A 200 create too deeply nested to parse is found by key, or raised as ambiguous."""
    bomb = b'{"id":' + b"[" * 50_000 + b"]" * 50_000 + b"}"

    async def handler(request: Request) -> Response:
        response = await service.handle(request)
        if request.method == "POST" and request.url.endswith("/batches"):
            return Response(200, response.headers, bomb)
        return response

    client = make_client(service, clock, transport=InMemoryTransport(handler, clock=clock))
    uploaded = await client.upload_file(chat_requests(1))
    batch = await client.create_batch(uploaded.id, ENDPOINT)
    assert service.batch_ids == [batch.id]
    service.faults.add(Fault.http(403, method="GET", path="/batches"))
    with pytest.raises(AmbiguousCreateError, match="answered 200") as info:
        await client.create_batch(uploaded.id, ENDPOINT)
    assert isinstance(info.value.__cause__, PermissionDeniedError)
    assert len(service.batch_ids) == 2
    assert service.request_count("POST", "/batches") == 2


async def test_server_that_drops_metadata_disables_re_sends(
    service: FakeBatchService, clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A server dropping metadata is noticed once; a lost create answer then raises."""

    async def handler(request: Request) -> Response:
        if request.method == "POST" and request.url.endswith("/batches"):
            body = json.loads(request.body)  # type: ignore[arg-type]
            body.pop("metadata", None)
            request = attrs.evolve(request, body=json.dumps(body).encode())
        return await service.handle(request)

    client = make_client(service, clock, transport=InMemoryTransport(handler, clock=clock))
    uploaded = await client.upload_file(chat_requests(1))
    with caplog.at_level(logging.WARNING, logger="aiobatch"):
        await client.create_batch(uploaded.id, ENDPOINT)
        await client.create_batch(uploaded.id, ENDPOINT)
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "did not return the metadata" in caplog.records[0].getMessage()
    service.faults.add(Fault.drop(after=True, method="POST", path="/batches"))
    with pytest.raises(AmbiguousCreateError, match="does not keep batch metadata"):
        await client.create_batch(uploaded.id, ENDPOINT)
    assert len(service.batch_ids) == 3
    assert service.request_count("GET", "/batches") == 0


async def test_a_journaled_key_is_resumed_with_find_created_batch(
    client: BatchClient, service: FakeBatchService
) -> None:
    """A caller's key is not looked up before sending; find_created_batch(key) resumes."""
    uploaded = await client.upload_file(chat_requests(1))
    meta = {CREATE_KEY_METADATA: "journal-1"}
    first = await client.create_batch(uploaded.id, ENDPOINT, metadata=meta)
    found = await client.find_created_batch("journal-1")
    assert found is not None
    assert found.id == first.id
    assert await client.find_created_batch("journal-2") is None
    await client.create_batch(uploaded.id, ENDPOINT, metadata=meta)
    assert len(service.batch_ids) == 2  # as documented: the key alone does not dedupe
    found = await client.find_created_batch("journal-1")
    assert found is not None
    assert found.id == first.id  # of two batches with one key, the earliest


# --- time budgets, deadlines, closed clients ---------------------------------------------


async def test_policy_timeout_bounds_attempts_not_just_waits(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """RetryPolicy(timeout=10): slow answers are cut at 10 s in all, not 3 x 120 s."""
    client = make_client(service, clock, retry=RetryPolicy(timeout=10.0, jitter=None))
    batch = await new_batch(client)
    service.faults.add(Fault.slow(100, method="GET", path="/batches/*", times=3))
    start = clock.monotonic()
    async with clock.auto_advance():
        with pytest.raises(TransportTimeoutError):
            await client.retrieve_batch(batch.id)
    assert clock.monotonic() - start == 10.0
    assert service.request_count("GET", f"/batches/{batch.id}") == 1


async def test_wait_deadline_bounds_slow_polls(
    client: BatchClient, service: FakeBatchService, clock: VirtualClock
) -> None:
    """wait(timeout=30) ends by 30 s even when every poll hangs for 100 s."""
    batch = await new_batch(client)
    service.faults.add(Fault.slow(100, method="GET", path="/batches/*", times=None))
    start = clock.monotonic()
    async with clock.auto_advance():
        with pytest.raises(WaitTimeoutError) as info:
            await client.wait(batch, timeout=30, poll_interval=1)
    assert clock.monotonic() - start <= 30.0
    assert isinstance(info.value.__cause__, TransportTimeoutError)
    assert info.value.last_status == "validating"


async def test_create_budget_bounds_attempts_and_lookups(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """A 30 s budget bounds a hanging create and its lookups; the key is raised within it."""
    client = make_client(service, clock, retry=RetryPolicy(timeout=30.0, jitter=None))
    uploaded = await client.upload_file(chat_requests(1))
    service.faults.add(Fault.slow(1000, act_after_delay=True, method="POST", path="/batches"))
    service.faults.add(Fault.slow(1000, method="GET", path="/batches", times=None))
    start = clock.monotonic()
    async with clock.auto_advance():
        with pytest.raises(AmbiguousCreateError) as info:
            await client.create_batch(uploaded.id, ENDPOINT)
        assert clock.monotonic() - start <= 30.0
        assert isinstance(info.value.__cause__, TransportTimeoutError)
        await clock.sleep(1000)  # the server finally commits the one create it got
    assert [b.id for b in await keyed(service, info.value.create_key)] == service.batch_ids
    assert len(service.batch_ids) == 1


async def test_closed_client_raises_without_sending_or_sleeping(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """After aclose() every call raises ClosedError at once: nothing sent, no retry."""
    client = make_client(service, clock)
    await client.aclose()
    assert client.closed
    before = len(service.requests)
    for call in (
        client.create_batch("file-1", ENDPOINT),
        client.retrieve_batch("batch_1"),
        client.upload_file(b"x"),
        client.delete_file("file-1"),
    ):
        with pytest.raises(ClosedError, match="closed"):
            await call
    with pytest.raises(ClosedError):
        await anext(client.iter_file_lines("file-1"))
    assert len(service.requests) == before
    assert clock.now() == VirtualClock().now()


# --- files: lost answers -----------------------------------------------------------------


async def test_delete_whose_answer_was_lost_reports_deleted(
    client: BatchClient, service: FakeBatchService, clock: VirtualClock
) -> None:
    """The DELETE took effect and its answer was lost; the retry's 404 means it worked."""
    uploaded = await client.upload_file(chat_requests(1))
    service.faults.add(Fault.drop(after=True, method="DELETE", path="/files/*"))
    async with clock.auto_advance():
        deleted = await client.delete_file(uploaded.id)
    assert deleted == FileDeleted(id=uploaded.id, deleted=True)
    assert uploaded.id not in service.file_ids
    with pytest.raises(NotFoundError):
        await client.delete_file(uploaded.id)  # without a lost answer a 404 is a 404


async def test_upload_whose_answer_was_lost_warns_of_an_extra_copy(
    client: BatchClient,
    service: FakeBatchService,
    clock: VirtualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An upload retried after a lost answer may leave a second file: a WARNING says so."""
    service.faults.add(Fault.drop(after=True, method="POST", path="/files"))
    with caplog.at_level(logging.WARNING, logger="aiobatch"):
        async with clock.auto_advance():
            uploaded = await client.upload_file(chat_requests(1), filename="in.jsonl")
    assert len(service.file_ids) == 2
    (record,) = caplog.records
    assert uploaded.id in record.getMessage()
    assert "extra copy" in record.getMessage()


# --- wait: jitter and unknown statuses ---------------------------------------------------


async def test_waits_started_together_do_not_poll_in_step(
    client: BatchClient, service: FakeBatchService, clock: VirtualClock
) -> None:
    """Twenty waits started at once spread their polls (10% jitter) instead of bunching."""
    batches = [await new_batch(client, lines=30) for _ in range(20)]
    start = clock.now()
    async with clock.auto_advance():
        await asyncio.gather(
            *(client.wait(b, poll_interval=10.0, max_interval=10.0) for b in batches)
        )
    first_polls = []
    for b in batches:
        polls = [r.at for r in service.requests if r.path == f"/batches/{b.id}"]
        first_polls.append(polls[0] - start)
    assert all(9.0 <= t <= 10.0 for t in first_polls)
    assert len(set(first_polls)) == len(first_polls)


async def test_wait_raises_for_an_unknown_status_naming_it(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """A poll with a status aiobatch does not know raises UnknownStatusError naming it."""
    rename: list[str] = []

    async def handler(request: Request) -> Response:
        response = await service.handle(request)
        if request.method == "GET" and "/batches/" in request.url and rename:
            body = {**json.loads(await response.read()), "status": rename[0]}
            return Response(200, response.headers, json.dumps(body).encode())
        return response

    client = make_client(service, clock, transport=InMemoryTransport(handler, clock=clock))
    batch = await new_batch(client)
    rename.append("frobnicating")
    async with clock.auto_advance():
        with pytest.raises(UnknownStatusError) as info:
            await client.wait(batch, poll_interval=1.0)
        assert info.value.value == "frobnicating"
        with pytest.raises(UnknownStatusError, match="frobnicating"):
            await client.wait(batch.id)


async def test_create_through_a_closed_shared_transport_fails_at_once(
    service: FakeBatchService, clock: VirtualClock
) -> None:
    """A create on a transport closed by its owner raises ClosedError: no wait, no lookup."""
    transport = service.transport()
    client = BatchClient(
        api_key=KEY, base_url="http://fake.local/v1", transport=transport, clock=clock
    )
    await transport.aclose()
    start = clock.now()
    with pytest.raises(ClosedError):
        await client.create_batch("file-x", "/v1/chat/completions")
    assert clock.now() == start
    assert service.requests == ()


async def test_with_options_shares_transport_and_follows_parent_close() -> None:
    """with_options makes a client over the same transport whose retry policy differs and
    which is closed when its parent is."""
    clock = VirtualClock()
    service = FakeBatchService(clock=clock)
    service.faults.add(Fault.http(503, path="/batches/*", times=1))
    async with BatchClient(
        api_key="sk-test",
        base_url="http://fake/v1",
        transport=service.transport(),
        clock=clock,
        retry=RetryPolicy.for_testing(max_attempts=3),
    ) as parent:
        single = parent.with_options(retry=RetryPolicy.never())
        uploaded = await parent.upload_file(chat_requests(2))
        created = await parent.create_batch(uploaded.id, "/v1/chat/completions")
        with pytest.raises(ServerError):
            await single.retrieve_batch(created.id)
        assert (await single.retrieve_batch(created.id)).id == created.id
    assert single.closed
    with pytest.raises(ClosedError):
        await single.retrieve_batch(created.id)


async def test_status_errors_carry_retry_after_for_any_status() -> None:
    """A 503 with retry-after surfaces the server's wait on the error, like a 429 does."""
    clock = VirtualClock()
    service = FakeBatchService(clock=clock)
    service.faults.add(Fault.http(503, retry_after=7, path="/batches", times=1))
    async with BatchClient(
        api_key="sk-test",
        base_url="http://fake/v1",
        transport=service.transport(),
        clock=clock,
        retry=RetryPolicy.never(),
    ) as client:
        with pytest.raises(ServerError) as caught:
            await client.list_batches_page()
    assert caught.value.retry_after == 7
