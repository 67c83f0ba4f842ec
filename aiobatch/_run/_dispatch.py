"""A shard's tasks: its submission, its collection, and the fleet's events that start it.

Each is a loop of one shard (or of the fleet's events) over the steps of
:mod:`._submit` and :mod:`._collect`: a failing step is counted (:mod:`._failures`) and
tried again after its wait, until the step answers. The answer (the shard's next state)
goes back to :class:`~._batch_run.BatchRun`, which dispatches on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from .._fleet import BatchDone, StatusChanged, TrackingError
from .._lifecycle import TERMINAL
from .._models import Batch
from ..errors import (
    AiobatchError,
    APIStatusError,
    AuthenticationError,
    ClosedError,
    DecodeError,
    JournalError,
    LeaseLostError,
    PermissionDeniedError,
    RunError,
    TransportError,
)
from ._collect import collect, delete_files
from ._context import Next, RunContext, Stop, logger
from ._failures import Streak, heard_from_server, step_failed, tracking_failed
from ._records import Shard
from ._states import SUBMITTING, ShardState
from ._submit import WAITS, Step

__all__ = ["collect_shard", "consume", "drop", "resume", "submit_shard", "track"]

_S = ShardState
_TERMINAL_STATUSES = frozenset(status.value for status in TERMINAL)


async def resume(
    ctx: RunContext,
    *,
    submit: Callable[[RunContext, str], None],
    track: Callable[[RunContext, Shard], None],
    collect: Callable[[RunContext, str, BatchDone | None], None],
    adopted: Callable[[Shard], None],
) -> None:
    """Pick up every shard where the journal left it: ``submit`` the ones on their way
    to a batch, ``track`` (and announce as ``adopted``) the open batches, ``collect``
    the ones being collected."""
    for shard in await ctx.journal.shards(*SUBMITTING):
        ctx.put_status(shard.key, shard.state.value)
        submit(ctx, shard.key)
    for shard in await ctx.journal.shards(_S.OPEN):
        track(ctx, shard)
        adopted(shard)
    for shard in await ctx.journal.shards(_S.COLLECTING):
        assert shard.batch_id is not None
        ctx.shard_of[shard.batch_id] = shard.key
        ctx.put_status(shard.key, shard.status or "collecting")
        collect(ctx, shard.key, None)
    for shard in await ctx.journal.shards(_S.COLLECTED):
        ctx.put_status(shard.key, shard.status or "collected")


async def submit_shard(
    ctx: RunContext,
    key: str,
    *,
    steps: Mapping[ShardState, Step],
    slots: asyncio.Semaphore,
    after: Callable[[RunContext, str, Next], Awaitable[None]],
) -> None:
    """Take one shard from its recorded state to an open, tracked batch, one step of
    its provider's strategy (``steps``) at a time; ``after`` acts on each answer."""
    streak = Streak()
    while not ctx.stopping.is_set():
        shard = await ctx.journal.shard(key)
        step = steps.get(shard.state)
        if step is None:
            return
        try:
            wait = WAITS.get(shard.state)
            if wait is not None:
                await wait(ctx, shard)
            async with slots:
                streak.started = ctx.clock.monotonic()
                result = await step(ctx, shard)
            streak.reset()
            heard_from_server(ctx)
        except Stop:
            return
        except (RunError, JournalError):
            raise  # the journal failing is no step to try again
        except (AuthenticationError, PermissionDeniedError) as exc:
            raise RunError(
                f"run {ctx.run_id}: the server refused the credentials ({exc}); "
                "the journal is intact: fix them and run again"
            ) from exc
        except ClosedError as exc:
            raise RunError(
                f"run {ctx.run_id}: the client was closed under the run; the journal "
                "is intact: run again to continue"
            ) from exc
        except AiobatchError as exc:
            delay = step_failed(ctx, f"shard {key} ({shard.state})", streak, exc)
            try:
                await ctx.pause(delay)
            except Stop:
                return
            continue
        await after(ctx, key, result)


