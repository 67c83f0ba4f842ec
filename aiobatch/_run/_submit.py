"""Submission: a shard from its recorded intent to an open batch.

How a shard is submitted is the provider's strategy (``Provider.quirks.submission``):
:data:`FILE_SUBMISSION` uploads the shard's input file, then creates the batch from it
(OpenAI, Azure, Portkey and compatible servers); :data:`INLINE_SUBMISSION` creates the
batch with the shard's requests in the call (Anthropic). A strategy is a table from the shard
state a step works on to the step; each step takes the shard, does one thing, journals
it, and returns the shard's :class:`Next` state. ``BatchRun`` only dispatches.

Every step is safe to repeat after a crash:

- a shard whose upload may have happened (``uploading``) is looked up by its file name
  (``aiobatch-<run>-<shard>.jsonl``, same size) before it is uploaded again;
- a shard whose create may have happened (``creating``) is looked up by its create key
  (in the batch's metadata, beside ``aiobatch_run`` and ``aiobatch_shard``) and by its
  input file, once the create had time to land (``create_settle``), and adopted; it is
  created again only when the lookup proved that no batch was made.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

from .._aio import sleep_or_set
from .._client import BatchClient
from .._convert import structure
from .._create import CREATE_KEY_METADATA
from .._lifecycle import BatchStatus
from .._models import Batch, BatchRequest, File
from ..errors import (
    AiobatchError,
    AmbiguousCreateError,
    APIStatusError,
    ConfigurationError,
    ConnectError,
    LookupIncompleteError,
    NotFoundError,
    RunError,
    TransportError,
    describe,
)
from ._context import Next, RunContext, Stop, logger
from ._outcomes import token_limited
from ._records import Shard
from ._settle import reject
from ._states import ShardState

__all__ = [
    "FILE_SUBMISSION",
    "INLINE_SUBMISSION",
    "WAITS",
    "Next",
    "find_inline_batch",
    "find_shard_batch",
    "submission_steps",
]

#: Seconds allowed between this machine's clock and the server's when a lookup bounds
#: a batch's or a file's ``created_at`` by when this run started the call.
SKEW = 900.0

_S = ShardState


Step = Callable[[RunContext, Shard], Awaitable[Next]]


def file_name(run_id: str, key: str) -> str:
    """A shard's input file name: unique to the run and the shard."""
    return f"aiobatch-{run_id}-{key}.jsonl"


async def find_shard_batch(client: BatchClient, shard: Shard) -> Batch | None:
    """The batch a shard's create (its last create key) made, if any.

    The batch is looked for by its create key (in its metadata) and, for servers that do
    not keep metadata, by the shard's input file: a batch made from that file since the
    create started is the shard's (the file is the shard's own upload; the batches of it
    that ended in ``token_limit_exceeded`` before, recorded in the shard's history, are
    not). None means proved absent: the list, newest first, went below the create's
    start (less a margin for clock skew) or ended.

    Raises:
        AiobatchError: the list could not be read (nothing is proved).
    """
    assert shard.create_key is not None
    since = (shard.create_started_at or shard.planned_at) - SKEW
    with contextlib.suppress(LookupIncompleteError):
        found = await client.find_created_batch(shard.create_key, since=since, max_pages=1000)
        if found is not None:
            return found
    earlier = set(shard.history.split())
    async for batch in client.list_batches():
        ours = batch.input_file_id == shard.file_id and batch.id not in earlier
        if ours and not (batch.status is BatchStatus.FAILED and token_limited(batch)):
            return batch
        if batch.created_at < since:
            return None
    return None


async def _find_upload(ctx: RunContext, name: str, size: int, since: float) -> File | None:
    """A usable file named ``name`` of ``size`` bytes created after ``since`` (less a
    margin for clock skew), or None (also when files cannot be listed). A file the
    server marked ``error`` is not usable."""
    horizon = since - SKEW
    try:
        async for file in ctx.client.list_files(purpose="batch", order="desc"):
            if file.filename == name and file.bytes == size and file.status != "error":
                return file
            if file.created_at < horizon:
                break
    except ConnectError:
        raise  # the server cannot be reached: an upload could not be either
    except AiobatchError as exc:
        logger.warning(
            "could not list files to find %s (%s); uploading it again", name, describe(exc)
        )
    return None


