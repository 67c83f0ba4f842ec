"""The journal contract: what every journal backend (SQLite, PostgreSQL) must do for a run.

Each test drives the backend through the async ``Journal`` protocol only; a new backend
is added to ``BACKENDS`` and must pass the module unchanged.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import attrs
import pytest
from conftest import Ticker
from pg import pg_url

from aiobatch._run._journal import CHUNK_BYTES, Journal
from aiobatch._run._records import (
    FinalResult,
    ModelTokens,
    NamedResult,
    NewShard,
    PendingRequest,
    PreparedRequest,
    RequestGroup,
    RequestRow,
    RetryLine,
    RunMeta,
    ShardPlan,
)
from aiobatch._run._sqlite_journal import SQLiteJournal
from aiobatch._run._states import ShardState
from aiobatch.errors import JournalError, ShardMoveError, TooManyBatchesError

_S = ShardState
URL = "/v1/chat/completions"

Factory = Callable[[Path], Awaitable[Journal]]


async def _sqlite(folder: Path) -> Journal:
    return SQLiteJournal(folder / "run.journal", create=True)


async def _postgres(folder: Path) -> Journal:
    from aiobatch._run._postgres import PostgresJournal

    return await PostgresJournal.open(pg_url(str(folder), run="contract"))


async def _sqlite_rows(folder: Path) -> Journal:
    # As on a SQLite without its JSON functions (built in only since 3.38): a chunk
    # named by custom_id is then written a statement a row.
    journal = SQLiteJournal(folder / "run.journal", create=True)
    journal.file._json_rows = False
    return journal


BACKENDS: dict[str, Factory] = {
    "sqlite": _sqlite,
    "sqlite-rows": _sqlite_rows,
    "postgres": _postgres,
}


@pytest.fixture(params=sorted(BACKENDS))
async def journal(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Journal]:
    """A fresh journal of each backend."""
    made = await BACKENDS[request.param](tmp_path)
    yield made
    await made.close()


def _request(seq: int, model: str = "m") -> PreparedRequest:
    data = b'{"custom_id":"r%d","method":"POST","url":"%s","body":{"model":"%s"}}' % (
        seq,
        URL.encode(),
        model.encode(),
    )
    return PreparedRequest(
        seq=seq, url=URL, model=model, tokens=5, line=seq + 1, custom_id=f"r{seq}", data=data
    )


async def _ingest(journal: Journal, count: int) -> list[PreparedRequest]:
    requests = [_request(seq) for seq in range(count)]
    async with journal.ingest() as sink:
        await sink.add([r.row() for r in requests])
        await sink.start(RunMeta(run_id="run1", started_at=10.0, updated_at=10.0))
    return requests


def _plan(requests: list[PreparedRequest]) -> ShardPlan:
    return ShardPlan(URL, "m", tuple(r.seq for r in requests), sum(r.size for r in requests), 0)


def _final(seq: int, body: bytes = b'{"ok":1}') -> FinalResult:
    return FinalResult(
        seq=seq, kind="success", code=None, shard="s0", batch_id="b1", attempts=0, data=body
    )


def _named(
    seq: int,
    body: bytes = b'{"ok":1}',
    *,
    kind: str = "success",
    code: str | None = None,
    used: tuple[int, int] = (0, 0),
) -> NamedResult:
    return NamedResult(f"r{seq}", kind, code, used[0], used[1], body)


async def test_ingest_is_all_or_nothing(journal: Journal) -> None:
    """An ingest that raises records no request and no run."""

    async def failing_ingest() -> None:
        async with journal.ingest() as sink:
            await sink.add([_request(0).row(), _request(1).row()])
            raise RuntimeError("preflight failed")

    with pytest.raises(RuntimeError):
        await failing_ingest()
    assert await journal.meta() is None
    assert await journal.pending_count() == 0


async def test_ingest_records_requests_and_facts(journal: Journal) -> None:
    """After an ingest the run's facts and every request (pending) are there."""
    await _ingest(journal, 3)
    meta = await journal.meta()
    assert meta is not None
    assert (meta.run_id, meta.started_at, meta.state) == ("run1", 10.0, "running")
    assert await journal.pending_count() == 3
    assert await journal.not_done_count() == 3
    assert await journal.pending_groups() == [RequestGroup(URL, "m")]


async def test_a_background_ingest_lets_other_tasks_run_and_refuses_a_taken_id(
    journal: Journal,
) -> None:
    """``ingest(background=True)`` (a run's start; SQLite spilling its
    page cache into the log held the loop ~45 ms) lets other tasks run while a batch
    is added, refuses a batch that reuses an id and keeps none of it, and records the
    same requests as in the loop."""
    requests = [_request(seq) for seq in range(4)]
    async with journal.ingest(background=True) as sink:
        ticker = await Ticker.start()
        before = ticker.ticks
        assert await sink.add([r.row() for r in requests[:3]])
        during = ticker.ticks - before
        await ticker.stop()
        reused = attrs.evolve(requests[3], seq=4, line=5, custom_id="r1")
        assert not await sink.add([requests[3].row(), reused.row()])
        assert await sink.taken(["r1", "r3"]) == {"r1": 2}
        assert await sink.add([requests[3].row()])
        await sink.start(RunMeta(run_id="run1", started_at=10.0, updated_at=10.0))
    assert during >= 1
    assert await journal.pending_count() == 4
    assert [r.seq async for r in journal.pending_requests(URL, "m")] == [0, 1, 2, 3]


