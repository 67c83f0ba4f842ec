"""The main job: a whole request set through the Batch API, resumable, exactly once.

:class:`BatchRun` takes a JSONL file (or an iterable of requests) and drives it end to
end::

    preflight -> journal -> plan shards -> submit -> track (fleet) -> collect -> settle
              -> retry rounds -> results (each custom_id exactly once)

It holds no step logic: every shard's state (:mod:`._states`) says which step comes
next, the step (:mod:`._submit`, :mod:`._collect`, :mod:`._settle`) returns the
shard's next state, and the run dispatches on it. Every step is written to the journal
(:mod:`._journal`) before it is acted on, so a run killed at any point and started again
with the same journal continues where it stopped, and no shard gets a second batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

from .._aio import cancel_and_wait
from .._client import BatchClient
from .._fleet import BatchDone
from .._models import Batch
from ..errors import (
    JournalError,
    LeaseLostError,
    TooManyBatchesError,
)
from ..webhooks import WebhookReceiver
from ._cancel import wind_down
from ._config import RequestSource, RunConfig, RunResult
from ._context import Next, RunContext, logger
from ._dispatch import collect_shard, consume, drop, resume, submit_shard, track
from ._events import BatchAnnouncer, BatchEvent
from ._follow import follow_results
from ._journal import Journal
from ._open import is_postgres_url, open_journal, pg_run_name, shared_run_class
from ._output import write_output
from ._progress import RunProgress
from ._records import Shard
from ._report import RunReport, final_report, load_counts, run_progress
from ._start import check_output, default_work_dir, ingest_or_check, run_context
from ._states import SUBMITTING, ShardState
from ._submit import Step, submission_steps
from ._supervise import plan_pending, supervise

__all__ = ["BatchRun"]

_S = ShardState


def _exists(path: str) -> bool:
    return os.path.exists(path)


class BatchRun:
    """A whole request set through the Batch API, resumable, each request answered once.

    Create it with the client, the requests and a journal path; :meth:`run` drives it to
    the end and returns the report, :meth:`results` streams the final results as they
    arrive. Running it again with the same journal (after a crash, a cancel, or in a new
    process) continues the same run: the journal, not the source, holds the requests
    then (a file source is only checked to be the same file).

    Args:
        client: the client to call (not closed by the run).
        source: a JSONL file path, or request objects (or their JSON lines), sync or
            async; read once, on the first run.
        journal: the journal file (SQLite), created when missing; or a
            ``postgresql://`` URL (with ``aiobatch[postgres]``): the run is named by the
            URL's ``?run=NAME``, else by the output file's absolute path, else by the
            input file's, and ``?schema=NAME`` puts the tables in a schema of their own.
        output: a JSONL file to write every final result to, once the run completes
            (atomically), in ``config.order``.
        config: sharding, retries, concurrency (see :class:`RunConfig`).
        on_progress: called with a :class:`RunProgress` whenever something changed
            (for :class:`aiobatch.ProgressDisplay`); must be quick.
        webhooks: a :class:`~aiobatch.webhooks.WebhookReceiver` (served by the caller)
            whose batch events reach the run's fleet while it runs; the fleet then
            polls only every ``FleetConfig.webhook_interval`` (600 s unless the config
            sets it) as a safety net for lost deliveries.
        on_batch: called with a :class:`BatchCreated` when a batch is open on the server
            (made, or adopted on a resume) and a :class:`BatchEnded` when tracking it ends
            (a batch cancelled at its ``batch_timeout`` ends twice: ``reason="deadline"``,
            then ``"finished"`` once cancelled); must be quick (its exceptions are
            logged, never propagated).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> BatchRun:
        # On a PostgreSQL journal a run shares its shards with workers by leases.
        shared = shared_run_class(kwargs.get("journal")) if cls is BatchRun else None
        return object.__new__(shared if shared is not None else cls)

    def __init__(
        self,
        client: BatchClient,
        source: RequestSource | None,
        *,
        journal: str | os.PathLike[str],
        output: str | os.PathLike[str] | None = None,
        config: RunConfig | None = None,
        on_progress: Callable[[RunProgress], None] | None = None,
        webhooks: WebhookReceiver | None = None,
        on_batch: Callable[[BatchEvent], None] | None = None,
    ) -> None:
        self._client = client
        self._batches = BatchAnnouncer(on_batch)
        self._webhooks = webhooks
        self._source = source
        self._journal_path = os.fspath(journal)
        self._output = os.fspath(output) if output is not None else None
        self._pg_name = (
            pg_run_name(self._journal_path, output=self._output, source=source)
            if is_postgres_url(self._journal_path)
            else None
        )
        self._config = config if config is not None else RunConfig()
        self._on_progress = on_progress
        self._clock = client.clock
        self._steps: Mapping[ShardState, Step] = submission_steps(client)
        self._ctx: RunContext | None = None
        self._run_id = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self._submitting: dict[str, asyncio.Task[None]] = {}
        self._collecting: set[str] = set()
        self._stopping = asyncio.Event()
        self._changed = asyncio.Event()
        self._results_changed = asyncio.Event()
        self._stop_reason: str | None = None
        self._failure: BaseException | None = None
        self._submit_slots = asyncio.Semaphore(self._config.max_submissions)
        self._collect_slots = asyncio.Semaphore(self._config.max_collections)
        self._started_at = 0.0
        self._state = "new"
        self._runner: asyncio.Task[RunReport] | None = None
        self._finished = asyncio.Event()
        self._ingested = False
        #: the report the run ended with: its last progress snapshot shows its figures.
        self._final: RunReport | None = None
        self._last_progress: RunProgress | None = None

    # --- public surface ------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        """The run's id ('' before the run opened its journal)."""
        return self._run_id

    @property
    def journal_path(self) -> str:
        """The journal file."""
        return self._journal_path

    def cancel(self) -> None:
        """Cancel the run: no new batches; the open ones are cancelled and their
        finished lines collected; :meth:`run` then returns a ``cancelled`` report. The
        journal stays resumable (the cancelled lines run when the run is started
        again)."""
        self._request_stop("cancelled")

    def stop(self) -> None:
        """Stop the run at once, without cancelling its batches: they keep running on
        the server, and the next run with this journal collects them (what a service
        does on shutdown, and ``aiobatch run`` on SIGTERM). :meth:`run` then returns a
        ``stopped`` report."""
        self._request_stop("stopped")

    async def run(self) -> RunReport:
        """Drive the run to its end (or its cancel) and return the report.

        A cancelled task (or Ctrl-C) cancels the open batches and collects their finished
        lines first (see ``RunConfig.cancel_timeout``), then re-raises.

        Raises:
            PreflightError: the input has bad lines (nothing was uploaded, no journal
                is left behind).
            JournalError: the journal belongs to another input, or another process
                runs it.
            RunError: a step kept failing, or the server refused the credentials; the
                journal stays resumable.
        """
        return await self._start()

    def _start(self) -> asyncio.Task[RunReport]:
        if self._runner is None:
            self._runner = asyncio.ensure_future(self._run())
            self._runner.add_done_callback(lambda _: self._finished.set())
        return self._runner

    async def results(self) -> AsyncGenerator[RunResult, None]:
        """The final results, each request's once, as they become final, in
        ``config.order`` (input order yields a result once every earlier request has
        its own). Starts the run when it is not running; ends when the run ends.

        The results are read from the journal (through a connection of their own), so a
        slow reader holds no results in memory and misses none.

        Raises:
            whatever :meth:`run` raises.
        """
        started_here = self._runner is None
        runner = self._start()
        results = follow_results(
            runner,
            order=self._config.order,
            clock=self._clock,
            ingested=lambda: self._ingested,
            open_reader=lambda: self._open_journal(create=False),
            changed=self._results_changed,
            finished=self._finished,
        )
        try:
            async with contextlib.aclosing(results):
                async for result in results:
                    yield result
        finally:
            if started_here and not runner.done():
                # Nobody else awaits the run this iterator started: stop it (its batches
                # keep running; the journal has everything) rather than leave it behind.
                self.stop()
                with contextlib.suppress(Exception):
                    await runner

    def progress(self) -> RunProgress:
        """A snapshot of the run, for display (after the run: its last one, whose
        figures are the report's)."""
        snapshot = run_progress(
            self._ctx,
            state=self._state,
            started_at=self._started_at,
            final=self._final,
            last=self._last_progress,
        )
        self._last_progress = snapshot
        return snapshot

    # --- the run -------------------------------------------------------------------------

    async def _run(self) -> RunReport:
        check_output(self._output)
        path = self._journal_path
        if self._source is None and self._pg_name is None and not _exists(path):
            raise JournalError(f"no journal at {path}, and no requests to start a run with")
        journal = await self._open_journal(create=True)
        try:
            if self._source is None and await journal.meta() is None:
                raise JournalError(
                    f"no run in the journal {journal.location}, and no requests to start a run with"
                )
            await journal.acquire()
            try:
                return await self._drive(journal)
            finally:
                self._ctx = None
                self._results_changed.set()
                await journal.release()
        finally:
            # In the journal's worker thread (SQLite copies the log into the file).
            await journal.close(background=True)

    async def _open(self, journal: Journal) -> bool:
        """Ingest the source into a new journal, or check it against the journal's;
        True when the run resumes."""
        return await ingest_or_check(
            journal,
            self._source,
            client=self._client,
            config=self._config,
            remove=self._journal_path if self._pg_name is None else None,
        )

    async def _drive(self, journal: Journal) -> RunReport:
        resuming = await self._open(journal)
        self._ingested = True
        self._results_changed.set()
        meta = await journal.meta()
        assert meta is not None
        self._run_id = meta.run_id
        self._started_at = meta.started_at
        work_dir = self._config.work_dir or default_work_dir(
            self._journal_path, pg_name=self._pg_name, output=self._output, run_id=meta.run_id
        )
        ctx = run_context(
            self._client,
            self._config,
            journal,
            meta.run_id,
            webhooks=self._webhooks is not None,
            work_dir=work_dir,
            emit=self._emit_progress,
            stop=self._request_stop,
            stopping=self._stopping,
            changed=self._changed,
            results_changed=self._results_changed,
        )
        self._ctx = ctx
        if meta.state == "done":
            self._state = "done"
            await load_counts(ctx)
            await self._write_output(journal)
            await ctx.fleet.aclose()
            return await self._final_report(journal)
        # A cancel flag left from an earlier run is stale (that run stopped); one set
        # while this run checked its input is this run's.
        await journal.set_state("running", at=self._clock.now(), clear_cancel=resuming)
        self._state = "running"
        await load_counts(ctx)
        cancelled: BaseException | None = None
        if self._webhooks is not None:
            self._webhooks.attach(ctx.fleet)
        try:
            self._spawn(
                consume(ctx, ctx.fleet.events(), lost=self._lost, done=self._batch_done),
                name="events",
            )
            ctx.network_since = self._clock.monotonic()
            await self._resume(ctx)
            try:
                await self._supervise(ctx)
            except asyncio.CancelledError as exc:
                cancelled = exc
                self._request_stop("cancelled")
            if self._stop_reason == "cancelled" and self._failure is None:
                await wind_down(
                    ctx,
                    submitting=self._submitting,
                    collecting=self._collecting,
                    failed=lambda: self._failure is not None,
                    acts_on=self._acts_on,
                    track=self._track,
                )
        finally:
            if self._webhooks is not None:
                self._webhooks.detach(ctx.fleet)
            await cancel_and_wait(self._tasks)
            await ctx.fleet.aclose()
        if self._failure is not None:
            await self._record_state(journal, "failed")
            self._state = "failed"
            raise self._failure
        if self._stop_reason in ("cancelled", "stopped"):
            state = self._stop_reason
            await self._record_state(journal, state)
            self._state = state
            report = await self._final_report(journal)
            if cancelled is not None:
                raise cancelled
            return report
        await journal.set_state("done", at=self._clock.now())
        self._state = "done"
        if self._config.work_dir is None:
            with contextlib.suppress(OSError):
                os.rmdir(work_dir)  # only when empty
        await self._write_output(journal)
        return await self._final_report(journal)

    async def _record_state(self, journal: Journal, state: str) -> None:
        """Record how the run ended in this process (a worker of a shared run records
        less: see :class:`~aiobatch._run._worker.Worker`)."""
        await journal.set_state(state, at=self._clock.now())

    def _acts_on(self, key: str) -> bool:
        """Whether this process acts on shard ``key`` (a worker: only on its leases)."""
        return True

    async def _open_journal(self, *, create: bool) -> Journal:
        return await open_journal(self._journal_path, create=create, name=self._pg_name)

    async def _final_report(self, journal: Journal) -> RunReport:
        """The report of the run as it ends, shown once more as its last progress
        snapshot (with the report's figures, so that the two agree)."""
        report = self._as_ended(await final_report(journal, self._config.prices))
        self._final = report
        self._emit_progress()
        return report

    def _as_ended(self, report: RunReport) -> RunReport:
        """The report as this process ended the run (a shared run's process may see
        another's state: see :class:`~aiobatch._run._worker.Worker`)."""
        return report

    # --- supervision ---------------------------------------------------------------------

    async def _resume(self, ctx: RunContext) -> None:
        """Pick up every shard where the journal left it."""
        await resume(
            ctx,
            submit=self._start_submit,
            track=self._track,
            collect=self._start_collect,
            adopted=lambda shard: self._batches.created(shard, adopted=True),
        )

    async def _supervise(self, ctx: RunContext) -> None:
        """Plan shards when lines are pending, until every request has its result."""
        await supervise(
            ctx,
            busy=lambda: bool(self._submitting or self._collecting or ctx.shard_of),
            failed=lambda: self._failure is not None,
            plan=self._plan,
        )

    async def _plan(self, ctx: RunContext) -> None:
        """Plan shards for the pending requests and start their submission."""
        try:
            shards = await plan_pending(ctx)
        except TooManyBatchesError as exc:
            self._failure = exc
            self._stopping.set()
            return
        for shard in shards:
            ctx.round = max(ctx.round, shard.round)
        await self._take_planned(ctx, shards)
        if shards:
            logger.info("run %s: planned %d batch(es)", self._run_id, len(shards))
        self._emit_progress()

    async def _take_planned(self, ctx: RunContext, shards: list[Shard]) -> None:
        """Start submitting the shards just planned (a run shared by workers claims
        its share of them instead)."""
        for shard in shards:
            ctx.put_status(shard.key, _S.PLANNED.value)
            self._start_submit(ctx, shard.key)

    def _spawn(self, coroutine: Any, *, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and isinstance(task.exception(), LeaseLostError):
            # Another worker holds the shard now: this one stopped acting on it.
            logger.warning("run %s: %s", self._run_id, task.exception())
        elif not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()
            self._stopping.set()
        self._changed.set()

    def _request_stop(self, reason: str) -> None:
        if not self._stopping.is_set():
            self._stop_reason = reason
            self._state = "cancelling" if reason == "cancelled" else "stopping"
            self._stopping.set()
            self._changed.set()
            if self._ctx is not None:
                self._ctx.budget.changed.set()
            self._emit_progress()

    # --- submission ----------------------------------------------------------------------

    def _start_submit(self, ctx: RunContext, key: str) -> None:
        if key not in self._submitting:
            task = self._spawn(self._submit(ctx, key), name=f"submit {key}")
            self._submitting[key] = task
            task.add_done_callback(lambda _: self._submitting.pop(key, None))

    async def _submit(self, ctx: RunContext, key: str) -> None:
        await submit_shard(ctx, key, steps=self._steps, slots=self._submit_slots, after=self._after)

    async def _after(self, ctx: RunContext, key: str, result: Next) -> None:
        """Act on a step's answer: track an open batch, submit a shard sent back."""
        if result.state is _S.OPEN:
            shard = await ctx.journal.shard(key)
            self._track(ctx, shard, result.batch)
            self._batches.created(shard, adopted=False)
        elif result.state in SUBMITTING:
            ctx.set_status(key, result.state.value)
            if key not in self._submitting and not self._stopping.is_set():
                self._start_submit(ctx, key)

    def _track(
        self, ctx: RunContext, shard: Shard, batch: Batch | None = None, *, deadline: bool = True
    ) -> None:
        track(ctx, shard, batch, deadline=deadline)

    # --- tracking and collection ---------------------------------------------------------

    def _batch_done(self, ctx: RunContext, key: str, event: BatchDone) -> None:
        self._batches.ended(key, event)
        self._start_collect(ctx, key, event)

    def _lost(self, ctx: RunContext, key: str) -> None:
        drop(ctx, key, self._submitting.pop(key, None))

    def _start_collect(self, ctx: RunContext, key: str, done: BatchDone | None) -> None:
        self._collecting.add(key)
        self._spawn(self._collect(ctx, key, done), name=f"collect {key}")

    async def _collect(self, ctx: RunContext, key: str, done: BatchDone | None) -> None:
        """Collect a finished batch, and act on the shard's next state."""
        self._collecting.add(key)
        try:
            result = await collect_shard(ctx, key, done, slots=self._collect_slots)
            if result is None:
                return
            if result.state is _S.OPEN:
                # Still running at its deadline: cancelled, tracked to its end.
                shard = await ctx.journal.shard(key)
                self._track(ctx, shard, result.batch, deadline=False)
                assert result.batch is not None
                ctx.fleet.cancel(result.batch.id)
            elif result.state is _S.UPLOADED and not self._stopping.is_set():
                self._start_submit(ctx, key)
        finally:
            self._collecting.discard(key)
            if self._ctx is not None:
                shard = await ctx.journal.shard(key)
                if shard.state is _S.COLLECTED and shard.batch_id is not None:
                    ctx.shard_of.pop(shard.batch_id, None)
            self._changed.set()

    def _emit_progress(self) -> None:
        callback = self._on_progress
        if callback is not None:
            try:
                callback(self.progress())
            except Exception:  # a display must never break the run
                logger.exception("progress callback failed")

    # --- output --------------------------------------------------------------------------

    async def _write_output(self, journal: Journal) -> None:
        """Write every final result to the output file, atomically, in order."""
        if self._output is not None:
            await write_output(journal, self._output, order=self._config.order)
