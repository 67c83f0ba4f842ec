"""Collection: an ended batch's result files into the journal, then its shard settled.

:func:`collect` takes an ``open`` (or, on resume, ``collecting``) shard whose batch the
fleet reported ended and returns its next state:

- ``collected``: its output and error files were streamed into the journal (in chunks,
  each committed with the count of lines read, so a collection cut short resumes after
  the last committed line and no result is recorded twice; a chunk is written in the
  journal's worker thread while the next one is read) and every request without a
  result line was settled;
- ``uploaded``: the batch failed with ``token_limit_exceeded`` and is created again from
  the same file, after a backoff;
- ``open``: the fleet stopped tracking a batch that still runs (its deadline): it is
  cancelled and tracked to its end, so no line runs in two batches.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import NamedTuple

from .._convert import summarize_result
from .._fleet import BatchDone, DoneReason
from .._lifecycle import BatchStatus
from .._models import Batch
from ..errors import AiobatchError, DecodeError, NotFoundError, describe
from ._context import Next, RunContext, logger
from ._line_checks import text_problem
from ._outcomes import (
    CANCELLED_CODES,
    TOKEN_LIMIT_CODE,
    Fate,
    classify,
    fate,
    own_error,
    token_limited,
    undecodable,
)
from ._records import FinalResult, Member, NamedResult, RetryLine, Shard
from ._settle import settle, settle_batch
from ._states import ShardState

__all__ = ["collect", "delete_files"]

#: A result file answered 404 this many times is taken as gone (deleted or expired).
GONE_AFTER = 3

#: Lines of a result file read in one turn of the loop (~2-5 ms of decoding).
_LINES_PER_TURN = 500

_S = ShardState


async def collect(ctx: RunContext, shard: Shard, done: BatchDone | None) -> Next:
    """Read a shard's ended batch into the journal and settle it (see the module
    notes); ``done`` is the fleet's event, None on resume."""
    batch: Batch | None = done.batch if done is not None else None
    if shard.state is _S.OPEN:
        assert shard.batch_id is not None
        if done is not None and done.reason is DoneReason.NOT_FOUND:
            await settle(ctx, shard, None, "batch_not_found", "the server lost the batch")
            return Next(_S.COLLECTED)
        ended = done is not None and done.reason is DoneReason.UNKNOWN_STATUS
        if batch is None or not (batch.is_terminal or ended):
            batch = await ctx.retrieve(shard.batch_id)
        if not (batch.is_terminal or ended):
            return await _cancel_and_track(ctx, shard, batch)
        if batch.status is BatchStatus.FAILED and token_limited(batch):
            return await _recreate(ctx, shard, batch)
        batch = await _with_output(ctx, batch)
        shard = await ctx.journal.move(
            shard.key,
            _S.COLLECTING,
            status=batch.status.value,
            output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
        )
    elif batch is None:
        batch = await _retrieve_or_recall(ctx, shard)
    for column, progress in (("output_file_id", "output_done"), ("error_file_id", "error_done")):
        file_id = getattr(shard, column)
        if not file_id or (column == "error_file_id" and file_id == shard.output_file_id):
            continue
        try:
            await _read_file(ctx, shard, file_id, progress)
        except NotFoundError:
            gone = ctx.gone.get(file_id, 0) + 1
            ctx.gone[file_id] = gone
            if gone < GONE_AFTER:
                raise
            logger.warning(
                "run %s: the %s %s of batch %s is gone (404 %d times); its lines not "
                "collected yet count as missing",
                ctx.run_id,
                column.replace("_id", "").replace("_", " "),
                file_id,
                shard.batch_id,
                gone,
            )
            await ctx.journal.update(shard.key, **{column: None})
        shard = await ctx.journal.shard(shard.key)
    await settle_batch(ctx, shard, batch)
    return Next(_S.COLLECTED)


async def _retrieve_or_recall(ctx: RunContext, shard: Shard) -> Batch:
    """A collecting shard's batch, or, when the server no longer has it, the batch as
    the journal knows it (its status and files)."""
    assert shard.batch_id is not None
    try:
        return await ctx.retrieve(shard.batch_id)
    except NotFoundError:
        return Batch(
            id=shard.batch_id,
            endpoint=shard.url,
            input_file_id=shard.file_id or "",
            completion_window=None,
            status=BatchStatus(shard.status or "completed"),
            created_at=0,
            output_file_id=shard.output_file_id,
            error_file_id=shard.error_file_id,
        )


