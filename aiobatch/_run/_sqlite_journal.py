"""The run's :class:`~aiobatch._run._journal.Journal` on a SQLite file: :class:`SQLiteJournal`.

Its statements are short and run in the event loop's thread, through
:class:`~aiobatch._run._sqlite.JournalFile`; the file's own lock (``JOURNAL.lock``) keeps
it to one process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

from ._records import (
    FinalResult,
    JournalCounts,
    Member,
    PreparedRequest,
    QueuedLine,
    RequestGroup,
    ResultRow,
    RetryLine,
    RunMeta,
    Shard,
    ShardPlan,
)
from ._sqlite import JournalFile
from ._sqlite_db import Db, FileLock
from ._states import ShardState

__all__ = ["SQLiteJournal"]


def _chunks(lines: Iterator[bytes], size: int = 2000) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _SQLiteIngest:
    def __init__(self, file: JournalFile, db: Db) -> None:
        self._file = file
        self._db = db

    async def add(self, requests: Sequence[PreparedRequest]) -> None:
        self._file.add_requests(self._db, requests)

    async def start(self, meta: RunMeta) -> None:
        self._file.start(self._db, meta)


class SQLiteJournal:
    """The :class:`~aiobatch._run._journal.Journal` of a SQLite file (the default).

    Its statements are short and run in the event loop's thread; the file's own
    ``fcntl`` lock (``JOURNAL.lock``) keeps it to one process.

    Args:
        path: the SQLite file, created when missing and ``create`` is set.
        create: make the file when it does not exist.
        busy_timeout: how long a write waits for another process's write to end.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, create: bool = False, busy_timeout: float = 10.0
    ) -> None:
        self.file = JournalFile(path, create=create, busy_timeout=busy_timeout)
        self._lock = FileLock(self.file.path)

    @property
    def location(self) -> str:
        return self.file.path

    async def close(self) -> None:
        self.file.close()

    async def acquire(self) -> None:
        self._lock.acquire()

    async def release(self) -> None:
        self._lock.release()

    @contextlib.asynccontextmanager
    async def ingest(self) -> AsyncIterator[_SQLiteIngest]:
        with self.file.transaction() as db:
            yield _SQLiteIngest(self.file, db)

    async def meta(self) -> RunMeta | None:
        return self.file.meta()

    async def set_state(self, state: str, *, at: float, clear_cancel: bool = False) -> None:
        values: dict[str, str | None] = {"state": state, "updated_at": repr(at)}
        if clear_cancel:
            values["cancel_requested"] = None
        self.file.set_meta(**values)

    async def touch(self, at: float) -> None:
        self.file.set_meta(updated_at=repr(at))

    async def request_cancel(self, at: float) -> None:
        self.file.set_meta(cancel_requested=repr(at))

    async def cancel_requested(self) -> bool:
        return bool(self.file.get_meta("cancel_requested"))

    async def set_output(self, path: str) -> None:
        self.file.set_meta(output_written=path)

    async def count_extra_uploads(self, deleted: int) -> None:
        self.file.count_extra_uploads(deleted)

    async def pending_count(self) -> int:
        return self.file.pending_count()

    async def has_fresh_pending(self) -> bool:
        return self.file.has_fresh_pending()

    async def not_done_count(self) -> int:
        return self.file.not_done_count()

    async def retrying_count(self) -> int:
        return self.file.retrying_count()

    async def requeue_orphans(self) -> int:
        return self.file.requeue_orphans()

    async def pending_groups(self) -> list[RequestGroup]:
        return self.file.pending_groups()

    async def pending_requests(self, url: str, model: str | None) -> AsyncIterator[PreparedRequest]:
        for request in self.file.pending_requests(url, model):
            yield request

    async def shard_lines(self, key: str) -> AsyncIterator[Sequence[bytes]]:
        for chunk in _chunks(self.file.shard_lines(key)):
            yield chunk

    async def members(self, key: str) -> dict[str, Member]:
        return self.file.members(key)

    async def queued_at(self, key: str) -> dict[int, QueuedLine]:
        return self.file.queued_at(key)

    async def add_shard(
        self, key: str, plan: ShardPlan, *, planned_at: float, max_batches: int | None = None
    ) -> Shard:
        return self.file.add_shard(key, plan, planned_at=planned_at, max_batches=max_batches)

    async def shard(self, key: str) -> Shard:
        return self.file.shard(key)

    async def shards(self, *states: ShardState) -> list[Shard]:
        return self.file.shards(*states)

    async def shard_count(self) -> int:
        return self.file.shard_count()

    async def move(self, key: str, to: ShardState, **fields: Any) -> Shard:
        return self.file.move(key, to, **fields)

    async def update(self, key: str, **fields: Any) -> None:
        self.file.update(key, **fields)

    async def record(
        self,
        key: str | None,
        finals: Sequence[FinalResult],
        retries: Sequence[RetryLine] = (),
        **fields: Any,
    ) -> None:
        self.file.record(key, finals, retries, **fields)

    async def settle(
        self,
        key: str,
        finals: Sequence[FinalResult],
        retries: Sequence[RetryLine],
        **fields: Any,
    ) -> Shard:
        return self.file.settle(key, finals, retries, **fields)

    async def result_rows(self, *, order: str, after: int, limit: int) -> list[ResultRow]:
        return self.file.result_rows(order=order, after=after, limit=limit)

    async def result_lines(self, *, order: str) -> AsyncIterator[Iterable[bytes]]:
        for chunk in _chunks(self.file.result_lines(order=order), 8192):
            yield chunk

    async def tokens_by_model(self) -> dict[str, tuple[int, int]]:
        return self.file.tokens_by_model()

    async def counts(self) -> JournalCounts:
        return self.file.counts()

    async def open_batches(self) -> list[Shard]:
        return self.file.open_batches()
