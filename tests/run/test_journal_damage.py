"""A damaged journal (data pages overwritten, its ``-wal`` file cut short) is a
:class:`JournalError` that says what is wrong, lists the batches that can still be read
from it, and says what to do; ``aiobatch status`` and ``aiobatch run`` print it and exit 1
instead of a traceback.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from conftest import (
    FAST_FLEET,
    Handler,
    batch_ids_in,
    client_for,
    in_front,
    make_requests,
    page_size,
    run_argv,
    service_on,
)

from aiobatch import BatchRun, RunConfig, read_report
from aiobatch._run import _sqlite
from aiobatch._run._sqlite import JournalFile as Journal
from aiobatch.cli import main
from aiobatch.errors import JournalError
from aiobatch.testing import VirtualClock
from aiobatch.transport import Request, Response


def root_page(path: Path, table: str) -> int:
    """The root page number of ``table``."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(
            db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
        )
    finally:
        db.close()


def damage_page(path: Path, page: int) -> None:
    """Overwrite page ``page`` (1-based, not the header page) with garbage."""
    assert page > 1
    size = page_size(path)
    with path.open("r+b") as fh:
        fh.seek((page - 1) * size)
        fh.write(b"\xff" * size)


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """New journals get 4 KiB pages (not 32 KiB), so that a small run's rows spread
    over several pages and a damaged page or a cut log hits some of them only."""
    monkeypatch.setattr(_sqlite, "PAGE_SIZE", 4096)


def finished_run(tmp_path: Path, *extra: str, lines: int = 60) -> tuple[Path, list[str]]:
    """A finished ``aiobatch run --fake`` (no faults); its journal and batch ids."""
    source = make_requests(tmp_path / "in.jsonl", lines)
    output = tmp_path / "out.jsonl"
    code = main(
        run_argv(
            output,
            "-q",
            "--fake-faults",
            "0",
            "--fake-transient-errors",
            "0",
            "--fake-permanent-errors",
            "0",
            *extra,
            source=source,
        )
    )
    assert code == 0
    journal = Path(f"{output}.journal")
    ids = [batch_id for batch_id in batch_ids_in(journal) if batch_id is not None]
    assert ids
    return journal, ids


def test_status_of_a_journal_with_damaged_pages_names_the_damage_and_the_batches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``aiobatch status`` on a journal whose data pages are overwritten exits 1 with a
    message naming the file, saying it is damaged and what to do, and listing every
    batch the run had created."""
    journal, ids = finished_run(tmp_path, "--max-lines", "20")
    damage_page(journal, root_page(journal, "requests"))
    capsys.readouterr()
    assert main(["status", str(journal)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert str(journal) in err
    assert "damaged" in err
    for batch_id in ids:
        assert batch_id in err
    assert "new journal" in err
    assert "aiobatch_run=" in err


@pytest.mark.parametrize("table", ["results", "meta"])
def test_run_on_a_journal_with_damaged_pages_exits_4_with_the_batches(
    table: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``aiobatch run`` again on a journal whose result (or meta) pages are overwritten
    exits 4 (the journal cannot be used) with the damage message and the batch ids, and
    writes no output."""
    journal, ids = finished_run(tmp_path, "--max-lines", "20")
    output = tmp_path / "out.jsonl"
    output.unlink()
    damage_page(journal, root_page(journal, table))
    capsys.readouterr()
    code = main(run_argv(output, "-q", source=tmp_path / "in.jsonl"))
    err = capsys.readouterr().err
    assert code == 4
    assert "damaged" in err
    assert str(journal) in err
    for batch_id in ids:
        assert batch_id in err
    assert not output.exists()


def _copy(source: Path, target: Path) -> None:
    for suffix in ("", "-wal"):
        shutil.copyfile(f"{source}{suffix}", f"{target}{suffix}")