@pytest.mark.parametrize("background", [False, True], ids=["in_the_loop", "background"])
async def test_ingested_requests_read_back_exactly(journal: Journal, background: bool) -> None:
    """Each request an ingest adds is read back with its own id, fields and bytes."""
    ids = ['say "hi"', "back\\slash", "tab\tnew\nline", "café-日本", "🎉", "007", "[1]", "r"]
    ids += ["\\u0000", "a\\u0000b"]
    rows = [
        RequestRow(seq, cid, seq + 3, URL, None if seq == 2 else f"m{seq}", seq * 7, seq + 1, data)
        for seq, (cid, data) in enumerate(
            zip(
                ids,
                [b"{}", b"\x00\xff", b'{"a":"\xc3\xa9"}', b"x" * 5000] * 2 + [b"{}", b"{}"],
                strict=True,
            )
        )
    ]
    async with journal.ingest(background=background) as sink:
        assert await sink.add(rows)
        await sink.start(RunMeta(run_id="run1", started_at=10.0, updated_at=10.0))
    pending = [r for model in ("m0", None) async for r in journal.pending_requests(URL, model)]
    assert pending == [
        PendingRequest(r.seq, len(r.data) + 1, r.tokens, r.inputs, URL, r.model)
        for r in (rows[0], rows[2])
    ]
    plan = ShardPlan(URL, "m", tuple(r.seq for r in rows), sum(len(r.data) + 1 for r in rows), 0)
    await journal.add_shard("s0", plan, planned_at=11.0)
    lines = [line async for chunk in journal.shard_lines("s0") for line in chunk]
    assert lines == [r.data for r in rows]
    queued = await journal.queued_at("s0")
    assert [q.custom_id for q in queued.values()] == ids


def _queued_rows(data: list[bytes], shard_of: list[tuple[str, int]]) -> list[RequestRow]:
    """Rows queued at ingest: row ``n`` in shard ``shard_of[n]`` (model "m" in s000000,
    else "n"), ``seq`` tokens each."""
    return [
        RequestRow(
            seq, f"r{seq}", seq + 1, URL, "m" if key == "s000000" else "n", seq, 1, body
        )._replace(shard=key, pos=pos)
        for seq, (body, (key, pos)) in enumerate(zip(data, shard_of, strict=True))
    ]


def _new_shards(rows: list[RequestRow]) -> list[NewShard]:
    """The shards the rows are queued in, by key."""
    return [
        NewShard(
            key,
            URL,
            part[0].model,
            len(part),
            sum(len(r.data) + 1 for r in part),
            sum(r.tokens for r in part),
        )
        for key in sorted({str(r.shard) for r in rows})
        for part in [[r for r in rows if r.shard == key]]
    ]


@pytest.mark.parametrize("background", [False, True], ids=["in_the_loop", "background"])
async def test_requests_queued_at_ingest_read_back_as_planned_shards(
    journal: Journal, background: bool
) -> None:
    """Rows an ingest queues in shards read back as planned shards' rows in their first batch."""
    data = [b'{"a":1}', b'{"b":22}', b"\x00\xff", b"x" * 5000, b"{}"]
    shard_of = [("s000000", 1), ("s000001", 1), ("s000000", 2), ("s000000", 3), ("s000001", 2)]
    rows = _queued_rows(data, shard_of)
    new_shards = _new_shards(rows)
    async with journal.ingest(background=background) as sink:
        assert await sink.add(rows[:2])
        assert await sink.add(rows[2:])
        await sink.start(RunMeta(run_id="run1", started_at=10.0, updated_at=10.0), new_shards)
    assert await journal.pending_count() == 0
    assert await journal.not_done_count() == 5
    shards = await journal.shards(_S.PLANNED)
    assert [
        (s.key, s.model, s.lines, s.bytes, s.tokens, s.round, s.planned_at) for s in shards
    ] == [(n.key, n.model, n.lines, n.size, n.tokens, 0, 10.0) for n in new_shards]
    lines = [line async for chunk in journal.shard_lines("s000000") for line in chunk]
    assert lines == [data[0], data[2], data[3]]
    queued = await journal.queued_at("s000001")
    assert {pos: (q.seq, q.custom_id, q.attempts) for pos, q in queued.items()} == {
        1: (1, "r1", 0),
        2: (4, "r4", 0),
    }
    members = await journal.members("s000000", ["r0", "r2", "r3", "r1"])
    assert {cid: (m.seq, m.queued) for cid, m in members.items()} == {
        "r0": (0, True),
        "r2": (2, True),
        "r3": (3, True),
    }
    # In its first batch: back to pending, a second batch is over a limit of one.
    await journal.record(None, [], [RetryLine(1, 1, b"{}")])
    plan = ShardPlan(URL, "n", (1,), len(data[1]) + 1, 1)
    with pytest.raises(TooManyBatchesError):
        await journal.add_shard("s000002", plan, planned_at=12.0, max_batches=1)


