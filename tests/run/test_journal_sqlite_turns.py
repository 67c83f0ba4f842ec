"""The SQLite journal's statements: in the event loop's thread, reading many lines from
it (the output file, a shard's file) gives the loop back often; from its worker thread,
a batch goes in as one statement, exactly."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import Ticker

from aiobatch._run._records import FinalResult, NamedResult, PreparedRequest, RunMeta, ShardPlan
from aiobatch._run._sqlite_journal import SLICE_ROWS, SQLiteJournal

URL = "/v1/chat/completions"


async def _journal_with_a_shard(path: Path, count: int) -> tuple[SQLiteJournal, list[FinalResult]]:
    """A journal of ``count`` requests in shard ``s0``, and a final result for each."""
    journal = SQLiteJournal(path, create=True)
    requests = [
        PreparedRequest(
            seq=seq,
            url=URL,
            model="m",
            tokens=1,
            line=seq + 1,
            custom_id=f"r{seq}",
            data=b'{"custom_id":"r%d"}' % seq,
        )
        for seq in range(count)
    ]
    async with journal.ingest() as sink:
        await sink.add([r.row() for r in requests])
        await sink.start(RunMeta(run_id="run1", started_at=1.0, updated_at=1.0))
    plan = ShardPlan(URL, "m", tuple(range(count)), sum(r.size for r in requests), 0)
    await journal.add_shard("s0", plan, planned_at=2.0)
    finals = [
        FinalResult(
            seq=seq,
            kind="success",
            code=None,
            shard="s0",
            batch_id="b",
            attempts=0,
            data=b"%d" % seq,
        )
        for seq in reversed(range(count))
    ]
    return journal, finals


async def test_output_lines_come_in_chunks_of_at_most_1024_lines(tmp_path: Path) -> None:
    """The output's lines are read 1024 at most between two turns of the loop (4096
    lines of a few hundred bytes held it 150-200 ms on a busy machine), every line once
    and in input order."""
    count = 3000
    journal, finals = await _journal_with_a_shard(tmp_path / "run.journal", count)
    await journal.record("s0", finals, output_done=count)
    chunks = [list(chunk) async for chunk in journal.result_lines(order="input")]
    await journal.close()
    assert max(len(chunk) for chunk in chunks) <= 1024
    assert [line for chunk in chunks for line in chunk] == [b"%d" % seq for seq in range(count)]


async def test_a_shard_intent_queues_at_most_2048_requests_between_turns(tmp_path: Path) -> None:
    """Recording the intent of a shard of 20,000 requests gives the loop back at least
    once every 2048 requests it queues (slices of 4096, then the shard's row in the
    same turn as the last of them, held it 40-60 ms on a busy machine), and the shard
    is recorded whole."""
    count = 20_000
    journal = SQLiteJournal(tmp_path / "run.journal", create=True)
    requests = [
        PreparedRequest(
            seq=seq, url=URL, model="m", tokens=1, line=seq + 1, custom_id=f"r{seq}", data=b"{}"
        )
        for seq in range(count)
    ]
    async with journal.ingest() as sink:
        await sink.add([r.row() for r in requests])
        await sink.start(RunMeta(run_id="run1", started_at=1.0, updated_at=1.0))
    ticker = await Ticker.start()
    before = ticker.ticks
    plan = ShardPlan(URL, "m", tuple(range(count)), 3 * count, 0)
    shard = await journal.add_shard("s0", plan, planned_at=2.0)
    during = ticker.ticks - before
    await ticker.stop()
    queued = await journal.queued_at("s0")
    await journal.close()
    assert during >= -(-count // 2048)
    assert shard.lines == count
    assert list(queued) == list(range(1, count + 1))


async def test_a_close_during_a_background_record_waits_for_it(tmp_path: Path) -> None:
    """Closing the journal while a chunk is written in a worker thread waits for that
    write: the chunk lands whole and the file is closed after it, not under it."""
    count = 20000
    journal, finals = await _journal_with_a_shard(tmp_path / "run.journal", count)
    write = asyncio.ensure_future(journal.record("s0", finals, background=True, output_done=count))
    await asyncio.sleep(0)  # the write is under way in its thread
    await journal.close()
    await write
    again = SQLiteJournal(tmp_path / "run.journal")
    rows = await again.result_rows(order="input", after=-1, limit=2 * count)
    await again.close()
    assert len(rows) == count


async def test_named_results_of_more_than_a_slice_are_declined_in_the_loop(
    tmp_path: Path,
) -> None:
    """``record_named`` in the loop declines a chunk of more than a slice of rows (it
    would write it in one go), writing nothing, and takes it in the worker thread."""
    count = SLICE_ROWS + 1
    journal, _finals = await _journal_with_a_shard(tmp_path / "run.journal", count)
    lines = [NamedResult(f"r{seq}", "success", None, 0, 0, b"%d" % seq) for seq in range(count)]
    assert not await journal.record_named("s0", "b", lines, output_done=count)
    assert await journal.result_rows(order="input", after=-1, limit=5) == []
    assert await journal.record_named("s0", "b", lines, background=True, output_done=count)
    assert (await journal.counts()).requests == {"done": count}
    await journal.close()


async def test_text_with_nul_is_kept_exactly_by_the_worker_thread(tmp_path: Path) -> None:
    """Requests and results named by ids with NUL characters (which SQLite's JSON
    functions cut short) are written exactly from the worker thread."""
    journal = SQLiteJournal(tmp_path / "run.journal", create=True)
    ids = ["a\x00b", "a\x00c", "a", "\x00"]
    requests = [
        PreparedRequest(
            seq=s, url=URL, model="m\x00", tokens=1, line=s + 1, custom_id=c, data=b"{}"
        )
        for s, c in enumerate(ids)
    ]
    async with journal.ingest(background=True) as sink:
        assert await sink.add([r.row() for r in requests])
        await sink.start(RunMeta(run_id="run1", started_at=1.0, updated_at=1.0))
    plan = ShardPlan(URL, "m\x00", tuple(range(len(ids))), 3 * len(ids), 0)
    await journal.add_shard("s0", plan, planned_at=2.0)
    lines = [NamedResult(c, "success", None, 1, 1, b"line %d" % s) for s, c in enumerate(ids)]
    assert await journal.record_named("s0", "b1", lines, background=True)
    rows = await journal.result_rows(order="input", after=-1, limit=10)
    await journal.close()
    assert [(r.custom_id, r.data) for r in rows] == [(c, b"line %d" % s) for s, c in enumerate(ids)]


@pytest.mark.parametrize("background", [False, True], ids=["in_the_loop", "background"])
async def test_members_with_nul_in_their_ids_are_found_exactly(
    tmp_path: Path, background: bool
) -> None:
    """Requests whose ids differ only after a NUL character are each found by their id."""
    journal = SQLiteJournal(tmp_path / "run.journal", create=True)
    ids = ["a\x00b", "a\x00c", "a", "\x00"]
    requests = [
        PreparedRequest(seq=s, url=URL, model="m", tokens=1, line=s + 1, custom_id=c, data=b"{}")
        for s, c in enumerate(ids)
    ]
    async with journal.ingest() as sink:
        assert await sink.add([r.row() for r in requests])
        await sink.start(RunMeta(run_id="run1", started_at=1.0, updated_at=1.0))
    await journal.add_shard("s0", ShardPlan(URL, "m", (0, 1, 2, 3), 12, 0), planned_at=2.0)
    found = await journal.members("s0", ["a\x00c", "\x00", "a\x00"], background=background)
    await journal.close()
    assert {cid: m.seq for cid, m in found.items()} == {"a\x00c": 1, "\x00": 3}
