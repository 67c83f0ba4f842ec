"""The run journal: a SQLite file that makes a run resumable after a crash.

Everything a run knows is here, written before it acts on it:

- ``meta``: the run id, the input's fingerprint, the run's state, a cancel flag that
  ``aiobatch cancel`` sets from another process.
- ``requests``: every accepted request line (its bytes, to build shard files and retry
  rounds from), its state (``pending``: not in any open shard; ``queued``: in the open
  shard ``shard``; ``done``: it has its final result), its retryable failures so far
  (``attempts``) and the last of them (``last_error``), and how many shards (batches,
  not counting ``token_limit_exceeded`` re-creates) it was put in (``batches``).
- ``shards``: one row per batch-to-be: the intent (its requests) is recorded before its
  file is uploaded; then its file id, its create key (before the create is sent), its
  batch id, its status, and how many lines of its output and error files are collected.
- ``results``: the final result line of each request, at most one (the primary key is the
  request's position); the row order is the completion order.

The run writes through one connection from the event loop's thread; each write is a
short transaction (``BEGIN IMMEDIATE``), so another process (``aiobatch status`` or
``aiobatch cancel``) can read and flag the journal while a run goes on. WAL mode with
``synchronous=NORMAL`` keeps every committed transaction through a killed process (only a
power loss may lose the last ones).

A failure of the file, wherever it shows (opening, reading, writing), is a
:class:`JournalError` naming it; a damaged file (malformed pages, a ``-wal`` file cut
short) also lists the batches that can still be read from it, and what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from ._shard import ShardItem
from .errors import JournalError

__all__ = ["SCHEMA_VERSION", "Journal", "ShardRow"]

SCHEMA_VERSION = 5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY,
    custom_id TEXT NOT NULL UNIQUE,
    line INTEGER NOT NULL,
    url TEXT NOT NULL,
    model TEXT,
    tokens INTEGER NOT NULL,
    inputs INTEGER NOT NULL DEFAULT 1,
    data BLOB NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    shard TEXT,
    pos INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error BLOB,
    batches INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS requests_pending ON requests (url, model, seq)
    WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS requests_shard ON requests (shard, seq);
CREATE TABLE IF NOT EXISTS shards (
    key TEXT PRIMARY KEY,
    round INTEGER NOT NULL,
    url TEXT NOT NULL,
    model TEXT,
    lines INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    state TEXT NOT NULL,
    planned_at REAL NOT NULL,
    upload_started_at REAL,
    file_id TEXT,
    creates INTEGER NOT NULL DEFAULT 0,
    create_key TEXT,
    create_started_at REAL,
    not_before REAL,
    batch_id TEXT,
    status TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    output_done INTEGER NOT NULL DEFAULT 0,
    error_done INTEGER NOT NULL DEFAULT 0,
    cancel_reason TEXT,
    history TEXT NOT NULL DEFAULT '',
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    note TEXT
);
CREATE INDEX IF NOT EXISTS shards_state ON shards (state);
CREATE TABLE IF NOT EXISTS results (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    seq INTEGER NOT NULL UNIQUE REFERENCES requests (seq),
    kind TEXT NOT NULL,
    code TEXT,
    shard TEXT,
    batch_id TEXT,
    attempts INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    data BLOB NOT NULL
);
"""

#: Shard states, in order. ``planned``: the intent (its requests) is recorded;
#: ``uploaded``: its file id is known; ``creating``: the create key is recorded and a
#: create may have been sent; ``open``: its batch id is known and it is being tracked;
#: ``collecting``: the batch ended and its files are being read; ``collected``: every one
#: of its requests has a final result or is pending for a retry round.
SHARD_STATES = ("planned", "uploaded", "creating", "open", "collecting", "collected")

_SHARD_COLUMNS = (
    "key",
    "round",
    "url",
    "model",
    "lines",
    "bytes",
    "tokens",
    "state",
    "planned_at",
    "upload_started_at",
    "file_id",
    "creates",
    "create_key",
    "create_started_at",
    "not_before",
    "batch_id",
    "status",
    "output_file_id",
    "error_file_id",
    "output_done",
    "error_done",
    "cancel_reason",
    "history",
    "input_tokens",
    "output_tokens",
    "note",
)


