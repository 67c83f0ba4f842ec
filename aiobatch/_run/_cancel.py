"""A run's cancel, from inside its process: :func:`wind_down`.

The run stops starting work; the submissions in flight finish their step, a create
whose answer was lost is looked up (its batch may exist), every open batch is cancelled
and what it finished is collected, within ``RunConfig.cancel_timeout``. The journal
keeps whatever is left for the next run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection

from .._aio import sleep_or_set
from .._models import Batch
from ..errors import AiobatchError, describe
from ._context import RunContext, logger
from ._records import Shard
from ._states import ShardState
from ._submit import resolve_create

__all__ = ["wind_down"]

_S = ShardState


async def wind_down(
    ctx: RunContext,
    *,
    submitting: Collection[str],
    collecting: Collection[str],
    failed: Callable[[], bool],
    acts_on: Callable[[str], bool],
    track: Callable[[RunContext, Shard, Batch | None], None],
) -> None:
    """After a cancel: let in-flight submissions (the shards in ``submitting``) finish
    their step, cancel every open batch, and collect what they finished (until
    ``collecting`` is empty), unless the run ``failed()`` meanwhile."""
    journal = ctx.journal
    await journal.set_state("cancelling", at=ctx.clock.now())
    deadline = (
        ctx.clock.monotonic() + ctx.config.cancel_timeout
        if ctx.config.cancel_timeout is not None
        else math.inf
    )
    while submitting and not failed():
        await _wait_changed(ctx, deadline)
        if ctx.clock.monotonic() >= deadline:
            break
    # A create whose answer was lost may have made a batch: find it, to cancel it
    # (a create still being sent, past the cancel timeout, is left to the next run).
    for shard in await journal.shards(_S.CREATING):
        if shard.key in submitting or not acts_on(shard.key):
            continue
        try:
            step = await resolve_create(ctx, shard, during_cancel=True)
        except AiobatchError as exc:
            logger.warning(
                "run %s: could not tell whether shard %s has a batch (%s); the next run "
                "looks again",
                ctx.run_id,
                shard.key,
                describe(exc),
            )
            continue
        if step.state is _S.OPEN:
            track(ctx, await journal.shard(shard.key), step.batch)
    fleet = ctx.fleet
    for batch_id in fleet.open_ids:
        key = ctx.shard_of.get(batch_id)
        if key is not None:
            await journal.update(key, cancel_reason="run")
        with contextlib.suppress(KeyError):
            fleet.cancel(batch_id)
    while (ctx.shard_of or collecting) and not failed():
        if ctx.clock.monotonic() >= deadline:
            logger.warning(
                "run %s: %d batch(es) still cancelling at the cancel timeout; the "
                "journal keeps them for the next run",
                ctx.run_id,
                len(fleet.open_ids),
            )
            break
        await _wait_changed(ctx, deadline)


async def _wait_changed(ctx: RunContext, deadline: float) -> None:
    ctx.changed.clear()
    left = None if deadline == math.inf else deadline - ctx.clock.monotonic()
    await sleep_or_set(ctx.clock, left, ctx.changed)