async def _cancel_and_track(ctx: RunContext, shard: Shard, batch: Batch) -> Next:
    """The fleet stopped tracking a batch that still runs (its deadline): cancel it and
    track it to its end, so no line runs twice."""
    logger.warning(
        "run %s: batch %s (shard %s) is still %s at its deadline; cancelling it",
        ctx.run_id,
        batch.id,
        shard.key,
        batch.wire_status,
    )
    await ctx.journal.update(shard.key, cancel_reason=shard.cancel_reason or "deadline")
    return Next(_S.OPEN, batch)


async def _recreate(ctx: RunContext, shard: Shard, batch: Batch) -> Next:
    """``token_limit_exceeded``: create the batch again from the same file, later."""
    if shard.creates >= ctx.config.max_recreates:
        await settle(ctx, shard, batch, TOKEN_LIMIT_CODE, batch.outcome, retryable=False)
        return Next(_S.COLLECTED)
    delay = ctx.token_waits.backoff_delay(shard.creates)
    logger.warning(
        "run %s: batch %s (shard %s) failed with token_limit_exceeded; re-creating it "
        "from file %s in %.0fs",
        ctx.run_id,
        batch.id,
        shard.key,
        shard.file_id,
        delay,
    )
    assert shard.batch_id is not None
    ctx.shard_of.pop(shard.batch_id, None)
    await ctx.journal.move(
        shard.key,
        _S.UPLOADED,
        creates=shard.creates + 1,
        not_before=ctx.clock.now() + delay,
        batch_id=None,
        status=None,
        create_key=None,
        history=f"{shard.history} {batch.id}".strip(),
        cancel_reason=None,
        note=f"token_limit_exceeded on {batch.id}",
    )
    ctx.set_status(shard.key, "uploaded")
    return Next(_S.UPLOADED)


async def _with_output(ctx: RunContext, batch: Batch) -> Batch:
    """A ``completed`` batch that reports finished requests but no output file yet
    (a lag seen on OpenAI): retrieve it again a few times."""
    tries = 0
    while (
        batch.status is BatchStatus.COMPLETED
        and batch.output_file_id is None
        and batch.request_counts is not None
        and batch.request_counts.completed > 0
        and tries < ctx.config.output_lag_retries
    ):
        await ctx.clock.sleep(ctx.step_waits.backoff_delay(tries))
        tries += 1
        batch = await ctx.retrieve(batch.id)
    return batch


