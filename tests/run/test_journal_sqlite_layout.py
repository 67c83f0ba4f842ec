"""The SQLite journal's file: a new run's ingest builds the indexes of its requests once
they are in (the journal it leaves has every index a new journal is made with, and a
failed ingest takes nothing of them away); a new file has 32 KiB pages, and a file made
with other pages keeps them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from aiobatch._run import _sqlite
from aiobatch._run._records import RequestRow, RunMeta
from aiobatch._run._sqlite_journal import SQLiteJournal

URL = "/v1/chat/completions"


def _request(seq: int, shard: str | None) -> RequestRow:
    """Request ``seq``, queued in ``shard`` (None: pending)."""
    data = b'{"custom_id":"r%d"}' % seq
    pos = seq + 1 if shard is not None else None
    return RequestRow(seq, f"r{seq}", seq + 1, URL, "m", 1, 1, data, shard, pos)


def _indexes(path: Path) -> dict[str, str]:
    """Each index of the file's tables by name, with its definition."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT name, sql FROM sqlite_schema WHERE type = 'index'")
        return {str(name): str(sql) for name, sql in rows}
    finally:
        db.close()


async def _made(path: Path) -> dict[str, str]:
    """The indexes of a journal made and closed without a run."""
    journal = SQLiteJournal(path, create=True)
    await journal.close()
    return _indexes(path)


@pytest.mark.parametrize("background", [False, True])
async def test_a_new_runs_ingest_leaves_every_index_of_a_new_journal(
    tmp_path: Path, background: bool
) -> None:
    """After an ingest of queued and pending requests the journal has every index a new one has."""
    expected = await _made(tmp_path / "empty.journal")
    path = tmp_path / "run.journal"
    journal = SQLiteJournal(path, create=True)
    async with journal.ingest(background=background) as sink:
        assert await sink.add([_request(seq, "s000000") for seq in range(5)])
        assert await sink.add([_request(seq, None) for seq in range(5, 8)])
        taken = _request(8, "s000000")._replace(custom_id="r2")
        assert not await sink.add([taken])  # its id is taken
        await sink.start(RunMeta(run_id="run1", started_at=1.0, updated_at=1.0))
    assert await journal.members("s000000", ["r1", "r4"])
    await journal.close()
    assert _indexes(path) == expected
    assert {"requests_members", "requests_shard", "requests_pending"} <= set(expected)


async def test_a_failed_ingest_leaves_the_indexes_in_place(tmp_path: Path) -> None:
    """An ingest that raises after adding requests leaves the journal's indexes as they were."""
    expected = await _made(tmp_path / "empty.journal")
    path = tmp_path / "run.journal"
    journal = SQLiteJournal(path, create=True)

    async def failing_ingest() -> None:
        async with journal.ingest() as sink:
            await sink.add([_request(seq, "s000000") for seq in range(3)])
            raise RuntimeError("preflight failed")

    with pytest.raises(RuntimeError):
        await failing_ingest()
    await journal.close()
    assert _indexes(path) == expected


def _page_size(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA page_size").fetchone()[0])
    finally:
        db.close()


async def test_a_new_journal_has_32_kib_pages(tmp_path: Path) -> None:
    """A journal made now has pages of 32 KiB."""
    await _made(tmp_path / "new.journal")
    assert _page_size(tmp_path / "new.journal") == 32768


async def test_a_journal_made_with_64_kib_pages_keeps_them_and_reads_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal made with 64 KiB pages, opened again, keeps them and reads back its requests."""
    path = tmp_path / "old.journal"
    with monkeypatch.context() as patch:
        patch.setattr(_sqlite, "PAGE_SIZE", 65536)
        journal = SQLiteJournal(path, create=True)
        async with journal.ingest() as sink:
            assert await sink.add([_request(seq, "s000000") for seq in range(4)])
            await sink.start(RunMeta(run_id="run1", started_at=1.0, updated_at=1.0))
        await journal.close()
    journal = SQLiteJournal(path)
    try:
        found = await journal.members("s000000", ["r0", "r3", "r9"])
        assert sorted(found) == ["r0", "r3"]
        assert await journal.not_done_count() == 4
    finally:
        await journal.close()
    assert _page_size(path) == 65536
