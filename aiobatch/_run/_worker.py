"""Workers sharing a run on a PostgreSQL journal: :class:`Worker`.

Several processes (``aiobatch worker --journal postgresql://... --run RUN``) carry one
run together. Each acts only on the shards it holds a *lease* on (``lease_owner``,
``lease_until`` in the shard's row, on the database's clock):

- it *claims* unfinished shards that no worker holds, or whose lease lapsed
  (``UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED)``), and carries each on from its
  recorded state exactly as a resumed run does (a lost upload or a lost create is looked
  up the same way, so an adopted shard never gets a second batch);
- it *plans* (the requests pending: a retry round, or a run ingested without its
  shards) only while it holds the run's planner lease (a new run's first shards are
  planned by its ingest, with its requests); the shards it plans are leased to nobody,
  and every worker claims at most its fair share of the unfinished
  shards (their number over the live workers, each of which renews a row of
  ``aiobatch_workers`` with its leases); at each heartbeat it lets go of the shards
  beyond its share that it has not started (nothing sent for them), so that a worker
  joining later gets work too;
- a heartbeat, a task of its own, renews its leases every third of the lease time (and
  sets this worker's share of the run's request budget, :mod:`._shared_budget`),
  giving the database a third of the lease time to answer; a shard whose lease is gone
  is dropped (its submission cancelled, its batch no longer tracked), and every journal
  write about a shard checks the lease in the same transaction
  (:class:`~aiobatch.errors.LeaseLostError`, nothing written);
- every request to the provider is fenced too (:mod:`._lease_fence`): once half the
  lease time has passed since the start of the last renewal that succeeded (the
  database out of reach, or hung), the worker's requests wait (a create or an upload
  that waited in the request budget or out a ``Retry-After`` included) until a renewal
  succeeds (the shards lost are dropped first); once the whole lease time has passed
  without one, the leases are gone: the worker stops
  (:class:`~aiobatch.errors.LeaseExpiredError`) and the waiting requests are never
  sent. Only a request already on the wire at half the lease time may still land, and
  the adopting worker finds it by the same lookups as a resume.

Why leases in our own tables rather than a job-queue library (procrastinate,
pgqueuer): a shard is no fire-and-forget job but a long-lived state machine whose every
step is a journal write; the lease check must sit in the same transaction as that write
(fencing), which a queue's job row cannot give, and the extra dependency would buy only
the ``SKIP LOCKED`` claim, a dozen lines here.

``aiobatch run`` (a :class:`BatchRun`) on a PostgreSQL journal is such a worker too
(:class:`SharedRun`): it also ingests the input, holds the run's advisory lock (one
``aiobatch run`` per run at a time) and writes the output file at the end, so workers
joining its run share its shards instead of trampling on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import attrs

from .._aio import sleep_or_set
from .._budget import RequestBudget
from .._client import BatchClient
from .._fleet import FleetConfig
from ..errors import JournalError, LeaseExpiredError, LeaseLostError
from ..transport._base import Transport
from ._batch_run import BatchRun
from ._config import RunConfig
from ._context import RunContext, logger
from ._journal import Journal
from ._kill_hook import KillingTransport, KillSwitch
from ._lease_fence import FencedTransport, LeaseFence
from ._open import register_shared_run
from ._postgres_leases import PgLeases
from ._records import Shard
from ._report import RunReport
from ._shared_budget import SharedBudget
from ._states import SUBMITTING, ShardState

if TYPE_CHECKING:
    from ._postgres import PostgresJournal  # asyncpg: only with aiobatch[postgres]

__all__ = ["SharedRun", "Worker"]

_S = ShardState
T = TypeVar("T")


def _pg(journal: Journal) -> PostgresJournal:
    """The PostgreSQL journal a leased run works on (opened from its URL)."""
    assert isinstance(journal, PgLeases)
    return cast("PostgresJournal", journal)


class _Leased(BatchRun):
    """What a process acting on a shared run by leases does (see the module notes)."""

    lease_seconds = 30.0
    worker_id = ""
    _claim_limit = 1000
    _shared: SharedBudget | None = None
    _kill: KillSwitch | None = None

    def _init_leases(self, worker_id: str | None) -> None:
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._mine: set[str] = set()
        #: a renewal succeeded since the last :meth:`_take_stock`
        self._renewed = False
        self._supervisor: asyncio.Task[None] | None = None

    def _fenced(
        self,
        client: BatchClient,
        requests_per_second: float | None,
        burst: int,
        kill: KillSwitch | None = None,
    ) -> BatchClient:
        """``client`` as this worker sends through it: every request checked against
        the lease fence (:mod:`._lease_fence`), after its grant from this worker's share
        of the run's request budget when there is one."""
        self._fence = LeaseFence("")
        fence = self._fence

        def wrap(transport: Transport) -> Transport:
            if kill is not None:  # test-only (see ._kill_hook)
                transport = KillingTransport(transport, kill)
            return FencedTransport(transport, fence)

        client = client.with_options(wrap_transport=wrap)
        if requests_per_second is not None:
            self._shared = SharedBudget(requests_per_second, burst, client)
            client = self._shared.client
        return client

    @property
    def request_budget(self) -> RequestBudget | None:
        """This worker's share of the run's request budget (None when it has none)."""
        return self._shared.budget if self._shared is not None else None

    async def _open_journal(self, *, create: bool) -> Journal:
        journal = _pg(await super()._open_journal(create=create))
        journal.owner = self.worker_id
        journal.lease_seconds = self.lease_seconds
        return journal

    async def _drive(self, journal: Journal) -> RunReport:
        try:
            return await super()._drive(journal)
        finally:
            with contextlib.suppress(JournalError):  # else they lapse on their own
                await self._within(_pg(journal).drop_leases(), "letting the leases go")

    async def _record_state(self, journal: Journal, state: str) -> None:
        # A database gone quiet must not hold up a worker that stops because of it.
        if state != "failed":
            await self._within(super()._record_state(journal, state), "recording the run state")
            return
        with contextlib.suppress(JournalError):
            await self._within(super()._record_state(journal, state), "recording the failure")

    def _acts_on(self, key: str) -> bool:
        return key in self._mine

    def _start_submit(self, ctx: RunContext, key: str) -> None:
        self._mine.add(key)
        super()._start_submit(ctx, key)

    def _lost(self, ctx: RunContext, key: str) -> None:
        self._mine.discard(key)
        super()._lost(ctx, key)

    async def _plan(self, ctx: RunContext) -> None:
        try:
            await super()._plan(ctx)
        except LeaseLostError as exc:  # another worker plans now
            logger.info("run %s: %s", self._run_id, exc)
            await self._claim(ctx)

    async def _take_planned(self, ctx: RunContext, shards: list[Shard]) -> None:
        # Planned shards are leased to nobody: take this worker's share like any other.
        await self._claim(ctx)

    async def _claim(self, ctx: RunContext) -> None:
        """Take free shards and carry each on from where the journal left it."""
        journal = _pg(ctx.journal)
        room = self._claim_limit - len(self._mine)
        if room <= 0 or self._stopping.is_set():
            return
        shards = await journal.claim(room)
        if shards and self._kill is not None:
            self._kill.reached("after_claim")
        for shard in shards:
            logger.info("run %s: worker %s took shard %s", self._run_id, self.worker_id, shard.key)
            self._adopt(ctx, shard)

    def _adopt(self, ctx: RunContext, shard: Shard) -> None:
        self._mine.add(shard.key)
        if shard.state in SUBMITTING:
            ctx.put_status(shard.key, shard.state.value)
            self._start_submit(ctx, shard.key)
        elif shard.state is _S.OPEN:
            self._track(ctx, shard)
        elif shard.state is _S.COLLECTING:
            assert shard.batch_id is not None
            ctx.shard_of[shard.batch_id] = shard.key
            ctx.put_status(shard.key, shard.status or "collecting")
            self._start_collect(ctx, shard.key, None)

    def _as_ended(self, report: RunReport) -> RunReport:
        # Another process still winding its batches down after the same cancel may have
        # recorded the run as cancelling again between this one's "cancelled" and its
        # report: this process is done cancelling.
        if self._state == "cancelled" and report.state == "cancelling":
            return attrs.evolve(report, state="cancelled")
        return report

    async def _within(self, call: Awaitable[T], what: str) -> T:
        """``call``'s answer, or JournalError when the database gives none within a third
        of the lease time (a hung link: the call is cancelled, never waited for)."""
        task = asyncio.ensure_future(call)
        limit = self.lease_seconds / 3
        try:
            done, _ = await asyncio.wait({task}, timeout=limit)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            task.add_done_callback(_forget)
            raise JournalError(f"the database did not answer {what} within {limit:g} s")
        return task.result()

    async def _renew(self, ctx: RunContext) -> bool:
        """Renew the leases (and take this worker's share of the request budget), drop
        the shards lost; True when renewed. Once the lease time has passed without a
        renewal it raises: the worker stops acting.

        Raises:
            LeaseExpiredError: no renewal for the lease time.
        """
        journal = _pg(ctx.journal)
        started = self._fence.now()
        mine = set(self._mine)  # a shard claimed meanwhile is judged at the next one
        try:
            held = await self._within(journal.renew(), "a lease renewal")
            if self._shared is not None:
                workers = await self._within(journal.live_workers(), "a count of the workers")
                await self._within(self._shared.split(journal, len(workers)), "a budget share")
            # Drop the shards lost before the held requests go (the fence is renewed).
            for key in (mine & self._mine) - held:
                shard = await self._within(journal.shard(key), "a shard's state")
                if shard.state is not _S.COLLECTED:
                    logger.warning(
                        "run %s: worker %s lost its lease on shard %s; another worker "
                        "carries it on",
                        self._run_id,
                        self.worker_id,
                        key,
                    )
                    self._lost(ctx, key)
                else:
                    self._mine.discard(key)
        except JournalError as exc:
            # The lease time without a renewal: another worker may adopt these shards
            # now; the fence held every request since half that time.
            if self._fence.gone:
                raise self._fence.expire() from exc
            logger.warning("run %s: could not renew the leases: %s", self._run_id, exc)
            return False
        self._fence.renewed(started, self.lease_seconds)
        self._renewed = True
        self._changed.set()
        return True

    async def _take_stock(self, ctx: RunContext) -> None:
        """After a renewal: let go of the shards beyond this worker's share, claim free
        shards."""
        if not self._renewed:
            return
        self._renewed = False
        journal = _pg(ctx.journal)
        for key in await journal.shed():  # workers that joined later take them
            logger.info("run %s: worker %s let shard %s go", self._run_id, self.worker_id, key)
            self._lost(ctx, key)
        await self._claim(ctx)

    async def _beat(self, ctx: RunContext) -> None:
        """The heartbeat, a task of its own (a long planning step or a hung journal call
        never holds it up): renew every third of the lease time; once the leases are
        gone, stop the worker (its supervision is cancelled even when hung on the
        database)."""
        beat = self.lease_seconds / 3
        while not self._stopping.is_set():
            await sleep_or_set(self._clock, beat, self._stopping)
            if self._stopping.is_set():
                return
            try:
                await self._renew(ctx)
            except LeaseExpiredError as exc:
                if self._failure is None:
                    self._failure = exc
                self._stopping.set()
                self._changed.set()
                if self._supervisor is not None:
                    self._supervisor.cancel()
                return

    async def _resume(self, ctx: RunContext) -> None:
        # Nothing is held yet: the first renewal gets the same grace as any other.
        self._fence.worker = self.worker_id
        self._fence.renewed(self._fence.now(), self.lease_seconds)
        await self._renew(ctx)
        await self._take_stock(ctx)
        self._spawn(self._beat(ctx), name="heartbeat")

    async def _supervise(self, ctx: RunContext) -> None:
        self._supervisor = asyncio.ensure_future(self._supervise_loop(ctx))
        try:
            await self._supervisor
        except asyncio.CancelledError:
            if not (self._supervisor.cancelled() and isinstance(self._failure, LeaseExpiredError)):
                raise
            # the heartbeat cut it short: the worker stops (with self._failure)
        finally:
            self._supervisor = None

    async def _supervise_loop(self, ctx: RunContext) -> None:
        """Claim, plan while holding the planner lease, until every request of the run
        has its final result (whichever worker got it); the heartbeat (:meth:`_beat`)
        renews the leases meanwhile."""
        clock = self._clock
        journal = _pg(ctx.journal)
        beat = self.lease_seconds / 3
        next_beat = clock.monotonic() + beat
        while True:
            self._changed.clear()
            if self._failure is not None or self._stopping.is_set():
                return
            await self._take_stock(ctx)
            now = clock.monotonic()
            if now >= next_beat:
                next_beat = now + beat
                await journal.touch(clock.now())
                self._emit_progress()
                if await ctx.cancel_requested():
                    return
            if await journal.pending_count():
                if await journal.plan_lease():
                    await self._plan(ctx)
            elif await journal.not_done_count() == 0 and not await journal.shards(
                *(state for state in ShardState if state is not _S.COLLECTED)
            ):
                return  # every request answered and every shard settled
            await sleep_or_set(clock, max(0.0, min(next_beat - now, 1.0)), self._changed)