async def _read_file(ctx: RunContext, shard: Shard, file_id: str, column: str) -> None:
    """Stream one result file into the journal, resuming after the lines already
    committed. Lines are read in chunks (``collect_chunk`` lines or
    ``collect_chunk_bytes``, shared by the files read at once: with ``n`` of them, each
    chunk is an ``n``-th of that); the requests they name are looked up in the journal,
    their outcomes decided, and the chunk committed in one transaction with the new line
    count, so a collection holds one chunk whatever the size of the shard. A chunk whose
    lines are each final whatever their request's attempts (successes, failures never
    retried: most chunks) goes to the journal as it is, which finds the requests as it
    writes them (:meth:`Journal.record_named`); when one line is not the first outcome of
    a request of the shard, the chunk is decided line by line."""
    skip = int(getattr(shard, column))
    number = 0
    tokens = [shard.input_tokens, shard.output_tokens]
    config = ctx.config
    chunk: list[_Line] = []
    held = 0  # bytes of the lines of the chunk
    cancelled_by_run = shard.cancel_reason == "run"

    def final(
        seq: int,
        kind: str,
        code: str | None,
        attempts: int,
        data: bytes,
        used_in: int,
        used_out: int,
    ) -> FinalResult:
        return FinalResult(
            seq=seq,
            kind=kind,
            code=code,
            shard=shard.key,
            batch_id=shard.batch_id,
            attempts=attempts,
            data=data,
            input_tokens=used_in,
            output_tokens=used_out,
        )

    # A chunk is written in the journal's worker thread while the next one is read.
    writing: asyncio.Future[None] | None = None  # the chunk being written

    async def written() -> None:
        """Wait for the chunk being written (before a chunk's look-up: it sees the
        results of every earlier line)."""
        nonlocal writing
        if writing is not None:
            done, writing = writing, None
            await done

    async def write(
        finals: list[FinalResult], retries: list[RetryLine], upto: int, used: tuple[int, int]
    ) -> None:
        await ctx.journal.record(
            shard.key,
            finals,
            retries,
            background=True,
            **{column: upto},
            input_tokens=used[0],
            output_tokens=used[1],
        )
        ctx.counted(finals, retries)
        ctx.results_changed.set()

    def decide(lines: list[_Line], members: dict[str, Member]) -> _Decided:
        """Each line's outcome, from its request's state (a line that names no request
        of the shard waiting for an outcome, or one named earlier in the chunk, has
        none); the shard's token totals count the final ones."""
        finals: list[FinalResult] = []
        retries: list[RetryLine] = []
        decided: set[str] = set()  # requests given an outcome in this chunk
        for line in lines:
            cid = line.custom_id
            member = members.get(cid) if cid is not None else None
            if member is None or not member.queued or cid in decided:
                if member is None and line.kind is not None:
                    logger.warning(
                        "run %s: batch %s returned custom_id %r, which it was not sent",
                        ctx.run_id,
                        shard.batch_id,
                        cid,
                    )
                continue
            assert cid is not None
            decided.add(cid)
            seq, attempts = member.seq, member.attempts
            kind = line.kind
            if kind is None:
                # The request ran (and was paid) but its line does not decode: end it
                # with the decode error rather than run it again.
                why = "undecodable_result"
                data = own_error(cid, why, line.error)
                finals.append(final(seq, "error", why, attempts, data, 0, 0))
                continue
            free = cancelled_by_run and line.code in CANCELLED_CODES
            match fate(
                attempts=attempts,
                retryable=line.retryable,
                free=free,
                max_rounds=config.max_rounds,
            ):
                case Fate.AGAIN_FREE:
                    # Our own cancel: the line runs again as if for the first time.
                    retries.append(RetryLine(seq, attempts, None))
                case Fate.AGAIN:
                    retries.append(RetryLine(seq, attempts + 1, line.data))
                case Fate.FINAL:
                    used_in, used_out = line.input_tokens, line.output_tokens
                    tokens[0] += used_in
                    tokens[1] += used_out
                    finals.append(
                        final(seq, kind, line.code, attempts, line.data, used_in, used_out)
                    )
        return finals, retries

    async def look_up_and_write(lines: list[_Line], upto: int) -> None:
        """Look the lines' requests up, decide each line, and write the chunk."""
        ids = [cid for line in lines if (cid := line.custom_id) is not None and _can_name(cid)]
        members = await ctx.journal.members(shard.key, ids, background=True) if ids else {}
        await asyncio.sleep(0)  # the look-up and the commit are two turns of the loop
        finals, retries = decide(lines, members)
        await write(finals, retries, upto, (tokens[0], tokens[1]))

    async def write_named(named: list[NamedResult], lines: list[_Line], upto: int) -> None:
        """Write a chunk of final lines that the journal matches to their requests
        itself; when one of them is not the first outcome of a request of the shard
        (an unknown or repeated ``custom_id``, a request retried before...), decide
        line by line instead."""
        used = (
            tokens[0] + sum(line.input_tokens for line in named),
            tokens[1] + sum(line.output_tokens for line in named),
        )
        if await ctx.journal.record_named(
            shard.key,
            shard.batch_id,
            named,
            background=True,
            **{column: upto},
            input_tokens=used[0],
            output_tokens=used[1],
        ):
            tokens[0], tokens[1] = used
            ctx.counted_first(named)
            ctx.results_changed.set()
        else:
            await look_up_and_write(lines, upto)

    async def commit(upto: int) -> None:
        nonlocal writing
        await written()  # the next chunk's look-up sees the results of this one
        lines = chunk[:]
        chunk.clear()
        # A chunk of lines that are each final whatever their request's attempts
        # (successes, failures never retried): the journal finds their requests as it
        # writes them. Not in a shard of a later round: its requests failed before (its
        # round is the most failures any of them had), and the journal would refuse them.
        named = _final_whatever_attempts(lines) if shard.round == 0 else None
        if named is not None:
            step = write_named(named, lines, upto)
        else:
            step = look_up_and_write(lines, upto)
        writing = asyncio.ensure_future(step)

    ctx.reading += 1
    try:
        async with contextlib.aclosing(ctx.client.iter_file_lines(file_id)) as lines:
            async for raw in lines:
                number += 1
                if not number % _LINES_PER_TURN:
                    # Lines already received arrive without a wait (and lines committed
                    # before a resume are skipped): read them in turns of the loop.
                    await asyncio.sleep(0)
                if number <= skip or not raw.strip():
                    continue
                try:
                    # The line in OpenAI's shape, whatever the provider.
                    result, data = summarize_result(raw, what=f"line {number} of file {file_id}")
                except DecodeError as exc:
                    logger.warning("run %s: a result line does not decode: %s", ctx.run_id, exc)
                    # Ended with the error when it says which request it is.
                    chunk.append(
                        _Line(undecodable(raw), None, None, False, 0, 0, b"", describe(exc))
                    )
                else:
                    held += len(data)
                    kind, code, retryable = classify(result)
                    chunk.append(
                        _Line(
                            result.custom_id,
                            kind,
                            code,
                            retryable,
                            result.input_tokens,
                            result.output_tokens,
                            data,
                        )
                    )
                # The files read at once share the chunk's bounds (each its part).
                share = ctx.reading
                if len(chunk) * share >= config.collect_chunk or (
                    held * share >= config.collect_chunk_bytes
                ):
                    await commit(number)
                    held = 0
                    await asyncio.sleep(0)  # let the other batches' tasks run
        await commit(number)
    finally:
        ctx.reading -= 1
        await written()  # a chunk committed is counted, whatever ended the reading