def _open_file(folder: str, name: str) -> tuple[Path, BinaryIO]:
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path / name, (path / name).open("wb")


def _write_lines(fh: BinaryIO, lines: Iterable[bytes]) -> int:
    size = 0
    for data in lines:
        fh.write(data)
        fh.write(b"\n")
        size += len(data) + 1
    return size


async def _write_file(ctx: RunContext, shard: Shard, name: str) -> tuple[Path, int]:
    """Write a shard's lines to its file in the work folder; return the path and the
    bytes written."""
    path, fh = _open_file(ctx.work_dir, name)
    size = 0
    with fh:
        async for lines in ctx.journal.shard_lines(shard.key):
            size += _write_lines(fh, lines)
    return path, size


async def upload(ctx: RunContext, shard: Shard) -> Next:
    """``planned``/``uploading`` -> ``uploaded``: upload the shard's file, unless an
    upload of it already landed."""
    name = file_name(ctx.run_id, shard.key)
    if shard.state is _S.UPLOADING and shard.upload_started_at is not None:
        found = await _find_upload(ctx, name, shard.bytes, shard.upload_started_at)
        if found is not None:
            logger.info("run %s: shard %s: adopted upload %s", ctx.run_id, shard.key, found.id)
            if ctx.client.provider.quirks.wait_for_processed_file:
                found = await ctx.client.wait_for_file(found)
            await ctx.journal.move(shard.key, _S.UPLOADED, file_id=found.id)
            await _delete_extra_uploads(ctx, shard, found.id, shard.upload_started_at)
            return Next(_S.UPLOADED)
    path, size = await _write_file(ctx, shard, name)
    if size != shard.bytes:
        raise RunError(
            f"run {ctx.run_id}: shard {shard.key} should be {shard.bytes} bytes, "
            f"its lines make {size}; the journal is inconsistent"
        )
    # The first attempt's start is kept: the copies of every attempt are looked for.
    started = shard.upload_started_at or ctx.clock.now()
    if shard.state is _S.PLANNED:
        await ctx.journal.move(shard.key, _S.UPLOADING, upload_started_at=started)
    ctx.set_status(shard.key, "uploading")
    try:
        uploaded = await ctx.client.upload_file(
            path, filename=name, expires_after_seconds=ctx.config.input_expires_after
        )
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    await ctx.journal.move(shard.key, _S.UPLOADED, file_id=uploaded.id)
    await _delete_extra_uploads(ctx, shard, uploaded.id, started)
    return Next(_S.UPLOADED)


async def _delete_extra_uploads(ctx: RunContext, shard: Shard, kept: str, since: float) -> None:
    """Delete the other copies of a shard's input file once its file id is recorded:
    an upload whose answer was lost (and was then sent again, or looked up) leaves one
    on the server, unused. A copy is known by its name (unique to the run and the shard)
    and size. Nothing here fails the run: a list or delete that fails is logged, and the
    copies it could not reach stay."""
    name = file_name(ctx.run_id, shard.key)
    horizon = since - SKEW
    extras: list[str] = []
    try:
        async for file in ctx.client.list_files(purpose="batch", order="desc"):
            if file.filename == name and file.bytes == shard.bytes and file.id != kept:
                extras.append(file.id)
            if file.created_at < horizon:
                break
    except AiobatchError as exc:
        logger.info(
            "run %s: could not list files to find extra copies of %s (%s)",
            ctx.run_id,
            name,
            describe(exc),
        )
    deleted = 0
    for file_id in extras:
        try:
            await ctx.client.delete_file(file_id)
        except AiobatchError as exc:
            logger.warning(
                "run %s: could not delete %s, an extra copy of the input file of shard "
                "%s (%s); it is unused and can be deleted by hand",
                ctx.run_id,
                file_id,
                shard.key,
                describe(exc),
            )
            continue
        deleted += 1
    if deleted:
        await ctx.journal.count_extra_uploads(deleted)
        logger.warning(
            "run %s: %d extra cop%s of the input file of shard %s (%s), left by lost "
            "upload answers, deleted; the batch uses %s",
            ctx.run_id,
            deleted,
            "y" if deleted == 1 else "ies",
            shard.key,
            name,
            kept,
        )