@pytest.mark.parametrize("background", [False, True], ids=["in_the_loop", "background"])
async def test_a_refused_batch_of_queued_requests_leaves_none_of_them(
    journal: Journal, background: bool
) -> None:
    """A batch of queued rows refused for a custom_id used before adds none of its rows."""
    rows = _queued_rows([b"{}", b"{}", b"{}"], [("s000000", 1), ("s000000", 2), ("s000001", 1)])
    reused = RequestRow(3, "r0", 4, URL, "n", 3, 1, b"{}", "s000001", 2)
    async with journal.ingest(background=background) as sink:
        assert await sink.add(rows[:1])
        assert not await sink.add([*rows[1:], reused])
        assert await sink.add(rows[1:2])
        await sink.start(
            RunMeta(run_id="run1", started_at=10.0, updated_at=10.0), _new_shards(rows[:2])
        )
    assert await journal.not_done_count() == 2
    queued = await journal.queued_at("s000000")
    assert [(pos, q.custom_id) for pos, q in sorted(queued.items())] == [(1, "r0"), (2, "r1")]
    assert await journal.queued_at("s000001") == {}


async def test_intent_is_recorded_before_upload(journal: Journal) -> None:
    """A shard's intent queues its requests, in order, before anything is sent; its
    lines are the requests' bytes."""
    requests = await _ingest(journal, 3)
    shard = await journal.add_shard("s0", _plan(requests[:2]), planned_at=11.0)
    assert (shard.state, shard.lines, shard.round) == (_S.PLANNED, 2, 0)
    assert await journal.pending_count() == 1
    lines = [line async for chunk in journal.shard_lines("s0") for line in chunk]
    assert lines == [r.data for r in requests[:2]]
    queued = await journal.queued_at("s0")
    assert [(pos, q.custom_id) for pos, q in queued.items()] == [(1, "r0"), (2, "r1")]
    pending = [r.seq async for r in journal.pending_requests(URL, "m")]
    assert pending == [2]


async def test_a_background_queued_at_lets_other_tasks_run_and_is_the_same(
    journal: Journal,
) -> None:
    """``queued_at(key, background=True)`` (settling a batch; a
    50,000-request shard's look-up held the loop ~120 ms on a busy machine) lets other
    tasks run while it reads, and gives the same lines as in the loop."""
    requests = await _ingest(journal, 4)
    await journal.add_shard("s0", _plan(requests), planned_at=11.0)
    await journal.record("s0", [_final(1)], output_done=1)
    ticker = await Ticker.start()
    before = ticker.ticks
    queued = await journal.queued_at("s0", background=True)
    during = ticker.ticks - before
    await ticker.stop()
    assert during >= 1
    assert queued == await journal.queued_at("s0")
    assert [(pos, q.custom_id) for pos, q in queued.items()] == [(1, "r0"), (3, "r2"), (4, "r3")]


async def test_background_members_let_other_tasks_run_and_are_the_same(
    journal: Journal,
) -> None:
    """``members(key, ids, background=True)`` (a chunk of result lines on the real
    clock; 2,000 look-ups held the loop 20-40 ms on a busy machine) lets other tasks run
    while it looks, and finds the same requests as in the loop."""
    requests = await _ingest(journal, 4)
    await journal.add_shard("s0", _plan(requests), planned_at=11.0)
    await journal.record("s0", [_final(1)], output_done=1)
    ids = ["r0", "r1", "r3", "elsewhere"]
    ticker = await Ticker.start()
    before = ticker.ticks
    found = await journal.members("s0", ids, background=True)
    during = ticker.ticks - before
    await ticker.stop()
    assert during >= 1
    assert found == await journal.members("s0", ids)
    assert {cid: m.queued for cid, m in found.items()} == {"r0": True, "r1": False, "r3": True}


async def test_create_key_is_recorded_with_the_move(journal: Journal) -> None:
    """The create key and its start are on record once the shard is ``creating``."""
    requests = await _ingest(journal, 1)
    await journal.add_shard("s0", _plan(requests), planned_at=11.0)
    await journal.move("s0", _S.UPLOADING, upload_started_at=12.0)
    await journal.move("s0", _S.UPLOADED, file_id="file-1")
    await journal.move("s0", _S.CREATING, create_key="run1:s0:0", create_started_at=13.0)
    shard = await journal.shard("s0")
    assert (shard.state, shard.file_id, shard.create_key) == (_S.CREATING, "file-1", "run1:s0:0")
    assert [s.key for s in await journal.shards(_S.CREATING)] == ["s0"]
    assert await journal.shards(_S.OPEN) == []


async def test_a_move_off_the_table_is_refused(journal: Journal) -> None:
    """move() refuses what the shard table lacks and writes nothing."""
    requests = await _ingest(journal, 1)
    await journal.add_shard("s0", _plan(requests), planned_at=11.0)
    with pytest.raises(ShardMoveError):
        await journal.move("s0", _S.OPEN, batch_id="b1")
    shard = await journal.shard("s0")
    assert (shard.state, shard.batch_id) == (_S.PLANNED, None)


