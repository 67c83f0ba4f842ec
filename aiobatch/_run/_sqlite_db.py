"""The SQLite journal's connection: failures of the file as :class:`JournalError`, what a
damaged file still tells, and the file lock that keeps a journal to one process.

A failure of the file (damaged pages, a ``-wal`` file cut short, a full disk, a lock
held too long) shows as a :class:`~aiobatch.errors.JournalError` naming the file,
wherever it shows: on opening, reading or writing. A damaged file's error lists the
batches the run had created, as far as the file can still be read, and what the user
can do.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

import attrs

from ..errors import JournalError
from ._journal import CHUNK_BYTES

__all__ = [
    "PAGE_BYTES",
    "PAGE_LINES",
    "Checkpointer",
    "Db",
    "FileLock",
    "Page",
    "SeqRun",
    "journal_failure",
    "remove_journal",
    "run_is_live",
    "seq_runs",
]


#: Errors of SQLite that are bugs in the statements, not failures of the file.
_NOT_THE_FILE = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)

#: SQLite's primary result codes: the file is damaged, not a database, or busy.
_CORRUPT, _NOTADB, _BUSY, _LOCKED = 11, 26, 5, 6


def _code(exc: sqlite3.Error) -> int | None:
    """SQLite's primary result code of an error (from its text before Python 3.11)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    text = str(exc)
    for fragment, value in (
        ("malformed", _CORRUPT),
        ("not a database", _NOTADB),
        ("is locked", _BUSY),
    ):
        if fragment in text:
            return value
    return None


def journal_failure(path: str, exc: sqlite3.Error) -> JournalError:
    """The JournalError for a failure of the journal file at ``path``: a damaged file
    says so, with what can still be read of it and what to do (see :func:`damaged`)."""
    code = _code(exc)
    if code == _CORRUPT:
        return damaged(path, exc)
    if code == _NOTADB:
        return JournalError(
            f"{path} is not an aiobatch journal, or its first page is damaged ({exc})"
        )
    if code in (_BUSY, _LOCKED):
        return JournalError(
            f"{path} is busy ({exc}): a run is writing it (checking its input takes a "
            "while); try again in a moment"
        )
    return JournalError(f"{path}: the journal cannot be read or written: {exc}")


class _Rows:
    """A cursor of the journal's connection (see :class:`Db`)."""

    __slots__ = ("_cursor", "_db")

    def __init__(self, cursor: sqlite3.Cursor, db: Db) -> None:
        self._cursor = cursor
        self._db = db

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    def fetchone(self) -> Any:
        with self._db.failures():
            return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        with self._db.failures():
            return self._cursor.fetchall()

    def close(self) -> None:
        """Done with the statement (before all its rows were read)."""
        self._cursor.close()

    def __iter__(self) -> Iterator[Any]:
        with self._db.failures():
            yield from self._cursor


