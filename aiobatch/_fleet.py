"""The fleet: one scheduler that tracks any number of batches until each one ends.

Theory of operation
-------------------
Every tracked batch has a due time. One scheduler task sleeps (on the injected clock)
until the earliest due time, takes every batch due by then (plus a short coalescing
window), and observes them in one *round*:

* Batches whose place in the list is unknown (added by id, never seen) and batches with
  a cancel to send are handled one call each.
* For the others it compares the expected cost of the two ways to observe them: one
  ``GET /batches/{id}`` each, or a *sweep* of ``GET /batches`` pages, newest first,
  that observes every tracked batch it meets (:mod:`aiobatch._fleet_sweep` says how a
  sweep is costed, walked and given up); due batches a sweep did not meet fall back
  to a retrieve.

Every call goes through one :class:`~aiobatch.RequestBudget` (a token bucket) and a
concurrency limit, and is a *single attempt*: the fleet polls again anyway, so a failed
poll is simply rescheduled with backoff. A 429, or any answer with ``retry-after``,
pauses the whole budget for that long (at most ``max_retry_wait``: then the fleet tries
again), so the fleet never storms a server that asked it to slow down.

Each observation goes through the batch's :class:`~aiobatch.BatchLifecycle`. A move the
lifecycle rejects (a regression, a move out of a terminal status) becomes a
:class:`TrackingError` event and a WARNING log record; the batch keeps its last good
state and stays tracked. Nothing the server sends crashes the fleet or loses a batch.

A status string aiobatch does not know is first looked up in ``status_aliases`` (the
user's mapping of such strings to the statuses they stand for); a mapped one is the
status it maps to, everywhere. An unmapped one is reported once per batch and string
(a :class:`TrackingError` and a WARNING that says how to map it) and the batch stays
tracked in its last known status, until it can no longer be running: once it carries
an output or error file id, or its ``expires_at`` is ``unknown_status_grace`` seconds
past, it ends with :attr:`DoneReason.UNKNOWN_STATUS`, so that its files are read.

The next poll depends on the status and the progress rate
(:mod:`aiobatch._fleet_tracked`), shortened by a random share (``jitter``) so that
batches added together drift apart; with webhooks (``webhook_interval``) polls are a
safety net and :meth:`Fleet.notify` makes a batch due at once. Per tracked batch the
fleet keeps a few numbers and its lifecycle, never the snapshots it has seen (the last
:class:`~aiobatch.Batch` of a finished batch is kept in its outcome). Events reach
users through :mod:`aiobatch._fleet_events`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any

import attrs

from ._aio import cancel_and_wait, first_of, run_all, run_bounded, sleep_or_set
from ._budget import RequestBudget
from ._client import BatchClient
from ._fleet_events import (
    BatchDone,
    Callback,
    DeadlinePassed,
    DoneReason,
    EventHub,
    FleetEvent,
    FleetStats,
    ProgressChanged,
    StatusChanged,
    Subscription,
    TrackingError,
)
from ._fleet_sweep import BatchList, Sweep
from ._fleet_tracked import Cancel, DueQueue, FleetConfig, Pushed, Tracked
from ._lifecycle import BatchStatus, parse_status_aliases
from ._models import Batch, RequestCounts, alias_status
from ._retry import RetryPolicy, cap_server_wait, is_transient, retry_after_of
from .errors import (
    AiobatchError,
    APIStatusError,
    ClosedError,
    DecodeError,
    NotFoundError,
    RateLimitError,
    StateError,
    UnknownStatusError,
    describe,
)

__all__ = [
    "BatchDone",
    "DeadlinePassed",
    "DoneReason",
    "Fleet",
    "FleetConfig",
    "FleetEvent",
    "FleetStats",
    "ProgressChanged",
    "StatusChanged",
    "TrackingError",
]

logger = logging.getLogger("aiobatch")

_S = BatchStatus


class Fleet:
    """Track any number of batches with one scheduler, under one request budget.

    Use it as an async context manager (or call :meth:`aclose`)::

        async with Fleet(client) as fleet:
            for batch in created:
                fleet.add(batch)
            async for done in fleet.as_completed():
                print(done.batch_id, done.batch.status)

    Args:
        client: the client to call; the fleet makes single attempts through
            :meth:`~aiobatch.BatchClient.with_options` (it reschedules failures
            itself) and never closes it.
        config: intervals, budget and limits (see :class:`FleetConfig`).
        budget: a request budget to share with other users (default: one made from
            ``config.requests_per_second`` and ``config.burst`` on the client's clock).
        on_event: called with every event; may be a coroutine function. An exception
            it raises is logged, never propagated.
        status_aliases: status strings aiobatch does not know, each mapped to the
            status it stands for (``{"succeeded": "completed"}``): a batch reporting
            one is treated as in that status everywhere (lifecycle, events, outcome);
            ``batch.raw_status`` keeps the server's string.

    Raises:
        ValueError: a ``status_aliases`` target is not an aiobatch status.
    """

    def __init__(
        self,
        client: BatchClient,
        *,
        config: FleetConfig | None = None,
        budget: RequestBudget | None = None,
        on_event: Callback | None = None,
        status_aliases: Mapping[str, BatchStatus | str] | None = None,
    ) -> None:
        self._aliases = parse_status_aliases(status_aliases or {})
        self._config = config if config is not None else FleetConfig()
        cfg = self._config
        self._clock = client.clock
        self._client = client.with_options(retry=attrs.evolve(client.retry_policy, max_attempts=1))
        self._budget = (
            budget
            if budget is not None
            else RequestBudget(cfg.requests_per_second, cfg.burst, clock=self._clock)
        )
        self._events = EventHub(on_event)
        # Doubling waits capped at max_interval (the fleet adds its own seeded jitter):
        # after failed polls, and for a 429 that did not say how long.
        self._error_waits = RetryPolicy(
            initial_delay=cfg.error_backoff, max_delay=cfg.max_interval, jitter=None
        )
        self._pause_waits = RetryPolicy(
            initial_delay=cfg.rate_limit_pause, max_delay=cfg.max_interval, jitter=None
        )
        self._rng = random.Random(cfg.seed)
        #: the safety-net beats (with webhook_interval) fall whole intervals after this.
        self._origin = self._clock.monotonic()
        self._tracked: dict[str, Tracked] = {}
        self._outcomes: dict[str, BatchDone] = {}
        #: ids notified before they were added (a webhook can outrun create's answer).
        self._early: dict[str, None] = {}
        self._due = DueQueue(self._tracked)
        self._list = BatchList(cfg)
        self._semaphore = asyncio.Semaphore(cfg.max_concurrency)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failure: BaseException | None = None
        self._rate_limited_in_a_row = 0
        self.stats = FleetStats()

    # --- public surface ----------------------------------------------------------------------

    @property
    def config(self) -> FleetConfig:
        """The configuration in force."""
        return self._config

    @property
    def status_aliases(self) -> dict[str, BatchStatus]:
        """The status strings mapped onto aiobatch's statuses (a copy)."""
        return dict(self._aliases)

    @property
    def budget(self) -> RequestBudget:
        """The request budget every call of the fleet goes through."""
        return self._budget

    @property
    def open_ids(self) -> list[str]:
        """Ids of the batches still being tracked."""
        return list(self._tracked)

    @property
    def outcomes(self) -> dict[str, BatchDone]:
        """The outcome of every batch the fleet has stopped tracking, by id."""
        return dict(self._outcomes)

    def __len__(self) -> int:
        """How many batches are still being tracked."""
        return len(self._tracked)

    def __contains__(self, batch_id: object) -> bool:
        return batch_id in self._tracked

    def __repr__(self) -> str:
        return f"<Fleet open={len(self._tracked)} done={len(self._outcomes)}>"

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def add(self, batch: str | Batch, *, timeout: float | None = None) -> None:
        """Track a batch until it ends, from its id or from a snapshot of it.

        A snapshot (such as the answer to :meth:`~aiobatch.BatchClient.create_batch`)
        counts as the first observation, and its place in the batch list is then known,
        so list sweeps can cover it. Adding a batch already tracked does nothing; adding
        one that ended earlier tracks it again.

        Args:
            batch: the id or the batch.
            timeout: seconds from now to this batch's deadline (default
                ``config.timeout``).

        Raises:
            ClosedError: the fleet is closed.
            ValueError: the id is empty.
        """
        self._check_open()
        batch_id = batch if isinstance(batch, str) else batch.id
        if not batch_id:
            raise ValueError("a batch id must be a non-empty string")
        if batch_id in self._tracked:
            return
        limit = timeout if timeout is not None else self._config.timeout
        now = self._clock.monotonic()
        record = Tracked(batch_id, None if limit is None else now + limit)
        self._tracked[batch_id] = record
        self._outcomes.pop(batch_id, None)
        self._idle.clear()
        self._start()
        if isinstance(batch, Batch):
            self._observe(record, batch, now, emit_first=False)
        else:
            self._due.schedule(record, now)
        self._wake.set()
        if batch_id in self._early:
            del self._early[batch_id]
            self.notify(batch_id)

    def add_many(self, batches: Iterable[str | Batch], *, timeout: float | None = None) -> None:
        """:meth:`add` each of ``batches``."""
        for batch in batches:
            self.add(batch, timeout=timeout)

    def remove(self, batch_id: str) -> bool:
        """Stop tracking a batch (no outcome is recorded); True when it was tracked."""
        record = self._tracked.pop(batch_id, None)
        if record is None:
            return False
        self._list.remove(record)
        self._after_removal()
        return True

    def notify(self, batch_id: str) -> bool:
        """A webhook says this batch has ended: make it due at once.

        The scheduler observes it in its next round (one retrieve, or a sweep when many
        batches are due together), so its :class:`BatchDone` follows within a round
        trip. If that observation does not show it ended yet (the event outran the
        server's read side), it is polled again after ``min_interval``. Called for a
        batch the fleet does not track (never added, already ended), it counts in
        ``stats.unknown_notifications`` and changes nothing. Safe to call for the same
        batch many times.

        Returns:
            Whether the batch is tracked.
        """
        record = self._tracked.get(batch_id) if isinstance(batch_id, str) else None
        if record is None or self._closed:
            self.stats.unknown_notifications += 1
            if record is None and isinstance(batch_id, str) and not self._closed:
                self._early[batch_id] = None
                if len(self._early) > 1000:
                    del self._early[next(iter(self._early))]
            return False
        self.stats.notifications += 1
        if record.due == math.inf:
            # A call about it is in flight: look again as soon as it is answered.
            record.pushed = Pushed.IN_FLIGHT
            return True
        record.pushed = Pushed.PUSHED
        now = self._clock.monotonic()
        if record.due > now:
            self._due.schedule(record, now)
            self._wake.set()
        return True

    def outcome(self, batch_id: str) -> BatchDone | None:
        """The outcome of a batch the fleet stopped tracking, or None."""
        return self._outcomes.get(batch_id)

    def forget(self, batch_id: str) -> BatchDone | None:
        """Drop a recorded outcome and return it (None when there was none).

        The fleet keeps every outcome (with the batch's last snapshot) until then: a
        long-running service that adds batches for ever forgets those it has handled.
        """
        return self._outcomes.pop(batch_id, None)

    def events(self) -> Subscription:
        """An async iterator over every event from now on; it ends when the fleet closes.

        Each call makes an independent subscription (events are queued for it until
        read); stop one early with its ``aclose()``.
        """
        self._check_open()
        return self._events.subscribe()

    async def as_completed(self) -> AsyncIterator[BatchDone]:
        """Each batch's outcome as it ends, until no tracked batch is open.

        Outcomes recorded before the call come first. Batches added while iterating are
        waited for too.

        Raises:
            ClosedError: the fleet was closed while batches were still open.
        """
        subscription = self._events.subscribe()
        queue = subscription.queue
        try:
            # Outcomes recorded before the subscription may also be queued: skip an
            # outcome already yielded (by identity: a batch added again and finished
            # again has a new one, which is yielded too).
            earlier = list(self._outcomes.values())
            yielded = {id(done) for done in earlier}
            for done in earlier:
                yield done
            while True:
                self._raise_failure()
                if not queue.empty():
                    event = queue.get_nowait()
                elif not self._tracked:
                    break
                else:
                    event = await self._next_or_idle(queue)
                if isinstance(event, BatchDone) and id(event) not in yielded:
                    yield event
        finally:
            await subscription.aclose()

    async def wait_all(self) -> dict[str, BatchDone]:
        """Wait until no tracked batch is open; return every outcome, by id.

        Raises:
            ClosedError: the fleet was closed while batches were still open.
        """
        while self._tracked:
            self._raise_failure()
            await self._idle.wait()
            if self._tracked and self._closed:
                break
        self._raise_failure()
        return dict(self._outcomes)

    def cancel(self, batch_id: str) -> None:
        """Ask the server to cancel one tracked batch; it stays tracked until it ends.

        Raises:
            KeyError: the batch is not tracked.
        """
        record = self._tracked[batch_id]
        if record.cancel is Cancel.NONE:
            record.cancel = Cancel.WANTED
            self._due.schedule(record, self._clock.monotonic())
            self._wake.set()

    async def cancel_all(self, *, wait: bool = True) -> dict[str, BatchDone]:
        """Cancel every open batch and keep tracking each until it ends.

        Cancelling can take ten minutes or more on the server: the fleet keeps polling
        (at ``cancelling_interval``, growing) with no time limit of its own; each
        batch's deadline, if any, still applies.

        Args:
            wait: wait until every batch has ended (as :meth:`wait_all`); False returns
                at once (cancels are sent by the scheduler, under the budget).

        Returns:
            The outcomes so far (all of them when ``wait``).
        """
        self._check_open()
        now = self._clock.monotonic()
        for record in list(self._tracked.values()):
            if record.cancel is Cancel.NONE:
                record.cancel = Cancel.WANTED
                self._due.schedule(record, now)
        self._wake.set()
        if wait:
            return await self.wait_all()
        return dict(self._outcomes)

    async def aclose(self) -> None:
        """Stop the scheduler and every call in flight; end every event iterator.

        Batches still open are left as they are on the server (not cancelled). Safe to
        call twice.
        """
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            # A scheduler that failed earlier (its failure was logged and handed to
            # every waiter) does not fail the close: it still cleans up below.
            await cancel_and_wait([task])
        await self._events.aclose()
        self._idle.set()
        await self._client.aclose()

    # --- plumbing -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the fleet is closed; make a new Fleet")
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed and self._tracked:
            raise ClosedError(f"the fleet was closed with {len(self._tracked)} batches still open")

    async def _next_or_idle(self, queue: asyncio.Queue[FleetEvent | None]) -> FleetEvent | None:
        """The next event, or None once nothing is tracked (or the fleet closed)."""
        get = asyncio.ensure_future(queue.get())
        await first_of(get, asyncio.ensure_future(self._idle.wait()))
        return None if get.cancelled() else get.result()

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _after_removal(self) -> None:
        if not self._tracked:
            self._idle.set()
            self._wake.set()

    # --- scheduling ---------------------------------------------------------------------------

    def _jittered(self, interval: float) -> float:
        jitter = self._config.jitter
        if jitter:
            interval *= self._rng.uniform(1.0 - jitter, 1.0)
        return interval

    # --- observations ------------------------------------------------------------------------

    def _observe(self, record: Tracked, batch: Batch, now: float, *, emit_first: bool) -> None:
        """Take one snapshot of a tracked batch into account, and schedule the next poll.

        ``emit_first``: emit events for the first snapshot too (False when the caller
        handed the snapshot in with :meth:`add`).
        """
        self.stats.observations += 1
        record.errors = 0
        record.not_found = 0
        if self._aliases:
            batch = alias_status(batch, self._aliases)
        lifecycle = record.lifecycle
        if record.created_at is None:
            record.created_at = batch.created_at
            self._list.add(record)
        first = not record.seen
        record.seen = True
        previous = lifecycle.status
        changed = False
        unknown: UnknownStatusError | None = None
        if batch.status is _S.UNKNOWN:
            grace = self._config.unknown_status_grace
            unknown = record.unknown_status(batch, grace, self._clock.now(), self._events.emit)
        elif first:
            lifecycle.status = batch.status
            changed = True
        else:
            try:
                changed = lifecycle.observe(batch.status) is not None
            except StateError as exc:
                self._report(record.id, exc, batch)
        if changed and (emit_first or not first):
            self._events.emit(StatusChanged(batch, None if first else previous))
        counts = batch.request_counts
        progressed = False
        if counts is not None and (
            counts.completed != record.completed
            or counts.failed != record.failed
            or counts.total != record.total
        ):
            old = (
                RequestCounts(record.total, record.completed, record.failed)
                if record.total >= 0
                else None
            )
            record.total = counts.total
            record.completed = counts.completed
            record.failed = counts.failed
            progressed = old is not None or (emit_first and counts.total > 0)
            if progressed:
                self._events.emit(ProgressChanged(batch, old))
        if lifecycle.status is _S.IN_PROGRESS and record.start_done < 0 and record.total > 0:
            record.start_done = record.completed + record.failed
            record.start_time = now
        if lifecycle.is_terminal:
            self._finish(record, batch, DoneReason.FINISHED)
            return
        if unknown is not None:
            self._finish(record, batch, DoneReason.UNKNOWN_STATUS, unknown)
            return
        if record.deadline is not None and now >= record.deadline:
            self._deadline(record, batch, now)
            return
        when = now
        if record.cancel is not Cancel.WANTED:
            when = record.next_poll(
                self._config, changed or progressed, now, self._origin, self._jittered
            )
        self._due.schedule(record, when)

    def _report(self, batch_id: str | None, error: AiobatchError, batch: Batch | None) -> None:
        logger.warning("fleet: %s%s", f"batch {batch_id}: " if batch_id else "", describe(error))
        self._events.emit(TrackingError(batch_id, error, batch))

    def _finish(
        self,
        record: Tracked,
        batch: Batch | None,
        reason: DoneReason,
        error: AiobatchError | None = None,
    ) -> None:
        if self._tracked.get(record.id) is not record:
            return
        del self._tracked[record.id]
        self._list.remove(record)
        done = BatchDone(record.id, batch, reason, error)
        self._outcomes[record.id] = done
        self._events.emit(done)
        self._after_removal()

    def _deadline(self, record: Tracked, batch: Batch | None, now: float) -> None:
        cancelling = self._config.cancel_on_deadline
        self._events.emit(DeadlinePassed(record.id, batch, cancelling))
        if cancelling:
            record.deadline = None
            if record.cancel is Cancel.NONE:
                record.cancel = Cancel.WANTED
            self._due.schedule(record, now)
        else:
            self._finish(record, batch, DoneReason.DEADLINE)

    def _failed(self, record: Tracked, error: AiobatchError, now: float) -> None:
        """A call about one batch failed: back off, report, maybe give up."""
        if self._tracked.get(record.id) is not record:
            return
        cfg = self._config
        record.errors += 1
        if isinstance(error, NotFoundError):
            record.not_found += 1
            if record.not_found >= cfg.not_found_limit:
                self._report(record.id, error, None)
                self._finish(record, None, DoneReason.NOT_FOUND, error)
                return
        elif not is_transient(error) or record.errors % cfg.report_after_errors == 0:
            self._report(record.id, error, None)
        if record.deadline is not None and now >= record.deadline:
            # As after an observation: a batch being cancelled is bound by its deadline
            # too (otherwise every retry lands on the past deadline, back to back).
            self._deadline(record, None, now)
            return
        delay = self._error_waits.backoff_delay(record.errors - 1)
        self._due.schedule(record, now + self._jittered(delay))

    def _rate_limited(self, error: AiobatchError) -> None:
        """Pause the whole budget when the server asked for it (429 or retry-after)."""
        asked = retry_after_of(error)
        if isinstance(error, RateLimitError):
            self.stats.rate_limited += 1
            if self._budget.paused_until is None:
                # A new episode (429s for calls sent before the pause began do not
                # lengthen it again).
                self._rate_limited_in_a_row += 1
            if asked is None or asked <= 0:
                asked = self._pause_waits.backoff_delay(max(self._rate_limited_in_a_row, 1) - 1)
        if asked is not None and asked > 0:
            # Said once per pause: the answers to calls sent before it began ask again.
            quiet = self._budget.paused_until is not None
            asked = cap_server_wait(
                asked, self._config.max_retry_wait, what="fleet", log=None if quiet else logger
            )
            self._budget.pause(asked)

    # --- the scheduler -----------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                due = self._due.next_due()
                if due is None:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                now = self._clock.monotonic()
                if due > now:
                    await self._sleep_or_wake(due - now)
                    continue
                records = self._due.take(now + self._config.coalesce)
                if records:
                    await self._round(records)
        except asyncio.CancelledError:
            raise
        except ClosedError as exc:  # the client was closed under the fleet
            logger.warning("fleet: the client was closed; the fleet stopped tracking")
            self._stopped(exc)
        except BaseException as exc:  # a bug: make every waiter see it
            logger.exception("the fleet scheduler failed")
            self._stopped(exc)
            raise

    def _stopped(self, failure: BaseException) -> None:
        """The scheduler ended for good: every waiter and event iterator sees it."""
        self._failure = failure
        self._idle.set()
        self._events.end()

    async def _sleep_or_wake(self, seconds: float) -> None:
        self._wake.clear()
        await sleep_or_set(self._clock, seconds, self._wake)

    async def _round(self, records: list[Tracked]) -> None:
        """Observe every record of one round: cancels, retrieves and maybe a sweep."""
        now = self._clock.monotonic()
        singles: list[Callable[[], Awaitable[None]]] = []
        listable: list[Tracked] = []
        for record in records:
            if record.cancel is Cancel.WANTED:
                singles.append(functools.partial(self._cancel_one, record))
            elif record.deadline is not None and now >= record.deadline and record.seen:
                # One last look at the deadline, then the deadline rules apply.
                singles.append(functools.partial(self._retrieve_one, record))
            elif record.created_at is None:
                singles.append(functools.partial(self._retrieve_one, record))
            else:
                listable.append(record)
        sweep: Coroutine[Any, Any, None] | None = None
        if listable and self._list.sweep_is_cheaper(listable, self._clock.monotonic()):
            sweep = self._sweep_then_retrieve(listable)
        else:
            singles.extend(functools.partial(self._retrieve_one, r) for r in listable)
        jobs: list[Coroutine[Any, Any, None]] = [run_bounded(singles, self._config.max_concurrency)]
        if sweep is not None:
            jobs.append(sweep)
        await run_all(jobs)

    async def _call(self, kind: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """One request: through the concurrency limit and the budget, counted once sent
        in ``stats.requests`` and in the ``stats`` counter named ``kind``."""
        async with self._semaphore:
            await self._budget.acquire()
            stats = self.stats
            stats.requests += 1
            setattr(stats, kind, getattr(stats, kind) + 1)
            return await call()

    def _call_failed(self, error: AiobatchError) -> None:
        self.stats.failures += 1
        self._rate_limited(error)
        if isinstance(error, ClosedError):
            raise error
        if not isinstance(error, RateLimitError):
            self._rate_limited_in_a_row = 0

    def _call_succeeded(self) -> None:
        self._rate_limited_in_a_row = 0

    async def _retrieve_one(self, record: Tracked) -> None:
        if self._tracked.get(record.id) is not record:
            return
        try:
            batch: Batch = await self._call(
                "retrieves", lambda: self._client.retrieve_batch(record.id)
            )
        except (APIStatusError, DecodeError, ClosedError) as exc:
            self._call_failed(exc)
            self._failed(record, exc, self._clock.monotonic())
            return
        except AiobatchError as exc:  # transport errors
            self._call_failed(exc)
            self._failed(record, exc, self._clock.monotonic())
            return
        self._call_succeeded()
        if self._tracked.get(record.id) is record:
            self._observe(record, batch, self._clock.monotonic(), emit_first=True)

    async def _cancel_one(self, record: Tracked) -> None:
        if self._tracked.get(record.id) is not record:
            return
        try:
            batch: Batch = await self._call("cancels", lambda: self._client.cancel_batch(record.id))
        except AiobatchError as exc:
            self._call_failed(exc)
            now = self._clock.monotonic()
            if isinstance(exc, APIStatusError) and exc.status_code in (400, 409):
                # The server refuses: the batch has most likely finished already. Look.
                record.cancel = Cancel.SENT
                logger.info("fleet: cancel of %s refused (%s)", record.id, describe(exc))
                self._due.schedule(record, now)
                self._wake.set()
                return
            self._failed(record, exc, now)
            return
        self._call_succeeded()
        if self._tracked.get(record.id) is not record:
            return
        record.cancel = Cancel.SENT
        if not record.lifecycle.is_terminal:
            record.lifecycle.request_cancel()
        self._observe(record, batch, self._clock.monotonic(), emit_first=True)

    # --- list sweeps -------------------------------------------------------------------------

    async def _sweep_then_retrieve(self, due: list[Tracked]) -> None:
        missing = await self._sweep(due)
        retrieves = [functools.partial(self._retrieve_one, r) for r in missing]
        await run_bounded(retrieves, self._config.max_concurrency)

    async def _sweep(self, due: list[Tracked]) -> list[Tracked]:
        """Walk list pages newest first until every due batch is seen, or none of the
        rest can be on later pages; observe every tracked batch met on the way.

        Returns:
            The due batches the walk did not meet (for a retrieve each).
        """
        cfg = self._config
        self.stats.sweeps += 1
        sweep = Sweep(due, cfg.max_list_pages)
        while sweep.next_page():
            try:
                page = await self._call(
                    "list_pages",
                    functools.partial(
                        self._client.list_batches_page, after=sweep.after, limit=cfg.page_size
                    ),
                )
            except AiobatchError as exc:
                self._call_failed(exc)
                report, give_up = self._list.page_failed(exc)
                if report:
                    self._report(None, exc, None)
                else:
                    logger.info("fleet: a list page failed (%s); trying again later", describe(exc))
                now = self._clock.monotonic()
                if give_up:
                    # Retrieve these now, and list again only after max_interval.
                    self._list.stop_listing(now)
                    return sweep.missing(self._tracked)
                # Try these again after a pause, by the next round's cheapest way.
                for unseen in sweep.wanted.values():
                    self._failed_quietly(unseen, now)
                return []
            self._call_succeeded()
            self._list.page_read()
            now = self._clock.monotonic()
            for record, batch in sweep.meet(page, self._tracked):
                self._observe(record, batch, now, emit_first=True)
            if not sweep.advance(page):
                break
        self._list.learn(sweep)
        return sweep.missing(self._tracked)

    def _failed_quietly(self, record: Tracked, now: float) -> None:
        """Reschedule a batch a failed sweep did not reach (the sweep's error was reported)."""
        if self._tracked.get(record.id) is not record:
            return
        record.errors += 1
        delay = self._error_waits.backoff_delay(record.errors - 1)
        self._due.schedule(record, now + self._jittered(delay))