class ShardRow:
    """One row of ``shards`` (a plain record; see :data:`SHARD_STATES`)."""

    __slots__ = _SHARD_COLUMNS

    key: str
    round: int
    url: str
    model: str | None
    lines: int
    bytes: int
    tokens: int
    state: str
    planned_at: float
    upload_started_at: float | None
    file_id: str | None
    creates: int
    create_key: str | None
    create_started_at: float | None
    not_before: float | None
    batch_id: str | None
    status: str | None
    output_file_id: str | None
    error_file_id: str | None
    output_done: int
    error_done: int
    cancel_reason: str | None
    history: str
    input_tokens: int
    output_tokens: int
    note: str | None

    def __init__(self, row: Sequence[Any]) -> None:
        for name, value in zip(_SHARD_COLUMNS, row, strict=True):
            setattr(self, name, value)

    def __repr__(self) -> str:
        return f"ShardRow(key={self.key!r}, state={self.state!r}, batch_id={self.batch_id!r})"


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
    """A cursor of the journal's connection (see :class:`_Db`)."""

    __slots__ = ("_cursor", "_db")

    def __init__(self, cursor: sqlite3.Cursor, db: _Db) -> None:
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

    def __iter__(self) -> Iterator[Any]:
        with self._db.failures():
            yield from self._cursor


class _Db:
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

    def rollback(self) -> None:
        """End the open transaction without its changes; quietly, as it runs while
        another error is on its way (SQLite may have rolled back already)."""
        with contextlib.suppress(sqlite3.Error):
            self._connection.execute("ROLLBACK")

    def close(self) -> None:
        self._connection.close()


