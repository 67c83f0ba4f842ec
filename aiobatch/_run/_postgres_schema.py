"""The PostgreSQL journal's schema: its version and the migrations that bring an older
database forward (:mod:`aiobatch._run._postgres` applies them under an advisory lock)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import JournalError
from ._records import SHARD_FIELDS, Shard

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate"]

#: The schema this aiobatch writes; older ones are migrated forward on opening.
SCHEMA_VERSION = 4
_PROGRAM = "aiobatch"
#: The first key of every advisory lock aiobatch takes ("aiob").
_LOCK_SPACE = 0x61696F62

#: The database's clock, in seconds since the epoch (leases are read and set by it).
_NOW = "extract(epoch FROM clock_timestamp())"

_SHARD_SELECT = f"SELECT {', '.join(SHARD_FIELDS)} FROM aiobatch_shards"


def _shard(row: Any) -> Shard:
    """A shard from its row (the columns of ``SHARD_FIELDS``, in order)."""
    return Shard(**dict(zip(SHARD_FIELDS, row, strict=True)))


#: Version -> the statements that bring the schema from the version before to it.
MIGRATIONS: Mapping[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE aiobatch_schema (
            program TEXT NOT NULL,
            version INTEGER NOT NULL
        )""",
        """CREATE TABLE aiobatch_runs (
            rid BIGSERIAL PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            run_id TEXT UNIQUE,
            source TEXT NOT NULL DEFAULT '',
            fingerprint TEXT NOT NULL DEFAULT '',
            state TEXT NOT NULL DEFAULT 'running',
            started_at DOUBLE PRECISION NOT NULL DEFAULT 0,
            updated_at DOUBLE PRECISION NOT NULL DEFAULT 0,
            skipped INTEGER NOT NULL DEFAULT 0,
            problems TEXT NOT NULL DEFAULT '',
            "order" TEXT NOT NULL DEFAULT 'input',
            cancel_requested TEXT,
            output_written TEXT,
            extra_uploads_deleted INTEGER NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE aiobatch_requests (
            rid BIGINT NOT NULL,
            seq INTEGER NOT NULL,
            custom_id TEXT NOT NULL,
            line INTEGER NOT NULL,
            url TEXT NOT NULL,
            model TEXT,
            tokens INTEGER NOT NULL,
            inputs INTEGER NOT NULL DEFAULT 1,
            data BYTEA NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            shard TEXT,
            pos INTEGER,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error BYTEA,
            batches INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (rid, seq),
            UNIQUE (rid, custom_id)
        )""",
        "CREATE INDEX aiobatch_requests_pending ON aiobatch_requests (rid, url, model, seq) "
        "WHERE state = 'pending'",
        "CREATE INDEX aiobatch_requests_shard ON aiobatch_requests (rid, shard, seq)",
        """CREATE TABLE aiobatch_shards (
            rid BIGINT NOT NULL,
            key TEXT NOT NULL,
            round INTEGER NOT NULL,
            url TEXT NOT NULL,
            model TEXT,
            lines INTEGER NOT NULL,
            bytes BIGINT NOT NULL,
            tokens BIGINT NOT NULL,
            state TEXT NOT NULL,
            planned_at DOUBLE PRECISION NOT NULL,
            upload_started_at DOUBLE PRECISION,
            file_id TEXT,
            creates INTEGER NOT NULL DEFAULT 0,
            create_key TEXT,
            create_started_at DOUBLE PRECISION,
            not_before DOUBLE PRECISION,
            batch_id TEXT,
            status TEXT,
            output_file_id TEXT,
            error_file_id TEXT,
            output_done INTEGER NOT NULL DEFAULT 0,
            error_done INTEGER NOT NULL DEFAULT 0,
            cancel_reason TEXT,
            history TEXT NOT NULL DEFAULT '',
            input_tokens BIGINT NOT NULL DEFAULT 0,
            output_tokens BIGINT NOT NULL DEFAULT 0,
            note TEXT,
            PRIMARY KEY (rid, key)
        )""",
        "CREATE INDEX aiobatch_shards_state ON aiobatch_shards (rid, state)",
        """CREATE TABLE aiobatch_results (
            rid BIGINT NOT NULL,
            seq INTEGER NOT NULL,
            n BIGSERIAL NOT NULL,
            kind TEXT NOT NULL,
            code TEXT,
            shard TEXT,
            batch_id TEXT,
            attempts INTEGER NOT NULL,
            input_tokens BIGINT NOT NULL DEFAULT 0,
            output_tokens BIGINT NOT NULL DEFAULT 0,
            data BYTEA NOT NULL,
            PRIMARY KEY (rid, seq)
        )""",
        "CREATE INDEX aiobatch_results_n ON aiobatch_results (rid, n)",
    ),
    # Leases: which worker acts on a shard (and plans a run) until when, on the
    # database's clock (seconds since the epoch).
    2: (
        "ALTER TABLE aiobatch_shards ADD COLUMN lease_owner TEXT",
        "ALTER TABLE aiobatch_shards ADD COLUMN lease_until DOUBLE PRECISION",
        "ALTER TABLE aiobatch_runs ADD COLUMN planner TEXT",
        "ALTER TABLE aiobatch_runs ADD COLUMN planner_until DOUBLE PRECISION",
    ),
    # Live workers of a run (each renews its row with its leases): shards are claimed in
    # fair shares among them.
    3: (
        """CREATE TABLE aiobatch_workers (
            rid BIGINT NOT NULL,
            worker TEXT NOT NULL,
            seen_until DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (rid, worker)
        )""",
    ),
    # The share of the run's request budget each worker took (1 / share_of): a worker
    # joining sends nothing until every other live one took its new share.
    4: ("ALTER TABLE aiobatch_workers ADD COLUMN share_of INTEGER",),
}


async def migrate(conn: Any, shown: str) -> None:
    """Bring the schema of the database behind ``conn`` (shown as ``shown``) to
    :data:`SCHEMA_VERSION`, in the caller's transaction, under an advisory lock so that
    processes opening at once do not race.

    Raises:
        JournalError: the database holds another program's tables (without aiobatch's),
            or aiobatch's at a newer version.
    """
    await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))", _LOCK_SPACE)
    tables = {
        str(r[0])
        for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )
    }
    version = 0
    if "aiobatch_schema" in tables:
        row = await conn.fetchrow("SELECT program, version FROM aiobatch_schema")
        if row is None or row[0] != _PROGRAM:
            raise JournalError(
                f"the database {shown} holds an 'aiobatch_schema' table that is not "
                "aiobatch's; use another database or ?schema=NAME"
            )
        version = int(row[1])
    elif tables:
        listed = ", ".join(sorted(tables)[:5])
        raise JournalError(
            f"the database {shown} holds another program's tables ({listed}) and no "
            "aiobatch journal; use an empty database, or a schema of aiobatch's own "
            "with ?schema=NAME in the URL"
        )
    if version > SCHEMA_VERSION:
        raise JournalError(
            f"the database {shown} has aiobatch journal schema {version}; this aiobatch "
            f"reads up to {SCHEMA_VERSION}: upgrade aiobatch"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[target]:
            await conn.execute(statement)
        if target == 1:
            await conn.execute(
                "INSERT INTO aiobatch_schema (program, version) VALUES ($1, $2)",
                _PROGRAM,
                target,
            )
        else:
            await conn.execute("UPDATE aiobatch_schema SET version = $1", target)
