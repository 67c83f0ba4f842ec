"""The journal's result lines live in its ``-data`` file, written once: a finished run's
lines are there, a chunk whose transaction rolled back is never read, and a file that is
missing, cut short or another journal's is a JournalError naming it."""

from __future__ import annotations

import asyncio
import io
import os
import sqlite3
from itertools import accumulate
from pathlib import Path
from typing import Any

import pytest
from conftest import cancelled_at_start, client_for, read_output, requests, service_on, write_jsonl

from aiobatch import BatchRun, RunConfig
from aiobatch._run._disk import WRITE_BYTES
from aiobatch._run._output import write_output
from aiobatch._run._records import FinalResult
from aiobatch._run._sqlite import JournalFile
from aiobatch._run._sqlite_data import ResultData
from aiobatch._run._sqlite_journal import SQLiteJournal
from aiobatch.errors import JournalError
from aiobatch.testing import VirtualClock


async def _run_finished(tmp_path: Path, n: int = 12) -> tuple[Path, Path]:
    """A finished run of ``n`` requests in 3 batches: its journal and output file."""
    clock = VirtualClock()
    source = write_jsonl(tmp_path / "in.jsonl", requests(n))
    journal, output = tmp_path / "run.journal", tmp_path / "out.jsonl"
    async with client_for(clock, service_on(clock).transport()) as client, clock.auto_advance():
        run = BatchRun(
            client, source, journal=journal, output=output, config=RunConfig(max_lines=4)
        )
        report = await run.run()
    assert report.succeeded == n
    return journal, output


async def _run_unfinished(tmp_path: Path, n: int = 4) -> Path:
    """The journal of a run cancelled at its first progress report (no results)."""
    clock = VirtualClock()
    source = write_jsonl(tmp_path / "in.jsonl", requests(n))
    journal = tmp_path / "run.journal"
    async with client_for(clock, service_on(clock).transport()) as client, clock.auto_advance():
        report = await cancelled_at_start(client, source, journal)
    assert report.pending == n
    return journal


def _finished(tmp_path: Path) -> tuple[Path, Path]:
    return asyncio.run(_run_finished(tmp_path))


def _record_and_fail(db: JournalFile, finals: list[FinalResult]) -> None:
    """Record ``finals`` in a transaction that then fails (and rolls back)."""
    with db.transaction() as tx:
        db.record_rows(tx, finals, ())
        raise RuntimeError("the commit never came")


def _final(seq: int, data: bytes) -> FinalResult:
    return FinalResult(
        seq=seq, kind="success", code=None, shard=None, batch_id=None, attempts=0, data=data
    )


def test_a_finished_runs_result_lines_are_in_the_data_file_once(tmp_path: Path) -> None:
    """Every line of the output is in the journal's ``-data`` file, once, after the
    file's id line, and the journal reads them back in input order."""
    journal, output = _finished(tmp_path)
    lines = output.read_bytes().splitlines()
    head, _, data = Path(f"{journal}-data").read_bytes().partition(b"\n")
    assert head.startswith(b"aiobatch result lines ")
    assert len(data) == sum(len(line) for line in lines)
    assert all(data.count(line) == 1 for line in lines)
    with JournalFile(journal, readonly=True) as db:
        assert list(db.result_lines(order="input")) == lines
        assert sorted(db.result_lines(order="completion")) == sorted(lines)
    assert [line["custom_id"] for line in read_output(output)] == [f"r-{n}" for n in range(12)]


def test_a_chunk_rolled_back_is_written_over_and_never_read(tmp_path: Path) -> None:
    """A chunk whose transaction rolled back after its lines were written leaves no
    trace: the next chunk's lines take their place and are the ones read back."""
    journal = asyncio.run(_run_unfinished(tmp_path))
    with JournalFile(journal) as db:
        with pytest.raises(RuntimeError, match="never came"):
            _record_and_fail(db, [_final(0, b"A" * 40), _final(1, b"B" * 40)])
        assert list(db.result_lines()) == []
        db.record(None, [_final(2, b'{"c":1}'), _final(3, b'{"d":22}')])
        assert list(db.result_lines()) == [b'{"c":1}', b'{"d":22}']
        assert db.counts().requests["done"] == 2
    assert Path(f"{journal}-data").read_bytes().partition(b"\n")[2][:15] == b'{"c":1}{"d":22}'


