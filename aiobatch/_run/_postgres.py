"""The run's :class:`~aiobatch._run._journal.Journal` on PostgreSQL: :class:`PostgresJournal`.

Many runs share one database; each is a row of ``aiobatch_runs`` (its ``name`` says
which run a command continues, its ``run_id`` is the id in its batches' metadata) and
every other row carries the run's internal ``rid``. The tables hold what the SQLite file
holds (see :mod:`aiobatch._run._sqlite`): the requests with their bytes and state, the
shards, and the final results, at most one per request (the primary key
``(rid, seq)`` of ``aiobatch_results`` enforces it, whichever process writes).

The driver is ``asyncpg`` (``pip install 'aiobatch[postgres]'``): it spends a quarter of
psycopg 3's client CPU on the bulk statements a run makes (see
``benchmarks/bench_pg_driver.py``). Each method takes a connection from a small pool, so
the run's tasks never wait on one another's statements; a failure of the database
(unreachable, credentials refused, gone mid-run) is a :class:`JournalError` naming the
database (never its password), and the run is resumable once it is back, since every
write is one transaction.

The schema is versioned (``aiobatch_schema``) and migrated forward on opening, under an
advisory lock so that workers opening at once do not race; a database that holds other
programs' tables (without aiobatch's), or aiobatch's tables at a newer version, is
refused (:mod:`._postgres_schema`). The workers' leases are in :mod:`._postgres_leases`,
a new run's ingest in :mod:`._postgres_ingest`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import attrs

from ..errors import JournalError, LeaseLostError
from ._journal import CHUNK_BYTES, PENDING_PAGE, too_many_batches
from ._pg_url import PgLocation, parse_postgres_url
from ._postgres_ingest import PgIngest
from ._postgres_leases import PgLeases
from ._postgres_schema import (
    _LOCK_SPACE,
    _NOW,
    _SHARD_SELECT,
    SCHEMA_VERSION,
    _shard,
    migrate,
)
from ._records import (
    SHARD_FIELDS,
    FinalResult,
    JournalCounts,
    Member,
    ModelTokens,
    NamedResult,
    PendingRequest,
    QueuedLine,
    RequestGroup,
    ResultRow,
    RetryLine,
    RunMeta,
    Shard,
    ShardPlan,
)
from ._sqlite import _check_move
from ._states import ShardState

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the install
    raise JournalError(
        "a PostgreSQL journal needs the asyncpg driver: pip install 'aiobatch[postgres]'"
    ) from exc

__all__ = ["SCHEMA_VERSION", "PostgresJournal", "connect_failure"]


_META_FIELDS = tuple(field.name for field in attrs.fields(RunMeta))
_META_SELECT = "SELECT " + ", ".join(f'"{name}"' for name in _META_FIELDS) + " FROM aiobatch_runs"

#: What a failing connection raises (the database is unreachable or went away).
_GONE: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)


def connect_failure(shown: str, exc: BaseException) -> JournalError:
    """The JournalError for a database that cannot be reached or refused us."""
    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return JournalError(
            f"the journal database {shown} refused the credentials ({exc}); check the user "
            "and password in the URL"
        )
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return JournalError(f"the journal database {shown} does not exist ({exc}); create it")
    return JournalError(
        f"the journal database {shown} cannot be reached ({type(exc).__name__}: {exc}); "
        "nothing was lost: run again once it is back"
    )


def _bounded(query: str, most_bytes: str) -> str:
    """``query`` (rows ``k, data`` in ``k`` order) cut to the rows whose bytes add up to at
    most the parameter ``most_bytes`` (``$4``), and at least its first row: a chunk of
    lines holds bounded memory however long the lines are."""
    return (
        "SELECT k, data FROM (SELECT k, data, sum(length(data)) OVER (ORDER BY k) AS total, "
        f"row_number() OVER (ORDER BY k) AS i FROM ({query}) AS page) AS sized "
        f"WHERE total <= {most_bytes} OR i = 1 ORDER BY k"
    )


class PostgresJournal(PgLeases):
    """The :class:`~aiobatch._run._journal.Journal` of one run in a PostgreSQL database.

    Open it with :meth:`open` (it connects, and creates or migrates the schema).

    Args:
        location: the parsed URL.
        pool: its connection pool.
        name: the run's name (or id): which run this journal is.
    """

    def __init__(self, location: PgLocation, pool: Any, name: str) -> None:
        self._where = location
        self._pool = pool
        self.name = name
        #: the worker whose leases fence this journal's shard writes (None: no leases,
        #: one process runs the run)
        self.owner: str | None = None
        self.lease_seconds = 30.0
        self._rid: int | None = None
        self._lock_conn: Any = None
        self._closed = False

    # --- opening -------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, url: str, *, name: str | None = None, pool_size: int = 4, timeout: float = 15.0
    ) -> PostgresJournal:
        """Connect to the database of ``url`` and open the run ``name`` (or the URL's
        ``?run=``) in it (it is made by the run's ingest when new).

        Raises:
            JournalError: the URL is malformed, the database cannot be reached or
                refused the credentials, holds another program's tables, or aiobatch's
                at a newer schema; or no run is named.
        """
        where = parse_postgres_url(url)
        run = name or where.run
        if not run:
            raise JournalError(
                f"the journal URL {where.shown} names no run: add ?run=NAME (a run's name or id)"
            )
        settings = {"search_path": where.schema} if where.schema else {}
        try:
            if where.schema:
                conn = await asyncpg.connect(where.dsn, timeout=timeout)
                try:
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{where.schema}"')
                except asyncpg.UniqueViolationError:
                    pass  # another process made it at the same moment
                finally:
                    await conn.close()
            pool = await asyncpg.create_pool(
                where.dsn,
                min_size=1,
                max_size=pool_size,
                timeout=timeout,
                command_timeout=300,
                server_settings=settings,
            )
        except JournalError:
            raise
        except (*_GONE, asyncpg.PostgresError, ValueError) as exc:
            raise connect_failure(where.shown, exc) from exc
        journal = cls(where, pool, run)
        try:
            await journal._migrate()
        except BaseException:
            await pool.close()
            raise
        return journal

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        """A connection of the pool; a failure of the database shows as JournalError."""
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except JournalError:
            raise
        except _GONE as exc:
            raise connect_failure(self._where.shown, exc) from exc

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[Any]:
        async with self._conn() as conn, conn.transaction():
            yield conn

    async def _migrate(self) -> None:
        async with self._tx() as conn:
            await migrate(conn, self._where.shown)

    @property
    def location(self) -> str:
        return f"{self._where.shown} (run {self.name})"

    async def close(self, *, background: bool = False) -> None:
        # ``background`` is moot: closing the pool is network work, nothing holds the loop.
        if self._closed:
            return
        self._closed = True
        await self.release()
        with contextlib.suppress(*_GONE):
            await asyncio.wait_for(self._pool.close(), 10)
        self._pool.terminate()

    # --- ownership -----------------------------------------------------------------------

    def _lock_key(self) -> str:
        return f"{self._where.schema or ''}:{self.name}"

    async def acquire(self) -> None:
        if self._lock_conn is not None:
            return
        try:
            conn = await asyncpg.connect(self._where.dsn, timeout=15)
            got = await conn.fetchval(
                "SELECT pg_try_advisory_lock($1, hashtext($2))", _LOCK_SPACE, self._lock_key()
            )
        except _GONE as exc:
            raise connect_failure(self._where.shown, exc) from exc
        if not got:
            await conn.close()
            raise JournalError(
                f"the journal {self.location} is in use by another process; one run at a time"
            )
        self._lock_conn = conn

    async def release(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            with contextlib.suppress(*_GONE):
                await conn.close(timeout=5)
            conn.terminate()

    # --- the run -------------------------------------------------------------------------

    async def _run_rid(self, conn: Any) -> int | None:
        if self._rid is None:
            rid = await conn.fetchval(
                "SELECT rid FROM aiobatch_runs WHERE name = $1 OR run_id = $1 "
                "ORDER BY (name = $1) DESC LIMIT 1",
                self.name,
            )
            self._rid = None if rid is None else int(rid)
        return self._rid

    async def rid(self) -> int:
        """The run's internal id; -1 before the run was recorded (reads find nothing)."""
        if self._rid is not None:
            return self._rid
        async with self._conn() as conn:
            rid = await self._run_rid(conn)
        return -1 if rid is None else rid

    async def _write_rid(self) -> int:
        """The run's internal id, for a write (the run must have been recorded)."""
        rid = await self.rid()
        if rid < 0:
            raise JournalError(f"no run {self.name!r} in {self._where.shown}")
        return rid

    @contextlib.asynccontextmanager
    async def ingest(self, *, background: bool = False) -> AsyncIterator[PgIngest]:
        async with self._tx() as conn:
            try:
                rid = await conn.fetchval(
                    "INSERT INTO aiobatch_runs (name) VALUES ($1) RETURNING rid", self.name
                )
            except asyncpg.UniqueViolationError as exc:
                raise JournalError(f"the journal {self.location} holds a run already") from exc
            yield PgIngest(conn, int(rid))
        self._rid = int(rid)

    async def meta(self) -> RunMeta | None:
        async with self._conn() as conn:
            rid = await self._run_rid(conn)
            if rid is None:
                return None
            row = await conn.fetchrow(_META_SELECT + " WHERE rid = $1", rid)
        if row is None or row["run_id"] is None:
            return None
        return RunMeta(**{name: row[name] for name in _META_FIELDS})

    async def _set_run(self, sets: str, *values: Any) -> None:
        rid = await self._write_rid()
        async with self._conn() as conn:
            await conn.execute(f"UPDATE aiobatch_runs SET {sets} WHERE rid = $1", rid, *values)

    async def set_state(self, state: str, *, at: float, clear_cancel: bool = False) -> None:
        clear = ", cancel_requested = NULL" if clear_cancel else ""
        await self._set_run(f"state = $2, updated_at = $3{clear}", state, at)

    async def touch(self, at: float) -> None:
        await self._set_run("updated_at = $2", at)

    async def request_cancel(self, at: float) -> None:
        await self._set_run("cancel_requested = $2", repr(at))

    async def cancel_requested(self) -> bool:
        rid = await self.rid()
        async with self._conn() as conn:
            flag = await conn.fetchval(
                "SELECT cancel_requested FROM aiobatch_runs WHERE rid = $1", rid
            )
        return bool(flag)

    async def set_output(self, path: str) -> None:
        await self._set_run("output_written = $2", path)

    async def count_extra_uploads(self, deleted: int) -> None:
        await self._set_run("extra_uploads_deleted = extra_uploads_deleted + $2", deleted)

    # --- requests ------------------------------------------------------------------------

    async def _value(self, query: str, *args: Any) -> Any:
        rid = await self.rid()
        async with self._conn() as conn:
            return await conn.fetchval(query, rid, *args)

    async def _count(self, table: str, where: str = "true") -> int:
        """How many of the run's rows of ``table`` match ``where``."""
        return int(await self._value(f"SELECT count(*) FROM {table} WHERE rid = $1 AND {where}"))

    async def pending_count(self) -> int:
        return await self._count("aiobatch_requests", "state = 'pending'")

    async def has_fresh_pending(self) -> bool:
        return bool(
            await self._value(
                "SELECT EXISTS (SELECT 1 FROM aiobatch_requests WHERE rid = $1 "
                "AND state = 'pending' AND last_error IS NULL)"
            )
        )

    async def not_done_count(self) -> int:
        return await self._count("aiobatch_requests", "state != 'done'")

    async def retrying_count(self) -> int:
        return await self._count("aiobatch_requests", "state != 'done' AND attempts > 0")

    async def requeue_orphans(self) -> int:
        rid = await self._write_rid()
        async with self._tx() as conn:
            status = await conn.execute(
                "UPDATE aiobatch_requests SET state = 'pending' WHERE rid = $1 "
                "AND state = 'queued' AND shard IN "
                "(SELECT key FROM aiobatch_shards WHERE rid = $1 AND state = 'collected')",
                rid,
            )
        return int(status.split()[-1])

    async def pending_groups(self) -> list[RequestGroup]:
        rid = await self.rid()
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT DISTINCT url, model FROM aiobatch_requests "
                "WHERE rid = $1 AND state = 'pending' ORDER BY url, model",
                rid,
            )
        return [RequestGroup(str(r[0]), None if r[1] is None else str(r[1])) for r in rows]

    async def pending_requests(
        self,
        url: str,
        model: str | None,
        *,
        chunk: int = PENDING_PAGE,
        background: bool = False,  # the server reads: nothing holds the loop
    ) -> AsyncIterator[PendingRequest]:
        rid = await self.rid()
        after = -1
        while True:
            async with self._conn() as conn:
                rows = await conn.fetch(
                    "SELECT seq, length(data) + 1, tokens, inputs FROM aiobatch_requests "
                    "WHERE rid = $1 AND state = 'pending' AND url = $2 "
                    "AND model IS NOT DISTINCT FROM $3 AND seq > $4 ORDER BY seq LIMIT $5",
                    rid,
                    url,
                    model,
                    after,
                    chunk,
                )
            if not rows:
                return
            for seq, size, tokens, inputs in rows:
                yield PendingRequest(seq, size, tokens, inputs, url, model)
            after = int(rows[-1][0])

    async def shard_lines(self, key: str, *, chunk: int = 2000) -> AsyncIterator[Sequence[bytes]]:
        rid = await self.rid()
        after = -1
        while True:
            async with self._conn() as conn:
                rows = await conn.fetch(
                    _bounded(
                        "SELECT seq AS k, data FROM aiobatch_requests WHERE rid = $1 "
                        "AND shard = $2 AND state != 'pending' AND seq > $3 ORDER BY seq "
                        "LIMIT $4",
                        "$5",
                    ),
                    rid,
                    key,
                    after,
                    chunk,
                    CHUNK_BYTES,
                )
            if not rows:
                return
            yield [bytes(r[1]) for r in rows]
            after = int(rows[-1][0])

    async def members(
        self, key: str, custom_ids: Sequence[str], *, background: bool = False
    ) -> dict[str, Member]:
        # ``background`` is moot: the server looks them up.
        rid = await self.rid()
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT custom_id, seq, attempts, state FROM aiobatch_requests "
                "WHERE rid = $1 AND shard = $2 AND custom_id = ANY($3::text[])",
                rid,
                key,
                list(custom_ids),
            )
        return {r[0]: Member(r[1], r[2], r[3] == "queued") for r in rows}

    async def queued_at(self, key: str, *, background: bool = False) -> dict[int, QueuedLine]:
        # ``background`` is moot: the server reads, nothing holds the loop.
        rid = await self.rid()
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT pos, seq, custom_id, attempts FROM aiobatch_requests "
                "WHERE rid = $1 AND shard = $2 AND state = 'queued' ORDER BY seq",
                rid,
                key,
            )
        return {r[0]: QueuedLine(r[1], r[2], r[3]) for r in rows}

    # --- shards --------------------------------------------------------------------------

    async def add_shard(
        self,
        key: str,
        plan: ShardPlan,
        *,
        planned_at: float,
        max_batches: int | None = None,
        background: bool = False,  # the server writes: nothing holds the loop
    ) -> Shard:
        rid = await self._write_rid()
        async with self._tx() as conn:
            await self.fence_planner(conn, rid, key)
            await conn.execute(
                "UPDATE aiobatch_requests r SET state = 'queued', shard = $2, pos = u.pos, "
                "batches = r.batches + 1 FROM unnest($3::int[], $4::int[]) AS u(seq, pos) "
                "WHERE r.rid = $1 AND r.seq = u.seq AND r.state = 'pending'",
                rid,
                key,
                list(plan.seqs),
                list(range(1, len(plan.seqs) + 1)),
            )
            if max_batches is not None:
                row = await conn.fetchrow(
                    "SELECT custom_id, batches FROM aiobatch_requests WHERE rid = $1 AND "
                    "shard = $2 ORDER BY batches DESC, seq LIMIT 1",
                    rid,
                    key,
                )
                if row is not None and row[1] > max_batches:
                    cid, batches = row[0], row[1]
                    raise too_many_batches(str(cid), int(batches), max_batches)
            round_ = await conn.fetchval(
                "SELECT coalesce(max(attempts), 0) FROM aiobatch_requests "
                "WHERE rid = $1 AND shard = $2",
                rid,
                key,
            )
            row = await conn.fetchrow(
                # A new shard is leased to nobody: whichever worker claims it acts on it.
                "INSERT INTO aiobatch_shards (rid, key, round, url, model, lines, bytes, "
                "tokens, state, planned_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
                f"RETURNING {', '.join(SHARD_FIELDS)}",
                rid,
                key,
                int(round_),
                plan.url,
                plan.model,
                len(plan.seqs),
                plan.size,
                plan.tokens,
                ShardState.PLANNED.value,
                planned_at,
            )
        return _shard(row)

    async def _shard_on(self, conn: Any, rid: int, key: str) -> Shard:
        row = await conn.fetchrow(_SHARD_SELECT + " WHERE rid = $1 AND key = $2", rid, key)
        if row is None:
            raise JournalError(f"{self.location}: no shard {key!r}")
        return _shard(row)

    async def shard(self, key: str) -> Shard:
        rid = await self.rid()
        async with self._conn() as conn:
            return await self._shard_on(conn, rid, key)

    async def shards(self, *states: ShardState) -> list[Shard]:
        rid = await self.rid()
        async with self._conn() as conn:
            if states:
                rows = await conn.fetch(
                    _SHARD_SELECT + " WHERE rid = $1 AND state = ANY($2::text[]) ORDER BY key",
                    rid,
                    [state.value for state in states],
                )
            else:
                rows = await conn.fetch(_SHARD_SELECT + " WHERE rid = $1 ORDER BY key", rid)
        return [_shard(row) for row in rows]

    async def shard_count(self) -> int:
        return await self._count("aiobatch_shards")

    async def _fence(self, conn: Any, rid: int, key: str) -> str | None:
        """Lock a shard's row for this transaction and return its state; with leases,
        refuse (LeaseLostError) when this worker's lease on it is gone."""
        row = await conn.fetchrow(
            f"SELECT state, lease_owner, coalesce(lease_until > {_NOW}, false) "
            "FROM aiobatch_shards WHERE rid = $1 AND key = $2 FOR UPDATE",
            rid,
            key,
        )
        if row is None:
            return None
        if self.owner is not None and (row[1] != self.owner or not row[2]):
            raise LeaseLostError(
                f"shard {key}: the lease of worker {self.owner} on it "
                + ("ran out" if row[1] == self.owner else f"is held by {row[1]}")
                + "; this worker stops acting on it (nothing was written)",
                shard=key,
            )
        return str(row[0])

    async def _set(self, conn: Any, rid: int, key: str, fields: Mapping[str, Any]) -> None:
        unknown = set(fields) - set(SHARD_FIELDS)
        if unknown:
            raise ValueError(f"unknown shard fields: {sorted(unknown)}")
        if not fields:
            return
        sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(fields, start=3))
        values = [v.value if isinstance(v, ShardState) else v for v in fields.values()]
        await conn.execute(
            f"UPDATE aiobatch_shards SET {sets} WHERE rid = $1 AND key = $2", rid, key, *values
        )

    async def _move(self, conn: Any, rid: int, key: str, to: ShardState, fields: Any) -> None:
        state = await self._fence(conn, rid, key)
        if state is None:
            raise JournalError(f"{self.location}: no shard {key!r}")
        _check_move(key, ShardState(state), to)
        await self._set(conn, rid, key, {**fields, "state": to})

    async def move(self, key: str, to: ShardState, **fields: Any) -> Shard:
        rid = await self._write_rid()
        async with self._tx() as conn:
            await self._move(conn, rid, key, to, fields)
            return await self._shard_on(conn, rid, key)

    async def update(self, key: str, **fields: Any) -> None:
        if "state" in fields or "key" in fields:
            raise ValueError("a shard's state changes by move(), its key never")
        if fields:
            rid = await self._write_rid()
            async with self._tx() as conn:
                await self._fence(conn, rid, key)
                await self._set(conn, rid, key, fields)

    # --- results -------------------------------------------------------------------------

    @staticmethod
    async def _record(
        conn: Any, rid: int, finals: Sequence[FinalResult], retries: Sequence[RetryLine]
    ) -> None:
        if finals:
            # A request that already has its result keeps it (the primary key says so).
            await conn.execute(
                "INSERT INTO aiobatch_results (rid, seq, kind, code, shard, batch_id, attempts, "
                "input_tokens, output_tokens, data) SELECT $1, * FROM unnest($2::int[], "
                "$3::text[], $4::text[], $5::text[], $6::text[], $7::int[], $8::bigint[], "
                "$9::bigint[], $10::bytea[]) ON CONFLICT (rid, seq) DO NOTHING",
                rid,
                [f.seq for f in finals],
                [f.kind for f in finals],
                [f.code for f in finals],
                [f.shard for f in finals],
                [f.batch_id for f in finals],
                [f.attempts for f in finals],
                [f.input_tokens for f in finals],
                [f.output_tokens for f in finals],
                [f.data for f in finals],
            )
            await conn.execute(
                "UPDATE aiobatch_requests SET state = 'done' WHERE rid = $1 "
                "AND seq = ANY($2::int[])",
                rid,
                [f.seq for f in finals],
            )
        if retries:
            await conn.execute(
                "UPDATE aiobatch_requests r SET state = 'pending', attempts = u.attempts, "
                "last_error = u.last_error FROM unnest($2::int[], $3::int[], $4::bytea[]) "
                "AS u(seq, attempts, last_error) WHERE r.rid = $1 AND r.seq = u.seq "
                "AND r.state != 'done'",
                rid,
                [r.seq for r in retries],
                [r.attempts for r in retries],
                [r.last_error for r in retries],
            )

    async def record(
        self,
        key: str | None,
        finals: Sequence[FinalResult],
        retries: Sequence[RetryLine] = (),
        *,
        background: bool = False,  # the server writes: nothing holds the loop
        **fields: Any,
    ) -> None:
        rid = await self._write_rid()
        async with self._tx() as conn:
            if key is not None:
                await self._fence(conn, rid, key)
            await self._record(conn, rid, finals, retries)
            if key is not None and fields:
                await self._set(conn, rid, key, fields)

    async def record_named(
        self,
        key: str,
        batch_id: str | None,
        lines: Sequence[NamedResult],
        *,
        background: bool = False,  # the server writes: nothing holds the loop
        **fields: Any,
    ) -> bool:
        rid = await self._write_rid()
        async with self._tx() as conn:
            await self._fence(conn, rid, key)
            # A request with its result is 'done' here; the shard's row is locked.
            rows = await conn.fetch(
                "SELECT custom_id, seq FROM aiobatch_requests WHERE rid = $1 AND shard = $2 "
                "AND state = 'queued' AND attempts = 0 AND custom_id = ANY($3::text[])",
                rid,
                key,
                [line.custom_id for line in lines],
            )
            seqs = {str(r[0]): int(r[1]) for r in rows}
            if len(seqs) != len(lines):  # one a stranger, or named twice (ids are unique)
                return False
            finals = [
                FinalResult(
                    seq=seqs[line.custom_id],
                    kind=line.kind,
                    code=line.code,
                    shard=key,
                    batch_id=batch_id,
                    attempts=0,
                    data=line.data,
                    input_tokens=line.input_tokens,
                    output_tokens=line.output_tokens,
                )
                for line in lines
            ]
            await self._record(conn, rid, finals, ())
            await self._set(conn, rid, key, fields)
        return True

    async def settle(
        self,
        key: str,
        finals: Sequence[FinalResult],
        retries: Sequence[RetryLine],
        **fields: Any,
    ) -> Shard:
        rid = await self._write_rid()
        async with self._tx() as conn:
            await self._move(conn, rid, key, ShardState.COLLECTED, {})
            await self._record(conn, rid, finals, retries)
            await self._set(conn, rid, key, fields)
            return await self._shard_on(conn, rid, key)

    async def result_rows(self, *, order: str, after: int, limit: int) -> list[ResultRow]:
        column = "r.seq" if order == "input" else "r.n"
        rid = await self.rid()
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT r.n, r.seq, q.custom_id, r.attempts, r.batch_id, r.data, r.kind "
                "FROM aiobatch_results r JOIN aiobatch_requests q ON q.rid = r.rid "
                f"AND q.seq = r.seq WHERE r.rid = $1 AND {column} > $2 ORDER BY {column} "
                "LIMIT $3",
                rid,
                after,
                limit,
            )
        return [
            ResultRow(
                n=r[0], seq=r[1], custom_id=r[2], attempts=r[3], batch_id=r[4], data=r[5], kind=r[6]
            )
            for r in rows
        ]

    async def result_lines(
        self,
        *,
        order: str,
        chunk: int = 8192,
        background: bool = False,  # the server reads: nothing holds the loop
    ) -> AsyncIterator[Iterable[bytes]]:
        column = "seq" if order == "input" else "n"
        rid = await self.rid()
        after = -1
        while True:
            async with self._conn() as conn:
                rows = await conn.fetch(
                    _bounded(
                        f"SELECT {column} AS k, data FROM aiobatch_results WHERE rid = $1 "
                        f"AND {column} > $2 ORDER BY {column} LIMIT $3",
                        "$4",
                    ),
                    rid,
                    after,
                    chunk,
                    CHUNK_BYTES,
                )
            if not rows:
                return
            yield [bytes(r[1]) for r in rows]
            after = int(rows[-1][0])

    async def tokens_by_model(self, *, background: bool = False) -> dict[str, ModelTokens]:
        # ``background`` is moot: the server reads, nothing holds the loop.
        rid = await self.rid()
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT coalesce(s.model, ''), coalesce(sum(r.input_tokens), 0), "
                "coalesce(sum(r.output_tokens), 0) FROM aiobatch_results r "
                "LEFT JOIN aiobatch_shards s ON s.rid = r.rid AND s.key = r.shard "
                "WHERE r.rid = $1 GROUP BY coalesce(s.model, '')",
                rid,
            )
        return {str(model): ModelTokens(int(i), int(o)) for model, i, o in rows if i or o}

    async def counts(self, *, background: bool = False) -> JournalCounts:
        # ``background`` is moot: the server reads, nothing holds the loop.
        rid = await self.rid()
        async with self._conn() as conn, conn.transaction(isolation="repeatable_read"):

            async def pairs(query: str) -> dict[str, int]:
                return {str(k): int(v) for k, v in await conn.fetch(query, rid)}

            requests = await pairs(
                "SELECT state, count(*) FROM aiobatch_requests WHERE rid = $1 GROUP BY state"
            )
            kinds = await pairs(
                "SELECT kind, count(*) FROM aiobatch_results WHERE rid = $1 GROUP BY kind"
            )
            codes = await pairs(
                "SELECT coalesce(code, kind), count(*) FROM aiobatch_results WHERE rid = $1 "
                "AND kind != 'success' GROUP BY coalesce(code, kind)"
            )
            tokens = await conn.fetchrow(
                "SELECT coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0), "
                "(SELECT count(*) FROM aiobatch_requests WHERE rid = $1 AND attempts > 0 "
                "AND state != 'pending') FROM aiobatch_results WHERE rid = $1",
                rid,
            )
            shard_states = await pairs(
                "SELECT state, count(*) FROM aiobatch_shards WHERE rid = $1 GROUP BY state"
            )
            statuses = await pairs(
                "SELECT coalesce(status, state), count(*) FROM aiobatch_shards WHERE rid = $1 "
                "GROUP BY coalesce(status, state)"
            )
            figures = await conn.fetchrow(
                "SELECT count(batch_id) + coalesce(sum(creates), 0), coalesce(sum(creates), 0) "
                "- count(*) FILTER (WHERE creates > 0 AND batch_id IS NULL), "
                "coalesce(max(round), 0), coalesce(max(greatest(planned_at, "
                "coalesce(upload_started_at, 0), coalesce(create_started_at, 0))), 0) "
                "FROM aiobatch_shards WHERE rid = $1",
                rid,
            )
        return JournalCounts(
            requests=requests,
            kinds=kinds,
            codes=codes,
            input_tokens=int(tokens[0]),
            output_tokens=int(tokens[1]),
            retried=int(tokens[2]),
            shard_states=shard_states,
            statuses=statuses,
            batches=int(figures[0]),
            recreated=int(figures[1]),
            rounds=int(figures[2]),
            last_step=float(figures[3]),
        )

    async def open_batches(self) -> list[Shard]:
        return [s for s in await self.shards(ShardState.OPEN) if s.batch_id is not None]