async def test_one_final_result_per_request(journal: Journal) -> None:
    """A request's first final result stands; a second is ignored."""
    requests = await _ingest(journal, 2)
    await journal.add_shard("s0", _plan(requests), planned_at=11.0)
    await journal.record("s0", [_final(0)], output_done=1)
    await journal.record("s0", [_final(0, b'{"ok":2}'), _final(1)], output_done=2)
    rows = await journal.result_rows(order="input", after=-1, limit=10)
    assert [(r.seq, r.data) for r in rows] == [(0, b'{"ok":1}'), (1, b'{"ok":1}')]
    assert (await journal.shard("s0")).output_done == 2
    assert await journal.not_done_count() == 0
    lines = [line async for chunk in journal.result_lines(order="completion") for line in chunk]
    assert lines == [b'{"ok":1}', b'{"ok":1}']


async def test_a_background_record_is_a_record(journal: Journal) -> None:
    """``record(background=True)`` (collection) writes the same
    results, line count and tokens as a record in the loop, and the first result of a
    request still stands."""
    requests = await _ingest(journal, 3)
    await journal.add_shard("s0", _plan(requests), planned_at=11.0)
    await journal.record("s0", [_final(0)], output_done=1)
    await journal.record(
        "s0",
        [_final(0, b'{"ok":2}'), _final(1)],
        [RetryLine(2, 1, b"boom")],
        background=True,
        output_done=3,
        input_tokens=7,
    )
    rows = await journal.result_rows(order="input", after=-1, limit=10)
    assert [(r.seq, r.data) for r in rows] == [(0, b'{"ok":1}'), (1, b'{"ok":1}')]
    shard = await journal.shard("s0")
    assert (shard.output_done, shard.input_tokens) == (3, 7)
    assert await journal.pending_count() == 1


@pytest.mark.parametrize("background", [False, True], ids=["in_the_loop", "background"])
async def test_named_results_are_recorded_for_the_requests_they_name(
    journal: Journal, background: bool
) -> None:
    """``record_named`` writes each line as the result of the shard's request it names
    (with its batch, no attempts and its tokens) and the shard's fields, at once."""
    requests = await _ingest(journal, 3)
    await journal.add_shard("s0", _plan(requests), planned_at=11.0)
    lines = [_named(2, b'{"two":1}', used=(3, 4)), _named(0, kind="error", code="bad")]
    ticker = await Ticker.start()
    recorded = await journal.record_named(
        "s0", "b1", lines, background=background, output_done=2, input_tokens=3
    )
    await ticker.stop()
    assert recorded
    if background:  # a write in a thread, or on a server, lets the loop run meanwhile
        assert ticker.ticks >= 1
    rows = await journal.result_rows(order="input", after=-1, limit=10)
    assert [(r.seq, r.custom_id, r.kind, r.attempts, r.batch_id, r.data) for r in rows] == [
        (0, "r0", "error", 0, "b1", b'{"ok":1}'),
        (2, "r2", "success", 0, "b1", b'{"two":1}'),
    ]
    done = [line async for chunk in journal.result_lines(order="completion") for line in chunk]
    assert done == [b'{"two":1}', b'{"ok":1}']
    shard = await journal.shard("s0")
    assert (shard.output_done, shard.input_tokens) == (2, 3)
    counts = await journal.counts()
    assert (counts.codes, counts.input_tokens, counts.output_tokens) == ({"bad": 1}, 3, 4)
    members = await journal.members("s0", ["r0", "r1", "r2"])
    assert {cid: m.queued for cid, m in members.items()} == {"r0": False, "r1": True, "r2": False}


#: custom_ids of every shape: quotes, escapes, control characters, non-ASCII, "007".
_ODD_IDS = ['say "hi"', "back\\slash\\n", "tab\tnew\nline", "café-日本", "🎉x", "007", "[1]", ""]
_ODD_IDS += ["\\u0000", "a\\u0000b"]


async def _odd_ids_in_a_shard(journal: Journal) -> list[str]:
    """Ingest a request for each of ``_ODD_IDS`` (seq: its index), all in shard s0."""
    requests = [
        PreparedRequest(
            seq=seq, url=URL, model="m", tokens=5, line=seq + 1, custom_id=cid, data=b"{}"
        )
        for seq, cid in enumerate(_ODD_IDS)
    ]
    async with journal.ingest() as sink:
        await sink.add([r.row() for r in requests])
        await sink.start(RunMeta(run_id="run1", started_at=10.0, updated_at=10.0))
    await journal.add_shard("s0", _plan(requests), planned_at=11.0)
    return list(_ODD_IDS)


@pytest.mark.parametrize("background", [False, True], ids=["in_the_loop", "background"])
async def test_named_results_find_requests_whatever_their_custom_id(
    journal: Journal, background: bool
) -> None:
    """``record_named`` finds requests by any custom_id: quotes, escapes, non-ASCII, "007"."""
    ids = await _odd_ids_in_a_shard(journal)
    lines = [
        NamedResult(cid, "success", None, seq, 1, b"line %d" % seq)
        for seq, cid in reversed(list(enumerate(ids)))
    ]
    assert await journal.record_named("s0", "b1", lines, background=background)
    rows = await journal.result_rows(order="input", after=-1, limit=20)
    assert [(r.custom_id, r.data) for r in rows] == [
        (cid, b"line %d" % seq) for seq, cid in enumerate(ids)
    ]
    assert (await journal.counts()).input_tokens == sum(range(len(ids)))


