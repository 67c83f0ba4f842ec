"""What a run's steps share: :class:`RunContext`.

The steps (submit, collect, settle) are functions of a context and a shard that return
the shard's next state; the context holds what they read and the run-wide bookkeeping
they update (the enqueued-token budget, the shards' statuses for the progress display,
the outcome counts), never the decision of what to do next.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Sequence

import attrs

from .._aio import sleep_or_set
from .._client import BatchClient
from .._clock import Clock
from .._fleet import Fleet
from .._models import Batch, alias_status
from .._retry import RetryPolicy
from ..errors import RunError
from ._config import RunConfig
from ._journal import Journal
from ._planning import ShardLimits
from ._progress import RunProgress
from ._records import FinalResult, NamedResult, RetryLine, Shard
from ._states import ShardState

__all__ = ["Next", "RunContext", "Stop", "TokenBudget", "logger"]

logger = logging.getLogger("aiobatch.run")

#: Attempts per call (the client's own retries) until the server has answered the run
#: once: a wrong address is told within ``unreachable_after``, by the run's own tries
#: (see ``_failures``).
QUICK_ATTEMPTS = 3
#: Creates of one shard that came to nothing, in a row, when ``max_step_failures`` is None.
MAX_SETBACKS = 10


class Stop(Exception):
    """A step gave up because the run is stopping."""


@attrs.frozen
class Next:
    """A step's answer: the shard's state now, and its batch when it has one (so the
    fleet tracks it without asking for it again)."""

    state: ShardState
    batch: Batch | None = None


@attrs.define(eq=False)
class TokenBudget:
    """Estimated prompt tokens enqueued per model (``enqueued_token_limits``): a shard
    reserves before its create is sent and releases when its batch ends (or when the
    create proved that no batch was made)."""

    limits: dict[str, int]
    changed: asyncio.Event = attrs.field(factory=asyncio.Event)
    _enqueued: dict[str | None, int] = attrs.field(factory=dict)
    _reserved: dict[str, tuple[str | None, int]] = attrs.field(factory=dict)

    def reserve(self, shard: Shard) -> None:
        """Count a shard's tokens as enqueued for its model (once)."""
        if shard.key not in self._reserved:
            self._reserved[shard.key] = (shard.model, shard.tokens)
            self._enqueued[shard.model] = self._enqueued.get(shard.model, 0) + shard.tokens

    def release(self, key: str) -> None:
        """A shard's batch ended (or was proved never made): its tokens are free."""
        reserved = self._reserved.pop(key, None)
        if reserved is not None:
            model, tokens = reserved
            self._enqueued[model] = max(0, self._enqueued.get(model, 0) - tokens)
            self.changed.set()

    async def admit(self, shard: Shard, clock: Clock, stopping: asyncio.Event) -> None:
        """Wait until the shard's tokens fit its model's limit, then reserve them.

        Raises:
            Stop: the run stopped meanwhile.
        """
        limit = self.limits.get(shard.model or "")
        if limit is None:
            return
        while shard.key not in self._reserved and (
            self._enqueued.get(shard.model, 0) > 0
            and self._enqueued.get(shard.model, 0) + shard.tokens > limit
        ):
            self.changed.clear()
            await sleep_or_set(clock, None, self.changed, stopping)
            if stopping.is_set():
                raise Stop
        self.reserve(shard)