@pytest.mark.parametrize("order", ["completion", "input"])
def test_a_data_file_cut_short_is_a_journal_error_naming_it(tmp_path: Path, order: str) -> None:
    """Reading results (in either order) whose lines are past the end of a truncated
    ``-data`` file raises JournalError naming the file and the request, not a short or
    empty line."""
    journal, _output = _finished(tmp_path)
    data = Path(f"{journal}-data")
    data.write_bytes(data.read_bytes()[:-10])
    with JournalFile(journal, readonly=True) as db, pytest.raises(JournalError) as caught:
        list(db.result_lines(order=order))
    message = str(caught.value)
    assert f"{data}" in message
    assert "cut short" in message
    assert "request" in message


@pytest.mark.parametrize("kept", [0, 10])
def test_a_data_file_cut_inside_its_id_line_is_cut_short_not_another_journals(
    tmp_path: Path, kept: int
) -> None:
    """A ``-data`` file truncated to fewer bytes than its id line (emptied by a failed
    copy, say) is reported cut short when results are read, not as another journal's."""
    journal, _output = _finished(tmp_path)
    data = Path(f"{journal}-data")
    data.write_bytes(data.read_bytes()[:kept])
    with JournalFile(journal, readonly=True) as db, pytest.raises(JournalError) as caught:
        list(db.result_lines())
    assert f"{data}" in str(caught.value)
    assert "cut short" in str(caught.value)
    assert "another journal" not in str(caught.value)


def test_a_missing_data_file_is_a_journal_error_naming_it(tmp_path: Path) -> None:
    """A journal whose ``-data`` file was not copied along says so when its results are
    read."""
    journal, _output = _finished(tmp_path)
    Path(f"{journal}-data").unlink()
    with JournalFile(journal, readonly=True) as db, pytest.raises(JournalError) as caught:
        list(db.result_lines())
    assert f"{journal}-data" in str(caught.value)
    assert "beside the journal" in str(caught.value)


async def _resume(journal: Path) -> tuple[BaseException | None, list[str]]:
    """Resume the run of ``journal`` (its input beside it) on a fresh fake: the error it
    raised (None: it finished), and the requests the fake saw."""
    clock = VirtualClock()
    service = service_on(clock)
    source = journal.parent / "in.jsonl"
    error: BaseException | None = None
    async with client_for(clock, service.transport()) as client, clock.auto_advance():
        run = BatchRun(client, source, journal=journal, output=journal.parent / "out.jsonl")
        try:
            await run.run()
        except JournalError as exc:
            error = exc
    return error, [f"{r.method} {r.path}" for r in service.requests]


@pytest.mark.parametrize("damage", ["missing", "cut short"])
def test_a_run_does_not_resume_over_a_data_file_missing_or_cut_short(
    tmp_path: Path, damage: str
) -> None:
    """A journal whose results need more bytes than its ``-data`` file has (not copied
    along, truncated) is refused before anything is sent: resuming would write over it
    and read the earlier lines back as zeros."""
    journal = asyncio.run(_run_unfinished(tmp_path))
    with JournalFile(journal) as db:
        db.record(None, [_final(0, b'{"a":1}'), _final(1, b'{"b":2}')])
    data = Path(f"{journal}-data")
    if damage == "missing":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[:-3])
    error, sent = asyncio.run(_resume(journal))
    assert isinstance(error, JournalError)
    assert f"{data}" in str(error)
    assert sent == []
    assert not (tmp_path / "out.jsonl").exists()
    with JournalFile(journal, readonly=True) as db:  # status still reads it
        assert db.counts().requests["done"] == 2


