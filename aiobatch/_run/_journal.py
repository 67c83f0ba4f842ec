"""What a run asks of its journal: the :class:`Journal` protocol.

A run writes everything it knows to its journal *before* it acts on it, so a run killed
at any point continues where it stopped when started again:

- the requests and the run's facts, in one go (:meth:`Journal.ingest`), a new run's
  requests already queued in the shards it cut for them, with those shards' intents;
- each later shard's intent (its requests, pending until then) before its upload
  (:meth:`Journal.add_shard`);
- its file id as soon as it is known, its create key before the create is sent, its
  batch id, its status (:meth:`Journal.move`, :meth:`Journal.update`);
- its results in chunks, each chunk with the count of lines read
  (:meth:`Journal.record`), and its settling (:meth:`Journal.settle`), so no result is
  recorded twice and every request ends with exactly one.

Every method is a coroutine, so that a networked backend never blocks the event loop;
the SQLite backend (:class:`~aiobatch._run._sqlite_journal.SQLiteJournal`) runs its
statements in the loop's thread and cuts work on many rows into slices, between which
the loop runs other tasks. The run passes ``background=True`` to the methods that
read or write many rows at once (a new run's requests, a shard's intent, a chunk of
results, planning's pages, a shard's queued lines, the output's lines, the report's
figures, the close): the SQLite backend runs those in a worker thread (a
:class:`~aiobatch.testing.VirtualClock` moves time only once they are done). Lines read in chunks
(:meth:`Journal.shard_lines`, :meth:`Journal.result_lines`) come at most
:data:`CHUNK_BYTES` at a time (or one line, when a line is longer), so reading them
holds bounded memory however many there are. A request is done once it has its final
result. A backend refuses a shard move the shard
lifecycle (:mod:`aiobatch._run._states`) does not allow.
``tests/test_journal_contract.py`` is the contract every backend passes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from ..errors import TooManyBatchesError
from ._records import (
    FinalResult,
    JournalCounts,
    Member,
    ModelTokens,
    NamedResult,
    NewShard,
    PendingRequest,
    QueuedLine,
    RequestGroup,
    RequestRow,
    ResultRow,
    RetryLine,
    RunMeta,
    Shard,
    ShardPlan,
)
from ._states import ShardState

__all__ = ["CHUNK_BYTES", "PENDING_PAGE", "Ingest", "Journal", "too_many_batches"]

#: The most bytes of lines one chunk of :meth:`Journal.shard_lines` or
#: :meth:`Journal.result_lines` holds (one line may be longer).
CHUNK_BYTES = 4 * 1024 * 1024

#: The most pending requests :meth:`Journal.pending_requests` gives between two turns of
#: the loop (planning cuts each as it comes: pages of 10,000 held the loop 150-350 ms).
PENDING_PAGE = 2048


def too_many_batches(custom_id: str, batches: int, limit: int) -> TooManyBatchesError:
    """The error every backend raises when request ``custom_id`` would go into batch
    number ``batches``, past ``max_batches_per_request`` (``limit``)."""
    return TooManyBatchesError(
        f"request {custom_id!r} would go into batch number {batches}, past "
        f"max_batches_per_request={limit}: the server keeps failing "
        "its batches in a way that spends no retry round (see the warnings "
        "above for its errors). Nothing more was created and the journal "
        "is intact: look into the server's errors, then run again with a "
        "higher max_batches_per_request to go on",
        custom_id=custom_id,
        batches=batches,
        limit=limit,
    )


class Ingest(Protocol):
    """A new run's requests going into its journal: all or nothing."""

    async def add(self, rows: Sequence[RequestRow]) -> bool:
        """Add accepted requests (in input order); when the custom_id of one of them
        is used by a request added before, add none and return False (the caller
        finds which with :meth:`taken`). A row with a ``shard`` is queued in it, at line
        ``pos`` of its file, in its first batch (see :meth:`start`); a row without one
        is pending."""

    async def taken(self, custom_ids: Sequence[str]) -> dict[str, int]:
        """Which of ``custom_ids`` the requests added so far use, each with the input
        line of its request (how preflight finds duplicates without holding every id)."""

    async def start(self, meta: RunMeta, shards: Sequence[NewShard] = ()) -> None:
        """Record the run's facts, and the ``shards`` its requests were queued in
        (``planned`` at ``meta.started_at``, round 0); the ingest commits when its block
        ends."""


