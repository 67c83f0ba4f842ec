"""Cutting a stream of prepared requests into batches (shards). Pure: no IO.

A batch targets one endpoint and, in practice, one model, and holds at most 50,000
lines and 200 MB (the limits are parameters here). :func:`plan_shards` groups the
requests by ``(url, model)`` and cuts each group, in input order, into consecutive
shards that respect every limit, greedily: a shard is closed when the group's next
request does not fit in it (or when nothing more can fit).

It streams: it holds only the currently open shard of each group, yields a shard as
soon as it is closed, and yields the shards still open when the input ends, ordered by
the ``seq`` of their first request.

:func:`plan` is the run's planning step: it cuts the journal's pending requests and
records each shard's intent as soon as it is cut.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import attrs

from .._clock import SystemClock
from ..errors import TooManyBatchesError
from ._records import PendingRequest, PreparedRequest, Shard, ShardPlan

if TYPE_CHECKING:
    from ._context import RunContext

__all__ = ["ShardCutter", "plan", "plan_shards"]


@attrs.define(slots=True)
class _OpenShard:
    url: str
    model: str | None
    seqs: list[int]
    size: int
    tokens: int
    inputs: int

    def plan(self) -> ShardPlan:
        return ShardPlan(
            self.url, self.model, tuple(self.seqs), self.size, self.tokens, self.inputs
        )


def plan_shards(
    items: Iterable[PreparedRequest],
    *,
    max_lines: int,
    max_bytes: int,
    max_tokens: int | None = None,
    max_inputs: int | None = None,
) -> Iterator[ShardPlan]:
    """Group requests by ``(url, model)`` and cut each group into shards within limits.

    Within a group the requests keep their input order, and each shard takes the next
    requests of its group for as long as they fit: at most ``max_lines`` lines, at most
    ``max_bytes`` bytes and, when ``max_tokens`` is given, at most ``max_tokens``
    estimated tokens. A single request that alone exceeds ``max_bytes`` or
    ``max_tokens`` still gets a shard of its own, with nothing else in it: the caller
    decides what to do with it (preflight already rejects lines over the byte limit;
    for tokens the estimate may be off, or the real limit higher).

    The arguments are checked at once; the items are read lazily, as the returned
    iterator is consumed.

    Args:
        items: the requests, in input order.
        max_lines: the most lines per shard (>= 1).
        max_bytes: the most bytes per shard (>= 1), newlines included.
        max_tokens: the most estimated tokens per shard (>= 1), or None for no limit.
        max_inputs: the most inputs per shard (>= 1; OpenAI allows 50,000 embedding
            inputs per batch), or None for no limit. A single request over it still
            gets a shard of its own.

    Returns:
        The shards: each as soon as it is closed, then those still open when the input
        ends, by the ``seq`` of their first request.

    Raises:
        ValueError: a limit is not a positive int (at once), or an item has a size
            below 1 or negative tokens (when it is reached).
    """
    cutter = ShardCutter(
        max_lines=max_lines, max_bytes=max_bytes, max_tokens=max_tokens, max_inputs=max_inputs
    )
    return _plan(items, cutter)


def _check_limit(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _plan(items: Iterable[PreparedRequest], cutter: ShardCutter) -> Iterator[ShardPlan]:
    for item in items:
        yield from cutter.add(item)
    yield from cutter.finish()


class ShardCutter:
    """The cutting of :func:`plan_shards`, one request at a time (for requests read
    from an async source): :meth:`add` returns the shards the request closed,
    :meth:`finish` those still open."""

    def __init__(
        self,
        *,
        max_lines: int,
        max_bytes: int,
        max_tokens: int | None = None,
        max_inputs: int | None = None,
    ) -> None:
        _check_limit("max_lines", max_lines)
        _check_limit("max_bytes", max_bytes)
        if max_tokens is not None:
            _check_limit("max_tokens", max_tokens)
        if max_inputs is not None:
            _check_limit("max_inputs", max_inputs)
        self._max_lines = max_lines
        self._max_bytes = max_bytes
        self._max_tokens = max_tokens
        self._max_inputs = max_inputs
        self._open: dict[tuple[str, str | None], _OpenShard] = {}

    def add(self, item: PreparedRequest | PendingRequest) -> list[ShardPlan]:
        """Put a request in its group's open shard; returns the shards it closed."""
        if item.size < 1:
            raise ValueError(f"item {item.seq}: size must be >= 1 (it counts the newline)")
        if item.tokens < 0:
            raise ValueError(f"item {item.seq}: tokens must be >= 0, got {item.tokens}")
        max_lines, max_bytes = self._max_lines, self._max_bytes
        max_tokens, max_inputs = self._max_tokens, self._max_inputs
        closed: list[ShardPlan] = []
        key = (item.url, item.model)
        shard = self._open.get(key)
        if shard is not None and (
            len(shard.seqs) + 1 > max_lines
            or shard.size + item.size > max_bytes
            or (max_tokens is not None and shard.tokens + item.tokens > max_tokens)
            or (max_inputs is not None and shard.inputs + item.inputs > max_inputs)
        ):
            del self._open[key]
            closed.append(shard.plan())
            shard = None
        if shard is None:
            shard = _OpenShard(
                item.url, item.model, [item.seq], item.size, item.tokens, item.inputs
            )
        else:
            shard.seqs.append(item.seq)
            shard.size += item.size
            shard.tokens += item.tokens
            shard.inputs += item.inputs
        # Closed at once when no further request can fit (every one has size >= 1);
        # a shard at exactly the token limit stays open for requests of 0 tokens.
        if (
            len(shard.seqs) >= max_lines
            or shard.size >= max_bytes
            or (max_tokens is not None and shard.tokens > max_tokens)
            or (max_inputs is not None and shard.inputs >= max_inputs)
        ):
            self._open.pop(key, None)
            closed.append(shard.plan())
        else:
            self._open[key] = shard
        return closed

    def finish(self) -> list[ShardPlan]:
        """The shards still open, by the ``seq`` of their first request."""
        shards = sorted(self._open.values(), key=lambda s: s.seqs[0])
        self._open.clear()
        return [shard.plan() for shard in shards]


async def plan(ctx: RunContext) -> list[Shard]:
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
    limits = ctx.config.enqueued_token_limits
    now = ctx.clock.now()
    # On the real clock the pages are read and each intent is written in a worker
    # thread (a VirtualClock's auto_advance would take that wait for idleness).
    background = isinstance(ctx.clock, SystemClock)
    index = await journal.shard_count()
    shards: list[Shard] = []

    async def record(plans: list[ShardPlan]) -> None:
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
                    background=background,
                )
            )

    for group in await journal.pending_groups():
        embeddings = group.url.rstrip("/").endswith("/embeddings")
        cutter = ShardCutter(
            max_lines=ctx.max_lines,
            max_bytes=ctx.max_bytes,
            max_tokens=limits.get(group.model) if group.model is not None else None,
            max_inputs=ctx.max_inputs if embeddings else None,
        )
        try:
            pending = journal.pending_requests(group.url, group.model, background=background)
            add = cutter.add
            async for request in pending:
                if closed := add(request):  # most requests close no shard
                    await record(closed)
            await record(cutter.finish())
        except TooManyBatchesError as exc:
            exc.args = (f"run {ctx.run_id}: {exc}",)
            raise
    return shards
