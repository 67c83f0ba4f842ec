"""The fleet: one scheduler that tracks any number of batches until each one ends.

Theory of operation
-------------------
Every tracked batch has a due time. One scheduler task sleeps (on the injected clock)
until the earliest due time, takes every batch due by then (plus a short coalescing
window), and observes them in one *round*:

* Batches whose place in the list is unknown (added by id, never seen) and batches with
  a cancel to send are handled one call each.
* For the others it compares the expected cost of the two ways to observe them: one
  ``GET /batches/{id}`` each, or a *sweep*: ``GET /batches?limit=100`` pages, newest
  first, until every due batch has been seen or the page is older than the oldest of
  them. The pages needed are estimated from how many tracked batches are newer than the
  oldest due one, scaled by how many untracked batches the last sweep met per tracked
  one (tracked batches newer than anything that sweep saw count once: it learnt nothing
  about them). A sweep observes every tracked batch on its pages, due or not, so with thousands
  of open batches one sweep of ``N / 100`` pages refreshes all of them. A sweep never
  spends more pages than the retrieves it replaces; due batches it did not meet
  (deleted, listed elsewhere, too far down) fall back to a retrieve. So do the due
  batches of a sweep whose page fails for good (a non-transient error, or
  ``report_after_errors`` failures in a row, 429s aside): the fleet then lists again
  only after ``max_interval``.

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

The next poll depends on the status: short while ``validating``, ``finalizing`` and
``cancelling`` (growing while nothing changes), and while ``in_progress`` about half the
time left, estimated from the ``request_counts`` progress rate since processing began;
always within ``[min_interval, max_interval]``, shortened by a random share (``jitter``)
so that batches added together drift apart.

Per tracked batch the fleet keeps a few numbers and its lifecycle, never the snapshots
it has seen (the last :class:`~aiobatch.Batch` of a finished batch is kept in its
outcome).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import enum
import functools
import heapq
import inspect
import itertools
import logging
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, TypeAlias

import attrs

from ._aio import cancel_and_wait, first_of, sleep_or_set
from ._budget import RequestBudget
from ._client import BatchClient
from ._lifecycle import KNOWN, BatchLifecycle, BatchStatus, parse_status_aliases
from ._models import Batch, RequestCounts, alias_status
from ._retry import DEFAULT_MAX_RETRY_WAIT, RetryPolicy, cap_server_wait
from ._validators import non_negative, non_negative_or_none, positive
from .errors import (
    AiobatchError,
    APIStatusError,
    ClosedError,
    DecodeError,
    NotFoundError,
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


def _share(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"FleetConfig.{attribute.name} must be within [0, 1), got {value!r}")


@attrs.frozen(kw_only=True)
class FleetConfig:
    """How a :class:`Fleet` spends its requests and paces its polls.

    Durations are seconds on the client's clock.

    Attributes:
        requests_per_second: the request budget's average rate (every call the fleet
            makes: retrieves, list pages, cancels).
        burst: the most requests the budget grants at once.
        max_concurrency: the most calls in flight at once.
        min_interval: the shortest pause between two polls of one batch.
        max_interval: the longest pause between two polls of one batch.
        validating_interval: the first pause while ``validating``.
        finalizing_interval: the first pause while ``finalizing``.
        cancelling_interval: the first pause while ``cancelling``.
        in_progress_interval: the first pause while ``in_progress`` before the
            progress rate is known.
        growth: each poll that shows no change multiplies the pause by this.
        jitter: the largest share taken off a pause at random (0 for none).
        coalesce: batches due within this many seconds of the earliest are observed
            together (so one sweep serves them all).
        page_size: batches per list page (1 to 100).
        max_list_pages: the most pages one sweep reads.
        list_when_cheaper: use list sweeps when they are expected to cost fewer
            requests than retrieves; False always retrieves.
        timeout: the default deadline of each batch, from when it is added; None for
            none. A batch still open at its deadline ends with
            :attr:`DoneReason.DEADLINE` (or is cancelled, see ``cancel_on_deadline``).
        cancel_on_deadline: at a batch's deadline, cancel it and keep tracking it
            until it ends (its partial results are then in its files).
        error_backoff: the first pause after a failed poll; it doubles per failure in
            a row, up to ``max_interval``.
        rate_limit_pause: how long a 429 without ``retry-after`` pauses the budget; it
            doubles per 429 in a row, up to ``max_interval``.
        max_retry_wait: the longest pause a server's ``retry-after`` makes (a longer
            one is cut to this, with a WARNING; the next call then asks again). A
            :class:`~aiobatch.BatchRun` sets it to its ``RunConfig.max_retry_wait``.
        report_after_errors: a :class:`TrackingError` event is emitted after this many
            transient failures in a row for one batch (connection errors, timeouts,
            429, 5xx); other failures are reported at once.
        not_found_limit: a batch the server answers 404 for this many times in a row
            ends with :attr:`DoneReason.NOT_FOUND` (a fresh batch may be briefly
            invisible).
        unknown_status_grace: a batch in a status aiobatch does not know (and not in
            the fleet's ``status_aliases``) without result files ends with
            :attr:`DoneReason.UNKNOWN_STATUS` this many seconds after its
            ``expires_at`` (it ends at once when it carries an output or error file).
        seed: seeds the jitter (None for a random one).
        webhook_interval: webhooks on: every open batch is polled this often
            (seconds; may exceed ``max_interval``), whatever its status, since
            :meth:`Fleet.notify` (a :class:`~aiobatch.webhooks.WebhookReceiver`) makes a
            batch due the moment its webhook arrives and polls only catch deliveries
            that never come. None (the default): webhooks off, the intervals above.
    """

    requests_per_second: float = attrs.field(default=10.0, validator=positive)
    burst: int = attrs.field(default=20, validator=positive)
    max_concurrency: int = attrs.field(default=32, validator=positive)
    min_interval: float = attrs.field(default=5.0, validator=positive)
    max_interval: float = attrs.field(default=60.0, validator=positive)
    validating_interval: float = attrs.field(default=15.0, validator=positive)
    finalizing_interval: float = attrs.field(default=10.0, validator=positive)
    cancelling_interval: float = attrs.field(default=15.0, validator=positive)
    in_progress_interval: float = attrs.field(default=60.0, validator=positive)
    growth: float = attrs.field(default=1.5, validator=positive)
    jitter: float = attrs.field(default=0.1, validator=_share)
    coalesce: float = attrs.field(default=1.0, validator=non_negative)
    page_size: int = attrs.field(default=100, validator=positive)
    max_list_pages: int = attrs.field(default=500, validator=positive)
    list_when_cheaper: bool = True
    timeout: float | None = attrs.field(default=None, validator=non_negative_or_none)
    cancel_on_deadline: bool = False
    error_backoff: float = attrs.field(default=2.0, validator=positive)
    rate_limit_pause: float = attrs.field(default=1.0, validator=positive)
    max_retry_wait: float = attrs.field(default=DEFAULT_MAX_RETRY_WAIT, validator=positive)
    report_after_errors: int = attrs.field(default=5, validator=positive)
    not_found_limit: int = attrs.field(default=3, validator=positive)
    unknown_status_grace: float = attrs.field(default=3600.0, validator=non_negative)
    seed: int | None = None
    webhook_interval: float | None = attrs.field(default=None, validator=non_negative_or_none)

    def __attrs_post_init__(self) -> None:
        if self.min_interval > self.max_interval:
            raise ValueError(
                f"FleetConfig.min_interval ({self.min_interval:g}) must not exceed "
                f"max_interval ({self.max_interval:g})"
            )
        if self.webhook_interval is not None and self.webhook_interval < self.min_interval:
            raise ValueError(
                f"FleetConfig.webhook_interval ({self.webhook_interval:g}) must not be "
                f"shorter than min_interval ({self.min_interval:g})"
            )
        if self.page_size > 100:
            raise ValueError(f"FleetConfig.page_size must be at most 100, got {self.page_size}")


# --- events -------------------------------------------------------------------------------


class DoneReason(str, enum.Enum):
    """Why the fleet stopped tracking a batch."""

    #: The batch reached a terminal status (completed, failed, expired, cancelled, or
    #: one of Portkey's): ``batch.status`` says which.
    FINISHED = "finished"
    #: Its deadline passed while it was still open (``batch`` is the last snapshot).
    DEADLINE = "deadline"
    #: The server kept answering 404 for it.
    NOT_FOUND = "not_found"
    #: It reports a status aiobatch does not know (``batch.raw_status``; not in the
    #: fleet's ``status_aliases``) yet cannot be running any more: it carries an output
    #: or error file id, or its ``expires_at`` is ``unknown_status_grace`` seconds past.
    #: Its files hold what it finished; ``error`` is the
    #: :class:`~aiobatch.errors.UnknownStatusError`.
    UNKNOWN_STATUS = "unknown_status"


@attrs.frozen(slots=True)
class StatusChanged:
    """A batch moved to a new status (``previous`` is None on its first observation
    when it was added by id)."""

    batch: Batch
    previous: BatchStatus | None

    @property
    def batch_id(self) -> str:
        """The batch's id."""
        return self.batch.id


@attrs.frozen(slots=True)
class ProgressChanged:
    """A batch's ``request_counts`` changed."""

    batch: Batch
    previous: RequestCounts | None

    @property
    def batch_id(self) -> str:
        """The batch's id."""
        return self.batch.id


@attrs.frozen(slots=True)
class TrackingError:
    """Something went wrong while tracking; tracking goes on.

    ``batch_id`` is None for a failure that concerns no single batch (a list page).
    ``error`` is the exception: an :class:`~aiobatch.errors.UnexpectedTransitionError`
    or :class:`~aiobatch.errors.UnknownStatusError` when the server reported something
    impossible or unknown (the server's fault), an API or transport error otherwise.
    """

    batch_id: str | None
    error: AiobatchError
    batch: Batch | None = None


@attrs.frozen(slots=True)
class DeadlinePassed:
    """A batch was still open at its deadline; ``cancelling`` says whether the fleet is
    cancelling it (it then stays tracked until it ends)."""

    batch_id: str
    batch: Batch | None
    cancelling: bool


@attrs.frozen(slots=True)
class BatchDone:
    """The fleet stopped tracking a batch: its outcome.

    Attributes:
        batch_id: the batch.
        batch: the last snapshot (None if the batch was never seen).
        reason: why tracking ended.
        error: the last error, for :attr:`DoneReason.NOT_FOUND`; the
            :class:`~aiobatch.errors.UnknownStatusError`, for
            :attr:`DoneReason.UNKNOWN_STATUS`.
    """

    batch_id: str
    batch: Batch | None
    reason: DoneReason
    error: AiobatchError | None = None

    @property
    def finished(self) -> bool:
        """Whether the batch reached a terminal status."""
        return self.reason is DoneReason.FINISHED


FleetEvent: TypeAlias = StatusChanged | ProgressChanged | TrackingError | DeadlinePassed | BatchDone


@attrs.define(slots=True)
class FleetStats:
    """Counters of what a fleet has done (read them; the fleet updates them).

    Attributes:
        requests: calls sent (each one took a request from the budget).
        retrieves: ``GET /batches/{id}`` calls.
        list_pages: ``GET /batches`` pages.
        cancels: ``POST /batches/{id}/cancel`` calls.
        sweeps: list sweeps started.
        observations: batch snapshots examined.
        rate_limited: answers with status 429.
        failures: calls that failed (any reason).
        notifications: :meth:`Fleet.notify` calls for a tracked batch.
        unknown_notifications: :meth:`Fleet.notify` calls for a batch not tracked
            (ignored).
    """

    requests: int = 0
    retrieves: int = 0
    list_pages: int = 0
    cancels: int = 0
    sweeps: int = 0
    observations: int = 0
    rate_limited: int = 0
    failures: int = 0
    notifications: int = 0
    unknown_notifications: int = 0


# --- per-batch state ------------------------------------------------------------------------

_NO_CANCEL, _CANCEL_WANTED, _CANCEL_SENT = 0, 1, 2
_NOT_PUSHED, _PUSHED, _PUSHED_IN_FLIGHT = 0, 1, 2


class _Tracked:
    """What the fleet keeps per open batch: a few numbers, never the snapshots."""

    __slots__ = (
        "cancel",
        "completed",
        "created_at",
        "deadline",
        "due",
        "errors",
        "failed",
        "id",
        "interval",
        "lifecycle",
        "not_found",
        "pushed",
        "seen",
        "start_done",
        "start_time",
        "total",
        "unknown",
    )

    def __init__(self, batch_id: str, deadline: float | None) -> None:
        self.id = batch_id
        self.lifecycle = BatchLifecycle(status=_S.VALIDATING, batch_id=batch_id)
        self.seen = False
        self.created_at: int | None = None
        #: the last request_counts seen (-1: none yet).
        self.total = -1
        self.completed = -1
        self.failed = -1
        #: (time, lines done) when progress was first seen, for the rate estimate.
        self.start_time = 0.0
        self.start_done = -1
        self.due = 0.0
        self.interval = 0.0
        self.errors = 0
        self.not_found = 0
        self.cancel = _NO_CANCEL
        self.deadline = deadline
        #: the unknown status strings reported for this batch (each is reported once).
        self.unknown: tuple[str, ...] = ()
        #: a webhook said it ended: _PUSHED, or _PUSHED_IN_FLIGHT when it came while a
        #: call about it was in flight (that answer may predate the end).
        self.pushed = _NOT_PUSHED


Callback: TypeAlias = Callable[[FleetEvent], "Awaitable[None] | None"]


class _Subscription:
    """An async iterator over a fleet's events from the moment it was made."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet
        self._queue: asyncio.Queue[FleetEvent | None] = asyncio.Queue()
        fleet._subscribers.add(self._queue)

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> FleetEvent:
        if self._queue not in self._fleet._subscribers and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is None:
            self._fleet._subscribers.discard(self._queue)
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        """Stop receiving events; a task waiting on this iterator sees it end."""
        fleet, queue = self._fleet, self._queue
        if queue in fleet._subscribers:
            fleet._subscribers.discard(queue)
            while not queue.empty():  # drop what was never read
                queue.get_nowait()
            queue.put_nowait(None)


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
        self._on_event = on_event
        # Doubling waits capped at max_interval (the fleet adds its own seeded jitter):
        # after failed polls, and for a 429 that did not say how long.
        self._error_waits = RetryPolicy(
            initial_delay=cfg.error_backoff, max_delay=cfg.max_interval, jitter=None
        )
        self._pause_waits = RetryPolicy(
            initial_delay=cfg.rate_limit_pause, max_delay=cfg.max_interval, jitter=None
        )
        self._rng = random.Random(cfg.seed)
        self._tracked: dict[str, _Tracked] = {}
        self._outcomes: dict[str, BatchDone] = {}
        self._heap: list[tuple[float, int, _Tracked]] = []
        #: (created_at, id) of the tracked batches whose creation time is known, sorted.
        self._order: list[tuple[int, str]] = []
        self._seq = itertools.count()
        self._subscribers: set[asyncio.Queue[FleetEvent | None]] = set()
        self._callback_tasks: set[asyncio.Task[None]] = set()
        self._semaphore = asyncio.Semaphore(cfg.max_concurrency)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failure: BaseException | None = None
        #: batches listed per tracked one in the last sweep (for the sweep cost), and the
        #: newest creation time that sweep saw: the ratio says nothing of batches
        #: created later, above the part of the list it walked.
        self._foreign_ratio = 1.0
        self._ratio_top: int | None = None
        self._rate_limited_in_a_row = 0
        self._sweep_failures = 0
        #: no sweeps before this time (listing kept failing).
        self._list_off_until = -math.inf
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
        record = _Tracked(batch_id, None if limit is None else now + limit)
        self._tracked[batch_id] = record
        self._outcomes.pop(batch_id, None)
        self._idle.clear()
        self._start()
        if isinstance(batch, Batch):
            self._observe(record, batch, now, emit_first=False)
        else:
            self._schedule_at(record, now)
        self._wake.set()

    def add_many(self, batches: Iterable[str | Batch], *, timeout: float | None = None) -> None:
        """:meth:`add` each of ``batches``."""
        for batch in batches:
            self.add(batch, timeout=timeout)

    def remove(self, batch_id: str) -> bool:
        """Stop tracking a batch (no outcome is recorded); True when it was tracked."""
        record = self._tracked.pop(batch_id, None)
        if record is None:
            return False
        self._unindex(record)
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
            return False
        self.stats.notifications += 1
        if record.due == math.inf:
            # A call about it is in flight: look again as soon as it is answered.
            record.pushed = _PUSHED_IN_FLIGHT
            return True
        record.pushed = _PUSHED
        now = self._clock.monotonic()
        if record.due > now:
            self._schedule_at(record, now)
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

    def events(self) -> _Subscription:
        """An async iterator over every event from now on; it ends when the fleet closes.

        Each call makes an independent subscription (events are queued for it until
        read); stop one early with its ``aclose()``.
        """
        self._check_open()
        return _Subscription(self)

    async def as_completed(self) -> AsyncIterator[BatchDone]:
        """Each batch's outcome as it ends, until no tracked batch is open.

        Outcomes recorded before the call come first. Batches added while iterating are
        waited for too.

        Raises:
            ClosedError: the fleet was closed while batches were still open.
        """
        subscription = _Subscription(self)
        queue = subscription._queue
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
        if record.cancel == _NO_CANCEL:
            record.cancel = _CANCEL_WANTED
            self._schedule_at(record, self._clock.monotonic())
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
            if record.cancel == _NO_CANCEL:
                record.cancel = _CANCEL_WANTED
                self._schedule_at(record, now)
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
            task.cancel()
            # A scheduler that failed earlier (its failure was logged and handed to
            # every waiter) does not fail the close: it still cleans up below.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await cancel_and_wait(self._callback_tasks)
        self._callback_tasks.clear()
        for queue in list(self._subscribers):
            queue.put_nowait(None)
        self._subscribers.clear()
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

    def _unindex(self, record: _Tracked) -> None:
        if record.created_at is None:
            return
        order = self._order
        i = bisect.bisect_left(order, (record.created_at, record.id))
        if i < len(order) and order[i][1] == record.id:
            del order[i]

    def _after_removal(self) -> None:
        if not self._tracked:
            self._idle.set()
            self._wake.set()

    def _emit(self, event: FleetEvent) -> None:
        for queue in self._subscribers:
            queue.put_nowait(event)
        callback = self._on_event
        if callback is None:
            return
        try:
            result = callback(event)
        except Exception:
            logger.exception("a fleet event callback raised on %r", type(event).__name__)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(self._await_callback(result, event))
            self._callback_tasks.add(task)
            task.add_done_callback(self._callback_tasks.discard)

    @staticmethod
    async def _await_callback(result: Awaitable[None], event: FleetEvent) -> None:
        try:
            await result
        except Exception:
            logger.exception("a fleet event callback raised on %r", type(event).__name__)

    # --- scheduling ---------------------------------------------------------------------------

    def _schedule_at(self, record: _Tracked, when: float) -> None:
        if record.deadline is not None and when > record.deadline:
            when = record.deadline
        record.due = when
        heap = self._heap
        heapq.heappush(heap, (when, next(self._seq), record))
        if len(heap) > 2 * len(self._tracked) + 64:
            # Entries of batches rescheduled (by a sweep) or gone are dropped lazily when
            # they come to the top; a batch re-observed often, with a long interval,
            # would otherwise leave many behind. Rebuild: amortised O(1) per push.
            heap[:] = [entry for entry in heap if self._live(entry)]
            heapq.heapify(heap)

    def _live(self, entry: tuple[float, int, _Tracked]) -> bool:
        due, _, record = entry
        return self._tracked.get(record.id) is record and record.due == due

    def _next_due(self) -> float | None:
        heap = self._heap
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def _take_due(self, until: float) -> list[_Tracked]:
        heap = self._heap
        taken: list[_Tracked] = []
        marked: set[int] = set()
        while heap and heap[0][0] <= until:
            entry = heapq.heappop(heap)
            record = entry[2]
            if self._live(entry) and id(record) not in marked:
                marked.add(id(record))
                record.due = math.inf  # in flight: not due again until rescheduled
                taken.append(record)
        return taken

    def _jittered(self, interval: float) -> float:
        jitter = self._config.jitter
        if jitter:
            interval *= self._rng.uniform(1.0 - jitter, 1.0)
        return interval

    def _next_interval(self, record: _Tracked, changed: bool, now: float) -> float:
        cfg = self._config
        if cfg.webhook_interval is not None:
            # Webhooks report each end: polls are the safety net for lost deliveries.
            record.interval = cfg.webhook_interval
            return self._jittered(cfg.webhook_interval)
        status = record.lifecycle.status
        if status is _S.IN_PROGRESS and record.total > 0 and record.start_done >= 0:
            elapsed = now - record.start_time
            done = record.completed + record.failed
            gained = done - record.start_done
            if done >= record.total:
                interval = cfg.finalizing_interval
            elif gained > 0 and elapsed > 0:
                left = (record.total - done) * elapsed / gained
                interval = left / 2.0 if left > 2.0 * cfg.min_interval else left
            else:
                interval = cfg.in_progress_interval if changed else record.interval * cfg.growth
        else:
            if changed or record.interval <= 0:
                if status is _S.IN_PROGRESS:
                    interval = cfg.in_progress_interval
                elif status is _S.FINALIZING:
                    interval = cfg.finalizing_interval
                elif status is _S.CANCELLING:
                    interval = cfg.cancelling_interval
                else:
                    interval = cfg.validating_interval
            else:
                interval = record.interval * cfg.growth
        interval = min(max(interval, cfg.min_interval), cfg.max_interval)
        record.interval = interval
        return self._jittered(interval)

    # --- observations ------------------------------------------------------------------------

    def _observe(self, record: _Tracked, batch: Batch, now: float, *, emit_first: bool) -> None:
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
            bisect.insort(self._order, (batch.created_at, record.id))
        first = not record.seen
        record.seen = True
        previous = lifecycle.status
        changed = False
        unknown: UnknownStatusError | None = None
        if batch.status is _S.UNKNOWN:
            unknown = self._unknown_status(record, batch)
        elif first:
            lifecycle.status = batch.status
            changed = True
        else:
            try:
                changed = lifecycle.observe(batch.status) is not None
            except StateError as exc:
                self._report(record.id, exc, batch)
        if changed and (emit_first or not first):
            self._emit(StatusChanged(batch, None if first else previous))
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
                self._emit(ProgressChanged(batch, old))
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
        if record.cancel != _CANCEL_WANTED:
            when = now + self._next_interval(record, changed or progressed, now)
            pushed = record.pushed
            if pushed == _PUSHED_IN_FLIGHT:
                when = now  # the answer may predate the webhook: look again now
                record.pushed = _PUSHED
            elif pushed == _PUSHED:
                when = min(when, now + self._config.min_interval)
                record.pushed = _NOT_PUSHED
        self._schedule_at(record, when)

    def _unknown_status(self, record: _Tracked, batch: Batch) -> UnknownStatusError | None:
        """A snapshot in a status aiobatch does not know: report it (once per batch and
        string); return the error when the batch has ended for sure (it carries result
        files, or is past ``expires_at`` plus ``unknown_status_grace``), else None."""
        raw = batch.wire_status
        error = UnknownStatusError(raw, batch_id=record.id)
        grace = self._config.unknown_status_grace
        if raw not in record.unknown:
            record.unknown += (raw,)
            logger.warning(
                "fleet: batch %s reports unknown status %r; it stays tracked as %r and "
                "ends once it carries an output or error file, or %gs after its "
                "expires_at. If you know what the status means, map it with "
                "status_aliases={%r: STATUS}, STATUS one of: %s",
                record.id,
                raw,
                record.lifecycle.status.value,
                grace,
                raw,
                ", ".join(s.value for s in BatchStatus if s in KNOWN),
            )
            self._emit(TrackingError(record.id, error, batch))
        if batch.output_file_id or batch.error_file_id:
            why = "it carries result files"
        elif batch.expires_at is not None and self._clock.now() >= batch.expires_at + grace:
            why = f"its expires_at ({batch.expires_at}) passed more than {grace:g}s ago"
        else:
            return None
        logger.warning(
            "fleet: batch %s ends in unknown status %r: %s, so it runs no more",
            record.id,
            raw,
            why,
        )
        return error

    def _report(self, batch_id: str | None, error: AiobatchError, batch: Batch | None) -> None:
        logger.warning("fleet: %s%s", f"batch {batch_id}: " if batch_id else "", describe(error))
        self._emit(TrackingError(batch_id, error, batch))

    def _finish(
        self,
        record: _Tracked,
        batch: Batch | None,
        reason: DoneReason,
        error: AiobatchError | None = None,
    ) -> None:
        if self._tracked.get(record.id) is not record:
            return
        del self._tracked[record.id]
        self._unindex(record)
        done = BatchDone(record.id, batch, reason, error)
        self._outcomes[record.id] = done
        self._emit(done)
        self._after_removal()

    def _deadline(self, record: _Tracked, batch: Batch | None, now: float) -> None:
        cancelling = self._config.cancel_on_deadline
        self._emit(DeadlinePassed(record.id, batch, cancelling))
        if cancelling:
            record.deadline = None
            if record.cancel == _NO_CANCEL:
                record.cancel = _CANCEL_WANTED
            self._schedule_at(record, now)
        else:
            self._finish(record, batch, DoneReason.DEADLINE)

    def _failed(self, record: _Tracked, error: AiobatchError, now: float) -> None:
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
        elif not _transient(error) or record.errors % cfg.report_after_errors == 0:
            self._report(record.id, error, None)
        if record.deadline is not None and now >= record.deadline:
            # As after an observation: a batch being cancelled is bound by its deadline
            # too (otherwise every retry lands on the past deadline, back to back).
            self._deadline(record, None, now)
            return
        delay = self._error_waits.backoff_delay(record.errors - 1)
        self._schedule_at(record, now + self._jittered(delay))

    def _rate_limited(self, error: AiobatchError) -> None:
        """Pause the whole budget when the server asked for it (429 or retry-after)."""
        if not isinstance(error, APIStatusError):
            return
        asked = error.retry_after
        if error.status_code == 429:
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
                due = self._next_due()
                if due is None:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                now = self._clock.monotonic()
                if due > now:
                    await self._sleep_or_wake(due - now)
                    continue
                records = self._take_due(now + self._config.coalesce)
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
        for queue in list(self._subscribers):
            queue.put_nowait(None)
        self._subscribers.clear()

    async def _sleep_or_wake(self, seconds: float) -> None:
        self._wake.clear()
        await sleep_or_set(self._clock, seconds, self._wake)

    async def _round(self, records: list[_Tracked]) -> None:
        """Observe every record of one round: cancels, retrieves and maybe a sweep."""
        now = self._clock.monotonic()
        singles: list[Callable[[], Awaitable[None]]] = []
        listable: list[_Tracked] = []
        for record in records:
            if record.cancel == _CANCEL_WANTED:
                singles.append(_bind(self._cancel_one, record))
            elif record.deadline is not None and now >= record.deadline and record.seen:
                # One last look at the deadline, then the deadline rules apply.
                singles.append(_bind(self._retrieve_one, record))
            elif record.created_at is None:
                singles.append(_bind(self._retrieve_one, record))
            else:
                listable.append(record)
        sweep: Coroutine[Any, Any, None] | None = None
        if listable and self._sweep_is_cheaper(listable):
            sweep = self._sweep_then_retrieve(listable)
        else:
            singles.extend(_bind(self._retrieve_one, r) for r in listable)
        jobs: list[Coroutine[Any, Any, None]] = [self._run_jobs(singles)]
        if sweep is not None:
            jobs.append(sweep)
        await _all(jobs)

    async def _run_jobs(self, jobs: list[Callable[[], Awaitable[None]]]) -> None:
        """Run jobs on at most ``max_concurrency`` workers."""
        if not jobs:
            return
        queue = deque(jobs)

        async def worker() -> None:
            while queue:
                await queue.popleft()()

        workers = min(len(jobs), self._config.max_concurrency)
        await _all([worker() for _ in range(workers)])

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
        if not (isinstance(error, APIStatusError) and error.status_code == 429):
            self._rate_limited_in_a_row = 0

    def _call_succeeded(self) -> None:
        self._rate_limited_in_a_row = 0

    async def _retrieve_one(self, record: _Tracked) -> None:
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

    async def _cancel_one(self, record: _Tracked) -> None:
        if self._tracked.get(record.id) is not record:
            return
        try:
            batch: Batch = await self._call("cancels", lambda: self._client.cancel_batch(record.id))
        except AiobatchError as exc:
            self._call_failed(exc)
            now = self._clock.monotonic()
            if isinstance(exc, APIStatusError) and exc.status_code in (400, 409):
                # The server refuses: the batch has most likely finished already. Look.
                record.cancel = _CANCEL_SENT
                logger.info("fleet: cancel of %s refused (%s)", record.id, describe(exc))
                self._schedule_at(record, now)
                self._wake.set()
                return
            self._failed(record, exc, now)
            return
        self._call_succeeded()
        if self._tracked.get(record.id) is not record:
            return
        record.cancel = _CANCEL_SENT
        if not record.lifecycle.is_terminal:
            record.lifecycle.request_cancel()
        self._observe(record, batch, self._clock.monotonic(), emit_first=True)

    # --- list sweeps -------------------------------------------------------------------------

    def _sweep_is_cheaper(self, due: list[_Tracked]) -> bool:
        """Whether a list sweep for ``due`` is expected to cost fewer requests than a
        retrieve each.

        A sweep reads from the newest batch down to the oldest due one (refreshing every
        tracked batch above it on the way). Its pages are estimated from the tracked
        batches created since the oldest due one, scaled by the batches listed per
        tracked one in the last sweep; tracked batches newer than every batch that sweep
        saw count once each (nothing is known of what lies between them yet, and a sweep
        learns it for no more than the retrieves it replaces). Otherwise one dear sweep
        far down the list would keep the fleet retrieving every new batch for good.
        """
        cfg = self._config
        if not cfg.list_when_cheaper or len(due) < 2:
            return False
        if self._clock.monotonic() < self._list_off_until:
            return False  # listing failed for good lately (see _sweep)
        order = self._order
        oldest = min(r.created_at for r in due if r.created_at is not None)
        start = bisect.bisect_left(order, (oldest, ""))
        split = len(order)  # order[start:split] lies where the last sweep walked
        if self._ratio_top is not None:
            split = max(start, bisect.bisect_left(order, (self._ratio_top + 1, "")))
        listed = (split - start) * self._foreign_ratio + (len(order) - split)
        pages = math.ceil(listed / cfg.page_size)
        return pages < len(due)

    async def _sweep_then_retrieve(self, due: list[_Tracked]) -> None:
        missing = await self._sweep(due)
        await self._run_jobs([_bind(self._retrieve_one, r) for r in missing])

    async def _sweep(self, due: list[_Tracked]) -> list[_Tracked]:
        """Walk list pages newest first until every due batch is seen, or none of the
        rest can be on later pages; observe every tracked batch met on the way.

        Returns:
            The due batches the walk did not meet (for a retrieve each).
        """
        cfg = self._config
        self.stats.sweeps += 1
        wanted: dict[str, _Tracked] = {r.id: r for r in due}
        # The oldest creation time among the batches still wanted, lazily.
        ages = sorted(((r.created_at or 0), r.id) for r in due)
        oldest_index = 0
        budget_pages = min(cfg.max_list_pages, len(due) - 1)
        tracked_met = foreign_met = 0
        top: int | None = None
        after: str | None = None
        pages = 0
        while wanted and pages < budget_pages:
            pages += 1
            try:
                page = await self._call(
                    "list_pages",
                    functools.partial(
                        self._client.list_batches_page, after=after, limit=cfg.page_size
                    ),
                )
            except AiobatchError as exc:
                self._call_failed(exc)
                self._sweep_failures += 1
                in_a_row = self._sweep_failures
                report_after = cfg.report_after_errors
                if not _transient(exc) or in_a_row % report_after == 0:
                    self._report(None, exc, None)
                else:
                    logger.info("fleet: a list page failed (%s); trying again later", describe(exc))
                now = self._clock.monotonic()
                rate_limited = isinstance(exc, APIStatusError) and exc.status_code == 429
                if not rate_limited and (not _transient(exc) or in_a_row >= report_after):
                    # Listing does not work here (a server without GET /batches, or one
                    # failing for a while): retrieve these now, and list again only
                    # after max_interval. A 429 is no sign against listing: the budget
                    # is paused, and the next sweep is still the cheapest way.
                    self._list_off_until = now + cfg.max_interval
                    return [r for r in wanted.values() if self._tracked.get(r.id) is r]
                # Try these again after a pause, by the next round's cheapest way.
                for unseen in wanted.values():
                    self._failed_quietly(unseen, now)
                return []
            self._call_succeeded()
            self._sweep_failures = 0
            now = self._clock.monotonic()
            if top is None and page.data:
                top = max(batch.created_at for batch in page.data)
            for batch in page.data:
                record = self._tracked.get(batch.id)
                if record is None:
                    foreign_met += 1
                    continue
                tracked_met += 1
                if wanted.pop(batch.id, None) is None and record.due == math.inf:
                    continue  # in flight elsewhere in this round
                self._observe(record, batch, now, emit_first=True)
            if not page.has_more or not page.data:
                break
            after = page.data[-1].id
            while oldest_index < len(ages) and ages[oldest_index][1] not in wanted:
                oldest_index += 1
            if oldest_index == len(ages):
                break
            last_created = page.data[-1].created_at
            if last_created < ages[oldest_index][0]:
                break  # every wanted batch left is older than the pages can still show
        # Batches listed per tracked one: the cost model of the next plans. The wanted
        # batches the walk did not reach count as lying just below it (a lower bound).
        ours = tracked_met + len(wanted)
        if ours:
            self._foreign_ratio = max(1.0, (ours + foreign_met) / ours)
            self._ratio_top = top
        return [r for r in wanted.values() if self._tracked.get(r.id) is r]

    def _failed_quietly(self, record: _Tracked, now: float) -> None:
        """Reschedule a batch a failed sweep did not reach (the sweep's error was reported)."""
        if self._tracked.get(record.id) is not record:
            return
        record.errors += 1
        delay = self._error_waits.backoff_delay(record.errors - 1)
        self._schedule_at(record, now + self._jittered(delay))


def _transient(error: AiobatchError) -> bool:
    """Whether a failure is the kind that passes by itself (network, 408/409/429, 5xx)."""
    if isinstance(error, APIStatusError):
        return error.status_code in (408, 409, 429) or error.status_code >= 500
    return not isinstance(error, DecodeError | StateError)


async def _all(coroutines: list[Coroutine[Any, Any, None]]) -> None:
    """Run coroutines concurrently; if one fails (or this is cancelled), cancel the rest
    and wait for them, so nothing is left running."""
    if len(coroutines) == 1:
        await coroutines[0]
        return
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _bind(
    fn: Callable[[_Tracked], Awaitable[None]], record: _Tracked
) -> Callable[[], Awaitable[None]]:
    def job() -> Awaitable[None]:
        return fn(record)

    return job