async def create(ctx: RunContext, shard: Shard) -> Next:
    """``uploaded`` -> ``creating`` -> ``open``: create the shard's batch; the create
    key is journaled before the create is sent.

    A create that may or may not have made a batch leaves the shard ``creating`` (its
    tokens reserved) for :func:`resolve_create`.
    """
    assert shard.file_id is not None
    # A cancel requested since the run last looked makes no new batch (a cheap read).
    if await ctx.cancel_requested():
        raise Stop
    key = f"{ctx.run_id}:{shard.key}:{shard.creates}"
    await ctx.journal.move(
        shard.key, _S.CREATING, create_key=key, create_started_at=ctx.clock.now()
    )
    ctx.set_status(shard.key, "creating")
    metadata = {
        **ctx.config.metadata,
        "aiobatch_run": ctx.run_id,
        "aiobatch_shard": shard.key,
        CREATE_KEY_METADATA: key,
    }
    try:
        batch = await ctx.client.create_batch(
            shard.file_id,
            shard.url,
            completion_window=ctx.config.completion_window,
            metadata=metadata,
        )
    except AmbiguousCreateError:
        raise  # stays 'creating' (and reserved): looked up on the next step
    except NotFoundError:
        # The file is gone (or not visible yet): upload it again.
        ctx.budget.release(shard.key)
        await ctx.journal.move(shard.key, _S.PLANNED, file_id=None, upload_started_at=None)
        ctx.set_status(shard.key, "planned")
        ctx.set_back(shard.key, "its input file was not found")
        raise
    except (TransportError, APIStatusError) as exc:
        # No attempt made a batch (the client proved it).
        ctx.budget.release(shard.key)
        if isinstance(exc, APIStatusError) and exc.status_code in (400, 422):
            await reject(ctx, await ctx.journal.shard(shard.key), describe(exc))
            return Next(_S.COLLECTED)
        await ctx.journal.move(shard.key, _S.UPLOADED)
        ctx.set_status(shard.key, "uploaded")
        raise
    return await opened(ctx, shard.key, batch)


async def resolve_create(ctx: RunContext, shard: Shard, *, during_cancel: bool = False) -> Next:
    """``creating`` -> ``open`` or ``uploaded``: a create may have been sent; adopt its
    batch, or (when the lookup proved it absent, see :func:`find_shard_batch`) go back
    to be created again; a lookup that fails is tried again later.

    A create may still be on its way to the server (sent just before a crash or a
    stop): the lookup is trusted only ``create_settle`` seconds after the create
    started, as the client does after an ambiguous failure.
    """
    started = shard.create_started_at or shard.planned_at
    settle = started + ctx.client.create_settle - ctx.clock.now()
    if during_cancel:
        await ctx.clock.sleep(max(settle, 0.0))
    else:
        await ctx.pause(settle)
    found = await find_shard_batch(ctx.client, shard)
    if found is not None:
        logger.info("run %s: shard %s: adopted batch %s", ctx.run_id, shard.key, found.id)
        return await opened(ctx, shard.key, found)
    ctx.budget.release(shard.key)
    await ctx.journal.move(shard.key, _S.UPLOADED)
    ctx.set_status(shard.key, "uploaded")
    ctx.set_back(shard.key, "a lost create proved never made")
    return Next(_S.UPLOADED)


async def opened(ctx: RunContext, key: str, batch: Batch) -> Next:
    """``creating`` -> ``open``: the shard has its batch."""
    ctx.setbacks.pop(key, None)
    await ctx.journal.move(key, _S.OPEN, batch_id=batch.id, status=batch.status.value)
    ctx.left_creating.set()
    return Next(_S.OPEN, batch)


async def ready_to_create(ctx: RunContext, shard: Shard) -> None:
    """Wait out a token-limit backoff (``not_before``) and the enqueued-token budget.

    Raises:
        Stop: the run stopped meanwhile.
    """
    if shard.not_before is not None:
        await ctx.pause(shard.not_before - ctx.clock.now())
    await ctx.budget.admit(shard, ctx.clock, ctx.stopping)