def _forget(task: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a call given up on (so that it is not reported)."""
    if not task.cancelled():
        task.exception()


class Worker(_Leased):
    """One worker of a run shared through a PostgreSQL journal (see the module notes).

    :meth:`run` carries the run on until every request has its final result (or the run
    is cancelled, or :meth:`stop`), acting only on the shards it leases, and returns the
    run's report.

    Args:
        client: the client to call (not closed by the worker).
        journal: the ``postgresql://`` URL of the run's database.
        run: the run's id or name (else the URL's ``?run=``).
        config: as for :class:`BatchRun` (every worker of a run should use the same).
        lease_seconds: how long a lease lasts without renewal: a dead worker's shards
            are adopted after this long.
        claim_limit: shards one worker holds at most.
        worker_id: this worker's name in the leases (default: host, pid and a random
            part).
        requests_per_second: the provider account's request budget for every worker of
            the run together (give each the same); every request this worker sends
            takes from its share (:mod:`aiobatch._run._shared_budget`). None: no
            budget beyond the fleet's own for its polls.
        burst: the most requests the workers together send at once (default: the
            fleet's burst, 20).
    """

    def __init__(
        self,
        client: BatchClient,
        *,
        journal: str,
        run: str | None = None,
        config: RunConfig | None = None,
        lease_seconds: float = 30.0,
        claim_limit: int = 1000,
        worker_id: str | None = None,
        requests_per_second: float | None = None,
        burst: int | None = None,
    ) -> None:
        if run is not None:
            sep = "&" if "?" in journal else "?"
            journal = f"{journal}{sep}run={run}"
        self._kill = KillSwitch.from_env()  # test-only (see ._kill_hook)
        client = self._fenced(client, requests_per_second, burst or FleetConfig().burst, self._kill)
        super().__init__(client, None, journal=journal, config=config)
        self._init_leases(worker_id)
        self.lease_seconds = lease_seconds
        self._claim_limit = claim_limit

    async def _run(self) -> RunReport:
        journal = _pg(await self._open_journal(create=False))
        try:
            if await journal.meta() is None:
                raise JournalError(f"no run {journal.name!r} in {journal.location}")
            try:
                return await self._drive(journal)
            finally:
                self._ctx = None
                self._results_changed.set()
        finally:
            await journal.close()

    async def _open(self, journal: Journal) -> bool:
        # Joining never clears a cancel flag: it may be meant for every worker.
        return False

    async def _record_state(self, journal: Journal, state: str) -> None:
        # One worker stopping (or failing) does not stop the run: the others go on.
        if state == "cancelled":
            await super()._record_state(journal, state)


class SharedRun(_Leased):
    """A :class:`BatchRun` on a PostgreSQL journal (``BatchRun(...)`` makes one): it
    ingests the input, acts on its share of the shards by leases like a :class:`Worker`
    (so workers may join it), and writes the output file once every request has its
    result.

    A ``RunConfig.requests_per_second`` (``aiobatch run --requests-per-second``) is the
    account's budget shared with the run's workers: every request it sends takes from
    its share (:mod:`aiobatch._run._shared_budget`), at most ``fleet.burst`` at once.
    Without it there is no shared budget (a fleet config alone paces only its polls).
    """

    def __init__(self, client: BatchClient, *args: Any, **kwargs: Any) -> None:
        config = kwargs.get("config")
        rate = config.requests_per_second if isinstance(config, RunConfig) else None
        fleet = (config.fleet if isinstance(config, RunConfig) else None) or FleetConfig()
        client = self._fenced(client, rate, fleet.burst)
        super().__init__(client, *args, **kwargs)
        self._init_leases(None)


# ``BatchRun(..., journal="postgresql://...")`` builds a SharedRun (see ._open).
register_shared_run(SharedRun)