class Db:
    """The journal's SQLite connection, as the journal's methods use it: a failure of the
    file (damaged pages, a ``-wal`` file cut short, a full disk, a lock held too long)
    raises :class:`JournalError` naming the file, wherever it shows, on opening, reading
    or writing."""

    __slots__ = ("_connection", "path")

    def __init__(self, connection: sqlite3.Connection, path: str) -> None:
        self._connection = connection
        self.path = path

    @contextlib.contextmanager
    def failures(self) -> Iterator[None]:
        """Turn an error of the file into JournalError (a bug in a statement stays
        what it is)."""
        try:
            yield
        except _NOT_THE_FILE:
            raise
        except sqlite3.DatabaseError as exc:
            raise journal_failure(self.path, exc) from exc

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> _Rows:
        with self.failures():
            return _Rows(self._connection.execute(sql, parameters), self)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> _Rows:
        with self.failures():
            return _Rows(self._connection.executemany(sql, rows), self)

    def executescript(self, script: str) -> None:
        with self.failures():
            self._connection.executescript(script)

    def page(self, query: str, values: Sequence[Any], size: int) -> Page:
        """The rows ``(cursor, data)`` of ``query`` until they make ``size`` bytes (the
        statement is done with when this returns)."""
        rows = self.execute(query, values)
        found: list[bytes] = []
        held = 0
        last = -1
        try:
            for cursor, data in rows:
                found.append(bytes(data))
                last = int(cursor)
                held += len(data) + 1
                if held >= size:
                    break
        finally:
            rows.close()
        return Page(found, last)

    def is_journal(self) -> bool:
        """The open file is empty, or holds an aiobatch ``meta`` table."""
        tables = {
            str(name)
            for (name,) in self.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if not tables:
            return True
        if "meta" not in tables:
            return False
        row = self.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return row is not None

    def rollback(self) -> None:
        """End the open transaction without its changes; quietly, as it runs while
        another error is on its way (SQLite may have rolled back already)."""
        with contextlib.suppress(sqlite3.Error):
            self._connection.execute("ROLLBACK")

    def close(self) -> None:
        self._connection.close()


class Checkpointer:
    """Copies a journal's log (its ``-wal`` file) into the file from a thread and a
    connection of its own, so that a commit never waits for that copy. (SQLite's own
    checkpoint runs in the committing thread, the event loop's for most statements: it
    copied up to ~40 MB of log and synced the file there, and all of a big ingest's at
    its commit.) A copy starts after a commit, at most one every ``every`` seconds; it
    takes what no reader still needs (``PASSIVE``), and a failed copy is left to the
    next one (the run's own connection meets any failure of the file itself)."""

    def __init__(self, path: str, *, every: float) -> None:
        self._connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._every = every
        self._poked = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"aiobatch checkpoint {os.path.basename(path)}", daemon=True
        )
        self._thread.start()

    def poke(self) -> None:
        """A commit wrote to the log."""
        self._poked.set()

    def stop(self) -> None:
        """End the thread (after the copy under way) and close its connection."""
        self._stopped.set()
        self._poked.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while True:
                self._poked.wait()
                if self._stopped.is_set():
                    return
                self._poked.clear()
                with contextlib.suppress(sqlite3.Error):
                    self._connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                if self._stopped.wait(self._every):
                    return
        finally:
            self._connection.close()


#: Unreadable shard rows in a row after which the salvage stops looking for more.
_SALVAGE_MISSES = 20_000


def damaged(path: str, exc: sqlite3.Error) -> JournalError:
    """The JournalError for a damaged journal: what is wrong, the batches the run had
    created as far as the file can still be read, and what the user can do."""
    run_id, batches, unsent, complete = _salvage(path)
    parts = [
        f"{path} is damaged ({exc}): aiobatch cannot read it reliably, so it will not "
        "resume this run; keep a copy of the file."
    ]
    who = f"run {run_id}" if run_id else "the run"
    if batches:
        listed = ", ".join(f"{bid} ({status})" for bid, status in batches)
        parts.append(f"What can still be read of it: {who} had created these batches: {listed}.")
    else:
        parts.append(f"No batch of {who} can be read from it.")
    if not complete:
        parts.append("Some of its records could not be read: there may be more batches.")
    if unsent:
        parts.append(
            f"{unsent} create(s) had been sent whose batch ids were not recorded yet "
            "(their batches, if made, carry the metadata aiobatch_shard=<shard>)."
        )
    tag = (
        f"every batch of this run carries the metadata aiobatch_run={run_id}"
        if run_id
        else "the batches aiobatch makes carry their run's id in the metadata aiobatch_run"
    )
    parts.append(
        "A new journal does not adopt these batches: with your provider's API or console, "
        "cancel those still running and download the output files of those that finished "
        f"({tag}). Then move the damaged "
        "journal away and start the run again: it makes a new journal and submits every "
        "request again."
    )
    return JournalError(" ".join(parts))


