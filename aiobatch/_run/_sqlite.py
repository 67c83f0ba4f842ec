"""The run journal: a SQLite file that makes a run resumable after a crash.

Everything a run knows is here, written before it acts on it:

- ``meta``: the run id, the input's fingerprint, the run's state, a cancel flag that
  ``aiobatch cancel`` sets from another process.
- ``requests``: every accepted request line (its bytes, to build shard files and retry
  rounds from), where it is (``pending``: in no shard, waiting to be planned;
  ``queued``: put in shard ``shard``, as line ``pos`` of its file: a new run's requests
  are written queued, cut into shards as they are ingested), its retryable
  failures so far (``attempts``) and the last of them (``last_error``). A request is
  *done* when it has its row in ``results``: that row is the one record of it (schema 6;
  schema 5 and earlier also wrote ``state = 'done'``, one update per result, which cost
  more than the result itself).
- ``shards``: one row per batch-to-be: the intent (its requests) is recorded before its
  file is uploaded; then its file id, its create key (before the create is sent), its
  batch id, its status, and how many lines of its output and error files are collected.
- ``results``: the final result of each request, at most one (``seq`` is unique); the
  row order is the completion order. The result line itself is in the journal's
  ``-data`` file beside it, written once (see :mod:`._sqlite_data`). The results are
  recorded and read back by :mod:`._sqlite_results`.

The run writes through one connection, from the event loop's thread or the journal's
worker thread (a chunk of results, among others), one statement at a time all the
same; each write is a short transaction (``BEGIN IMMEDIATE``), so another process
(``aiobatch status`` or ``aiobatch cancel``) can read and flag the journal while a run
goes on. WAL mode with ``synchronous=NORMAL`` keeps every committed transaction through
a killed process (only a power loss may lose the last ones). A new file has 32 KiB
pages (see ``PAGE_SIZE``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from ..errors import JournalError, ShardMoveError
from ._journal import too_many_batches
from ._records import (
    SHARD_FIELDS,
    Member,
    NewShard,
    PendingRequest,
    QueuedLine,
    RequestGroup,
    RequestRow,
    RunMeta,
    Shard,
    ShardPlan,
)
from ._sqlite_data import ResultData, placed
from ._sqlite_db import PAGE_BYTES, PAGE_LINES, Checkpointer, Db, Page, SeqRun, seq_runs
from ._sqlite_results import _NO_RESULT, JournalResults, has_json, no_result, rows_json
from ._sqlite_schema import PAGE_SIZE, READABLE_VERSIONS, SCHEMA, SCHEMA_VERSION, UPGRADES
from ._states import ShardState, allowed

__all__ = [
    "PAGE_BYTES",
    "PAGE_LINES",
    "SCHEMA_VERSION",
    "JournalFile",
    "Page",
    "SeqRun",
    "seq_runs",
]

_SHARD_SELECT = f"SELECT {', '.join(SHARD_FIELDS)} FROM shards"
#: SQLite's page cache of the run's connection, KiB: the unique indexes of requests and
#: results take random inserts and look-ups, which go to the file when it is too small.
#: Ingest fills it as soon as the journal outgrows it, so it is most of what a run's
#: memory grows by from 10,000 requests up: 16 MiB held 8-9 MB more than 8 MiB at
#: 300,000 requests. The price of 8 MiB, measured: ingest of 100,000 requests as fast
#: (benchmarks/bench_ingest.py), but a run of 100,000 in memory on a virtual clock,
#: where every statement runs in the loop, spent about 12% more time outside the fake
#: (bench_run_100k.py --no-http), and a million requests with random ids took 14%
#: longer to ingest (42 s, not 37 s).
_CACHE_KIB = 8 * 1024
#: Ids looked up per statement (SQLite before 3.32 takes at most 999 parameters).
_IDS_PER_QUERY = 500
#: WAL bytes after which a commit checkpoints them into the file (and fsyncs).
_CHECKPOINT_BYTES = 40 * 1024 * 1024
#: Seconds between two copies of the log by :meth:`JournalFile.checkpoint_in_thread`.
_CHECKPOINT_EVERY = 0.25
_META_FLOATS = ("started_at", "updated_at")


def _shard(row: Sequence[Any]) -> Shard:
    return Shard(**dict(zip(SHARD_FIELDS, row, strict=True)))


def _check_move(key: str, source: ShardState, target: ShardState) -> None:
    if not allowed(source, target):
        raise ShardMoveError(
            f"shard {key}: no move from {source.value!r} to {target.value!r} in the shard "
            "lifecycle; this is a bug in aiobatch (nothing was written)",
            shard=key,
            source=source.value,
            target=target.value,
        )


#: Requests inserted in one statement: their fields as one JSON array of ``[seq,
#: custom_id, line, url, model, tokens, inputs, start, size]``, their lines as one blob
#: (each one's bytes at ``start``, counted from 1). One statement keeps Python's GIL
#: away for the whole batch, where ``executemany`` takes it back for every row: from
#: the journal's worker thread beside a busy event loop, each of those waits up to the
#: interpreter's switch interval (see ``_sqlite_results._INSERT_NAMED_JSON``).
_INSERT_REQUESTS_JSON = (
    "INSERT INTO requests (seq, custom_id, line, url, model, tokens, inputs, data, shard, "
    "pos, state, batches) "
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
    "json_extract(value, '$[2]'), json_extract(value, '$[3]'), json_extract(value, '$[4]'), "
    "json_extract(value, '$[5]'), json_extract(value, '$[6]'), "
    "substr(?2, json_extract(value, '$[7]'), json_extract(value, '$[8]')), "
    "json_extract(value, '$[9]'), json_extract(value, '$[10]'), "
    "CASE WHEN json_extract(value, '$[9]') IS NULL THEN 'pending' ELSE 'queued' END, "
    "json_extract(value, '$[9]') IS NOT NULL FROM json_each(?1)"
)
#: A statement a row: the columns of :class:`RequestRow`; a request given a shard is
#: queued in it, in its first batch.
_INSERT_REQUEST = (
    "INSERT INTO requests (seq, custom_id, line, url, model, tokens, inputs, data, shard, "
    "pos, state, batches) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, "
    "CASE WHEN ?9 IS NULL THEN 'pending' ELSE 'queued' END, ?9 IS NOT NULL)"
)
_INSERT_SHARD = (
    "INSERT INTO shards (key, round, url, model, lines, bytes, tokens, state, planned_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class JournalFile(JournalResults):
    """A run's journal file, read and written synchronously (see the module notes).

    :class:`SQLiteJournal` puts the run's :class:`~aiobatch._run._journal.Journal`
    interface over it; ``aiobatch status`` and tests read it directly. Its results half
    (recording final results and retries, reading them back) is
    :class:`~aiobatch._run._sqlite_results.JournalResults`.

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
        self.readonly = readonly
        self._checkpointer: Checkpointer | None = None
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
                # One statement at a time, from the loop's thread or from the worker
                # thread of a result chunk (SQLiteJournal's lock sees to it).
                connection = sqlite3.connect(
                    self.path, isolation_level=None, timeout=busy_timeout, check_same_thread=False
                )
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"{self.path} cannot be opened: {exc}") from exc
        self._db = Db(connection, self.path)
        self._data = ResultData(self.path, readonly=readonly)
        try:
            if not readonly:
                if exists and not self._db.is_journal():
                    raise JournalError(
                        f"{self.path} is not an aiobatch journal (it holds other tables); "
                        "choose another path"
                    )
                # Only a file without tables takes a page size (before WAL mode).
                self._db.execute(f"PRAGMA page_size={PAGE_SIZE}")
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                # Checkpoint (and fsync) every ~40 MB of log rather than every 4 MB:
                # collection writes in bulk.
                page = int(self._db.execute("PRAGMA page_size").fetchone()[0])
                self._db.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_BYTES // page}")
                self._db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
                if exists:
                    self._upgrade()
                self._db.executescript(SCHEMA)
            version = self.get_meta("schema_version")
            if version is None and exists and readonly:
                raise JournalError(f"{self.path} is not an aiobatch journal (no schema version)")
            if version is None and not readonly:
                self.set_meta(schema_version=str(SCHEMA_VERSION))
            elif (
                version is not None
                and version != str(SCHEMA_VERSION)
                and not (readonly and version in READABLE_VERSIONS)
            ):
                raise JournalError(
                    f"{self.path} has journal schema {version}; "
                    f"this aiobatch reads {SCHEMA_VERSION}"
                    + (
                        " (a newer aiobatch wrote it: upgrade aiobatch to resume this run)"
                        if version.isdigit() and int(version) > SCHEMA_VERSION
                        else ""
                    )
                )
            # Where a result line is (a journal before schema 7, read only, has no -data).
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(results)")}
            self._data.expect(self.get_meta("data_id"))
            if not readonly:  # a run resumes from here: its result lines must all be there
                self._data.check(int(self.get_meta("data_end") or 0))
        except BaseException:
            self._db.close()
            raise
        self.created = not exists
        self._line_at = "data_at, data_size" if "data_at" in columns else "NULL, NULL"
        # (A journal without the -data columns is one before schema 7, read only.)
        self._json_rows = has_json(self._db) and "data_at" in columns
        self._page_rows = {}

    def _upgrade(self) -> None:
        """Bring a journal of an earlier schema to this one, in place, in one transaction.

        4 to 5: ``requests.batches`` is added, estimated from what the journal knows (its
        rounds, and the shard it is in), and a shard whose upload was started is
        ``uploading`` (schema 4 kept it ``planned``). 5 to 6: a request with a result is
        no longer marked ``done`` (its result row says it): ``done`` becomes ``queued``,
        the shard it is in. 6 to 7: ``results`` gains ``data_at`` and ``data_size`` (the
        rows written before keep their line in ``data``; new ones go to ``-data``).
        """
        row = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        version = self.get_meta("schema_version") if row is not None else None
        if version not in ("4", "5", "6"):
            return
        with self.transaction() as db:
            for step in range(int(version), SCHEMA_VERSION):
                for statement in UPGRADES[step + 1]:
                    db.execute(statement)
            self.put_meta(db, {"schema_version": str(SCHEMA_VERSION)})

    def checkpoint_in_thread(self) -> None:
        """From now on the log is copied into the file by a thread of its own
        (:class:`Checkpointer`), not by the commits."""
        if self._checkpointer is None and not self.readonly:
            self._checkpointer = Checkpointer(self.path, every=_CHECKPOINT_EVERY)
            self._db.execute("PRAGMA wal_autocheckpoint=0")

    def close(self) -> None:
        """Close the file (safe to call twice)."""
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        try:
            self._db.close()
        finally:
            self._data.close()

    def __enter__(self) -> JournalFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Db]:
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
        if self._checkpointer is not None:
            self._checkpointer.poke()

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
    def put_meta(db: Db, values: Mapping[str, str | None]) -> None:
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

    def meta_values(self) -> dict[str, str]:
        """Every ``meta`` value, as stored."""
        return {str(k): str(v) for k, v in self._db.execute("SELECT key, value FROM meta")}

    def meta(self) -> RunMeta | None:
        """The run's facts; None before a run was recorded in the file."""
        values = self.meta_values()
        if "run_id" not in values:
            return None
        names = {field.name for field in attrs.fields(RunMeta)}
        fields: dict[str, Any] = {k: v for k, v in values.items() if k in names}
        for name in _META_FLOATS:
            if name in fields:
                fields[name] = float(fields[name])
        for name in ("skipped", "extra_uploads_deleted"):
            if name in fields:
                fields[name] = int(fields[name])
        return RunMeta(**fields)

    def start(self, db: Db, meta: RunMeta, shards: Sequence[NewShard] = ()) -> None:
        """Record a new run's facts inside the caller's transaction (the ingest's), and
        the shards its requests were queued in (see :meth:`Ingest.start
        <aiobatch._run._journal.Ingest.start>`)."""
        planned = ShardState.PLANNED.value
        db.executemany(
            _INSERT_SHARD,
            [
                (s.key, 0, s.url, s.model, s.lines, s.size, s.tokens, planned, meta.started_at)
                for s in shards
            ],
        )
        self.put_meta(
            db,
            {
                "run_id": meta.run_id,
                "source": meta.source,
                "fingerprint": meta.fingerprint,
                "started_at": repr(meta.started_at),
                "updated_at": repr(meta.updated_at),
                "state": meta.state,
                "skipped": str(meta.skipped),
                "problems": meta.problems,
                "order": meta.order,
            },
        )

    def count_extra_uploads(self, deleted: int) -> None:
        """Add to the count of extra input-file copies the run deleted."""
        with self.transaction() as db:
            total = int(self.get_meta("extra_uploads_deleted") or 0) + deleted
            self.put_meta(db, {"extra_uploads_deleted": str(total)})

    # --- requests ------------------------------------------------------------------------

    def add_requests(
        self, db: Db, rows: Sequence[RequestRow], *, one_statement: bool = False
    ) -> None:
        """Insert accepted requests inside the caller's transaction. ``one_statement``
        (from the journal's worker thread): all in one statement, where SQLite has its
        JSON functions (see ``_INSERT_REQUESTS_JSON``); else a statement a row, which
        costs less in the loop's own thread (0.45-0.54 s against 0.61-0.64 s per 100,000
        requests queued in shards)."""
        if not (one_statement and self._json_rows):
            db.executemany(_INSERT_REQUEST, rows)
            return
        fields = [
            (seq, custom_id, line, url, model, tokens, inputs, at, len(data), shard, pos)
            # substr counts from 1
            for (
                (seq, custom_id, line, url, model, tokens, inputs, data, shard, pos),
                at,
            ) in placed(rows, 1)
        ]
        text = rows_json(fields)
        blob = b"".join(row.data for row in rows)
        if text is None or not blob:  # substr of an empty blob is NULL
            self.add_requests(db, rows)
            return
        db.execute(_INSERT_REQUESTS_JSON, (text, blob))

    @staticmethod
    def taken(db: Db, custom_ids: Sequence[str]) -> dict[str, int]:
        """Which of ``custom_ids`` the requests use, each with its input line."""
        found: dict[str, int] = {}
        for start in range(0, len(custom_ids), _IDS_PER_QUERY):
            part = custom_ids[start : start + _IDS_PER_QUERY]
            marks = ", ".join("?" * len(part))
            for cid, line in db.execute(
                f"SELECT custom_id, line FROM requests WHERE custom_id IN ({marks})", part
            ):
                found[str(cid)] = int(line)
        return found

    def request_count(self) -> int:
        """How many requests the run has."""
        return int(self._db.execute("SELECT count(*) FROM requests").fetchone()[0])

    def pending_count(self) -> int:
        """How many requests are in no open shard (see :meth:`Journal.pending_count
        <aiobatch._run._journal.Journal.pending_count>`)."""
        query = "SELECT count(*) FROM requests WHERE state = 'pending'"
        return int(self._db.execute(query).fetchone()[0])

    def has_fresh_pending(self) -> bool:
        """Whether a pending request never failed (put back by a cancel of the run's own,
        or new in a journal ingested without planning)."""
        query = "SELECT 1 FROM requests WHERE state = 'pending' AND last_error IS NULL LIMIT 1"
        return self._db.execute(query).fetchone() is not None

    def not_done_count(self) -> int:
        """How many requests have no final result yet."""
        query = "SELECT (SELECT count(*) FROM requests) - (SELECT count(*) FROM results)"
        return int(self._db.execute(query).fetchone()[0])

    def retrying_count(self) -> int:
        """How many requests without a final result have failed for a retryable reason."""
        query = f"SELECT count(*) FROM requests WHERE attempts > 0 AND {_NO_RESULT}"
        return int(self._db.execute(query).fetchone()[0])

    def requeue_orphans(self) -> int:
        """Requests left ``queued`` without a result in a shard already collected become
        pending again; returns how many."""
        with self.transaction() as db:
            return int(
                db.execute(
                    "UPDATE requests SET state = 'pending' WHERE state = 'queued' "
                    f"AND shard IN (SELECT key FROM shards WHERE state = 'collected') "
                    f"AND {_NO_RESULT}"
                ).rowcount
            )

    def pending_groups(self) -> list[RequestGroup]:
        """The distinct (url, model) of the pending requests."""
        return [
            RequestGroup(str(url), None if model is None else str(model))
            for url, model in self._db.execute(
                "SELECT DISTINCT url, model FROM requests WHERE state = 'pending'"
            )
        ]

    def pending_page(
        self, url: str, model: str | None, *, after: int, limit: int
    ) -> list[PendingRequest]:
        """The next ``limit`` pending requests of one (url, model) past the request
        ``after`` (a seq), in input order, without their bytes."""
        if self._json_rows:
            # In one step (see JournalResults._result_page_json); the aggregate's order
            # is not promised, so the page is sorted.
            (text,) = self._db.execute(
                "SELECT json_group_array(json_array(seq, size, tokens, inputs)) "
                "FROM (SELECT seq, length(data) + 1 AS size, tokens, inputs FROM requests "
                "WHERE state = 'pending' AND url = ? AND model IS ? AND seq > ? "
                "ORDER BY seq LIMIT ?)",
                (url, model, after, limit),
            ).fetchone()
            found: list[list[int]] = json.loads(text)
            found.sort()
            return [
                PendingRequest(seq, size, tokens, inputs, url, model)
                for seq, size, tokens, inputs in found
            ]
        rows = self._db.execute(
            "SELECT seq, length(data) + 1, tokens, inputs, url, model FROM requests "
            "WHERE state = 'pending' AND url = ? AND model IS ? AND seq > ? "
            "ORDER BY seq LIMIT ?",
            (url, model, after, limit),
        ).fetchall()
        return list(map(PendingRequest._make, rows))

    def shard_lines(self, key: str) -> Iterator[bytes]:
        """The request lines of a shard, in input order, without newlines."""
        after = -1
        while page := self.shard_page(key, after=after):
            after = page.last
            yield from page.lines

    def shard_page(
        self, key: str, *, after: int, lines: int = PAGE_LINES, size: int = PAGE_BYTES
    ) -> Page:
        """A shard's request lines in input order past the request ``after`` (a seq):
        at most ``lines`` of them, and no more once they make ``size`` bytes."""
        return self._db.page(
            "SELECT seq, data FROM requests WHERE shard = ? AND state != 'pending' "
            "AND seq > ? ORDER BY seq LIMIT ?",
            (key, after, lines),
            size,
        )

    def members(self, key: str, custom_ids: Sequence[str]) -> dict[str, Member]:
        """The requests of a shard (queued or resolved) among ``custom_ids``, by id."""
        found: dict[str, Member] = {}
        for start in range(0, len(custom_ids), _IDS_PER_QUERY):
            part = custom_ids[start : start + _IDS_PER_QUERY]
            marks = ", ".join("?" * len(part))
            query = (
                f"SELECT custom_id, seq, attempts, state = 'queued' AND {_NO_RESULT} AS queued "
                # From the index alone (the shard's own index would read every row).
                f"FROM requests INDEXED BY requests_members "
                f"WHERE custom_id IN ({marks}) AND shard = ?"
            )
            if self._json_rows:
                # The part's rows in one step (see JournalResults._result_page_json);
                # text with NUL comes out of json_array whole (only reading JSON ends a
                # string there).
                (text,) = self._db.execute(
                    "SELECT json_group_array(json_array(custom_id, seq, attempts, queued)) "
                    f"FROM ({query})",
                    (*part, key),
                ).fetchone()
                rows = json.loads(text)
            else:
                rows = self._db.execute(query, (*part, key))
            for cid, seq, attempts, queued in rows:
                found[cid] = Member(seq, attempts, bool(queued))
        return found

    def queued_at(self, key: str) -> dict[int, QueuedLine]:
        """A shard's requests that have no outcome yet, by their 1-based line in the
        shard's file, in input order."""
        # The shard's index (its seqs in order) and the results' are walked first: only a
        # request without a result has its row read (a shard of 50,000 with every result
        # took 10-13 ms, against 17-27 ms row by row).
        return {
            int(pos): QueuedLine(int(seq), str(cid), int(attempts))
            for pos, seq, cid, attempts in self._db.execute(
                "SELECT r.pos, r.seq, r.custom_id, r.attempts "
                "FROM requests AS s INDEXED BY requests_shard "
                "CROSS JOIN requests AS r ON r.seq = s.seq "
                f"WHERE s.shard = ? AND r.state = 'queued' AND {no_result('s')} ORDER BY s.seq",
                (key,),
            )
        }

    # --- shards --------------------------------------------------------------------------

    def add_shard(
        self, key: str, plan: ShardPlan, *, planned_at: float, max_batches: int | None = None
    ) -> Shard:
        """Record a shard's intent in one transaction: its row, and its requests moved
        from ``pending`` to ``queued`` in it (each counting one more batch). Its round is
        the most retryable failures any of its requests has had.

        Raises:
            TooManyBatchesError: a request would go into more than ``max_batches``
                batches (nothing is recorded).
        """
        with self.transaction() as db:
            self.queue_runs(db, key, seq_runs(plan.seqs))
            self.put_shard(db, key, plan, planned_at=planned_at, max_batches=max_batches)
        return self.shard(key)

    @staticmethod
    def queue_runs(db: Db, key: str, runs: Iterable[SeqRun]) -> None:
        """Inside the caller's transaction: the pending requests of ``runs`` go into shard
        ``key`` (one statement per run of consecutive requests), each counting one more
        batch; a request's line in the shard's file is its position in the plan."""
        for run in runs:
            db.execute(
                "UPDATE requests SET state = 'queued', shard = ?, pos = seq - ?, "
                "batches = batches + 1 WHERE seq BETWEEN ? AND ? AND state = 'pending'",
                (key, run.first - run.pos, run.first, run.last),
            )

    def put_shard(
        self,
        db: Db,
        key: str,
        plan: ShardPlan,
        *,
        planned_at: float,
        max_batches: int | None = None,
    ) -> None:
        """Inside the caller's transaction, once its requests are queued in it: the
        shard's row (``planned``), its round from its requests' failures.

        Raises:
            TooManyBatchesError: a request of it would go into more than
                ``max_batches`` batches.
        """
        round_, most = db.execute(
            "SELECT coalesce(max(attempts), 0), coalesce(max(batches), 0) FROM requests "
            "WHERE shard = ?",
            (key,),
        ).fetchone()
        if max_batches is not None and most > max_batches:
            cid, batches = db.execute(
                "SELECT custom_id, batches FROM requests WHERE shard = ? "
                "ORDER BY batches DESC, seq LIMIT 1",
                (key,),
            ).fetchone()
            raise too_many_batches(str(cid), int(batches), max_batches)
        db.execute(
            _INSERT_SHARD,
            (
                key,
                int(round_),
                plan.url,
                plan.model,
                len(plan.seqs),
                plan.size,
                plan.tokens,
                ShardState.PLANNED.value,
                planned_at,
            ),
        )

    def shard(self, key: str) -> Shard:
        """A shard's row."""
        row = self._db.execute(_SHARD_SELECT + " WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise JournalError(f"{self.path}: no shard {key!r}")
        return _shard(row)

    def shards(self, *states: ShardState) -> list[Shard]:
        """The shards in any of ``states`` (all when none given), by key."""
        query = _SHARD_SELECT
        values = tuple(state.value for state in states)
        if states:
            query += f" WHERE state IN ({', '.join('?' * len(states))})"
        return [_shard(row) for row in self._db.execute(query + " ORDER BY key", values)]

    def shard_count(self) -> int:
        """How many shards were planned."""
        return int(self._db.execute("SELECT count(*) FROM shards").fetchone()[0])

    def set_fields(self, db: Db, key: str, fields: Mapping[str, Any]) -> None:
        """Set fields of a shard inside the caller's transaction."""
        unknown = set(fields) - set(SHARD_FIELDS)
        if unknown:
            raise ValueError(f"unknown shard fields: {sorted(unknown)}")
        sets = ", ".join(f"{name} = ?" for name in fields)
        values = [v.value if isinstance(v, ShardState) else v for v in fields.values()]
        db.execute(f"UPDATE shards SET {sets} WHERE key = ?", (*values, key))

    def move_in(self, db: Db, key: str, to: ShardState, fields: Any) -> None:
        """:meth:`move` inside the caller's transaction."""
        row = db.execute("SELECT state FROM shards WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise JournalError(f"{self.path}: no shard {key!r}")
        _check_move(key, ShardState(row[0]), to)
        self.set_fields(db, key, {**fields, "state": to})

    def move(self, key: str, to: ShardState, **fields: Any) -> Shard:
        """Move a shard to ``to`` and set ``fields``, in one transaction.

        Raises:
            ShardMoveError: the shard lifecycle has no such move (nothing is written).
        """
        with self.transaction() as db:
            self.move_in(db, key, to, fields)
        return self.shard(key)

    def update(self, key: str, **fields: Any) -> None:
        """Set fields of a shard other than its state (:meth:`move` changes that)."""
        if "state" in fields or "key" in fields:
            raise ValueError("a shard's state changes by move(), its key never")
        if fields:
            with self.transaction() as db:
                self.set_fields(db, key, fields)

    def open_batches(self) -> list[Shard]:
        """Every shard whose batch is being tracked."""
        return [s for s in self.shards(ShardState.OPEN) if s.batch_id is not None]