#: Upload the shard's file, then create its batch.
FILE_SUBMISSION: Mapping[ShardState, Step] = MappingProxyType(
    {
        _S.PLANNED: upload,
        _S.UPLOADING: upload,
        _S.UPLOADED: create,
        _S.CREATING: resolve_create,
    }
)

# --- inline submission (Anthropic) -------------------------------------------------------
#
# ``planned -> creating -> open``: the shard's requests go in the create call itself.
# Anthropic's batches carry no metadata, so the create key (journaled before the create
# is sent, as for files) cannot be found on the batch. A create whose answer was lost is
# therefore never sent again by the client (AmbiguousCreateError at once), and the shard
# stays ``creating``; it is found again by what the server does show: a batch with the
# shard's request count, created since the create started (less the skew margin), that
# no other shard of the run has adopted. Exactly one such batch is adopted; none (the
# list, newest first, went below that time) proves the create never made, and the shard
# is created again; more than one is an error naming them (never a second batch).
#
# A request count tells shards apart only if no two shards of the run with the same
# count are ``creating`` at once: a shard takes its turn (``wait_inline_turn``, then
# under ``ctx.inline_turn`` in ``inline_create``) and enters ``creating`` only when no
# other shard of its request count is there. Its create's outcome is known (or its lost
# answer resolved) before the next shard of that count is sent, also across a crash.

#: Seconds between looks at the journal while a shard waits for its turn to create (a
#: shard leaving ``creating`` in this process ends the wait at once).
TURN_POLL = 1.0


async def _turn_taken(ctx: RunContext, shard: Shard) -> bool:
    """Whether another shard with ``shard``'s request count is ``creating``."""
    return any(
        other.key != shard.key and other.lines == shard.lines
        for other in await ctx.journal.shards(_S.CREATING)
    )


async def wait_inline_turn(ctx: RunContext, shard: Shard) -> None:
    """Before an inline create (a wait outside the submission slots): until no other
    shard of the run with the same request count is ``creating``. Nothing for a provider
    that submits files (their creates are found by key).

    Raises:
        Stop: the run stopped meanwhile.
    """
    if ctx.client.provider.quirks.submission != "inline":
        return
    while True:
        ctx.left_creating.clear()
        if not await _turn_taken(ctx, shard):
            return
        await sleep_or_set(ctx.clock, TURN_POLL, ctx.left_creating, ctx.stopping)
        if ctx.stopping.is_set():
            raise Stop


def _inline_requests(lines: Iterable[bytes]) -> list[BatchRequest]:
    return [structure(json.loads(line), BatchRequest, what="a journaled request") for line in lines]


async def inline_create(ctx: RunContext, shard: Shard) -> Next:
    """``planned`` -> ``creating`` -> ``open``: create the shard's batch with its
    requests inline; the create key is journaled before the create is sent."""
    await ready_to_create(ctx, shard)
    if await ctx.cancel_requested():
        raise Stop
    requests: list[BatchRequest] = []
    async for lines in ctx.journal.shard_lines(shard.key):
        requests.extend(_inline_requests(lines))
    if len(requests) != shard.lines:
        raise RunError(
            f"run {ctx.run_id}: shard {shard.key} should have {shard.lines} requests, the "
            f"journal holds {len(requests)}; the journal is inconsistent"
        )
    key = f"{ctx.run_id}:{shard.key}:{shard.creates}"
    async with ctx.inline_turn:
        if await _turn_taken(ctx, shard):
            return Next(_S.PLANNED)  # another shard of this count went first: wait again
        await ctx.journal.move(
            shard.key, _S.CREATING, create_key=key, create_started_at=ctx.clock.now()
        )
    ctx.set_status(shard.key, "creating")
    try:
        batch = await ctx.client.create_inline_batch(requests)
    except AmbiguousCreateError:
        raise  # stays 'creating' (and reserved): looked up on the next step
    except (TransportError, APIStatusError) as exc:
        ctx.budget.release(shard.key)
        if isinstance(exc, APIStatusError) and exc.status_code in (400, 413, 422):
            await reject(ctx, await ctx.journal.shard(shard.key), describe(exc))
            ctx.left_creating.set()
            return Next(_S.COLLECTED)
        await ctx.journal.move(shard.key, _S.PLANNED)
        ctx.left_creating.set()
        ctx.set_status(shard.key, "planned")
        raise
    return await opened(ctx, shard.key, batch)


