"""Recording a new run's requests in a PostgreSQL journal (one transaction, ``COPY``):
what :meth:`PostgresJournal.ingest <aiobatch._run._postgres.PostgresJournal.ingest>`
yields."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from ._records import NewShard, RequestRow, RunMeta
from ._states import ShardState

__all__ = ["PgIngest"]

_COLUMNS = [
    "rid",
    "seq",
    "custom_id",
    "line",
    "url",
    "model",
    "tokens",
    "inputs",
    "data",
    "shard",
    "pos",
    "state",
    "batches",
]
_SHARD_COLUMNS = [
    "rid",
    "key",
    "round",
    "url",
    "model",
    "lines",
    "bytes",
    "tokens",
    "state",
    "planned_at",
]
#: The unique constraint of a run's custom_ids (its name as PostgreSQL makes it).
_ID_CONSTRAINT = "aiobatch_requests_rid_custom_id_key"


class PgIngest:
    """The requests of a new run, added on the ingest's connection ``conn``."""

    def __init__(self, conn: Any, rid: int) -> None:
        self._conn = conn
        self._rid = rid

    async def add(self, rows: Sequence[RequestRow]) -> bool:
        if not rows:
            return True
        rid = self._rid
        try:
            async with self._conn.transaction():  # a savepoint: the ingest's goes on
                await self._conn.copy_records_to_table(
                    "aiobatch_requests",
                    # a row with a shard is queued in it, in its first batch
                    records=[
                        (rid, *row, "pending", 0) if row.shard is None else (rid, *row, "queued", 1)
                        for row in rows
                    ],
                    columns=_COLUMNS,
                )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != _ID_CONSTRAINT:
                raise
            return False
        return True

    async def taken(self, custom_ids: Sequence[str]) -> dict[str, int]:
        rows = await self._conn.fetch(
            "SELECT custom_id, line FROM aiobatch_requests "
            "WHERE rid = $1 AND custom_id = ANY($2::text[])",
            self._rid,
            list(custom_ids),
        )
        return {str(row[0]): int(row[1]) for row in rows}

    async def start(self, meta: RunMeta, shards: Sequence[NewShard] = ()) -> None:
        if shards:
            planned, at = ShardState.PLANNED.value, meta.started_at
            # A new shard is leased to nobody: whichever worker claims it acts on it.
            await self._conn.copy_records_to_table(
                "aiobatch_shards",
                records=[
                    (self._rid, s.key, 0, s.url, s.model, s.lines, s.size, s.tokens, planned, at)
                    for s in shards
                ],
                columns=_SHARD_COLUMNS,
            )
        await self._conn.execute(
            "UPDATE aiobatch_runs SET run_id = $2, source = $3, fingerprint = $4, "
            "started_at = $5, updated_at = $6, state = $7, skipped = $8, problems = $9, "
            '"order" = $10 WHERE rid = $1',
            self._rid,
            meta.run_id,
            meta.source,
            meta.fingerprint,
            meta.started_at,
            meta.updated_at,
            meta.state,
            meta.skipped,
            meta.problems,
            meta.order,
        )