@pytest.mark.parametrize("background", [False, True], ids=["in_the_loop", "background"])
async def test_members_are_found_whatever_their_custom_id(
    journal: Journal, background: bool
) -> None:
    """members finds a shard's requests by any custom_id and says which wait for one."""
    ids = await _odd_ids_in_a_shard(journal)
    await journal.record("s0", [_final(1)])
    found = await journal.members("s0", [*reversed(ids), "7", "elsewhere"], background=background)
    assert {cid: (m.seq, m.queued) for cid, m in found.items()} == {
        cid: (seq, seq != 1) for seq, cid in enumerate(ids)
    }


async def test_a_request_run_again_after_its_own_cancel_takes_a_named_result(
    journal: Journal,
) -> None:
    """A request sent back by the run's own cancel (no failure counted) and queued in a
    shard again waits for its first outcome: ``record_named`` takes its line."""
    requests = await _ingest(journal, 2)
    await journal.add_shard("s0", _plan(requests), planned_at=11.0)
    await journal.record("s0", [_final(0)], [RetryLine(1, 0, None)], output_done=2)
    await journal.add_shard("s1", _plan(requests[1:]), planned_at=12.0)
    assert await journal.record_named("s1", "b2", [_named(1, b'{"later":1}')], output_done=1)
    rows = await journal.result_rows(order="input", after=-1, limit=10)
    assert [(r.seq, r.attempts, r.batch_id, r.data) for r in rows] == [
        (0, 0, "b1", b'{"ok":1}'),
        (1, 0, "b2", b'{"later":1}'),
    ]


@pytest.mark.parametrize("background", [False, True], ids=["in_the_loop", "background"])
@pytest.mark.parametrize(
    "case",
    ["unknown", "named_twice", "with_a_result", "of_another_shard", "back_to_pending", "retried"],
)
async def test_named_results_are_all_or_nothing(
    journal: Journal, case: str, background: bool
) -> None:
    """``record_named`` writes nothing, and says so, when a line names a request that
    is not the shard's waiting for its first outcome; the journal takes the next
    record whole."""
    requests = await _ingest(journal, 4)
    await journal.add_shard("s0", _plan(requests[:3]), planned_at=11.0)
    await journal.add_shard("s1", _plan(requests[3:]), planned_at=11.0)
    await journal.record("s0", [_final(2)], output_done=1)  # r2 has its result
    if case in ("back_to_pending", "retried"):
        await journal.record("s0", [], [RetryLine(1, 1, b'{"error":1}')])
    if case == "retried":  # r1 in a shard of the next round, after one failure
        await journal.add_shard("s2", _plan(requests[1:2]), planned_at=12.0)
    key, lines = {
        "unknown": ("s0", [_named(0), NamedResult("elsewhere", "success", None, 0, 0, b"{}")]),
        "named_twice": ("s0", [_named(0), _named(0)]),
        "with_a_result": ("s0", [_named(0), _named(2)]),
        "of_another_shard": ("s0", [_named(0), _named(3)]),
        "back_to_pending": ("s0", [_named(0), _named(1)]),
        "retried": ("s2", [_named(1, b'{"again":1}')]),
    }[case]
    assert not await journal.record_named(key, "b2", lines, background=background, output_done=9)
    rows = await journal.result_rows(order="input", after=-1, limit=10)
    assert [(r.seq, r.batch_id) for r in rows] == [(2, "b1")]
    assert (await journal.shard(key)).output_done == (1 if key == "s0" else 0)
    assert await journal.record_named("s1", "b3", [_named(3, b'{"three":1}')], output_done=1)
    rows = await journal.result_rows(order="input", after=-1, limit=10)
    assert [(r.seq, r.data) for r in rows] == [(2, b'{"ok":1}'), (3, b'{"three":1}')]


@pytest.mark.parametrize("named", [False, True], ids=["record", "record_named"])
async def test_a_cancelled_background_record_leaves_the_journal_whole(
    journal: Journal, named: bool
) -> None:
    """A background record (by seq, or by name) cancelled while it writes is all or
    nothing, and the journal takes the next statement at once (the write never
    overlaps it)."""
    requests = await _ingest(journal, 2000)
    await journal.add_shard("s0", _plan(requests), planned_at=11.0)
    count = len(requests)
    if named:
        lines = [_named(r.seq, b"x" * 2000) for r in requests]
        write = journal.record_named("s0", "b1", lines, background=True, output_done=count)
    else:
        finals = [_final(r.seq, b"x" * 2000) for r in requests]
        write = journal.record("s0", finals, background=True, output_done=count)
    task = asyncio.ensure_future(write)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    done = len(await journal.result_rows(order="input", after=-1, limit=5000))
    assert done in (0, count)
    assert (await journal.shard("s0")).output_done == (count if done else 0)
    await journal.record("s0", [], output_done=1)
    assert (await journal.shard("s0")).output_done == 1


