"""A run's supervising loop: :func:`supervise`.

It plans shards while requests are pending (their retries gathered for
``retry_coalesce`` seconds while the run is busy), notes every ``cancel_poll_interval``
that the run is alive and whether ``aiobatch cancel`` flagged it, and ends once every
request has its final result. The shards themselves are carried by their tasks
(:mod:`._dispatch`). :func:`plan_pending` is the planning step it runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from .._aio import sleep_or_set
from ..errors import RunError, TooManyBatchesError
from ._context import RunContext, logger
from ._records import Shard, ShardPlan

__all__ = ["plan_pending", "supervise"]


async def supervise(
    ctx: RunContext,
    *,
    busy: Callable[[], bool],
    failed: Callable[[], bool],
    plan: Callable[[RunContext], Awaitable[None]],
) -> None:
    """Plan shards (``plan``) when lines are pending, until every request has its
    result; a stop, a cancel flag in the journal, or the run having ``failed()``
    ends it sooner. While the run is ``busy()`` (submitting, tracking or collecting),
    pending retries wait up to ``retry_coalesce`` seconds to go out together."""
    clock = ctx.clock
    retry_since: float | None = None
    journal = ctx.journal
    next_cancel_check = clock.monotonic()
    while True:
        ctx.changed.clear()
        if failed() or ctx.stopping.is_set():
            return
        now = clock.monotonic()
        if now >= next_cancel_check:
            next_cancel_check = now + ctx.config.cancel_poll_interval
            await journal.touch(clock.now())
            ctx.emit()  # elapsed time and ETA move on while nothing changes
            if await ctx.cancel_requested():
                return
        is_busy = busy()
        pending = await journal.pending_count()
        if pending:
            if retry_since is None:
                retry_since = now
            due = retry_since + ctx.config.retry_coalesce
            if not is_busy or now >= due or await journal.has_fresh_pending():
                await plan(ctx)
                retry_since = None
                continue
        else:
            retry_since = None
            if not is_busy:
                if await journal.not_done_count() == 0:
                    return
                if not await _requeue_orphans(ctx):
                    raise RunError(
                        f"run {ctx.run_id}: requests are queued in shards that "
                        "nothing tracks; this is a bug in aiobatch (the journal is intact)"
                    )
                continue
        wait = next_cancel_check - now
        if pending and retry_since is not None:
            wait = min(wait, retry_since + ctx.config.retry_coalesce - now)
        await sleep_or_set(clock, wait, ctx.changed)


async def _requeue_orphans(ctx: RunContext) -> bool:
    """Requests left ``queued`` in a shard that is already collected (which should
    not happen) become pending again; True when there were any."""
    moved = await ctx.journal.requeue_orphans()
    if moved:
        logger.warning(
            "run %s: %d request(s) were queued in collected shards; submitting them again",
            ctx.run_id,
            moved,
        )
    return moved > 0


async def plan_pending(ctx: RunContext) -> list[Shard]:
    """Shard every pending request (by url and model, within the limits) and record
    each shard's intent before anything is uploaded; returns the new shards.

    Requests are read group by group in chunks, and each shard is recorded as soon as
    it is cut, so planning holds one chunk and the open shard, however many requests
    are pending.

    Raises:
        TooManyBatchesError: a shard would put a request in more batches than
            ``max_batches_per_request`` (that shard is not recorded: its requests stay
            pending, for a run with a higher limit).
    """
    journal = ctx.journal
    now = ctx.clock.now()
    # The pages are read and each intent is written in the journal's worker thread.
    index = await journal.shard_count()
    shards: list[Shard] = []

    async def record(plans: Sequence[ShardPlan]) -> None:
        nonlocal index
        for planned in plans:
            key = f"s{index:06d}"
            index += 1
            shards.append(
                await journal.add_shard(
                    key,
                    planned,
                    planned_at=now,
                    max_batches=ctx.config.batch_limit,
                    background=True,
                )
            )

    for group in await journal.pending_groups():
        cutter = ctx.shard_limits.cutter(group.url, group.model)
        try:
            pending = journal.pending_requests(group.url, group.model, background=True)
            add = cutter.add
            async for request in pending:
                if closed := add(request):  # most requests close no shard
                    await record(closed)
            await record(cutter.finish())
        except TooManyBatchesError as exc:
            exc.args = (f"run {ctx.run_id}: {exc}",)
            raise
    return shards
