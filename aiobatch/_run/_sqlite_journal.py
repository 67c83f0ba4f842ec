"""The run's :class:`~aiobatch._run._journal.Journal` on a SQLite file: :class:`SQLiteJournal`.

Its statements run in the event loop's thread (those a run passes ``background`` to:
planning's pages and intents, a new run's requests, a chunk of results, a shard's queued
lines, the output's lines, the report's figures and the close, in a worker thread, see
:meth:`SQLiteJournal.record`), through
:class:`~aiobatch._run._sqlite.JournalFile`, one coroutine at a time (an
:class:`asyncio.Lock`); the file's own lock (``JOURNAL.lock``) keeps it to one process.

Work on many rows never holds the loop long: it is cut into slices of at most
:data:`SLICE_ROWS` rows, and the loop runs other tasks between two slices. A slice of a
transaction (a shard's intent, a big settle) keeps the lock until the transaction ends,
so no other coroutine sees it half done; reads of many rows (shard files, the output)
are pages of their own, each a statement that is over before the loop moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .._aio import in_thread, wait_out
from ._journal import PENDING_PAGE
from ._records import (
    FinalResult,
    JournalCounts,
    Member,
    ModelTokens,
    NamedResult,
    NewShard,
    PendingRequest,
    QueuedLine,
    RequestGroup,
    RequestRow,
    ResultRow,
    RetryLine,
    RunMeta,
    Shard,
    ShardPlan,
)
from ._sqlite import JournalFile, SeqRun, seq_runs
from ._sqlite_db import Db, FileLock
from ._states import ShardState

__all__ = ["SLICE_ROWS", "SQLiteJournal"]

#: The most rows one statement batch writes before the loop runs other tasks.
SLICE_ROWS = 4096

#: The most requests a shard's intent moves into it before the loop runs other tasks
#: (each is rewritten, and moves between two indexes: 4096 held the loop 20-60 ms).
_QUEUE_ROWS = 2048

T = TypeVar("T")


def _slices(items: Sequence[T], size: int = SLICE_ROWS) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _run_slices(runs: list[SeqRun], size: int = SLICE_ROWS) -> Iterator[list[SeqRun]]:
    """Runs in groups of at most ``size`` requests (each run is at most ``size``)."""
    group: list[SeqRun] = []
    held = 0
    for run in runs:
        if group and held + run.size > size:
            yield group
            group, held = [], 0
        group.append(run)
        held += run.size
    if group:
        yield group


async def _turn() -> None:
    """Let the loop run other tasks."""
    await asyncio.sleep(0)


class _Worker:
    """The journal's one worker thread, started on first use.

    Its calls hold the journal's lock, so they never run two at a time: one thread is
    all they need. (The loop's default executor ran them in up to three threads in one
    collection, and each thread that allocates fills a malloc arena of its own: one
    thread saved 1-2.5 MB of a run's peak at 10,000 to 300,000 requests.)
    """

    __slots__ = ("_pool",)

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    async def run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function`` run in the worker thread, the loop running meanwhile; the
        caller holds the journal's lock, and keeps it until the thread is done even
        when it is cancelled (no other statement may use the connection meanwhile)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="aiobatch journal")
        future = in_thread(self._pool, functools.partial(function, *args, **kwargs), start_now=True)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await wait_out(future)
            raise

    def stop(self) -> None:
        """End the thread (at once: it has no call left, the lock is held)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class _SQLiteIngest:
    def __init__(
        self, file: JournalFile, db: Db, worker: _Worker, *, background: bool = False
    ) -> None:
        self._file = file
        self._db = db
        self._worker = worker
        self._background = background

    async def add(self, rows: Sequence[RequestRow]) -> bool:
        if not rows:
            return True
        if self._background:  # a spill of the page cache into the log held the loop ~45 ms
            return await self._worker.run(self._add, rows, one_statement=True)
        if len(rows) <= SLICE_ROWS:
            return self._add(rows)
        db = self._db
        db.execute("SAVEPOINT new_requests")
        try:
            for part in _slices(rows):
                self._file.add_requests(db, part)
                await _turn()
        except sqlite3.IntegrityError as exc:
            return self._refused(exc)
        db.execute("RELEASE new_requests")
        return True

    def _add(self, rows: Sequence[RequestRow], *, one_statement: bool = False) -> bool:
        """:meth:`add` in one statement batch (``one_statement``: in the worker thread,
        see :meth:`JournalFile.add_requests`)."""
        db = self._db
        db.execute("SAVEPOINT new_requests")
        try:
            self._file.add_requests(db, rows, one_statement=one_statement)
        except sqlite3.IntegrityError as exc:
            return self._refused(exc)
        db.execute("RELEASE new_requests")
        return True

    def _refused(self, exc: sqlite3.IntegrityError) -> bool:
        """A batch refused for a ``custom_id`` added before: none of it stays."""
        if "requests.custom_id" not in str(exc):
            raise exc
        self._db.execute("ROLLBACK TO new_requests")
        self._db.execute("RELEASE new_requests")
        return False

    async def taken(self, custom_ids: Sequence[str]) -> dict[str, int]:
        return self._file.taken(self._db, custom_ids)

    async def start(self, meta: RunMeta, shards: Sequence[NewShard] = ()) -> None:
        self._file.start(self._db, meta, shards)


class SQLiteJournal:
    """The :class:`~aiobatch._run._journal.Journal` of a SQLite file (the default).

    Its statements run in the event loop's thread, one coroutine at a time; work on
    many rows is sliced (see the module notes). The file's own ``fcntl`` lock
    (``JOURNAL.lock``) keeps it to one process.

    Args:
        path: the SQLite file, created when missing and ``create`` is set.
        create: make the file when it does not exist.
        busy_timeout: how long a write waits for another process's write to end.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, create: bool = False, busy_timeout: float = 10.0
    ) -> None:
        self.file = JournalFile(path, create=create, busy_timeout=busy_timeout)
        self.file.checkpoint_in_thread()  # no commit in the loop copies the log
        self._lock = FileLock(self.file.path)
        self._turn = asyncio.Lock()
        self._worker = _Worker()
        self._closed = False

    @property
    def location(self) -> str:
        return self.file.path

    async def close(self, *, background: bool = False) -> None:
        async with self._turn:  # after a chunk being written in a worker thread
            if self._closed:
                return  # (no thread started only to close a closed file)
            self._closed = True
            if background:  # SQLite copies the log into the file: 60-90 ms at 100,000 results
                try:
                    await self._worker.run(self.file.close)
                finally:
                    self._worker.stop()
            else:
                self._worker.stop()
                self.file.close()

    async def acquire(self) -> None:
        self._lock.acquire()

    async def release(self) -> None:
        self._lock.release()

    @contextlib.asynccontextmanager
    async def ingest(self, *, background: bool = False) -> AsyncIterator[_SQLiteIngest]:
        async with self._turn:
            with self.file.transaction() as db:
                yield _SQLiteIngest(self.file, db, self._worker, background=background)

    async def meta(self) -> RunMeta | None:
        async with self._turn:
            return self.file.meta()

    async def set_state(self, state: str, *, at: float, clear_cancel: bool = False) -> None:
        values: dict[str, str | None] = {"state": state, "updated_at": repr(at)}
        if clear_cancel:
            values["cancel_requested"] = None
        async with self._turn:
            self.file.set_meta(**values)

    async def touch(self, at: float) -> None:
        async with self._turn:
            self.file.set_meta(updated_at=repr(at))

    async def request_cancel(self, at: float) -> None:
        async with self._turn:
            self.file.set_meta(cancel_requested=repr(at))

    async def cancel_requested(self) -> bool:
        async with self._turn:
            return bool(self.file.get_meta("cancel_requested"))

    async def set_output(self, path: str) -> None:
        async with self._turn:
            self.file.set_meta(output_written=path)

    async def count_extra_uploads(self, deleted: int) -> None:
        async with self._turn:
            self.file.count_extra_uploads(deleted)

    async def pending_count(self) -> int:
        async with self._turn:
            return self.file.pending_count()

    async def has_fresh_pending(self) -> bool:
        async with self._turn:
            return self.file.has_fresh_pending()

    async def not_done_count(self) -> int:
        async with self._turn:
            return self.file.not_done_count()

    async def retrying_count(self) -> int:
        async with self._turn:
            return self.file.retrying_count()

    async def requeue_orphans(self) -> int:
        async with self._turn:
            return self.file.requeue_orphans()

    async def pending_groups(self) -> list[RequestGroup]:
        async with self._turn:
            return self.file.pending_groups()

    async def pending_requests(
        self, url: str, model: str | None, *, background: bool = False
    ) -> AsyncIterator[PendingRequest]:
        after = -1
        while True:
            async with self._turn:
                if background:
                    page = await self._worker.run(
                        self.file.pending_page, url, model, after=after, limit=PENDING_PAGE
                    )
                else:
                    page = self.file.pending_page(url, model, after=after, limit=PENDING_PAGE)
            if not page:
                return
            after = page[-1].seq
            for request in page:
                yield request
            await _turn()

    async def shard_lines(self, key: str) -> AsyncIterator[Sequence[bytes]]:
        after = -1
        while True:
            async with self._turn:
                page = self.file.shard_page(key, after=after)
            if not page:
                return
            after = page.last
            yield page.lines
            await _turn()

    async def members(
        self, key: str, custom_ids: Sequence[str], *, background: bool = False
    ) -> dict[str, Member]:
        async with self._turn:
            if background:  # 2,000 ids of a chunk: 3 index look-ups each, ~20-40 ms
                return await self._worker.run(self.file.members, key, custom_ids)
            return self.file.members(key, custom_ids)

    async def queued_at(self, key: str, *, background: bool = False) -> dict[int, QueuedLine]:
        async with self._turn:
            if background:  # a walk over the shard: 44-50 ms at 50,000 without results
                return await self._worker.run(self.file.queued_at, key)
            return self.file.queued_at(key)

    async def add_shard(
        self,
        key: str,
        plan: ShardPlan,
        *,
        planned_at: float,
        max_batches: int | None = None,
        background: bool = False,
    ) -> Shard:
        if background:  # its commit alone held the loop 15-60 ms at 50,000 requests
            async with self._turn:
                return await self._worker.run(
                    self.file.add_shard, key, plan, planned_at=planned_at, max_batches=max_batches
                )
        slices = list(_run_slices(seq_runs(plan.seqs, most=_QUEUE_ROWS), _QUEUE_ROWS))
        async with self._turn:
            with self.file.transaction() as db:
                for number, part in enumerate(slices):
                    if number:
                        await _turn()  # the lock keeps the transaction to this coroutine
                    self.file.queue_runs(db, key, part)
                if len(slices) > 1:
                    await _turn()  # the shard's row reads every request of it
                self.file.put_shard(db, key, plan, planned_at=planned_at, max_batches=max_batches)
            return self.file.shard(key)

    async def shard(self, key: str) -> Shard:
        async with self._turn:
            return self.file.shard(key)

    async def shards(self, *states: ShardState) -> list[Shard]:
        async with self._turn:
            return self.file.shards(*states)

    async def shard_count(self) -> int:
        async with self._turn:
            return self.file.shard_count()

    async def move(self, key: str, to: ShardState, **fields: Any) -> Shard:
        async with self._turn:
            return self.file.move(key, to, **fields)

    async def update(self, key: str, **fields: Any) -> None:
        async with self._turn:
            self.file.update(key, **fields)

    async def _record(
        self, db: Db, finals: Sequence[FinalResult], retries: Sequence[RetryLine]
    ) -> None:
        """Final results and retries in slices, inside the caller's transaction (the
        finals first: a request with a result never goes back to pending)."""
        first = True
        for part in _slices(finals):
            if not first:
                await _turn()
            self.file.record_rows(db, part, ())
            first = False
        for retry_part in _slices(retries):
            if not first:
                await _turn()
            self.file.record_rows(db, (), retry_part)
            first = False

    async def record(
        self,
        key: str | None,
        finals: Sequence[FinalResult],
        retries: Sequence[RetryLine] = (),
        *,
        background: bool = False,
        **fields: Any,
    ) -> None:
        async with self._turn:
            if background:
                await self._worker.run(self.file.record, key, finals, retries, **fields)
                return
            with self.file.transaction() as db:
                await self._record(db, finals, retries)
                if key is not None and fields:
                    self.file.set_fields(db, key, fields)

    async def record_named(
        self,
        key: str,
        batch_id: str | None,
        lines: Sequence[NamedResult],
        *,
        background: bool = False,
        **fields: Any,
    ) -> bool:
        # One statement batch: in the loop at most a slice of rows (a bigger chunk is
        # declined, and recorded by record() in slices); in the worker thread any.
        if not background and len(lines) > SLICE_ROWS:
            return False
        # Made before the turn: meanwhile the thread may write the chunk before.
        text = self.file.named_json(lines) if background else None
        async with self._turn:
            if background:
                return await self._worker.run(
                    self.file.record_named, key, batch_id, lines, text=text, **fields
                )
            return self.file.record_named(key, batch_id, lines, **fields)

    async def settle(
        self,
        key: str,
        finals: Sequence[FinalResult],
        retries: Sequence[RetryLine],
        **fields: Any,
    ) -> Shard:
        async with self._turn:
            with self.file.transaction() as db:
                await self._record(db, finals, retries)
                self.file.move_in(db, key, ShardState.COLLECTED, fields)
            return self.file.shard(key)

    async def result_rows(self, *, order: str, after: int, limit: int) -> list[ResultRow]:
        async with self._turn:
            return self.file.result_rows(order=order, after=after, limit=limit)

    async def result_lines(
        self, *, order: str, background: bool = False
    ) -> AsyncIterator[Iterable[bytes]]:
        after = -1
        while True:
            async with self._turn:
                if background:  # 1024 lines held the loop 30-60 ms on a busy machine
                    page = await self._worker.run(self.file.result_page, order=order, after=after)
                else:
                    page = self.file.result_page(order=order, after=after)
            if not page:
                return
            after = page.last
            yield page.lines
            await _turn()

    async def tokens_by_model(self, *, background: bool = False) -> dict[str, ModelTokens]:
        async with self._turn:
            if background:  # a pass over every result: ~60 ms at 100,000
                return await self._worker.run(self.file.tokens_by_model)
            return self.file.tokens_by_model()

    async def counts(self, *, background: bool = False) -> JournalCounts:
        async with self._turn:
            if background:  # a pass over every result: ~60 ms at 100,000
                return await self._worker.run(self.file.counts)
            return self.file.counts()

    async def open_batches(self) -> list[Shard]:
        async with self._turn:
            return self.file.open_batches()