def test_another_journals_data_file_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    """A ``-data`` file put back beside the wrong journal (another run's, at least as
    long) is a JournalError saying so, before a resume sends anything, and when
    ``aiobatch status`` reads results: not other requests' lines in the output."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    journal = asyncio.run(_run_unfinished(tmp_path / "a"))
    with JournalFile(journal) as db:
        db.record(None, [_final(0, b'{"a":1}'), _final(1, b'{"b":2}')])
    other = asyncio.run(_run_unfinished(tmp_path / "b"))
    with JournalFile(other) as db:
        db.record(None, [_final(0, b'{"x":111}'), _final(1, b'{"y":222}')])
    data = Path(f"{journal}-data")
    data.write_bytes(Path(f"{other}-data").read_bytes())
    error, sent = asyncio.run(_resume(journal))
    assert isinstance(error, JournalError)
    assert f"{data}" in str(error)
    assert "another journal" in str(error)
    assert sent == []
    with JournalFile(journal, readonly=True) as db, pytest.raises(JournalError) as caught:
        list(db.result_lines())
    assert "another journal" in str(caught.value)


def test_a_data_file_from_before_ids_is_read_and_appended_to(tmp_path: Path) -> None:
    """A journal whose ``-data`` file was made before files had an id line (no
    ``meta.data_id``) still resumes: its lines are read back, and new ones appended
    after them."""
    journal = asyncio.run(_run_unfinished(tmp_path))
    with JournalFile(journal) as db:
        db.record(None, [_final(0, b'{"a":1}'), _final(1, b'{"b":2}')])
    data = Path(f"{journal}-data")
    head, _, lines = data.read_bytes().partition(b"\n")
    data.write_bytes(lines)  # as an earlier aiobatch wrote it
    cut = len(head) + 1
    sql = sqlite3.connect(journal)
    with sql:
        sql.execute("UPDATE results SET data_at = data_at - ?", (cut,))
        sql.execute("UPDATE meta SET value = value - ? WHERE key = 'data_end'", (cut,))
        sql.execute("DELETE FROM meta WHERE key = 'data_id'")
    sql.close()
    with JournalFile(journal) as db:
        assert list(db.result_lines()) == [b'{"a":1}', b'{"b":2}']
        db.record(None, [_final(2, b'{"c":3}')])
        assert list(db.result_lines()) == [b'{"a":1}', b'{"b":2}', b'{"c":3}']
    assert data.read_bytes() == b'{"a":1}{"b":2}{"c":3}'


@pytest.mark.parametrize("system", ["short pwritev", "no pwritev"])
def test_a_chunk_is_written_whole_whatever_the_system_writes_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, system: str
) -> None:
    """A chunk's lines are all written at their offsets when a vectored write takes
    only part of them, or when the system has none."""
    if system == "no pwritev":
        monkeypatch.delattr(os, "pwritev", raising=False)
    else:
        real = os.pwritev

        def first_only(fd: int, buffers: list[bytes], offset: int) -> int:
            return real(fd, buffers[:1], offset)

        monkeypatch.setattr(os, "pwritev", first_only)
    long = b"L" * (WRITE_BYTES + 3)  # cut in two pieces
    data = ResultData(str(tmp_path / "run.journal"), readonly=False)
    try:
        data.write(0, [b"xyz"])
        data.write(3, [b"abc", b"defg", b"h", long, b"ij"])
        located = [(b"", 3, 3, 0), (b"", 6, 4, 1), (b"", 10, 1, 2), (b"", 11, len(long), 3)]
        located.append((b"", 11 + len(long), 2, 4))
        assert data.lines(located) == [b"abc", b"defg", b"h", long, b"ij"]
    finally:
        data.close()
    assert (tmp_path / "run.journal-data").read_bytes() == b"xyzabcdefgh" + long + b"ij"


def test_a_chunk_of_megabytes_goes_to_the_data_file_in_calls_under_2_mib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk with a 5 MiB line is written whole at its offsets, in calls under 2 MiB."""
    calls: list[int] = []
    real = os.pwritev

    def counted(fd: int, buffers: list[bytes], offset: int) -> int:
        calls.append(sum(map(len, buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", counted)
    lines = [b"a" * 5000, b"b" * (5 * 1024 * 1024 + 7), *(b"%06d" % n for n in range(3000))]
    data = ResultData(str(tmp_path / "run.journal"), readonly=False)
    try:
        data.write(0, lines)
        starts = accumulate(map(len, lines), initial=0)
        located = [
            (b"", at, len(line), n) for n, (line, at) in enumerate(zip(lines, starts, strict=False))
        ]
        assert data.lines(located) == lines
    finally:
        data.close()
    assert sum(calls) == sum(map(len, lines))
    assert max(calls) < 2 * 1024 * 1024


def test_the_output_file_goes_to_disk_in_calls_under_2_mib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An output page with a 3 MiB line is written whole, in calls under 2 MiB."""
    journal = asyncio.run(_run_unfinished(tmp_path))
    big = b'{"custom_id":"r-0","x":"' + b"y" * (3 * 1024 * 1024) + b'"}'
    with JournalFile(journal) as db:
        db.record(None, [_final(0, big), _final(1, b'{"b":1}')])
    sizes: list[int] = []

    class Counted(io.FileIO):
        """A file that keeps the size of each write the system is asked for."""

        def write(self, data: Any) -> int:
            sizes.append(len(memoryview(data).cast("B")))
            return super().write(data)

    def counted_open(path: str, mode: str = "r") -> io.BufferedWriter:
        assert mode == "wb"
        return io.BufferedWriter(Counted(path, "w"))

    monkeypatch.setattr("aiobatch._run._output.open", counted_open, raising=False)

    async def write() -> None:
        opened = SQLiteJournal(journal)
        try:
            await write_output(opened, str(tmp_path / "out.jsonl"), order="input")
        finally:
            await opened.close()

    asyncio.run(write())
    assert (tmp_path / "out.jsonl").read_bytes() == big + b'\n{"b":1}\n'
    assert sum(sizes) == len(big) + 9
    assert max(sizes) < 2 * 1024 * 1024