class Journal(Protocol):
    """A run's journal (see the module notes)."""

    @property
    def location(self) -> str:
        """Where the journal is (a path, or a database and run), for messages."""

    async def close(self, *, background: bool = False) -> None:
        """Close it (safe to call twice). ``background``: the backend may close it in
        another thread (the run passes it, as for :meth:`record`)."""

    # --- ownership -----------------------------------------------------------------------

    async def acquire(self) -> None:
        """Take the journal for this process: one run at a time.

        Raises:
            JournalError: another process runs it.
        """

    async def release(self) -> None:
        """Let the journal go (safe to call twice)."""

    # --- the run -------------------------------------------------------------------------

    def ingest(self, *, background: bool = False) -> AbstractAsyncContextManager[Ingest]:
        """A block in which a new run's requests and facts are recorded, committed when
        the block ends and rolled back when it raises. ``background``: the backend may
        add each batch of requests in another thread (the run passes it, as
        for :meth:`record`)."""

    async def meta(self) -> RunMeta | None:
        """The run's facts; None before a run was recorded."""

    async def set_state(self, state: str, *, at: float, clear_cancel: bool = False) -> None:
        """Record the run's state (and that it was alive at ``at``); ``clear_cancel``
        drops a cancel flag left by an earlier process."""

    async def touch(self, at: float) -> None:
        """Record that the run was alive at ``at``."""

    async def request_cancel(self, at: float) -> None:
        """Flag the run for cancelling (``aiobatch cancel``, from another process)."""

    async def cancel_requested(self) -> bool:
        """Whether the run is flagged for cancelling."""

    async def set_output(self, path: str) -> None:
        """Record that the output file was written."""

    async def count_extra_uploads(self, deleted: int) -> None:
        """Add to the count of extra input-file copies the run deleted."""

    # --- requests ------------------------------------------------------------------------

    async def pending_count(self) -> int:
        """Requests in no open shard: waiting for a retry round, put back by the run's
        own cancel, or new in a journal ingested without planning."""

    async def has_fresh_pending(self) -> bool:
        """Whether a pending request never failed (put back by the run's own cancel, or
        new in a journal ingested without planning)."""

    async def not_done_count(self) -> int:
        """Requests without their final result."""

    async def retrying_count(self) -> int:
        """Requests without a final result that failed for a retryable reason."""

    async def requeue_orphans(self) -> int:
        """Requests left queued in a collected shard go back to pending; how many."""

    async def pending_groups(self) -> list[RequestGroup]:
        """The distinct (url, model) of the pending requests."""

    def pending_requests(
        self, url: str, model: str | None, *, background: bool = False
    ) -> AsyncIterator[PendingRequest]:
        """The pending requests of one group, in input order, without their bytes; the
        loop runs other tasks at least every :data:`PENDING_PAGE` of them.
        ``background``: the backend may read each page in another thread (the run
        passes it, as for :meth:`record`)."""

    def shard_lines(self, key: str) -> AsyncIterator[Sequence[bytes]]:
        """A shard's request lines (without newlines), in input order, in chunks of at
        most :data:`CHUNK_BYTES`."""

    async def members(
        self, key: str, custom_ids: Sequence[str], *, background: bool = False
    ) -> dict[str, Member]:
        """The requests of shard ``key`` among ``custom_ids`` (those of a chunk of result
        lines), by ``custom_id``; ids not in the shard are left out. ``background``: the
        backend may look them up in another thread (as for :meth:`queued_at`)."""

    async def queued_at(self, key: str, *, background: bool = False) -> dict[int, QueuedLine]:
        """A shard's requests without an outcome, by their 1-based line in its file.
        ``background``: the backend may read them in another thread (the run passes it,
        as for :meth:`record`)."""

    # --- shards --------------------------------------------------------------------------

    async def add_shard(
        self,
        key: str,
        plan: ShardPlan,
        *,
        planned_at: float,
        max_batches: int | None = None,
        background: bool = False,
    ) -> Shard:
        """Record a shard's intent: its row (``planned``) and its requests queued in it,
        each counting one more batch. ``background``: the backend may do the write in
        another thread (the run passes it, as for :meth:`record`).

        Raises:
            TooManyBatchesError: a request would go into more than ``max_batches``
                batches (nothing is recorded).
        """

    async def shard(self, key: str) -> Shard:
        """A shard."""

    async def shards(self, *states: ShardState) -> list[Shard]:
        """The shards in any of ``states`` (all when none given), by key."""

    async def shard_count(self) -> int:
        """How many shards were planned."""

    async def move(self, key: str, to: ShardState, **fields: Any) -> Shard:
        """Move a shard to ``to`` and set ``fields`` at once.

        Raises:
            ShardMoveError: the shard lifecycle has no such move (nothing is written).
        """

    async def update(self, key: str, **fields: Any) -> None:
        """Set fields of a shard other than its state."""

    # --- results -------------------------------------------------------------------------

    async def record(
        self,
        key: str | None,
        finals: Sequence[FinalResult],
        retries: Sequence[RetryLine] = (),
        *,
        background: bool = False,
        **fields: Any,
    ) -> None:
        """At once: final results (a request that has one keeps it), requests back to
        pending, and fields of shard ``key``. ``background``: the backend may do the
        write in another thread (the run always passes it)."""

    async def record_named(
        self,
        key: str,
        batch_id: str | None,
        lines: Sequence[NamedResult],
        *,
        background: bool = False,
        **fields: Any,
    ) -> bool:
        """Record ``lines`` (result lines of batch ``batch_id``, each final whatever its
        request's attempts) and fields of shard ``key`` at once, when each names, by its
        ``custom_id``, a request of the shard that waits for its first outcome: queued
        in the shard, without a result, never failed in a retryable way (``attempts``
        0; the result is recorded with 0), and no two lines name the same request. The
        common chunk of a collection: a look-up and a write in one, with no decision
        left to the caller. True when recorded; else False, and nothing is written
        (the caller then looks the requests up with :meth:`members` and decides line
        by line); a backend may also decline a chunk it would write in one go while
        holding the loop (more than a slice of rows when not ``background``).
        ``background`` as in :meth:`record`."""

    async def settle(
        self,
        key: str,
        finals: Sequence[FinalResult],
        retries: Sequence[RetryLine],
        **fields: Any,
    ) -> Shard:
        """:meth:`record` and the shard's move to ``collected``, at once."""

    async def result_rows(self, *, order: str, after: int, limit: int) -> list[ResultRow]:
        """Final results past a cursor (a ``seq`` in input order, an ``n`` in
        completion order)."""

    def result_lines(
        self, *, order: str, background: bool = False
    ) -> AsyncIterator[Iterable[bytes]]:
        """Every final result line, in ``order``, in chunks of at most
        :data:`CHUNK_BYTES`. ``background``: the backend may read each chunk in another
        thread (the run passes it, as for :meth:`record`)."""

    async def counts(self, *, background: bool = False) -> JournalCounts:
        """The run's figures. ``background``: the backend may read them in another
        thread (the run passes it, as for :meth:`record`)."""

    async def tokens_by_model(self, *, background: bool = False) -> dict[str, ModelTokens]:
        """Prompt and completion tokens of the final results by the model of the shard
        that produced them (each result counted once; ``""`` for no model).
        ``background``: as for :meth:`counts`."""

    async def open_batches(self) -> list[Shard]:
        """The shards whose batch is being tracked."""