class Journal:
    """A run's journal file (see the module notes).

    Args:
        path: the SQLite file.
        create: make the file when it does not exist (else :class:`JournalError`).
        readonly: open for reading only (``aiobatch status``).
        busy_timeout: how long a write waits for another process's write to end.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = False,
        readonly: bool = False,
        busy_timeout: float = 10.0,
    ) -> None:
        self.path = os.fspath(path)
        exists = os.path.exists(self.path)
        if not exists and not create:
            raise JournalError(f"no journal at {self.path}")
        try:
            if readonly:
                uri = "file:" + os.path.abspath(self.path) + "?mode=ro"
                connection = sqlite3.connect(
                    uri, uri=True, isolation_level=None, timeout=busy_timeout
                )
            else:
                connection = sqlite3.connect(self.path, isolation_level=None, timeout=busy_timeout)
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"{self.path} cannot be opened: {exc}") from exc
        self._db = _Db(connection, self.path)
        try:
            if not readonly:
                if exists and not self._is_journal():
                    raise JournalError(
                        f"{self.path} is not an aiobatch journal (it holds other tables); "
                        "choose another path"
                    )
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                # Checkpoint (and fsync) every 40 MB of log rather than every 4 MB:
                # collection writes in bulk.
                self._db.execute("PRAGMA wal_autocheckpoint=10000")
                if exists:
                    self._upgrade()
                self._db.executescript(_SCHEMA)
            version = self.get_meta("schema_version")
            if version is None and exists and readonly:
                raise JournalError(f"{self.path} is not an aiobatch journal (no schema version)")
            if version is None and not readonly:
                self.set_meta(schema_version=str(SCHEMA_VERSION))
            elif (
                version is not None
                and version != str(SCHEMA_VERSION)
                and not (readonly and version == "4")  # what ``status`` reads is the same
            ):
                raise JournalError(
                    f"{self.path} has journal schema {version}; "
                    f"this aiobatch reads {SCHEMA_VERSION}"
                )
        except BaseException:
            self._db.close()
            raise
        self.created = not exists

    def _upgrade(self) -> None:
        """Bring a schema 4 journal to 5: ``requests.batches`` is added, estimated from
        what the journal knows (its rounds, and the shard it is in)."""
        row = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if row is None or self.get_meta("schema_version") != "4":
            return
        with self.transaction() as db:
            db.execute("ALTER TABLE requests ADD COLUMN batches INTEGER NOT NULL DEFAULT 0")
            db.execute("UPDATE requests SET batches = attempts + (state != 'pending')")
            self.put_meta(db, {"schema_version": str(SCHEMA_VERSION)})

    def _is_journal(self) -> bool:
        """The open file is empty, or holds an aiobatch ``meta`` table."""
        tables = {
            str(name)
            for (name,) in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if not tables:
            return True
        if "meta" not in tables:
            return False
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return row is not None

    def close(self) -> None:
        """Close the file (safe to call twice)."""
        self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[_Db]:
        """One write transaction: committed on success, rolled back on any error.

        Raises:
            JournalError: another process held the journal's write lock for 10 s (a
                run checking its input holds it that long), or the file is damaged.
        """
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.rollback()
            raise
        self._db.execute("COMMIT")

    # --- meta ----------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """A ``meta`` value, or None."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, **values: str | None) -> None:
        """Set (or, with None, delete) ``meta`` values, in one transaction."""
        with self.transaction() as db:
            self.put_meta(db, values)

    @staticmethod
    def put_meta(db: _Db, values: Mapping[str, str | None]) -> None:
        """Set (or, with None, delete) ``meta`` values inside the caller's transaction."""
        for key, value in values.items():
            if value is None:
                db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )

    def meta(self) -> dict[str, str]:
        """Every ``meta`` value."""
        return {str(k): str(v) for k, v in self._db.execute("SELECT key, value FROM meta")}

    # --- requests ------------------------------------------------------------------------

    def add_requests(self, db: _Db, rows: Iterable[tuple[Any, ...]]) -> None:
        """Insert request rows ``(seq, custom_id, line, url, model, tokens, inputs, data)``
        inside the caller's transaction."""
        db.executemany(
            "INSERT INTO requests (seq, custom_id, line, url, model, tokens, inputs, data) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    def request_count(self) -> int:
        """How many requests the run has."""
        return int(self._db.execute("SELECT count(*) FROM requests").fetchone()[0])

    def pending_count(self) -> int:
        """How many requests are in no open shard (new, or waiting for a retry round)."""
        query = "SELECT count(*) FROM requests WHERE state = 'pending'"
        return int(self._db.execute(query).fetchone()[0])

    def has_fresh_pending(self) -> bool:
        """Whether a pending request never failed (new input, or put back by a cancel
        of the run's own)."""
        query = "SELECT 1 FROM requests WHERE state = 'pending' AND last_error IS NULL LIMIT 1"
        return self._db.execute(query).fetchone() is not None

    def not_done_count(self) -> int:
        """How many requests have no final result yet."""
        query = "SELECT count(*) FROM requests WHERE state != 'done'"
        return int(self._db.execute(query).fetchone()[0])

    def retrying_count(self) -> int:
        """How many requests without a final result have failed for a retryable reason."""
        query = "SELECT count(*) FROM requests WHERE state != 'done' AND attempts > 0"
        return int(self._db.execute(query).fetchone()[0])

    def requeue_orphans(self) -> int:
        """Requests left ``queued`` in a shard already collected become pending again;
        returns how many."""
        with self.transaction() as db:
            return int(
                db.execute(
                    "UPDATE requests SET state = 'pending' WHERE state = 'queued' AND shard IN "
                    "(SELECT key FROM shards WHERE state = 'collected')"
                ).rowcount
            )

    def pending_groups(self) -> list[tuple[str, str | None]]:
        """The distinct (url, model) of the pending requests."""
        return [
            (str(url), None if model is None else str(model))
            for url, model in self._db.execute(
                "SELECT DISTINCT url, model FROM requests WHERE state = 'pending'"
            )
        ]

    def pending_items(
        self, url: str, model: str | None, *, chunk: int = 10_000
    ) -> Iterator[ShardItem]:
        """The pending requests of one (url, model), in input order, read in chunks (a
        request recorded in a shard meanwhile is not read again)."""
        after = -1
        while True:
            rows = self._db.execute(
                "SELECT seq, length(data) + 1, tokens, inputs FROM requests "
                "WHERE state = 'pending' AND url = ? AND model IS ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (url, model, after, chunk),
            ).fetchall()
            if not rows:
                return
            for seq, size, tokens, inputs in rows:
                yield ShardItem(int(seq), url, model, int(size), int(tokens), int(inputs))
            after = int(rows[-1][0])

    def shard_lines(self, key: str) -> Iterator[bytes]:
        """The request lines of a shard, in input order, without newlines."""
        for (data,) in self._db.execute(
            "SELECT data FROM requests WHERE shard = ? AND state != 'pending' ORDER BY seq",
            (key,),
        ):
            yield bytes(data)

    def shard_members(self, key: str) -> dict[str, tuple[int, int, str]]:
        """custom_id -> (seq, attempts, state) of a shard's requests (queued or resolved)."""
        return {
            str(cid): (int(seq), int(attempts), str(state))
            for cid, seq, attempts, state in self._db.execute(
                "SELECT custom_id, seq, attempts, state FROM requests WHERE shard = ?", (key,)
            )
        }

    def queued_at(self, key: str) -> dict[int, tuple[int, str, int]]:
        """A shard's requests that have no outcome yet, by their 1-based line in the
        shard's file, in input order: (seq, custom_id, attempts)."""
        return {
            int(pos): (int(seq), str(cid), int(attempts))
            for pos, seq, cid, attempts in self._db.execute(
                "SELECT pos, seq, custom_id, attempts FROM requests "
                "WHERE shard = ? AND state = 'queued' ORDER BY seq",
                (key,),
            )
        }

    def add_shard(
        self,
        db: _Db,
        *,
        key: str,
        url: str,
        model: str | None,
        seqs: Sequence[int],
        size: int,
        tokens: int,
        planned_at: float,
    ) -> int:
        """Record a shard's intent inside the caller's transaction: its row, and its
        requests moved from ``pending`` to ``queued`` in it. Returns its round: the most
        retryable failures any of its requests has had."""
        db.executemany(
            "UPDATE requests SET state = 'queued', shard = ?, pos = ?, batches = batches + 1 "
            "WHERE seq = ? AND state = 'pending'",
            ((key, pos, seq) for pos, seq in enumerate(seqs, start=1)),
        )
        (round_,) = db.execute(
            "SELECT coalesce(max(attempts), 0) FROM requests WHERE shard = ?", (key,)
        ).fetchone()
        db.execute(
            "INSERT INTO shards (key, round, url, model, lines, bytes, tokens, state, "
            "planned_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'planned', ?)",
            (key, int(round_), url, model, len(seqs), size, tokens, planned_at),
        )
        return int(round_)

    @staticmethod
    def most_batches(db: sqlite3.Connection, key: str) -> tuple[str, int]:
        """(custom_id, batches) of the request of a shard that was put in the most
        shards (``requests.batches``), inside the caller's transaction."""
        cid, batches = db.execute(
            "SELECT custom_id, batches FROM requests WHERE shard = ? "
            "ORDER BY batches DESC, seq LIMIT 1",
            (key,),
        ).fetchone()
        return str(cid), int(batches)

    def shard(self, key: str) -> ShardRow:
        """A shard's row."""
        row = self._db.execute(
            f"SELECT {', '.join(_SHARD_COLUMNS)} FROM shards WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            raise JournalError(f"{self.path}: no shard {key!r}")
        return ShardRow(row)

    def shards(self, *states: str) -> list[ShardRow]:
        """The shards in any of ``states`` (all when none given), by key."""
        query = f"SELECT {', '.join(_SHARD_COLUMNS)} FROM shards"
        if states:
            query += f" WHERE state IN ({', '.join('?' * len(states))})"
        return [ShardRow(row) for row in self._db.execute(query + " ORDER BY key", states)]

    def shard_count(self) -> int:
        """How many shards were planned."""
        return int(self._db.execute("SELECT count(*) FROM shards").fetchone()[0])

    def update_shard(self, key: str, db: _Db | None = None, **fields: Any) -> None:
        """Set columns of a shard (in the caller's transaction, or its own)."""
        if not fields:
            return
        unknown = set(fields) - set(_SHARD_COLUMNS)
        if unknown:
            raise ValueError(f"unknown shard columns: {sorted(unknown)}")
        sets = ", ".join(f"{name} = ?" for name in fields)
        values = (*fields.values(), key)
        if db is not None:
            db.execute(f"UPDATE shards SET {sets} WHERE key = ?", values)
            return
        with self.transaction() as own:
            own.execute(f"UPDATE shards SET {sets} WHERE key = ?", values)

    # --- results -------------------------------------------------------------------------

    def add_results(self, db: _Db, rows: Iterable[tuple[Any, ...]]) -> None:
        """Record final results ``(seq, kind, code, shard, batch_id, attempts,
        input_tokens, output_tokens, data)`` and mark their requests ``done``, inside the
        caller's transaction. A request that already has its result keeps it."""
        rows = list(rows)
        db.executemany(
            "INSERT OR IGNORE INTO results (seq, kind, code, shard, batch_id, attempts, "
            "input_tokens, output_tokens, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        db.executemany(
            "UPDATE requests SET state = 'done' WHERE seq = ?", ((row[0],) for row in rows)
        )

    def retry_later(self, db: _Db, rows: Iterable[tuple[int, int, bytes | None]]) -> None:
        """Make requests ``pending`` again, with their attempts and last error
        ``(seq, attempts, last_error)``, inside the caller's transaction; a last error of
        None marks a request that runs again as if for the first time (its batch was
        cancelled by the run). A request that already has its final result is left
        alone."""
        db.executemany(
            "UPDATE requests SET state = 'pending', attempts = ?, last_error = ? "
            "WHERE seq = ? AND state != 'done'",
            ((attempts, data, seq) for seq, attempts, data in rows),
        )

    def result_rows(
        self, *, order: str = "input", after: int = -1, limit: int = 1000
    ) -> list[tuple[int, int, str, int, str | None, bytes, str]]:
        """Final results ``(n, seq, custom_id, attempts, batch_id, data, kind)`` past a
        cursor: ``order="input"`` walks ``seq`` (``after`` is a seq), ``"completion"``
        walks the completion counter ``n`` (``after`` is an ``n``)."""
        column = "r.seq" if order == "input" else "r.n"
        return [
            (int(n), int(seq), str(cid), int(att), bid, bytes(data), str(kind))
            for n, seq, cid, att, bid, data, kind in self._db.execute(
                "SELECT r.n, r.seq, q.custom_id, r.attempts, r.batch_id, r.data, r.kind "
                f"FROM results r JOIN requests q ON q.seq = r.seq WHERE {column} > ? "
                f"ORDER BY {column} LIMIT ?",
                (after, limit),
            )
        ]

    def result_lines(self, *, order: str = "input") -> Iterator[bytes]:
        """Every final result line, streamed from the file (for the output file; no
        write may happen on this connection while it is read)."""
        column = "seq" if order == "input" else "n"
        for (data,) in self._db.execute(f"SELECT data FROM results ORDER BY {column}"):
            yield bytes(data)

    def counts(self) -> dict[str, Any]:
        """The figures of a report, read in one go."""
        db = self._db
        requests = dict(
            db.execute("SELECT state, count(*) FROM requests GROUP BY state").fetchall()
        )
        kinds = dict(db.execute("SELECT kind, count(*) FROM results GROUP BY kind").fetchall())
        codes = dict(
            db.execute(
                "SELECT coalesce(code, kind), count(*) FROM results WHERE kind != 'success' "
                "GROUP BY coalesce(code, kind)"
            ).fetchall()
        )
        tokens = db.execute(
            "SELECT coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0) FROM results"
        ).fetchone()
        # Re-submitted: a retryable failure, and sent again (or ended) since; a request
        # still waiting for its retry round is not re-submitted yet.
        attempts = db.execute(
            "SELECT coalesce(sum(attempts > 0 AND state != 'pending'), 0) FROM requests"
        ).fetchone()
        shard_states = dict(
            db.execute("SELECT state, count(*) FROM shards GROUP BY state").fetchall()
        )
        statuses = dict(
            db.execute(
                "SELECT coalesce(status, state), count(*) FROM shards "
                "GROUP BY coalesce(status, state)"
            ).fetchall()
        )
        # creates counts a shard's batches that failed with token_limit_exceeded (each
        # was made); the re-create of the last of them is not made yet while the shard
        # has no batch.
        batches = db.execute(
            "SELECT count(batch_id) + coalesce(sum(creates), 0), coalesce(sum(creates), 0) "
            "- coalesce(sum(creates > 0 AND batch_id IS NULL), 0) FROM shards"
        ).fetchone()
        rounds = db.execute("SELECT coalesce(max(round), 0) FROM shards").fetchone()[0]
        # The latest step a shard recorded (planned, upload or create started).
        last_step = db.execute(
            "SELECT coalesce(max(max(planned_at, coalesce(upload_started_at, 0), "
            "coalesce(create_started_at, 0))), 0) FROM shards"
        ).fetchone()[0]
        return {
            "requests": requests,
            "kinds": kinds,
            "codes": codes,
            "input_tokens": int(tokens[0]),
            "output_tokens": int(tokens[1]),
            "retried": int(attempts[0]),
            "shard_states": shard_states,
            "statuses": statuses,
            "batches": int(batches[0]),
            "recreated": int(batches[1]),
            "rounds": int(rounds),
            "last_step": float(last_step),
        }

    def open_batches(self) -> list[tuple[str, str]]:
        """(shard key, batch id) of every shard whose batch is being tracked."""
        return [
            (str(key), str(bid))
            for key, bid in self._db.execute(
                "SELECT key, batch_id FROM shards WHERE state = 'open' AND batch_id IS NOT NULL"
            )
        ]


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


def dumps_compact(value: Any) -> bytes:
    """JSON bytes with no spaces (result lines aiobatch writes itself)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
