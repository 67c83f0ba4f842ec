"""The results half of a run's journal file: recording final results and retries, and
reading them back (:class:`JournalResults`, a part of
:class:`~aiobatch._run._sqlite.JournalFile`).

A request is *done* when it has its row in ``results``, at most one (``seq`` is unique);
the row order is the completion order. A chunk of results is recorded in one
transaction: its result lines are appended to the journal's ``-data`` file first (see
:mod:`._sqlite_data`), then their rows inserted, and ``meta.data_end`` moved past them;
the requests put back for another round go back to ``pending``, and the shard's fields
(or its move to ``collected``) are written, in the same transaction. A chunk of lines
named by ``custom_id`` (:meth:`JournalResults.record_named`) finds its requests and
writes its rows in one statement, then appends its lines: the rows go back (a savepoint)
when one line names no request waiting for its first outcome.
Reading walks the results by input order (``seq``) or completion order (``n``), page
by page, and sums them for a report without sorting them.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .. import _json
from ..errors import JournalError
from ._records import (
    FailedRequest,
    FinalResult,
    JournalCounts,
    ModelTokens,
    NamedResult,
    ResultRow,
    RetryLine,
    Shard,
)
from ._sqlite_data import Located, ResultData, header, placed
from ._sqlite_db import PAGE_BYTES, PAGE_LINES, Db, Page
from ._states import ShardState

__all__ = ["JournalResults"]


def no_result(requests: str) -> str:
    """A request without its result: a row of ``requests`` (the table, or its alias)."""
    return f"NOT EXISTS (SELECT 1 FROM results WHERE results.seq = {requests}.seq)"


#: A request (a row of ``requests``) without its result.
_NO_RESULT = no_result("requests")

#: A result line's row, for the request of the shard it names by ``custom_id`` that
#: waits for its first outcome (found from the members index alone).
_INSERT_NAMED = (
    "INSERT OR IGNORE INTO results (seq, kind, code, shard, batch_id, attempts, "
    "input_tokens, output_tokens, data, data_at, data_size) "
    "SELECT seq, ?, ?, shard, ?, 0, ?, ?, X'', ?, ? FROM requests INDEXED BY requests_members "
    "WHERE custom_id = ? AND shard = ? AND state = 'queued' AND attempts = 0"
)

#: The same for a whole chunk in one statement, its lines given as one JSON array of
#: ``[kind, code, input_tokens, output_tokens, offset, data_size, custom_id]`` (``offset``:
#: where the line starts from the chunk's first, whose place in the ``-data`` file is a
#: parameter), inserted in their order (a CROSS JOIN makes the array the outer loop). One
#: statement
#: runs without Python's GIL from start to end: ``executemany`` takes the GIL back for
#: every row, and from a worker thread beside a busy event loop each of those waits up
#: to the interpreter's switch interval (5 ms). 20,000 rows into an indexed table took
#: 0.035 s alone and 11 s beside a thread looping in Python; in one statement, 0.064 s
#: and 0.108 s.
_INSERT_NAMED_JSON = (
    "INSERT OR IGNORE INTO results (seq, kind, code, shard, batch_id, attempts, "
    "input_tokens, output_tokens, data, data_at, data_size) "
    "SELECT r.seq, json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]'), r.shard, "
    "?, 0, json_extract(j.value, '$[2]'), json_extract(j.value, '$[3]'), X'', "
    "? + json_extract(j.value, '$[4]'), json_extract(j.value, '$[5]') "
    "FROM json_each(?) AS j CROSS JOIN requests AS r INDEXED BY requests_members "
    "WHERE r.custom_id = json_extract(j.value, '$[6]') AND r.shard = ? "
    "AND r.state = 'queued' AND r.attempts = 0"
)


#: How ``json.dumps`` (and :func:`aiobatch._json.dumps`) writes the character NUL, where
#: SQLite's JSON functions end a string (``json_extract('["a\\u0000b"]', '$[0]')`` is
#: ``'a'``): a chunk with one in its text goes a statement a row.
_NUL = "\\u0000"


def rows_json(rows: Sequence[Sequence[object]]) -> str | None:
    """``rows`` (of str, int and None) as the JSON array a statement over ``json_each``
    takes; None when that text would not hold them: a NUL in it (see ``_NUL``), or (with
    msgspec) text that is not Unicode. The rows then go a statement a row."""
    try:
        text = _json.dumps(rows)
    except ValueError:  # with msgspec: a lone surrogate
        return None
    return None if _NUL in text else text


def has_json(db: Db) -> bool:
    """Whether this SQLite has its JSON functions (built in since 3.38, an extension
    most builds enable before)."""
    try:
        db.execute("SELECT json_extract('[1]', '$[0]')").fetchone()
    except (sqlite3.OperationalError, JournalError):  # no such function
        return False
    return True


class JournalResults:
    """The result statements of :class:`~aiobatch._run._sqlite.JournalFile`."""

    path: str
    readonly: bool
    _db: Db
    _data: ResultData
    #: the columns of a result row that say where its line is (see ``JournalFile``)
    _line_at: str
    #: whether SQLite's JSON functions are there (and the journal's results have their
    #: places in the -data file), for the statements that read or write many rows in
    #: one step (else they go a step a row)
    _json_rows: bool
    #: by the column of a page's order: the rows read for the next page of results
    _page_rows: dict[str, int]

    if TYPE_CHECKING:

        def transaction(self) -> contextlib.AbstractContextManager[Db]: ...

        @staticmethod
        def put_meta(db: Db, values: Mapping[str, str | None]) -> None: ...

        def shard(self, key: str) -> Shard: ...

        def set_fields(self, db: Db, key: str, fields: Mapping[str, Any]) -> None: ...

        def move_in(self, db: Db, key: str, to: ShardState, fields: Any) -> None: ...

    def record_rows(
        self,
        db: Db,
        finals: Sequence[FinalResult],
        retries: Sequence[RetryLine],
    ) -> None:
        """Final results and requests back to pending (see :meth:`record`), inside the
        caller's transaction. A request that already has its result keeps it. The
        result lines are appended to the ``-data`` file first (a line whose request
        had its result already is written, and never read)."""
        if finals:
            start, data_id = self._data_start(db)
            self._write_data(db, start, data_id, [f.data for f in finals])
            located = [
                (
                    f.seq,
                    f.kind,
                    f.code,
                    f.shard,
                    f.batch_id,
                    f.attempts,
                    f.input_tokens,
                    f.output_tokens,
                    at,
                    len(f.data),
                )
                for f, at in placed(finals, start)
            ]
            db.executemany(
                "INSERT OR IGNORE INTO results (seq, kind, code, shard, batch_id, attempts, "
                "input_tokens, output_tokens, data, data_at, data_size) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, X'', ?, ?)",
                located,
            )
        # A request with a result is done: it goes back to pending no more.
        db.executemany(
            "UPDATE requests SET state = 'pending', attempts = ?, last_error = ? "
            f"WHERE seq = ? AND {_NO_RESULT}",
            ((r.attempts, r.last_error, r.seq) for r in retries),
        )

    def _data_start(self, db: Db) -> tuple[int, str | None]:
        """Where the next result line goes in the ``-data`` file, and, when it is the
        file's first write, the id the file is made with (else None)."""
        row = db.execute("SELECT value FROM meta WHERE key = 'data_end'").fetchone()
        end = int(row[0]) if row is not None else 0
        if end:
            return end, None
        data_id = uuid.uuid4().hex
        return len(header(data_id)), data_id

    def _write_data(self, db: Db, start: int, data_id: str | None, lines: list[bytes]) -> None:
        """``lines`` written one after another from ``start`` and synced (the file made
        first, with its id line, when ``data_id`` is given); ``meta.data_end`` moved
        past them."""
        if data_id is not None:
            self._data.write(0, [header(data_id), *lines], data_id=data_id)
            self.put_meta(db, {"data_id": data_id})
        else:
            self._data.write(start, lines)
        self.put_meta(db, {"data_end": str(start + sum(map(len, lines)))})

    def record_named_rows(
        self,
        db: Db,
        key: str,
        batch_id: str | None,
        lines: Sequence[NamedResult],
        *,
        text: str | None = None,
    ) -> bool:
        """:meth:`record_named` inside the caller's transaction: False when a line names
        no request of shard ``key`` that waits for its first outcome, or one named
        before (then nothing is written). Each line's request is found and its result
        row written in one statement (with ``text``, :meth:`named_json` of ``lines``,
        from the journal's worker thread: the whole chunk in one, see
        ``_INSERT_NAMED_JSON``); the lines go to the ``-data`` file once every row is
        in."""
        start, data_id = self._data_start(db)
        db.execute("SAVEPOINT named_results")
        # A request with its result already, or named twice, is not written again.
        if text is not None:
            added = db.execute(_INSERT_NAMED_JSON, (batch_id, start, text, key)).rowcount
        else:
            located = [
                (
                    line.kind,
                    line.code,
                    batch_id,
                    line.input_tokens,
                    line.output_tokens,
                    at,
                    len(line.data),
                    line.custom_id,
                    key,
                )
                for line, at in placed(lines, start)
            ]
            added = db.executemany(_INSERT_NAMED, located).rowcount
        if added != len(lines):
            db.execute("ROLLBACK TO named_results")
            db.execute("RELEASE named_results")
            return False
        db.execute("RELEASE named_results")
        self._write_data(db, start, data_id, [line.data for line in lines])
        return True

    def named_json(self, lines: Sequence[NamedResult]) -> str | None:
        """The JSON array ``_INSERT_NAMED_JSON`` takes for ``lines``; None when SQLite
        has no JSON functions or :func:`rows_json` gives none: the chunk then goes a
        statement a row. It needs no
        transaction: :meth:`SQLiteJournal.record_named
        <aiobatch._run._sqlite_journal.SQLiteJournal.record_named>` makes it in the
        loop's thread while the worker writes the chunk before (300,000 requests: made in
        the worker, the chunks took 2.6 s there)."""
        if not self._json_rows:
            return None
        return rows_json(
            [
                (
                    line.kind,
                    line.code,
                    line.input_tokens,
                    line.output_tokens,
                    at,
                    len(line.data),
                    line.custom_id,
                )
                for line, at in placed(lines, 0)
            ]
        )

    def record_named(
        self,
        key: str,
        batch_id: str | None,
        lines: Sequence[NamedResult],
        *,
        text: str | None = None,
        **fields: Any,
    ) -> bool:
        """In one transaction: final results named by ``custom_id`` and fields of shard
        ``key``, when every line names a request of the shard that waits for its first
        outcome (see :meth:`Journal.record_named
        <aiobatch._run._journal.Journal.record_named>`); else nothing, and False."""
        with self.transaction() as db:
            if not self.record_named_rows(db, key, batch_id, lines, text=text):
                return False
            if fields:
                self.set_fields(db, key, fields)
        return True

    def record(
        self,
        key: str | None,
        finals: Sequence[FinalResult],
        retries: Sequence[RetryLine] = (),
        **fields: Any,
    ) -> None:
        """In one transaction: final results (their requests are done), requests back to
        ``pending`` for another round, and fields of shard ``key``."""
        with self.transaction() as db:
            self.record_rows(db, finals, retries)
            if key is not None and fields:
                self.set_fields(db, key, fields)

    def settle(
        self,
        key: str,
        finals: Sequence[FinalResult],
        retries: Sequence[RetryLine],
        **fields: Any,
    ) -> Shard:
        """:meth:`record` and the shard's move to ``collected``, in one transaction."""
        with self.transaction() as db:
            self.record_rows(db, finals, retries)
            self.move_in(db, key, ShardState.COLLECTED, fields)
        return self.shard(key)

    def result_rows(
        self, *, order: str = "input", after: int = -1, limit: int = 1000
    ) -> list[ResultRow]:
        """Final results past a cursor: ``order="input"`` walks ``seq`` (``after`` is a
        seq), ``"completion"`` walks the completion counter ``n`` (``after`` is an
        ``n``)."""
        column = "r.seq" if order == "input" else "r.n"
        rows = self._db.execute(
            "SELECT r.n, q.custom_id, r.attempts, r.batch_id, r.kind, "
            f"r.data, {self._line_at}, r.seq "
            f"FROM results r JOIN requests q ON q.seq = r.seq WHERE {column} > ? "
            f"ORDER BY {column} LIMIT ?",
            (after, limit),
        ).fetchall()  # read whole: a line that cannot be read leaves no statement open
        lines = self._data.lines([row[5:] for row in rows])  # (data, at, size, seq)
        return [
            ResultRow(
                n=int(n),
                seq=int(seq),
                custom_id=str(cid),
                attempts=int(att),
                batch_id=bid,
                data=line,
                kind=str(kind),
            )
            for (n, cid, att, bid, kind, *_located, seq), line in zip(rows, lines, strict=True)
        ]

    def ids_without_result(self) -> set[str]:
        """The ``custom_id`` of every request without a final result."""
        rows = self._db.execute(f"SELECT custom_id FROM requests WHERE {_NO_RESULT}")
        return {str(custom_id) for (custom_id,) in rows}

    def result_lines(self, *, order: str = "input") -> Iterator[bytes]:
        """Every final result line, in ``order``, read page by page."""
        after = -1
        while page := self.result_page(order=order, after=after):
            after = page.last
            yield from page.lines

    def result_page(
        self, *, order: str, after: int, lines: int = PAGE_LINES, size: int = PAGE_BYTES
    ) -> Page:
        """Final result lines past a cursor (a ``seq`` in input order, an ``n`` in
        completion order): at most ``lines``, and no more once they make ``size``
        bytes."""
        column = "seq" if order == "input" else "n"
        if self._json_rows:
            page = self._result_page_json(column, after, lines, size)
            if page is not None:
                return page
        located: list[Located] = []
        held = 0
        last = -1
        rows = self._db.execute(
            f"SELECT {column}, seq, data, {self._line_at} FROM results WHERE {column} > ? "
            f"ORDER BY {column} LIMIT ?",
            (after, lines),
        )
        try:
            for cursor, seq, data, at, length in rows:
                located.append((data, at, length, seq))
                last = int(cursor)
                held += (len(data) if at is None else length) + 1
                if held >= size:
                    break
        finally:
            rows.close()
        return Page(self._data.lines(located), last)

    def _result_page_json(self, column: str, after: int, lines: int, size: int) -> Page | None:
        """:meth:`result_page` with the page's places read in one step of one statement
        (None when a row of it has its line in ``data``: written before schema 7).

        Read row by row, each step lets Python's GIL go and takes it back; a worker
        thread beside an event loop that never waits long (a task that spins with
        ``await asyncio.sleep(0)``) can wait for it a long time each: a run of 1,000
        requests spent 81 s here (``benchmarks/bench_busy_loop.py``). In the loop's
        own thread both ways cost about the same: 0.38 s per 100,000 rows alone, and
        0.21-0.23 s against 0.24-0.25 s in ``benchmarks/bench_run_100k.py``."""
        # Rows are read up to twice as many as the last page cut by ``size`` took: a
        # statement of one step reads all its rows before the cut. 200 pages of 100
        # rows of 400 bytes cut from 1,024 took 0.16-0.19 s; 0.036 s so, and 0.025 s
        # row by row. A page may so be shorter than ``size`` allows.
        limit = min(lines, self._page_rows.get(column, lines))
        text, old = self._db.execute(
            "SELECT json_group_array(json_array(c, seq, data_at, data_size)), "
            "coalesce(sum(data_at IS NULL), 0) FROM "
            f"(SELECT {column} AS c, seq, data_at, data_size FROM results WHERE {column} > ? "
            f"ORDER BY {column} LIMIT ?)",
            (after, limit),
        ).fetchone()
        if old:
            return None
        rows: list[list[int]] = json.loads(text)
        rows.sort()  # in order already: an aggregate's order is not promised
        located: list[Located] = []
        held = 0
        last = -1
        for cursor, seq, at, length in rows:
            located.append((b"", at, length, seq))
            last = cursor
            held += length + 1
            if held >= size:
                self._page_rows[column] = 2 * len(located)
                break
        else:
            if len(rows) == limit:  # not cut by size: the next page may take more rows
                self._page_rows[column] = min(lines, 2 * limit)
        return Page(self._data.lines(located), last)

    def counts(self) -> JournalCounts:
        """The figures of a report, read in one go."""
        db = self._db
        # Done: with a result (a pending request never has one); queued: the others.
        total, pending, done = db.execute(
            "SELECT (SELECT count(*) FROM requests), (SELECT count(*) FROM requests WHERE "
            "state = 'pending'), (SELECT count(*) FROM results)"
        ).fetchone()
        requests = {"pending": pending, "queued": total - pending - done, "done": done}
        requests = {k: v for k, v in requests.items() if v}
        # One pass over the results, summed here: SQLite's GROUP BY would sort them
        # (its sorter took 16 MiB with 64 KiB pages, which the process keeps), and an
        # index to group them by doubled the cost of recording a result.
        # So SQLite sums the successes and the tokens, and the failures (usually few) are
        # grouped here.
        succeeded, used_in, used_out = db.execute(
            "SELECT count(*), coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0) "
            "FROM results WHERE kind = 'success'"
        ).fetchone()
        tokens = [int(used_in), int(used_out)]
        kinds: dict[str, int] = {"success": int(succeeded)} if succeeded else {}
        codes: dict[str, int] = {}
        for kind, code, used_in, used_out in db.execute(
            "SELECT kind, code, input_tokens, output_tokens FROM results WHERE kind != 'success'"
        ):
            kinds[kind] = kinds.get(kind, 0) + 1
            name = kind if code is None else code
            codes[name] = codes.get(name, 0) + 1
            tokens[0] += used_in
            tokens[1] += used_out
        # Re-submitted: a retryable failure, and sent again (or ended) since; a request
        # still waiting for its retry round is not re-submitted yet.
        # ``aiobatch status`` (read-only) reads every request row for it, so that damage
        # anywhere in them shows now rather than when the run resumes; the run counts
        # through the index of the few requests that failed.
        scan = " NOT INDEXED" if self.readonly else ""
        attempts = db.execute(
            f"SELECT count(*) FROM requests{scan} WHERE attempts > 0 AND state != 'pending'"
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
        return JournalCounts(
            requests={str(k): int(v) for k, v in requests.items()},
            kinds={str(k): int(v) for k, v in kinds.items()},
            codes={str(k): int(v) for k, v in codes.items()},
            input_tokens=int(tokens[0]),
            output_tokens=int(tokens[1]),
            retried=int(attempts[0]),
            shard_states={str(k): int(v) for k, v in shard_states.items()},
            statuses={str(k): int(v) for k, v in statuses.items()},
            batches=int(batches[0]),
            recreated=int(batches[1]),
            rounds=int(rounds),
            last_step=float(last_step),
        )

    def failed_requests(self) -> Iterator[FailedRequest]:
        """Every request whose final result is an error, in input order, with its
        request line (streamed; no write may happen on this connection meanwhile)."""
        for seq, cid, kind, code, bid, att, request, result, at, size in self._db.execute(
            "SELECT r.seq, q.custom_id, r.kind, r.code, r.batch_id, r.attempts, q.data, "
            f"r.data, {self._line_at} FROM results r JOIN requests q ON q.seq = r.seq "
            "WHERE r.kind != 'success' ORDER BY r.seq"
        ):
            yield FailedRequest(
                seq=int(seq),
                custom_id=str(cid),
                kind=str(kind),
                code=code,
                batch_id=bid,
                attempts=int(att),
                request=bytes(request),
                result=self._data.lines([(result, at, size, seq)])[0],
            )

    def tokens_by_model(self) -> dict[str, ModelTokens]:
        """Prompt and completion tokens of the final results, by the model of the shard
        that produced them (each result counted once; ``""`` for results of no shard or
        a shard without a model)."""
        # Summed by shard here in one pass (no sort of the results: see counts()), then
        # by model over those few sums.
        by_shard: dict[str | None, list[int]] = {}
        for shard, used_in, used_out in self._db.execute(
            "SELECT shard, input_tokens, output_tokens FROM results"
        ):
            sums = by_shard.get(shard)
            if sums is None:
                by_shard[shard] = [used_in, used_out]
            else:
                sums[0] += used_in
                sums[1] += used_out
        shards = self._db.execute("SELECT key, model FROM shards")
        models = {str(key): str(model or "") for key, model in shards}
        totals: dict[str, list[int]] = {}
        for shard, (used_in, used_out) in by_shard.items():
            # A result of no shard (or of a shard without a model) counts under "".
            total = totals.setdefault(models.get(shard, "") if shard else "", [0, 0])
            total[0] += used_in
            total[1] += used_out
        return {model: ModelTokens(i, o) for model, (i, o) in totals.items() if i or o}