async def find_inline_batch(ctx: RunContext, shard: Shard) -> Batch | None:
    """The batch a shard's inline create made, found by request count and creation
    time (see the notes above); None when proved absent.

    Raises:
        RunError: more than one unclaimed batch fits.
        AiobatchError: the list could not be read (nothing is proved).
    """
    since = (shard.create_started_at or shard.planned_at) - SKEW
    shards = await ctx.journal.shards()
    claimed = {s.batch_id for s in shards if s.batch_id}
    claimed.update(shard.history.split())
    # Shards of the same count creating at once (a journal of an older aiobatch, which
    # did not take turns): a batch of that count could be any of theirs.
    rivals = [
        s.key
        for s in shards
        if s.state is _S.CREATING and s.lines == shard.lines and s.key != shard.key
    ]
    fits: list[Batch] = []
    async for batch in ctx.client.list_batches():
        if batch.created_at < since:
            break
        counts = batch.request_counts
        if counts is not None and counts.total == shard.lines and batch.id not in claimed:
            fits.append(batch)
    if fits and rivals:
        raise RunError(
            f"run {ctx.run_id}: shard {shard.key}: its create's answer was lost, and so "
            f"were those of shards {', '.join(rivals)} of the same request count "
            f"({shard.lines}); batch {', '.join(b.id for b in fits)} could be any of "
            "theirs and the run will not guess: cancel the batch, then resume"
        )
    if len(fits) > 1:
        names = ", ".join(b.id for b in fits)
        raise RunError(
            f"run {ctx.run_id}: shard {shard.key}: its create's answer was lost and "
            f"{len(fits)} batches could be the one it made ({names}); the run will not "
            "guess: cancel the ones that are not this run's, then resume"
        )
    return fits[0] if fits else None


async def resolve_inline_create(ctx: RunContext, shard: Shard) -> Next:
    """``creating`` -> ``open`` or ``planned``: adopt the batch an inline create made,
    or (proved absent) go back to be created again, once the create had time to land."""
    started = shard.create_started_at or shard.planned_at
    await ctx.pause(started + ctx.client.create_settle - ctx.clock.now())
    found = await find_inline_batch(ctx, shard)
    if found is not None:
        logger.info("run %s: shard %s: adopted batch %s", ctx.run_id, shard.key, found.id)
        return await opened(ctx, shard.key, found)
    ctx.budget.release(shard.key)
    await ctx.journal.move(shard.key, _S.PLANNED)
    ctx.left_creating.set()
    ctx.set_status(shard.key, "planned")
    ctx.set_back(shard.key, "a lost create proved never made")
    return Next(_S.PLANNED)


#: Create the batch with the shard's requests inline (Anthropic).
INLINE_SUBMISSION: Mapping[ShardState, Step] = MappingProxyType(
    {
        _S.PLANNED: inline_create,
        _S.CREATING: resolve_inline_create,
    }
)

_STRATEGIES: Mapping[str, Mapping[ShardState, Step]] = MappingProxyType(
    {"file": FILE_SUBMISSION, "inline": INLINE_SUBMISSION}
)

#: Waits before a step, for every strategy: they are not work, so they run outside the
#: submission slots and shards held back never hold up others.
WAITS: Mapping[ShardState, Callable[[RunContext, Shard], Awaitable[None]]] = MappingProxyType(
    {_S.UPLOADED: ready_to_create, _S.PLANNED: wait_inline_turn}
)


def submission_steps(client: BatchClient) -> Mapping[ShardState, Step]:
    """The submission strategy of the client's provider.

    Raises:
        ConfigurationError: the provider names a strategy aiobatch does not have.
    """
    name = client.provider.quirks.submission
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise ConfigurationError(
            f"provider {client.provider.name!r} submits batches by {name!r}, which this "
            f"aiobatch cannot do (it knows {sorted(_STRATEGIES)})"
        ) from None