def track(
    ctx: RunContext, shard: Shard, batch: Batch | None = None, *, deadline: bool = True
) -> None:
    """Hand a shard's batch to the fleet (``batch`` when known, else its id), with
    what is left of its ``batch_timeout`` when ``deadline``."""
    assert shard.batch_id is not None
    ctx.shard_of[shard.batch_id] = shard.key
    ctx.put_status(shard.key, shard.status or "validating")
    if shard.status not in _TERMINAL_STATUSES:
        ctx.budget.reserve(shard)
    timeout = ctx.config.batch_timeout if deadline else None
    if timeout is not None:
        created = shard.create_started_at or shard.planned_at
        timeout = max(0.0, created + timeout - ctx.clock.now())
    ctx.fleet.add(batch if batch is not None else shard.batch_id, timeout=timeout)
    ctx.emit()


def drop(ctx: RunContext, key: str, submission: asyncio.Task[None] | None) -> None:
    """Stop acting on shard ``key`` at once (a worker's lease on it is gone): its
    ``submission`` is cancelled and its batch no longer tracked here."""
    if submission is not None:
        submission.cancel()
    for batch_id, owner in list(ctx.shard_of.items()):
        if owner == key:
            del ctx.shard_of[batch_id]
            ctx.fleet.remove(batch_id)
            ctx.fleet.forget(batch_id)
    ctx.budget.release(key)
    ctx.changed.set()


async def collect_shard(
    ctx: RunContext, key: str, done: BatchDone | None, *, slots: asyncio.Semaphore
) -> Next | None:
    """Read a finished batch's files into the journal and settle every line; the
    shard's next state (None: it was collected already).

    ``OPEN``: the batch still ran at its deadline and was cancelled (it is tracked to
    its end); ``UPLOADED``: its lines are created again; else the shard is collected
    (and its files deleted, with ``delete_files``).
    """
    ctx.budget.release(key)
    if done is not None:
        ctx.fleet.forget(done.batch_id)
    streak = Streak()
    async with slots:
        while True:
            shard = await ctx.journal.shard(key)
            if shard.state is _S.COLLECTED:
                return None
            streak.started = ctx.clock.monotonic()
            try:
                result = await collect(ctx, shard, done)
                heard_from_server(ctx)
            except (TransportError, APIStatusError, DecodeError) as exc:
                delay = step_failed(ctx, f"collecting shard {key}", streak, exc)
                await ctx.clock.sleep(delay)
                done = None
                continue
            if result.state is _S.OPEN or result.state is _S.UPLOADED:
                return result
            if ctx.config.delete_files:
                await delete_files(ctx, await ctx.journal.shard(key))
            return result


async def consume(
    ctx: RunContext,
    events: AsyncIterator[Any],
    *,
    lost: Callable[[RunContext, str], None],
    done: Callable[[RunContext, str, BatchDone], None],
) -> None:
    """Act on the fleet's events: a batch's new status goes to the journal and the
    display, a finished batch to ``done``; a shard whose lease is gone to ``lost``.

    Raises:
        RunError: the events ended, the fleet stopped on its own (the run cancels this
            task before it closes the fleet).
    """
    async for event in events:
        if isinstance(event, TrackingError):
            tracking_failed(ctx, event.error)
        key = ctx.shard_of.get(event.batch_id) if event.batch_id is not None else None
        if key is None:
            continue
        if isinstance(event, StatusChanged):
            try:
                await ctx.journal.update(key, status=event.batch.status.value)
            except LeaseLostError as exc:
                logger.warning("run %s: %s", ctx.run_id, exc)
                lost(ctx, key)
                continue
            ctx.set_status(key, event.batch.status.value)
        elif isinstance(event, BatchDone):
            done(ctx, key, event)
    # The events end only when the fleet stopped on its own (the run cancels this
    # task before it closes the fleet): nothing tracks the batches any more.
    raise RunError(
        f"run {ctx.run_id}: the fleet stopped tracking the batches (was the client "
        "closed?); the journal is intact: run again to continue"
    )