@attrs.define(eq=False)
class RunContext:
    """The state a run's steps share (see the module notes)."""

    client: BatchClient
    config: RunConfig
    journal: Journal
    run_id: str
    fleet: Fleet
    emit: Callable[[], None]
    #: ends the run (``"cancelled"`` or ``"stopped"``), from a step
    stop: Callable[[str], None]
    #: how big its shards may be
    shard_limits: ShardLimits
    work_dir: str
    stopping: asyncio.Event = attrs.field(factory=asyncio.Event)
    changed: asyncio.Event = attrs.field(factory=asyncio.Event)
    results_changed: asyncio.Event = attrs.field(factory=asyncio.Event)
    #: inline submission (``_submit``): held while a shard takes its turn to enter
    #: ``creating``, and set whenever a shard leaves ``creating``.
    inline_turn: asyncio.Lock = attrs.field(factory=asyncio.Lock)
    left_creating: asyncio.Event = attrs.field(factory=asyncio.Event)
    budget: TokenBudget = attrs.field(init=False)
    #: each shard's last status (or state before it has a batch), and how many shards
    #: have each: the progress snapshot reads the counts, not every shard.
    status: dict[str, str] = attrs.field(factory=dict)
    status_counts: collections.Counter[str] = attrs.field(factory=collections.Counter)
    counts: dict[str, int] = attrs.field(
        factory=lambda: {"succeeded": 0, "failed": 0, "retrying": 0, "total": 0}
    )
    round: int = 0
    #: batch id -> shard key, for the batches the fleet tracks.
    shard_of: dict[str, str] = attrs.field(factory=dict)
    #: result files answered 404, and how many times.
    gone: dict[str, int] = attrs.field(factory=dict)
    #: result files being read now: each holds its share of ``collect_chunk`` lines and
    #: ``collect_chunk_bytes`` (see ``_collect``).
    reading: int = 0
    #: creates of a shard that came to nothing (its file was not found, or a lost create
    #: proved never made) since it last had a batch: they stop the run at
    #: ``max_step_failures`` although each recovery step succeeds.
    setbacks: collections.Counter[str] = attrs.field(factory=collections.Counter)
    step_waits: RetryPolicy = attrs.field(init=False)
    token_waits: RetryPolicy = attrs.field(init=False)
    #: the client as given: ``client`` makes few attempts per call until the server has
    #: answered the run once (``answered``), then it is this one (see ``_failures``).
    given_client: BatchClient = attrs.field(init=False)
    answered: bool = False
    #: ``clock.monotonic()`` when the run started calling the server.
    network_since: float = 0.0

    def __attrs_post_init__(self) -> None:
        config = self.config
        self.given_client = self.client
        policy = self.client.retry_policy
        self.client = self.client.with_options(
            retry=attrs.evolve(policy, max_attempts=min(policy.max_attempts, QUICK_ATTEMPTS))
        )
        self.budget = TokenBudget(dict(config.enqueued_token_limits))
        self.step_waits = RetryPolicy(
            initial_delay=config.step_backoff, max_delay=max(config.step_backoff, 300.0)
        )
        # Doubling waits, without jitter: the enqueued tokens drain at the server's pace,
        # and a wait shorter than asked only earns another failure.
        self.token_waits = RetryPolicy(
            initial_delay=config.token_limit_backoff,
            max_delay=max(config.token_limit_backoff, config.token_limit_max_backoff),
            jitter=None,
        )

    @property
    def clock(self) -> Clock:
        return self.client.clock

    # --- statuses and progress -----------------------------------------------------------

    def put_status(self, key: str, status: str) -> None:
        """Note a shard's status (or state) for the progress display."""
        old = self.status.get(key)
        if old == status:
            return
        if old is not None:
            self.status_counts[old] -= 1
        self.status[key] = status
        self.status_counts[status] += 1

    def set_status(self, key: str, status: str) -> None:
        """:meth:`put_status` and tell the display."""
        self.put_status(key, status)
        self.emit()

    def progress(self, *, state: str, started_at: float) -> RunProgress:
        """A snapshot of the run, for display."""
        counts = self.counts
        return RunProgress(
            total=counts["total"],
            succeeded=counts["succeeded"],
            failed=counts["failed"],
            retrying=counts["retrying"],
            batches={name: n for name, n in self.status_counts.items() if n},
            round=self.round,
            elapsed=max(0.0, self.clock.now() - started_at) if started_at else 0.0,
            state=state,
        )

    def counted(self, finals: Sequence[FinalResult], retries: Sequence[RetryLine]) -> None:
        """Count new outcomes for the progress display."""
        counts = self.counts
        for final in finals:
            counts["succeeded" if final.kind == "success" else "failed"] += 1
            if final.attempts > 0:
                counts["retrying"] -= 1
        for retry in retries:
            if retry.attempts == 1:
                counts["retrying"] += 1
        counts["retrying"] = max(0, counts["retrying"])

    def counted_first(self, lines: Sequence[NamedResult]) -> None:
        """Count the final outcomes of requests that had no retryable failure before,
        for the progress display."""
        succeeded = sum(1 for line in lines if line.kind == "success")
        self.counts["succeeded"] += succeeded
        self.counts["failed"] += len(lines) - succeeded

    # --- waits and failures --------------------------------------------------------------

    async def retrieve(self, batch_id: str) -> Batch:
        """The batch now, its status mapped by ``status_aliases``."""
        batch = await self.client.retrieve_batch(batch_id)
        return alias_status(batch, self.config.status_aliases)

    async def pause(self, seconds: float) -> None:
        """Sleep on the clock; a stop cuts it short (raising :class:`Stop`)."""
        if seconds > 0:
            await sleep_or_set(self.clock, seconds, self.stopping)
        if self.stopping.is_set():
            raise Stop

    async def cancel_requested(self) -> bool:
        """Whether ``aiobatch cancel`` flagged the journal; if so the run starts
        cancelling."""
        if not await self.journal.cancel_requested():
            return False
        if not self.stopping.is_set():
            logger.warning("run %s: cancel requested in the journal", self.run_id)
        self.stop("cancelled")
        return True

    def set_back(self, key: str, why: str) -> None:
        """Count a create of a shard that came to nothing.

        Raises:
            RunError: the shard's creates came to nothing ``max_step_failures`` times
                (10 when None).
        """
        self.setbacks[key] += 1
        if self.setbacks[key] >= (self.config.max_step_failures or MAX_SETBACKS):
            raise RunError(
                f"run {self.run_id}: shard {key} could not get a batch after "
                f"{self.setbacks[key]} creates ({why}); the journal is intact"
            )