def _salvage(path: str) -> tuple[str | None, list[tuple[str, str]], int, bool]:
    """What a damaged journal still tells, read row by row, skipping what cannot be
    read: the run id, (batch id, last status) of each shard that has a batch, how many
    shards were creating without a batch id, and whether every shard row was read."""
    try:
        db = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True)
    except sqlite3.Error:
        return None, [], 0, False
    try:
        run_id: str | None = None
        with contextlib.suppress(sqlite3.Error):
            row = db.execute("SELECT value FROM meta WHERE key = 'run_id'").fetchone()
            run_id = None if row is None else str(row[0])
        batches: list[tuple[str, str]] = []
        unsent = 0
        complete = True
        try:
            top = db.execute("SELECT max(rowid) FROM shards").fetchone()[0]
        except sqlite3.Error:
            top, complete = None, False
        start, misses = 1, 0  # the first rowid not looked at yet
        while top is None or start <= int(top):
            try:
                row = db.execute(
                    "SELECT rowid, batch_id, status, state FROM shards WHERE rowid >= ? "
                    "ORDER BY rowid LIMIT 1",
                    (start,),
                ).fetchone()
            except sqlite3.Error:
                complete = False
                start, misses = start + 1, misses + 1
                if misses > _SALVAGE_MISSES:
                    break
                continue
            if row is None:
                break
            rowid, batch_id, status, state = row
            start, misses = int(rowid) + 1, 0
            if batch_id is not None:
                batches.append((str(batch_id), str(status or state)))
            elif state == "creating":
                unsent += 1
        return run_id, batches, unsent, complete
    except sqlite3.Error:
        return None, [], 0, False
    finally:
        db.close()


class FileLock:
    """An exclusive lock on a journal, held by the process that runs it (released by
    the OS when the process dies, however it dies)."""

    def __init__(self, path: str) -> None:
        self._path = path + ".lock"
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        fh = open(self._path, "a+")  # noqa: SIM115 - held for the run's lifetime
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            fh.close()
            raise JournalError(
                f"the journal {self._path[:-5]} is in use by {owner}; one run at a time"
            ) from exc
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def run_is_live(journal_path: str | os.PathLike[str]) -> bool:
    """Whether a process holds the journal (runs it) right now."""
    lock = FileLock(os.fspath(journal_path))
    try:
        lock.acquire()
    except JournalError:
        return True
    lock.release()
    return False


def remove_journal(path: str) -> None:
    """Delete a journal file and its side files (a run refused before it started)."""
    for suffix in ("", "-wal", "-shm", "-data", ".lock"):
        with contextlib.suppress(OSError):
            os.unlink(path + suffix)


#: Lines read from the journal at a time (shard files, the output file), at most (each
#: page holds the loop: 4096 lines of the output held it 150-200 ms on a busy machine)...
PAGE_LINES = 1024
#: ... and no more once they make this many bytes.
PAGE_BYTES = CHUNK_BYTES


@attrs.frozen(slots=True)
class Page:
    """Lines read from the journal, and the cursor of the last (-1: none read)."""

    lines: list[bytes]
    last: int

    def __bool__(self) -> bool:
        return bool(self.lines)


@attrs.frozen(slots=True)
class SeqRun:
    """Consecutive requests of a shard plan: ``first`` to ``last`` (their ``seq``), the
    first at line ``pos`` of the shard's file."""

    first: int
    last: int
    pos: int

    @property
    def size(self) -> int:
        return self.last - self.first + 1


def seq_runs(seqs: Sequence[int], *, most: int | None = None) -> list[SeqRun]:
    """The runs of consecutive ``seqs`` (in input order), each of at most ``most``."""
    runs: list[SeqRun] = []
    start = 0
    count = len(seqs)
    while start < count:
        limit = count if most is None else min(count, start + most)
        first = seqs[start]
        if seqs[limit - 1] - first == limit - 1 - start:
            end = limit - 1  # the seqs rise strictly: the whole window is one run
        else:
            end = start
            while end + 1 < limit and seqs[end + 1] == first + (end + 1 - start):
                end += 1
        runs.append(SeqRun(first, seqs[end], start + 1))
        start = end + 1
    return runs