async def test_background_figures_let_other_tasks_run_and_are_the_same(journal: Journal) -> None:
    """``counts(background=True)`` and ``tokens_by_model(background=True)`` (the run's
    report) let other tasks run while they are read (over 100,000
    results each held the loop ~60 ms), and give the same figures as in the loop."""
    requests = await _ingest(journal, 50)
    await journal.add_shard("s0", _plan(requests), planned_at=11.0)
    finals = [
        FinalResult(
            seq=r.seq,
            kind="success" if r.seq % 5 else "error",
            code=None if r.seq % 5 else "boom",
            shard="s0",
            batch_id="b",
            attempts=0,
            data=b'{"ok":1}',
            input_tokens=r.seq,
            output_tokens=1,
        )
        for r in requests[:40]
    ]
    await journal.record("s0", finals, output_done=40)
    ticker = await Ticker.start()
    during = []
    before = ticker.ticks
    counts = await journal.counts(background=True)
    during.append(ticker.ticks - before)
    before = ticker.ticks
    tokens = await journal.tokens_by_model(background=True)
    during.append(ticker.ticks - before)
    await ticker.stop()
    assert min(during) >= 1
    assert counts == await journal.counts()
    assert counts.kinds == {"success": 32, "error": 8}
    assert tokens == await journal.tokens_by_model()
    assert tokens == {"m": ModelTokens(input=sum(range(40)), output=40)}