def test_a_journal_with_a_truncated_wal_is_reported_as_damaged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], small_pages: None
) -> None:
    """A journal whose ``-wal`` file was cut short after a checkpoint (its pages are a
    mix of two moments) is reported as damaged by ``aiobatch status``; the same journal
    with its whole ``-wal`` file reads fine."""
    journal, ids = finished_run(tmp_path, "--max-lines", "20")
    # Write two transactions through the WAL, checkpoint them into the main file, and
    # keep a copy of both files as they are while the connection is still open.
    db = sqlite3.connect(journal, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("BEGIN IMMEDIATE")
    db.execute("DELETE FROM results WHERE seq % 2 = 0")
    db.execute("UPDATE requests SET state = 'pending' WHERE seq % 2 = 0")
    db.execute("COMMIT")
    first = os.path.getsize(f"{journal}-wal")
    db.execute("BEGIN IMMEDIATE")
    db.execute("UPDATE requests SET last_error = randomblob(300)")
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
    whole = tmp_path / "whole.journal"
    cut = tmp_path / "cut.journal"
    _copy(journal, whole)
    _copy(journal, cut)
    db.close()
    os.truncate(f"{cut}-wal", first)

    capsys.readouterr()
    assert main(["status", str(whole)]) == 0
    assert main(["status", str(cut)]) == 1
    err = capsys.readouterr().err
    assert str(cut) in err
    assert "damaged" in err
    for batch_id in ids:
        assert batch_id in err


def _dbstat(path: Path, table: str) -> list[tuple[int, str, int]]:
    """(page, type, cells) of the pages of ``table``; skips the test when SQLite was
    built without the dbstat table."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT pageno, pagetype, ncell FROM dbstat WHERE name = ? ORDER BY pageno",
            (table,),
        ).fetchall()
    except sqlite3.OperationalError:
        pytest.skip("this SQLite has no dbstat table")
    finally:
        db.close()
    return [(int(p), str(t), int(n)) for p, t, n in rows]


def test_unreadable_shard_rows_are_skipped_and_the_readable_ones_listed(
    tmp_path: Path, small_pages: None
) -> None:
    """When a page of the shards table itself is damaged, the error still lists the
    batches of every shard row on the other pages, and says some could not be read."""
    journal, ids = finished_run(tmp_path, "--max-lines", "1", lines=40)
    leaves = [(page, cells) for page, kind, cells in _dbstat(journal, "shards") if kind == "leaf"]
    assert len(leaves) >= 3
    page, lost = leaves[1]
    damage_page(journal, page)
    with pytest.raises(JournalError) as info, Journal(journal, readonly=True) as db:
        read_report(db)
    message = str(info.value)
    listed = [batch_id for batch_id in ids if batch_id in message]
    assert len(listed) == len(ids) - lost
    assert "could not be read" in message


async def test_a_journal_damaged_during_a_run_ends_the_run_with_journal_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A journal that becomes unreadable while a run uploads its first file ends the run
    at once with a JournalError naming the damage: the step is not tried again against
    it, and no RunError claims the journal is intact."""
    source = make_requests(tmp_path / "in.jsonl", 12)
    journal = tmp_path / "run.journal"
    clock = VirtualClock()
    service = service_on(clock)
    damaged: list[str] = []

    async def damage_at_first_upload(request: Request, handle: Handler) -> Response:
        if request.method == "POST" and request.url.endswith("/files") and not damaged:
            # Point the shards table at a page that is not its own, through SQLite, so
            # the run's own connection sees it.
            db = sqlite3.connect(journal, isolation_level=None)
            (version,) = db.execute("PRAGMA schema_version").fetchone()
            db.execute("PRAGMA writable_schema = ON")
            db.execute(
                "UPDATE sqlite_master SET rootpage = ? WHERE name = 'shards'",
                (root_page(journal, "results"),),
            )
            db.execute(f"PRAGMA schema_version = {int(version) + 1}")
            db.close()
            damaged.append(request.url)
        return await handle(request)

    transport = in_front(service, damage_at_first_upload)
    async with client_for(clock, transport) as client, clock.auto_advance():
        run = BatchRun(
            client, source, journal=journal, config=RunConfig(max_lines=4, fleet=FAST_FLEET)
        )
        started = clock.now()
        with pytest.raises(JournalError, match="damaged"):
            await run.run()
        assert clock.now() == started
    assert damaged
    assert "trying again" not in caplog.text