def _final_whatever_attempts(lines: list[_Line]) -> list[NamedResult] | None:
    """A chunk's lines as :class:`NamedResult`, when each decodes and is final whatever
    its request's attempts (a success, or a failure never retried); else None."""
    named: list[NamedResult] = []
    for cid, kind, code, retryable, used_in, used_out, data, _error in lines:
        if kind is None or cid is None or retryable or not _can_name(cid):
            return None
        named.append(NamedResult(cid, kind, code, used_in, used_out, data))
    return named or None


def _can_name(custom_id: str) -> bool:
    """Whether a result line's ``custom_id`` can be looked up as a request's: one with a
    lone surrogate escape (not Unicode text) cannot, and names no request (preflight
    refuses such ids, and those with a NUL); its line is logged as a stranger's."""
    return custom_id.isascii() or text_problem(custom_id) is None


#: What a chunk's lines came to: final results, and requests for another round.
_Decided = tuple[list[FinalResult], list[RetryLine]]


class _Line(NamedTuple):
    """A result line waiting in a chunk, as :func:`classify` read it: the request it
    names (None: none can be told), its kind and code (kind None: it does not decode,
    ``error`` says why), whether that failure may run again, the tokens of a success's
    ``usage``, and its bytes. (A named tuple of plain values: the garbage collector
    stops tracking it, so a chunk of 4,000 waiting for its commit does not make a full
    collection come sooner.)"""

    custom_id: str | None
    kind: str | None
    code: str | None
    retryable: bool
    input_tokens: int
    output_tokens: int
    data: bytes
    error: str = ""


async def delete_files(ctx: RunContext, shard: Shard) -> None:
    """``delete_files``: a collected shard's input, output and error files go; a file
    that cannot be deleted is logged and left."""
    if shard.state is not _S.COLLECTED:
        return
    for file_id in dict.fromkeys((shard.file_id, shard.output_file_id, shard.error_file_id)):
        if file_id is None:
            continue
        try:
            await ctx.client.delete_file(file_id)
        except AiobatchError as exc:
            logger.info("run %s: could not delete file %s: %s", ctx.run_id, file_id, exc)
