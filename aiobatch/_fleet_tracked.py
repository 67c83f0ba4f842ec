"""What a fleet is told and what it keeps per open batch: :class:`FleetConfig`, the
record of each tracked batch (:class:`Tracked`) with the pacing of its polls, and the
queue of their due times (:class:`DueQueue`). No IO but log records, no asyncio.

The next poll depends on the status: short while ``validating``, ``finalizing`` and
``cancelling`` (growing while nothing changes), and while ``in_progress`` about half the
time left, estimated from the ``request_counts`` progress rate since processing began;
always within ``[min_interval, max_interval]`` (:meth:`Tracked.next_interval`; the
fleet then shortens it by a random share, ``jitter``, so that batches added together
drift apart). With webhooks on (``webhook_interval``) every poll is a safety net on a
beat the open batches share, so that one list sweep serves them all, and a batch a
webhook said ended is looked at again soon (:meth:`Tracked.next_poll`).

A status string aiobatch does not know is reported once per batch and string, and ends
the batch once it can no longer be running (:meth:`Tracked.unknown_status`).
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from ._fleet_events import TrackingError
from ._lifecycle import KNOWN, BatchLifecycle, BatchStatus
from ._models import Batch
from ._retry import DEFAULT_MAX_RETRY_WAIT
from ._validators import non_negative, non_negative_or_none, positive
from .errors import UnknownStatusError

__all__ = ["Cancel", "DueQueue", "FleetConfig", "Pushed", "Tracked"]

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
            408, 409, 429, 5xx); other failures are reported at once.
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
            that never come. The polls fall on one beat for all open batches (whole
            intervals after the fleet was made, without jitter) so that one list sweep
            serves them all. None (the default): webhooks off, the intervals above.
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


class Cancel(enum.Enum):
    """Where the cancel of a tracked batch stands."""

    #: nobody asked for one
    NONE = "none"
    #: asked for: the scheduler sends it in the next round
    WANTED = "wanted"
    #: sent (or refused by the server: the batch has most likely ended)
    SENT = "sent"


class Pushed(enum.Enum):
    """Whether a webhook said a tracked batch ended (:meth:`Fleet.notify`)."""

    #: no webhook since the last observation
    NONE = "none"
    #: one came: the next poll is soon
    PUSHED = "pushed"
    #: one came while a call about the batch was in flight (its answer may predate the
    #: end): look again as soon as it is answered
    IN_FLIGHT = "in_flight"


class Tracked:
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
        self.cancel = Cancel.NONE
        self.deadline = deadline
        #: the unknown status strings reported for this batch (each is reported once).
        self.unknown: tuple[str, ...] = ()
        self.pushed = Pushed.NONE

    def next_interval(self, config: FleetConfig, changed: bool, now: float) -> float:
        """The pause before the next poll (before jitter), remembered as the last one.

        Args:
            config: the fleet's intervals.
            changed: whether the last snapshot showed a change (status or progress).
            now: ``clock.monotonic()`` of the snapshot.
        """
        cfg = config
        status = self.lifecycle.status
        if status is _S.IN_PROGRESS and self.total > 0 and self.start_done >= 0:
            elapsed = now - self.start_time
            done = self.completed + self.failed
            gained = done - self.start_done
            if done >= self.total:
                interval = cfg.finalizing_interval
            elif gained > 0 and elapsed > 0:
                left = (self.total - done) * elapsed / gained
                interval = left / 2.0 if left > 2.0 * cfg.min_interval else left
            else:
                interval = cfg.in_progress_interval if changed else self.interval * cfg.growth
        else:
            if changed or self.interval <= 0:
                if status is _S.IN_PROGRESS:
                    interval = cfg.in_progress_interval
                elif status is _S.FINALIZING:
                    interval = cfg.finalizing_interval
                elif status is _S.CANCELLING:
                    interval = cfg.cancelling_interval
                else:
                    interval = cfg.validating_interval
            else:
                interval = self.interval * cfg.growth
        interval = min(max(interval, cfg.min_interval), cfg.max_interval)
        self.interval = interval
        return interval

    def next_poll(
        self,
        config: FleetConfig,
        changed: bool,
        now: float,
        origin: float,
        jittered: Callable[[float], float],
    ) -> float:
        """When to poll next after a snapshot at ``now``.

        Without webhooks: ``now`` plus :meth:`next_interval`, shortened by ``jittered``.
        With webhooks (``webhook_interval``): the safety net's next beat, ``origin`` plus
        a whole number of intervals, at least ``min_interval`` from now; every open batch
        shares it, so that one list sweep can serve them all (jitter would scatter them
        into rounds too small for a sweep, a retrieve each). After a webhook, sooner:
        ``now`` when it came while the call just answered was in flight, else
        ``min_interval`` from now (the server's read side may lag the event).

        Args:
            config: the fleet's intervals.
            changed: whether the snapshot showed a change (status or progress).
            now: ``clock.monotonic()`` of the snapshot.
            origin: ``clock.monotonic()`` when the fleet was made.
            jittered: takes the jitter off an interval.
        """
        beat = config.webhook_interval
        if beat is None:
            when = now + jittered(self.next_interval(config, changed, now))
        else:
            self.interval = beat
            when = origin + (math.floor((now + config.min_interval - origin) / beat) + 1) * beat
        pushed, self.pushed = self.pushed, Pushed.NONE
        if pushed is Pushed.IN_FLIGHT:
            self.pushed = Pushed.PUSHED  # if this look is too early, one more soon
            return now
        if pushed is Pushed.PUSHED:
            return min(when, now + config.min_interval)
        return when

    def unknown_status(
        self,
        batch: Batch,
        grace: float,
        wall_now: float,
        report: Callable[[TrackingError], None],
    ) -> UnknownStatusError | None:
        """A snapshot in a status aiobatch does not know: report it (once per batch and
        string, to ``report`` and as a WARNING); return the error when the batch has
        ended for sure (it carries result files, or ``wall_now`` is past
        ``expires_at`` plus ``grace``), else None."""
        raw = batch.wire_status
        error = UnknownStatusError(raw, batch_id=self.id)
        if raw not in self.unknown:
            self.unknown += (raw,)
            logger.warning(
                "fleet: batch %s reports unknown status %r; it stays tracked as %r and "
                "ends once it carries an output or error file, or %gs after its "
                "expires_at. If you know what the status means, map it with "
                "status_aliases={%r: STATUS}, STATUS one of: %s",
                self.id,
                raw,
                self.lifecycle.status.value,
                grace,
                raw,
                ", ".join(s.value for s in BatchStatus if s in KNOWN),
            )
            report(TrackingError(self.id, error, batch))
        if batch.output_file_id or batch.error_file_id:
            why = "it carries result files"
        elif batch.expires_at is not None and wall_now >= batch.expires_at + grace:
            why = f"its expires_at ({batch.expires_at}) passed more than {grace:g}s ago"
        else:
            return None
        logger.warning(
            "fleet: batch %s ends in unknown status %r: %s, so it runs no more",
            self.id,
            raw,
            why,
        )
        return error


class DueQueue:
    """The tracked batches by due time: a heap whose stale entries (a batch rescheduled
    or no longer tracked) are dropped lazily.

    Args:
        tracked: the fleet's tracked batches by id (read, never changed).
    """

    def __init__(self, tracked: Mapping[str, Tracked]) -> None:
        self._tracked = tracked
        self._heap: list[tuple[float, int, Tracked]] = []
        self._seq = itertools.count()

    def schedule(self, record: Tracked, when: float) -> None:
        """Make ``record`` due at ``when`` (at its deadline at the latest)."""
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

    def __len__(self) -> int:
        """Entries in the heap, stale ones included (at most about twice the tracked)."""
        return len(self._heap)

    def _live(self, entry: tuple[float, int, Tracked]) -> bool:
        due, _, record = entry
        return self._tracked.get(record.id) is record and record.due == due

    def next_due(self) -> float | None:
        """The earliest due time, or None when nothing is due."""
        heap = self._heap
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def take(self, until: float) -> list[Tracked]:
        """Every batch due by ``until``, marked in flight (not due again until
        rescheduled)."""
        heap = self._heap
        taken: list[Tracked] = []
        marked: set[int] = set()
        while heap and heap[0][0] <= until:
            entry = heapq.heappop(heap)
            record = entry[2]
            if self._live(entry) and id(record) not in marked:
                marked.add(id(record))
                record.due = math.inf  # in flight: not due again until rescheduled
                taken.append(record)
        return taken
