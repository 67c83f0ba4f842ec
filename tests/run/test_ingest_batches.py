"""A new run's ingest, a batch of lines at a time: a batch goes into the journal (in its
worker thread) while the next one is inspected, and ids used again are found across
batches on either clock, naming the line of their first use."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import chat_line, write_jsonl

from aiobatch import RunConfig
from aiobatch._clock import Clock, SystemClock
from aiobatch._run._ingest import ingest
from aiobatch._run._journal import Ingest
from aiobatch._run._preflight import DEFAULT_MAX_LINE_BYTES
from aiobatch._run._records import RequestRow
from aiobatch._run._sqlite_journal import SQLiteJournal
from aiobatch.errors import JournalError, PreflightError
from aiobatch.testing import VirtualClock


class _Inspections:
    """A token estimator that counts the lines it is asked about (each inspected line)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, body: Mapping[str, Any]) -> int:
        self.count += 1
        return 1


class _Sink:
    """An ingest sink in front of the journal's own (what it does not change, it passes on)."""

    def __init__(self, sink: Ingest) -> None:
        self._sink = sink

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sink, name)


class _WatchedIngest(_Sink):
    """An ingest sink that notes, for each batch added, how many lines had been
    inspected when the add began and when it ended."""

    def __init__(self, sink: Ingest, inspections: _Inspections) -> None:
        super().__init__(sink)
        self._inspections = inspections
        self.adds: list[tuple[int, int]] = []

    async def add(self, rows: Sequence[RequestRow]) -> bool:
        began = self._inspections.count
        added = await self._sink.add(rows)
        self.adds.append((began, self._inspections.count))
        return added


class _FailingIngest(_Sink):
    """An ingest sink that fails to add any batch."""

    async def add(self, rows: Sequence[RequestRow]) -> bool:
        raise JournalError("the disk is full")


class _SinkJournal(SQLiteJournal):
    """The SQLite journal, its ingest sinks put behind ``sink`` (each kept in ``sinks``)."""

    def __init__(self, path: Path, sink: Callable[[Ingest], _Sink]) -> None:
        super().__init__(path, create=True)
        self._sink = sink
        self.sinks: list[_Sink] = []

    @contextlib.asynccontextmanager
    async def ingest(self, *, background: bool = False) -> AsyncIterator[Any]:
        async with super().ingest(background=background) as sink:
            self.sinks.append(self._sink(sink))
            yield self.sinks[-1]


async def test_on_the_real_clock_a_batch_goes_in_while_the_next_is_inspected(
    tmp_path: Path,
) -> None:
    """On the real clock, while each batch but the last goes into the journal, the lines
    of the next batch are inspected; every request is in the journal after."""
    source = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"r-{n}") for n in range(1700)])
    inspections = _Inspections()
    journal = _SinkJournal(tmp_path / "run.journal", lambda sink: _WatchedIngest(sink, inspections))
    await ingest(
        journal,
        str(source),
        config=RunConfig(token_estimator=inspections),
        clock=SystemClock(),
        max_line_bytes=DEFAULT_MAX_LINE_BYTES,
    )
    (watched,) = journal.sinks
    assert isinstance(watched, _WatchedIngest)
    adds = watched.adds
    assert [began for began, _ended in adds] == [500, 1000, 1500, 1700]
    assert [ended - began for began, ended in adds[:-1]] == [500, 500, 200]
    assert await journal.pending_count() == 1700
    await journal.close()


