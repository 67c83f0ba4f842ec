"""The SQLite journal's pages: a new file has 32 KiB pages, and a file made with other
pages keeps them."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import page_size

from aiobatch._run import _sqlite
from aiobatch._run._records import RequestRow, RunMeta
from aiobatch._run._sqlite import JournalFile
from aiobatch._run._sqlite_journal import SQLiteJournal

URL = "/v1/chat/completions"


def _request(seq: int, shard: str) -> RequestRow:
    """Request ``seq``, queued in ``shard``."""
    data = b'{"custom_id":"r%d"}' % seq
    return RequestRow(seq, f"r{seq}", seq + 1, URL, "m", 1, 1, data, shard, seq + 1)


async def _made(path: Path) -> None:
    """A journal made and closed without a run."""
    journal = SQLiteJournal(path, create=True)
    await journal.close()


async def test_a_new_journal_has_32_kib_pages(tmp_path: Path) -> None:
    """A journal made now has pages of 32 KiB."""
    await _made(tmp_path / "new.journal")
    assert page_size(tmp_path / "new.journal") == 32768


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
    assert page_size(path) == 65536


def test_a_journal_file_checkpoints_its_log_every_40_mib_whatever_its_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal file, made with 32 KiB or with 64 KiB pages, checkpoints its log every 40 MiB."""
    with monkeypatch.context() as patch:
        patch.setattr(_sqlite, "PAGE_SIZE", 65536)
        JournalFile(tmp_path / "old.journal", create=True).close()
    JournalFile(tmp_path / "new.journal", create=True).close()
    for name, size in (("old.journal", 65536), ("new.journal", 32768)):
        with JournalFile(tmp_path / name) as db:
            pages = int(db._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
        assert pages * size == 40 * 1024 * 1024
