"""List sweeps: many tracked batches observed with a few ``GET /batches`` pages.

A *sweep* reads ``GET /batches?limit=100`` pages, newest first, until every due batch
has been seen or the page is older than the oldest of them. The pages needed are
estimated from how many tracked batches are newer than the oldest due one, scaled by
how many untracked batches the last sweep met per tracked one (tracked batches newer
than anything that sweep saw count once: it learnt nothing about them). A sweep
observes every tracked batch on its pages, due or not, so with thousands of open
batches one sweep of ``N / 100`` pages refreshes all of them. A sweep never spends more
pages than the retrieves it replaces; due batches it did not meet (deleted, listed
elsewhere, too far down) fall back to a retrieve. So do the due batches of a sweep
whose page fails for good (a non-transient error, or ``report_after_errors`` failures
in a row, 429s aside): the fleet then lists again only after ``max_interval``.

This module is the bookkeeping, with no IO: :class:`BatchList` is what the fleet knows
of the server's list and :class:`Sweep` one walk down it. The fleet reads the pages
(through its request budget) and observes the batches a page met.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Mapping

from ._fleet_tracked import FleetConfig, Tracked
from ._models import Batch, BatchPage
from ._retry import is_transient
from .errors import AiobatchError, RateLimitError

__all__ = ["BatchList", "Sweep"]


class BatchList:
    """What a fleet knows of the server's batch list.

    Its tracked batches in creation order, how many batches the last sweep listed per
    tracked one (the cost model of the next sweeps), and whether listing works here.

    Args:
        config: the fleet's configuration.
    """

    def __init__(self, config: FleetConfig) -> None:
        self._config = config
        #: (created_at, id) of the tracked batches whose creation time is known, sorted.
        self._order: list[tuple[int, str]] = []
        #: batches listed per tracked one in the last sweep (for the sweep cost), and the
        #: newest creation time that sweep saw: the ratio says nothing of batches
        #: created later, above the part of the list it walked.
        self._foreign_ratio = 1.0
        self._ratio_top: int | None = None
        #: list pages that failed in a row.
        self._failures = 0
        #: no sweeps before this ``clock.monotonic()`` time (listing kept failing).
        self._off_until = -math.inf

    def add(self, record: Tracked) -> None:
        """Place a tracked batch whose creation time has just become known."""
        assert record.created_at is not None
        bisect.insort(self._order, (record.created_at, record.id))

    def remove(self, record: Tracked) -> None:
        """Forget a batch no longer tracked."""
        if record.created_at is None:
            return
        order = self._order
        i = bisect.bisect_left(order, (record.created_at, record.id))
        if i < len(order) and order[i][1] == record.id:
            del order[i]

    def sweep_is_cheaper(self, due: list[Tracked], now: float) -> bool:
        """Whether a list sweep for ``due`` is expected to cost fewer requests than a
        retrieve each.

        A sweep reads from the newest batch down to the oldest due one (refreshing every
        tracked batch above it on the way). Its pages are estimated from the tracked
        batches created since the oldest due one, scaled by the batches listed per
        tracked one in the last sweep; tracked batches newer than every batch that sweep
        saw count once each (nothing is known of what lies between them yet, and a sweep
        learns it for no more than the retrieves it replaces). Otherwise one dear sweep
        far down the list would keep the fleet retrieving every new batch for good.

        Args:
            due: the batches to observe (their creation times are known).
            now: ``clock.monotonic()``.
        """
        cfg = self._config
        if not cfg.list_when_cheaper or len(due) < 2:
            return False
        if now < self._off_until:
            return False  # listing failed for good lately (see page_failed)
        order = self._order
        oldest = min(r.created_at for r in due if r.created_at is not None)
        start = bisect.bisect_left(order, (oldest, ""))
        split = len(order)  # order[start:split] lies where the last sweep walked
        if self._ratio_top is not None:
            split = max(start, bisect.bisect_left(order, (self._ratio_top + 1, "")))
        listed = (split - start) * self._foreign_ratio + (len(order) - split)
        pages = math.ceil(listed / cfg.page_size)
        return pages < len(due)

    def page_read(self) -> None:
        """A list page was read: listing works."""
        self._failures = 0

    def page_failed(self, error: AiobatchError) -> tuple[bool, bool]:
        """Count a list page that failed.

        Returns:
            ``(report, give_up)``: whether to report the error (a non-transient one, or
            every ``report_after_errors`` in a row), and whether the sweep gives up on
            listing (a non-transient error, or that many in a row; never for a 429: the
            budget is paused, and the next sweep is still the cheapest way).
        """
        self._failures += 1
        in_a_row = self._failures
        report_after = self._config.report_after_errors
        transient = is_transient(error)
        report = not transient or in_a_row % report_after == 0
        rate_limited = isinstance(error, RateLimitError)
        give_up = not rate_limited and (not transient or in_a_row >= report_after)
        return report, give_up

    def stop_listing(self, now: float) -> None:
        """Listing does not work here (a server without ``GET /batches``, or one failing
        for a while): no sweeps for ``max_interval``."""
        self._off_until = now + self._config.max_interval

    def learn(self, sweep: Sweep) -> None:
        """Take a finished sweep's counts into the cost model of the next plans. The
        wanted batches the walk did not reach count as lying just below it (a lower
        bound)."""
        ours = sweep.tracked_met + len(sweep.wanted)
        if ours:
            self._foreign_ratio = max(1.0, (ours + sweep.foreign_met) / ours)
            self._ratio_top = sweep.top


class Sweep:
    """One walk down the batch list, newest first, until every due batch is seen, or
    none of the rest can be on later pages.

    Args:
        due: the batches to observe.
        max_pages: the most pages to read (fewer than the retrieves it replaces).
    """

    def __init__(self, due: list[Tracked], max_pages: int) -> None:
        #: the due batches not met yet, by id.
        self.wanted: dict[str, Tracked] = {r.id: r for r in due}
        # The oldest creation time among the batches still wanted, lazily.
        self._ages = sorted(((r.created_at or 0), r.id) for r in due)
        self._oldest_index = 0
        self._max_pages = min(max_pages, len(due) - 1)
        self._pages = 0
        #: tracked and untracked batches met on the pages read.
        self.tracked_met = 0
        self.foreign_met = 0
        #: the newest creation time listed (None before a page with batches).
        self.top: int | None = None
        #: the cursor of the next page (None: the first).
        self.after: str | None = None

    def next_page(self) -> bool:
        """Whether to read another page (counting it when so)."""
        if not self.wanted or self._pages >= self._max_pages:
            return False
        self._pages += 1
        return True

    def meet(
        self, page: BatchPage, tracked: Mapping[str, Tracked]
    ) -> Iterator[tuple[Tracked, Batch]]:
        """The tracked batches on ``page`` to observe, each with its snapshot, as they
        are met (a batch in flight elsewhere in this round is left alone)."""
        if self.top is None and page.data:
            self.top = max(batch.created_at for batch in page.data)
        for batch in page.data:
            record = tracked.get(batch.id)
            if record is None:
                self.foreign_met += 1
                continue
            self.tracked_met += 1
            if self.wanted.pop(batch.id, None) is None and record.due == math.inf:
                continue  # in flight elsewhere in this round
            yield record, batch

    def advance(self, page: BatchPage) -> bool:
        """After ``page`` was observed: whether a later page can still hold a wanted
        batch (then the cursor moves on to it)."""
        if not page.has_more or not page.data:
            return False
        self.after = page.data[-1].id
        ages = self._ages
        while self._oldest_index < len(ages) and ages[self._oldest_index][1] not in self.wanted:
            self._oldest_index += 1
        if self._oldest_index == len(ages):
            return False
        # (No further page when every wanted batch left is older than this one's last.)
        return page.data[-1].created_at >= ages[self._oldest_index][0]

    def missing(self, tracked: Mapping[str, Tracked]) -> list[Tracked]:
        """The due batches the walk did not meet and still tracked (for a retrieve each)."""
        return [r for r in self.wanted.values() if tracked.get(r.id) is r]
