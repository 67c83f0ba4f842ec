"""Settling: every still-queued request of a shard gets its outcome, and the shard is
``collected``.

A batch's result files give most requests their result (see :mod:`._collect`); what is
left when a batch ended (it expired, was cancelled, failed, lost lines) or never came to
be (the create was refused, the batch is gone) is settled here, by the rules of
:mod:`._outcomes`.
"""

from __future__ import annotations

from .._lifecycle import BatchStatus
from .._models import Batch
from ._context import RunContext, logger
from ._outcomes import (
    CANCELLED_CODES,
    PERMANENT_BATCH_CODES,
    Fate,
    describe_errors,
    fate,
    own_error,
)
from ._records import FinalResult, RetryLine, Shard

__all__ = ["reject", "settle", "settle_batch"]


async def settle(
    ctx: RunContext,
    shard: Shard,
    batch: Batch | None,
    code: str,
    message: str,
    *,
    retryable: bool = True,
    free: bool = False,
    status: str | None = None,
) -> None:
    """Give every still-queued request of a shard its outcome and move the shard to
    ``collected``, with ``status`` (default: the batch's, or ``not_found`` without one).

    A retryable request spends one of its rounds, unless it is not at fault (``free``:
    its batch failed because of other lines; or the run cancelled it).
    """
    cancelled_by_run = shard.cancel_reason == "run" and code in CANCELLED_CODES
    free = free or cancelled_by_run
    max_rounds = ctx.config.max_rounds
    finals: list[FinalResult] = []
    retries: list[RetryLine] = []
    # Read in the journal's worker thread.
    for line in (await ctx.journal.queued_at(shard.key, background=True)).values():
        data = own_error(line.custom_id, code, message)
        match fate(attempts=line.attempts, retryable=retryable, free=free, max_rounds=max_rounds):
            case Fate.AGAIN_FREE:
                retries.append(RetryLine(line.seq, line.attempts, None))
            case Fate.AGAIN:
                retries.append(RetryLine(line.seq, line.attempts + 1, data))
            case Fate.FINAL:
                finals.append(
                    FinalResult(
                        seq=line.seq,
                        kind="error",
                        code=code,
                        shard=shard.key,
                        batch_id=shard.batch_id,
                        attempts=line.attempts,
                        data=data,
                    )
                )
    if status is None:
        status = batch.status.value if batch is not None else "not_found"
    await ctx.journal.settle(shard.key, finals, retries, status=status, note=message)
    ctx.counted(finals, retries)
    ctx.set_status(shard.key, status)
    if shard.batch_id is not None:
        ctx.shard_of.pop(shard.batch_id, None)
    ctx.results_changed.set()
    ctx.changed.set()


async def reject(ctx: RunContext, shard: Shard, message: str) -> None:
    """The server refused the shard's batch: every queued request ends with
    ``batch_create_rejected``."""
    await settle(
        ctx, shard, None, "batch_create_rejected", message, retryable=False, status="rejected"
    )


async def _fail_lines(ctx: RunContext, shard: Shard, batch: Batch) -> None:
    """A failed batch's errors that name input lines end those lines."""
    assert batch.errors is not None
    by_line: dict[int, tuple[str, str]] = {}
    for error in batch.errors.data:
        if error.line is not None:
            by_line.setdefault(error.line, (error.code or "batch_failed", error.message or ""))
    queued = await ctx.journal.queued_at(shard.key, background=True)
    finals = []
    for number, (code, message) in by_line.items():
        line = queued.get(number)
        if line is not None:
            finals.append(
                FinalResult(
                    seq=line.seq,
                    kind="error",
                    code=code,
                    shard=shard.key,
                    batch_id=shard.batch_id,
                    attempts=line.attempts,
                    data=own_error(line.custom_id, code, message),
                )
            )
    await ctx.journal.record(None, finals)
    ctx.counted(finals, [])


async def settle_batch(ctx: RunContext, shard: Shard, batch: Batch) -> None:
    """Every request of a collected batch without a result line gets its outcome."""
    status = batch.status
    free = False
    ended: str | None = None  # the shard's status, when not the batch's
    if status is BatchStatus.EXPIRED:
        code, message, retryable = "batch_expired", "the batch expired first", True
    elif status is BatchStatus.CANCELLED:
        code, message, retryable = "batch_cancelled", "the batch was cancelled first", True
    elif status is BatchStatus.FAILED:
        errors = batch.errors.data if batch.errors is not None else ()
        codes = {e.code for e in errors if e.code}
        code = "batch_failed"
        message = batch.outcome
        named = [e.line for e in errors if e.line is not None]
        strays = sorted({n for n in named if not 1 <= n <= shard.lines})
        if strays:
            # Lines the file does not have (a server numbering from 0, or otherwise):
            # no line can be blamed by its number, so none is ended for it and every
            # line spends a round (at most 1 + max_rounds batches).
            retryable = True
            what = "lines" if len(strays) > 1 else "line"
            listed = ", ".join(map(str, strays))
            message = (
                f"batch {batch.id} failed naming {what} {listed}, which its "
                f"{shard.lines}-line file does not have: {batch.outcome}"
            )
            then = "its lines go to a retry round (or end, out of rounds)"
        elif errors and len(named) == len(errors):
            # The batch failed because of the lines its errors name: those end with
            # their error, the others never ran and run again.
            await _fail_lines(ctx, shard, batch)
            retryable = free = True
            message = f"batch {batch.id} failed because of other lines: {batch.outcome}"
            then = "the named lines end with their error, the others are sent again"
        else:
            retryable = not (codes & PERMANENT_BATCH_CODES)
            if named:
                await _fail_lines(ctx, shard, batch)
            then = (
                "its lines go to a retry round (or end, out of rounds)"
                if retryable
                else "its lines end"
            )
        logger.warning(
            "run %s: batch %s (shard %s, %d lines) failed: %s; %s",
            ctx.run_id,
            batch.id,
            shard.key,
            shard.lines,
            describe_errors(batch),
            then,
        )
    elif status is BatchStatus.COMPLETED:
        code, message, retryable = (
            "missing_result",
            f"batch {batch.id} completed without a result line for this request",
            True,
        )
    elif status is BatchStatus.UNKNOWN:
        # The fleet ended it: it carries result files or is long past its expiry.
        code, retryable, ended = "batch_unknown_status", True, "ended_unknown_status"
        message = (
            f"batch {batch.id} ended in status {batch.wire_status!r}, which aiobatch "
            "does not know, without a result line for this request"
        )
        logger.warning(
            "run %s: batch %s (shard %s) ended in unknown status %r: its files were "
            "collected, its lines without a result run again or end "
            "batch_unknown_status. If you know what the status means, map it with "
            "status_aliases",
            ctx.run_id,
            batch.id,
            shard.key,
            batch.wire_status,
        )
    else:  # Portkey's file_upload_failed / batch_start_failed, and the like
        code, message, retryable = "batch_failed", batch.outcome, True
    await settle(ctx, shard, batch, code, message, retryable=retryable, free=free, status=ended)
