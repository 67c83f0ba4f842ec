"""The leases of the workers sharing a run on a PostgreSQL journal (see
:mod:`aiobatch._run._worker`): which worker acts on a shard, and plans the run, until
when, on the database's clock; and the live workers of a run (their rows of
``aiobatch_workers``), among which shards and the request budget are shared.
:class:`PgLeases` is a part of :class:`~aiobatch._run._postgres.PostgresJournal`."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from ..errors import LeaseLostError
from ._postgres_schema import _NOW, _shard
from ._records import SHARD_FIELDS, Shard

__all__ = ["PgLeases"]


class PgLeases:
    """The lease statements of :class:`~aiobatch._run._postgres.PostgresJournal`."""

    #: the worker whose leases fence the journal's shard writes (None: no leases)
    owner: str | None
    lease_seconds: float

    if TYPE_CHECKING:

        async def rid(self) -> int: ...

        async def _write_rid(self) -> int: ...

        def _conn(self) -> contextlib.AbstractAsyncContextManager[Any]: ...

        def _tx(self) -> contextlib.AbstractAsyncContextManager[Any]: ...

    async def _fair_share(self, conn: Any, rid: int) -> tuple[int, int]:
        """This worker's fair share of the run's unfinished shards (their number over the
        live workers, rounded up), and how many of them it holds."""
        row = await conn.fetchrow(
            "SELECT count(*), count(*) FILTER (WHERE lease_owner = $2 AND lease_until > "
            f"{_NOW}), (SELECT count(*) FROM aiobatch_workers WHERE rid = $1 AND "
            f"(seen_until > {_NOW} OR worker = $2)) FROM aiobatch_shards "
            "WHERE rid = $1 AND state != 'collected'",
            rid,
            self.owner,
        )
        unfinished, held, workers = (int(v) for v in row)
        return -(-unfinished // max(1, workers)), held

    async def claim(self, limit: int) -> list[Shard]:
        """Take the leases of up to ``limit`` unfinished shards that no worker holds (never
        leased, or let lapse), skipping rows another worker is claiming right now; never
        more than this worker's fair share (the unfinished shards over the live
        workers), so that workers joining later find work too."""
        assert self.owner is not None
        rid = await self.rid()
        async with self._tx() as conn:
            share, held = await self._fair_share(conn, rid)
            limit = min(limit, share - held)
            if limit <= 0:
                return []
            rows = await conn.fetch(
                f"UPDATE aiobatch_shards s SET lease_owner = $2, lease_until = {_NOW} + $3 "
                "FROM (SELECT key FROM aiobatch_shards WHERE rid = $1 AND state != 'collected' "
                f"AND (lease_until IS NULL OR lease_until < {_NOW}) ORDER BY key LIMIT $4 "
                "FOR UPDATE SKIP LOCKED) AS free WHERE s.rid = $1 AND s.key = free.key "
                f"RETURNING {', '.join('s.' + f for f in SHARD_FIELDS)}",
                rid,
                self.owner,
                self.lease_seconds,
                limit,
            )
        return [_shard(row) for row in rows]

    async def shed(self) -> list[str]:
        """Let go of the leases this worker holds beyond its fair share (the unfinished
        shards over the live workers) on shards it has not started (``planned``: nothing
        sent for them yet), so that workers joining later share the work; returns their
        keys."""
        assert self.owner is not None
        rid = await self.rid()
        async with self._tx() as conn:
            share, held = await self._fair_share(conn, rid)
            surplus = held - share
            if surplus <= 0:
                return []
            rows = await conn.fetch(
                "UPDATE aiobatch_shards s SET lease_owner = NULL, lease_until = NULL "
                "FROM (SELECT key FROM aiobatch_shards WHERE rid = $1 AND lease_owner = $2 "
                "AND state = 'planned' ORDER BY key DESC LIMIT $3 FOR UPDATE SKIP LOCKED) "
                "AS spare WHERE s.rid = $1 AND s.key = spare.key RETURNING s.key",
                rid,
                self.owner,
                surplus,
            )
        return [str(row[0]) for row in rows]

    async def renew(self) -> set[str]:
        """Renew this worker's leases; returns the keys of the unfinished shards it still
        holds (a shard missing from them was lost: stop acting on it)."""
        assert self.owner is not None
        rid = await self.rid()
        async with self._tx() as conn:
            rows = await conn.fetch(
                f"UPDATE aiobatch_shards SET lease_until = {_NOW} + $3 WHERE rid = $1 "
                f"AND lease_owner = $2 AND lease_until > {_NOW} AND state != 'collected' "
                "RETURNING key",
                rid,
                self.owner,
                self.lease_seconds,
            )
            await conn.execute(
                f"UPDATE aiobatch_runs SET planner_until = {_NOW} + $3 WHERE rid = $1 "
                f"AND planner = $2 AND planner_until > {_NOW}",
                rid,
                self.owner,
                self.lease_seconds,
            )
            await conn.execute(
                "INSERT INTO aiobatch_workers (rid, worker, seen_until) VALUES "
                f"($1, $2, {_NOW} + $3) ON CONFLICT (rid, worker) DO UPDATE SET "
                "seen_until = excluded.seen_until",
                rid,
                self.owner,
                self.lease_seconds,
            )
        return {str(row[0]) for row in rows}

    async def live_workers(self) -> list[str]:
        """The workers of this run that renewed their leases within the lease time."""
        rid = await self.rid()
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT worker FROM aiobatch_workers WHERE rid = $1 AND seen_until > {_NOW} "
                "ORDER BY worker",
                rid,
            )
        return [str(row[0]) for row in rows]

    async def take_share(self, workers: int) -> int | None:
        """Record that this worker now sends at most its share among ``workers`` of the
        run's request budget; returns the smallest number of workers any other live
        worker shares it among (None when no other took a share)."""
        assert self.owner is not None
        rid = await self.rid()
        async with self._tx() as conn:
            await conn.execute(
                "UPDATE aiobatch_workers SET share_of = $3 WHERE rid = $1 AND worker = $2",
                rid,
                self.owner,
                workers,
            )
            smallest = await conn.fetchval(
                "SELECT min(share_of) FROM aiobatch_workers WHERE rid = $1 AND worker != $2 "
                f"AND seen_until > {_NOW}",
                rid,
                self.owner,
            )
        return None if smallest is None else int(smallest)

    async def fence_planner(self, conn: Any, rid: int, key: str) -> None:
        """In the transaction of ``conn``, check that this worker still holds the run's
        planner lease and extend it (planning a large run outlasts a heartbeat); with
        leases, planning a shard under a lapsed planner lease would race the worker that
        took it.

        Raises:
            LeaseLostError: another worker plans now (nothing was written).
        """
        if self.owner is None:
            return
        held = await conn.fetchval(
            f"UPDATE aiobatch_runs SET planner_until = {_NOW} + $3 WHERE rid = $1 "
            f"AND planner = $2 AND planner_until > {_NOW} RETURNING rid",
            rid,
            self.owner,
            self.lease_seconds,
        )
        if held is None:
            raise LeaseLostError(
                f"worker {self.owner} lost the planner lease of the run before planning shard "
                f"{key}; another worker plans it",
                shard=key,
            )

    async def plan_lease(self) -> bool:
        """Take (or keep) the run's planner lease: one worker plans at a time."""
        assert self.owner is not None
        rid = await self._write_rid()
        async with self._tx() as conn:
            got = await conn.fetchval(
                f"UPDATE aiobatch_runs SET planner = $2, planner_until = {_NOW} + $3 "
                f"WHERE rid = $1 AND (planner = $2 OR planner IS NULL OR planner_until < {_NOW}) "
                "RETURNING rid",
                rid,
                self.owner,
                self.lease_seconds,
            )
        return got is not None

    async def drop_leases(self) -> None:
        """Let every lease of this worker go at once (a clean stop)."""
        assert self.owner is not None
        rid = await self.rid()
        async with self._tx() as conn:
            await conn.execute(
                "UPDATE aiobatch_shards SET lease_until = NULL, lease_owner = NULL "
                "WHERE rid = $1 AND lease_owner = $2",
                rid,
                self.owner,
            )
            await conn.execute(
                "UPDATE aiobatch_runs SET planner = NULL, planner_until = NULL "
                "WHERE rid = $1 AND planner = $2",
                rid,
                self.owner,
            )
            await conn.execute(
                "DELETE FROM aiobatch_workers WHERE rid = $1 AND worker = $2", rid, self.owner
            )