@pytest.mark.parametrize("clock", [VirtualClock(), SystemClock()], ids=["virtual", "real"])
async def test_ids_used_again_across_batches_name_their_first_use(
    clock: Clock, tmp_path: Path
) -> None:
    """Ids used again in the next batch (right after their first use, or by the line
    after a batch was just added) or far later, of accepted lines or of a line rejected
    for another reason, are duplicates naming the line of their first use; the other
    lines are in the journal, in order."""
    lines: list[Mapping[str, Any] | str] = [chat_line(f"r-{n}") for n in range(1600)]
    lines[1] = chat_line("s", stream=True)  # line 2: rejected, still holds "s"
    lines[500] = chat_line("r-499", "again")  # line 501: line 500 has it
    lines[1000] = chat_line("s", "again")  # line 1001: line 2 has it
    lines[1001] = chat_line("r-998", "again")  # line 1002: line 999 has it
    lines[1500] = chat_line("r-1499", "again")  # line 1501: line 1500 has it
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    journal = SQLiteJournal(tmp_path / "run.journal", create=True)
    with pytest.raises(PreflightError) as info:
        await ingest(
            journal,
            str(source),
            config=RunConfig(),
            clock=clock,
            max_line_bytes=DEFAULT_MAX_LINE_BYTES,
        )
    found = [(p.line, p.custom_id, p.code, p.message) for p in info.value.problems]
    assert found == [
        (2, "s", "stream_not_supported", "streaming is not supported in batches (stream=true)"),
        (501, "r-499", "duplicate_custom_id", "duplicate: line 500 already uses this custom_id"),
        (1001, "s", "duplicate_custom_id", "duplicate: line 2 already uses this custom_id"),
        (1002, "r-998", "duplicate_custom_id", "duplicate: line 999 already uses this custom_id"),
        (1501, "r-1499", "duplicate_custom_id", "duplicate: line 1500 already uses this custom_id"),
    ]
    assert await journal.meta() is None  # nothing of the run was kept
    await journal.close()

    kept = SQLiteJournal(tmp_path / "kept.journal", create=True)
    await ingest(
        kept,
        str(source),
        config=RunConfig(skip_invalid=True),
        clock=clock,
        max_line_bytes=DEFAULT_MAX_LINE_BYTES,
    )
    await kept.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "kept.journal")) as db:
        rows = db.execute("SELECT custom_id FROM requests ORDER BY seq")
        ids = [str(cid) for (cid,) in rows]
    skipped = {1, 500, 1000, 1001, 1500}
    assert ids == [f"r-{n}" for n in range(1600) if n not in skipped]


class _Broken(Exception):
    """The source's own error."""


async def _failing_source(lines: int, failure: BaseException | None) -> AsyncIterator[Any]:
    """``lines`` chat requests, then ``failure`` raised (None: a cancel of the task that
    reads it)."""
    for n in range(lines):
        yield chat_line(f"r-{n}")
    if failure is None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(0)
    else:
        raise failure


@pytest.mark.parametrize("failure", [_Broken("the source broke"), None], ids=["error", "cancel"])
async def test_an_ingest_that_fails_with_a_batch_going_in_keeps_nothing(
    failure: BaseException | None, tmp_path: Path
) -> None:
    """A source that fails (or a cancel) while a batch goes in on the real clock ends the
    ingest with that failure, keeps no request, and the journal takes a new ingest after."""
    journal = SQLiteJournal(tmp_path / "run.journal", create=True)
    expected: type[BaseException] = _Broken if failure is not None else asyncio.CancelledError
    with pytest.raises(expected):
        await ingest(
            journal,
            _failing_source(700, failure),
            config=RunConfig(),
            clock=SystemClock(),
            max_line_bytes=DEFAULT_MAX_LINE_BYTES,
        )
    assert await journal.meta() is None
    assert await journal.pending_count() == 0
    await ingest(
        journal,
        [chat_line(f"r-{n}") for n in range(3)],
        config=RunConfig(),
        clock=SystemClock(),
        max_line_bytes=DEFAULT_MAX_LINE_BYTES,
    )
    assert await journal.pending_count() == 3
    await journal.close()


async def test_a_batch_that_fails_to_go_in_stops_the_reading_at_the_next_line(
    tmp_path: Path,
) -> None:
    """When a batch fails to go into the journal, the ingest raises that error at the
    next line it reads, not after a whole batch more."""
    pulled = 0

    async def source() -> AsyncIterator[Any]:
        nonlocal pulled
        for n in range(5000):
            pulled += 1
            yield chat_line(f"r-{n}")
            await asyncio.sleep(0)  # a source that waits now and then

    journal = _SinkJournal(tmp_path / "run.journal", _FailingIngest)
    with pytest.raises(JournalError, match="the disk is full"):
        await ingest(
            journal,
            source(),
            config=RunConfig(),
            clock=VirtualClock(),
            max_line_bytes=DEFAULT_MAX_LINE_BYTES,
        )
    assert pulled == 501
    assert await journal.meta() is None
    await journal.close()