async def test_a_background_close_lets_other_tasks_run_and_keeps_everything(
    journal: Journal, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """``close(background=True)`` (a run's end; the SQLite file's last
    copy of its log held the loop 60-90 ms after 100,000 results) lets other tasks run
    while the journal closes, and the journal opened again holds what was written."""
    requests = await _ingest(journal, 3)
    await journal.add_shard("s0", _plan(requests), planned_at=11.0)
    await journal.record("s0", [_final(0)], output_done=1)
    ticker = await Ticker.start()
    before = ticker.ticks
    await journal.close(background=True)
    during = ticker.ticks - before
    await ticker.stop()
    assert during >= 1
    again = await BACKENDS[request.node.callspec.params["journal"]](tmp_path)
    try:
        assert (await again.counts()).requests == {"queued": 2, "done": 1}
        assert (await again.shard("s0")).output_done == 1
    finally:
        await again.close()


async def test_tokens_are_summed_by_the_model_of_their_shard(journal: Journal) -> None:
    """tokens_by_model() counts each final result once, under its shard's model."""
    requests = await _ingest(journal, 3)
    await journal.add_shard("s0", _plan(requests[:2]), planned_at=11.0)
    used = [
        FinalResult(
            seq=seq,
            kind="success",
            code=None,
            shard="s0",
            batch_id="b1",
            attempts=0,
            data=b"{}",
            input_tokens=10 * (seq + 1),
            output_tokens=seq + 1,
        )
        for seq in (0, 1)
    ]
    await journal.record("s0", used)
    await journal.record("s0", used[:1])  # a result recorded twice counts once
    assert await journal.tokens_by_model() == {"m": ModelTokens(input=30, output=3)}


async def test_settle_sends_lines_back_and_closes_the_shard(journal: Journal) -> None:
    """settle() ends some requests, sends others back to pending with their attempts,
    and moves the shard to ``collected``, at once."""
    requests = await _ingest(journal, 2)
    await journal.add_shard("s0", _plan(requests), planned_at=11.0)
    for state in (_S.UPLOADING, _S.UPLOADED, _S.CREATING, _S.OPEN, _S.COLLECTING):
        await journal.move("s0", state)
    shard = await journal.settle(
        "s0", [_final(0)], [RetryLine(1, 1, b"{}")], status="expired", note="expired"
    )
    assert (shard.state, shard.status) == (_S.COLLECTED, "expired")
    assert await journal.pending_count() == 1
    assert await journal.retrying_count() == 1
    assert await journal.has_fresh_pending() is False
    counts = await journal.counts()
    assert counts.kinds == {"success": 1}
    assert counts.shard_states == {"collected": 1}


async def test_a_request_goes_into_a_bounded_number_of_batches(journal: Journal) -> None:
    """add_shard() refuses a shard that puts a request past ``max_batches``, and
    records nothing of it."""
    requests = await _ingest(journal, 1)
    await journal.add_shard("s0", _plan(requests), planned_at=11.0, max_batches=1)
    await journal.record(None, [], [RetryLine(0, 1, b"{}")])
    with pytest.raises(TooManyBatchesError) as caught:
        await journal.add_shard("s1", _plan(requests), planned_at=12.0, max_batches=1)
    assert (caught.value.custom_id, caught.value.batches) == ("r0", 2)
    assert await journal.shard_count() == 1
    assert await journal.pending_count() == 1


async def test_a_background_intent_lets_other_tasks_run_and_is_an_intent(journal: Journal) -> None:
    """``add_shard(background=True)`` (planning; the commit of a
    50,000-request intent held the loop 60 ms on a busy machine) lets other tasks run
    while it records the shard, records the same intent as in the loop, and refuses a
    shard past ``max_batches`` the same way, recording nothing of it."""
    requests = await _ingest(journal, 4)
    ticker = await Ticker.start()
    before = ticker.ticks
    shard = await journal.add_shard(
        "s0", _plan(requests[:3]), planned_at=11.0, max_batches=1, background=True
    )
    during = ticker.ticks - before
    await ticker.stop()
    assert during >= 1
    assert (shard.key, shard.state, shard.lines, shard.round) == ("s0", _S.PLANNED, 3, 0)
    queued = await journal.queued_at("s0")
    assert [(pos, q.custom_id) for pos, q in queued.items()] == [(1, "r0"), (2, "r1"), (3, "r2")]
    assert [r.seq async for r in journal.pending_requests(URL, "m")] == [3]
    await journal.record(None, [], [RetryLine(0, 1, b"{}")])
    with pytest.raises(TooManyBatchesError) as caught:
        await journal.add_shard(
            "s1", _plan([requests[0]]), planned_at=12.0, max_batches=1, background=True
        )
    assert (caught.value.custom_id, caught.value.batches) == ("r0", 2)
    assert await journal.shard_count() == 1
    assert await journal.pending_count() == 2


async def test_cancel_flag_and_state(journal: Journal) -> None:
    """The cancel flag is seen once set and cleared with a new state on request."""
    await _ingest(journal, 1)
    assert await journal.cancel_requested() is False
    await journal.request_cancel(20.0)
    assert await journal.cancel_requested() is True
    await journal.set_state("running", at=21.0, clear_cancel=True)
    assert await journal.cancel_requested() is False
    meta = await journal.meta()
    assert meta is not None
    assert (meta.state, meta.updated_at) == ("running", 21.0)


async def test_resume_sees_open_batches(journal: Journal) -> None:
    """The shards whose batch is tracked are found again (what a resume tracks)."""
    requests = await _ingest(journal, 1)
    await journal.add_shard("s0", _plan(requests), planned_at=11.0)
    for state in (_S.UPLOADING, _S.UPLOADED, _S.CREATING):
        await journal.move("s0", state)
    await journal.move("s0", _S.OPEN, batch_id="b1", status="validating")
    assert [(s.key, s.batch_id) for s in await journal.open_batches()] == [("s0", "b1")]


async def test_one_process_at_a_time(
    journal: Journal, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """While one holder has the journal, another is refused; after release it may."""
    await journal.acquire()
    other = await BACKENDS[request.node.callspec.params["journal"]](tmp_path)
    with pytest.raises(JournalError, match="in use"):
        await other.acquire()
    await journal.release()
    await other.acquire()
    await other.release()
    await other.close()


async def test_a_request_with_a_result_is_done_wherever_it_is_read(journal: Journal) -> None:
    """Once a request has its final result it counts as done everywhere: not queued in
    its shard any more, not sent back to pending by a later retry line."""
    requests = await _ingest(journal, 3)
    await journal.add_shard("s0", _plan(requests), planned_at=11.0)
    await journal.record("s0", [_final(0)], output_done=1)
    members = await journal.members("s0", ["r0", "r1", "r2", "elsewhere"])
    assert {cid: m.queued for cid, m in members.items()} == {"r0": False, "r1": True, "r2": True}
    assert [m.seq for m in (await journal.members("s0", ["r2"])).values()] == [2]
    assert [q.custom_id for q in (await journal.queued_at("s0")).values()] == ["r1", "r2"]
    assert (await journal.counts()).requests == {"queued": 2, "done": 1}
    await journal.record("s0", [], [RetryLine(0, 1, b"{}"), RetryLine(1, 1, b"{}")])
    assert await journal.pending_count() == 1
    assert await journal.not_done_count() == 2
    assert await journal.retrying_count() == 1
    assert (await journal.counts()).requests == {"pending": 1, "queued": 1, "done": 1}
    assert [r.seq for r in await journal.result_rows(order="input", after=-1, limit=9)] == [0]


def _big_request(seq: int, size: int) -> PreparedRequest:
    pad = b"x" * size
    data = b'{"custom_id":"r%d","method":"POST","url":"%s","body":{"model":"m","p":"%s"}}' % (
        seq,
        URL.encode(),
        pad,
    )
    return PreparedRequest(
        seq=seq, url=URL, model="m", tokens=5, line=seq + 1, custom_id=f"r{seq}", data=data
    )


async def test_lines_come_in_chunks_of_bounded_bytes(journal: Journal) -> None:
    """A shard's lines and the result lines come in chunks of at most CHUNK_BYTES (or
    one line), whatever the count of lines: reading them holds bounded memory."""
    requests = [_big_request(seq, 300_000) for seq in range(40)]
    async with journal.ingest() as sink:
        await sink.add([r.row() for r in requests])
        await sink.start(RunMeta(run_id="run1"))
    await journal.add_shard("s0", _plan(requests), planned_at=1.0)
    chunks = [list(chunk) async for chunk in journal.shard_lines("s0")]
    assert [line for chunk in chunks for line in chunk] == [r.data for r in requests]
    assert all(sum(map(len, chunk[:-1])) < CHUNK_BYTES for chunk in chunks)
    await journal.record("s0", [_final(r.seq, r.data) for r in requests])
    for order in ("input", "completion"):
        chunks = [list(chunk) async for chunk in journal.result_lines(order=order)]
        assert [line for chunk in chunks for line in chunk] == [r.data for r in requests]
        assert all(sum(map(len, chunk[:-1])) < CHUNK_BYTES for chunk in chunks)


async def test_background_result_lines_let_other_tasks_run_while_each_chunk_is_read(
    journal: Journal,
) -> None:
    """``result_lines(background=True)`` (the output file; a chunk of
    1024 lines held the loop 30-60 ms on a busy machine) lets other tasks run while
    each chunk is read, and gives the same lines as in the loop."""
    requests = [_big_request(seq, 300_000) for seq in range(30)]
    async with journal.ingest() as sink:
        await sink.add([r.row() for r in requests])
        await sink.start(RunMeta(run_id="run1"))
    await journal.add_shard("s0", _plan(requests), planned_at=1.0)
    await journal.record("s0", [_final(r.seq, r.data) for r in requests])
    ticker = await Ticker.start()
    for order in ("input", "completion"):
        during: list[int] = []
        chunks: list[list[bytes]] = []
        before = ticker.ticks
        async for chunk in journal.result_lines(order=order, background=True):
            during.append(ticker.ticks - before)
            chunks.append(list(chunk))
            before = ticker.ticks
        assert len(chunks) >= 2
        assert min(during) >= 1
        assert [line for chunk in chunks for line in chunk] == [r.data for r in requests]
    await ticker.stop()


async def test_recording_a_large_shard_lets_other_tasks_run(journal: Journal) -> None:
    """Recording the intent of a shard of many requests does not hold the event loop
    to the end: other tasks run meanwhile, and the shard is recorded whole."""
    count = 20_000
    requests = await _ingest(journal, count)
    ticker = await Ticker.start()
    before = ticker.ticks
    shard = await journal.add_shard("s0", _plan(requests), planned_at=1.0)
    during = ticker.ticks - before
    await ticker.stop()
    assert during >= 2
    assert shard.lines == count
    assert await journal.pending_count() == 0
    assert len(await journal.queued_at("s0")) == count


async def test_pending_requests_come_at_most_2048_between_turns_of_the_loop(
    journal: Journal,
) -> None:
    """A group's pending requests are read at most 2048 between two turns of the loop
    (planning read pages of 10,000, which held the loop 150-350 ms at 100,000 requests),
    each pending request once and in input order."""
    count = 5000
    await _ingest(journal, count)
    ticker = await Ticker.start()
    seen = [(ticker.ticks, request.seq) async for request in journal.pending_requests(URL, "m")]
    await ticker.stop()
    between_turns = Counter(tick for tick, _seq in seen)
    assert max(between_turns.values()) <= 2048
    assert [seq for _tick, seq in seen] == list(range(count))


async def test_background_pending_requests_let_other_tasks_run_while_each_page_is_read(
    journal: Journal,
) -> None:
    """``pending_requests(background=True)`` (planning) lets other
    tasks run while each page of requests is read, and gives the same requests as in
    the loop."""
    count = 5000
    await _ingest(journal, count)
    ticker = await Ticker.start()
    start = ticker.ticks
    seen = [(ticker.ticks, r) async for r in journal.pending_requests(URL, "m", background=True)]
    await ticker.stop()
    pages = Counter(tick for tick, _request in seen)
    assert min(pages) > start  # the first page was read while other tasks ran
    assert max(pages.values()) <= 2048
    assert [r for _tick, r in seen] == [r async for r in journal.pending_requests(URL, "m")]


async def test_an_ingest_adds_no_request_of_a_batch_whose_id_is_taken(journal: Journal) -> None:
    """add() refuses (False) requests among which one uses an id added before, and adds
    none of them; the ingest goes on and commits the rest."""
    async with journal.ingest() as sink:
        assert await sink.add([_request(seq).row() for seq in range(3)]) is True
        taken = attrs.evolve(_request(4), custom_id="r1").row()
        assert await sink.add([_request(3).row(), taken]) is False
        assert await sink.add([_request(3).row()]) is True
        await sink.start(RunMeta(run_id="run1"))
    assert await journal.pending_count() == 4
    assert [r.seq async for r in journal.pending_requests(URL, "m")] == [0, 1, 2, 3]


async def test_an_ingest_tells_which_ids_its_requests_use(journal: Journal) -> None:
    """During an ingest, taken() gives the input line of the requests added so far
    under each id asked about (what finds duplicates), and nothing for the others."""
    async with journal.ingest() as sink:
        await sink.add([_request(seq).row() for seq in range(1200)])
        asked = [f"r{seq}" for seq in range(0, 2400, 2)]
        assert await sink.taken(asked) == {f"r{seq}": seq + 1 for seq in range(0, 1200, 2)}
        assert await sink.taken([]) == {}
        await sink.start(RunMeta(run_id="run1"))
