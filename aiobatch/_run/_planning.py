"""Cutting a stream of prepared requests into batches (shards). Pure: no IO.

A batch targets one endpoint and, in practice, one model, and holds at most 50,000
lines and 200 MB (the limits are parameters here). :func:`plan_shards` groups the
requests by ``(url, model)`` and cuts each group, in input order, into consecutive
shards that respect every limit, greedily: a shard is closed when the group's next
request does not fit in it (or when nothing more can fit).

It streams: it holds only the currently open shard of each group, yields a shard as
soon as it is closed, and yields the shards still open when the input ends, ordered by
the ``seq`` of their first request.

:class:`IngestPlanner` cuts a new run's requests as the ingest adds them, so that they
go into the journal already queued in their shards (one write of each request, not a
write and then an update). :func:`plan` is the run's planning step for the requests
pending after that (put back for another round): it cuts the journal's pending
requests and records each shard's intent as soon as it is cut.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import attrs

from .._clock import SystemClock
from ..errors import TooManyBatchesError
from ._records import NewShard, PendingRequest, PreparedRequest, RequestRow, Shard, ShardPlan

if TYPE_CHECKING:
    from ._context import RunContext

__all__ = ["IngestPlanner", "ShardCutter", "ShardLimits", "plan", "plan_shards"]


@attrs.frozen(slots=True)
class ShardLimits:
    """How big a run's shards may be: ``max_lines`` lines and ``max_bytes`` bytes each;
    ``max_inputs`` inputs for an embeddings endpoint; at most ``token_limits[model]``
    estimated tokens for a model named there."""

    max_lines: int
    max_bytes: int
    max_inputs: int | None = None
    token_limits: Mapping[str, int] = attrs.field(factory=dict)

    def cutter(
        self, url: str, model: str | None, *, name: Callable[[], str] | None = None
    ) -> ShardCutter:
        """A cutter for the requests of one (url, model) (``name``: see
        :class:`ShardCutter`)."""
        embeddings = url.rstrip("/").endswith("/embeddings")
        return ShardCutter(
            max_lines=self.max_lines,
            max_bytes=self.max_bytes,
            max_tokens=self.token_limits.get(model) if model is not None else None,
            max_inputs=self.max_inputs if embeddings else None,
            name=name,
        )


@attrs.define(slots=True)
class _OpenShard:
    url: str
    model: str | None
    seqs: list[int]
    size: int
    tokens: int
    inputs: int
    key: str | None = None

    def plan(self) -> ShardPlan:
        return ShardPlan(
            self.url, self.model, tuple(self.seqs), self.size, self.tokens, self.inputs, self.key
        )


#: What :meth:`ShardCutter.mark` notes of each open shard: it, and its lines, size,
#: tokens and inputs then.
_Noted = tuple[_OpenShard, int, int, int, int]
#: What :meth:`ShardCutter.mark` returns.
_CutterMark = dict[tuple[str, str | None], _Noted]
#: What :meth:`IngestPlanner.mark` returns: the shards named, the shards closed, and
#: each group's cutter mark.
_PlannerMark = tuple[int, int, dict[tuple[str, str | None], _CutterMark]]


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
    :meth:`finish` those still open.

    ``name``, when given, names each shard as it opens (:attr:`placed` then says where
    each request went), and :meth:`mark` and :meth:`undo` take requests back out.
    """

    def __init__(
        self,
        *,
        max_lines: int,
        max_bytes: int,
        max_tokens: int | None = None,
        max_inputs: int | None = None,
        name: Callable[[], str] | None = None,
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
        self._name = name
        #: the key of the shard the last request went into, and its line there
        #: (1-based); with ``name`` only
        self.placed: tuple[str, int] = ("", 0)

    def add(self, item: PreparedRequest | PendingRequest) -> Sequence[ShardPlan]:
        """Put a request in its group's open shard; returns the shards it closed."""
        return self.put(item.url, item.model, item.seq, item.size, item.tokens, item.inputs)

    def put(
        self, url: str, model: str | None, seq: int, size: int, tokens: int, inputs: int
    ) -> Sequence[ShardPlan]:
        """:meth:`add` of a request given by its fields."""
        if size < 1:
            raise ValueError(f"item {seq}: size must be >= 1 (it counts the newline)")
        if tokens < 0:
            raise ValueError(f"item {seq}: tokens must be >= 0, got {tokens}")
        max_lines, max_bytes = self._max_lines, self._max_bytes
        max_tokens, max_inputs = self._max_tokens, self._max_inputs
        closed: Sequence[ShardPlan] = ()
        key = (url, model)
        shard = self._open.get(key)
        if shard is not None and (
            len(shard.seqs) + 1 > max_lines
            or shard.size + size > max_bytes
            or (max_tokens is not None and shard.tokens + tokens > max_tokens)
            or (max_inputs is not None and shard.inputs + inputs > max_inputs)
        ):
            del self._open[key]
            closed = [shard.plan()]
            shard = None
        if shard is None:
            shard = self._open[key] = _OpenShard(url, model, [seq], size, tokens, inputs)
            if self._name is not None:
                shard.key = self._name()
        else:
            shard.seqs.append(seq)
            shard.size += size
            shard.tokens += tokens
            shard.inputs += inputs
        # Closed at once when no further request can fit (every one has size >= 1);
        # a shard at exactly the token limit stays open for requests of 0 tokens.
        if (
            len(shard.seqs) >= max_lines
            or shard.size >= max_bytes
            or (max_tokens is not None and shard.tokens > max_tokens)
            or (max_inputs is not None and shard.inputs >= max_inputs)
        ):
            del self._open[key]
            closed = [*closed, shard.plan()]
        if shard.key is not None:
            self.placed = (shard.key, len(shard.seqs))
        return closed

    def mark(self) -> _CutterMark:
        """Where the open shards stand, for :meth:`undo`."""
        return {
            key: (shard, len(shard.seqs), shard.size, shard.tokens, shard.inputs)
            for key, shard in self._open.items()
        }

    def undo(self, mark: _CutterMark) -> None:
        """Take back every request added since :meth:`mark`: the open shards are
        those of then, as they were (the shards closed since are forgotten)."""
        self._open = {}
        for key, (shard, lines, size, tokens, inputs) in mark.items():
            del shard.seqs[lines:]
            shard.size, shard.tokens, shard.inputs = size, tokens, inputs
            self._open[key] = shard

    def finish(self) -> list[ShardPlan]:
        """The shards still open, by the ``seq`` of their first request."""
        shards = sorted(self._open.values(), key=lambda s: s.seqs[0])
        self._open.clear()
        return [shard.plan() for shard in shards]


class IngestPlanner:
    """Cuts a new run's requests into shards as its ingest adds them (as :func:`plan`
    would cut them once added): :meth:`place` queues each request in its shard, and
    :meth:`finish` gives every shard.

    A shard is named (``s000000`` on) as it opens, so each request knows its shard
    before the shard is complete. :meth:`mark` and :meth:`undo` take back the requests
    of a batch that the journal refused.
    """

    def __init__(self, limits: ShardLimits) -> None:
        self._limits = limits
        self._cutters: dict[tuple[str, str | None], ShardCutter] = {}
        self._closed: list[ShardPlan] = []
        self._count = 0

    def _name(self) -> str:
        key = f"s{self._count:06d}"
        self._count += 1
        return key

    def place(self, rows: Sequence[RequestRow]) -> list[RequestRow]:
        """``rows`` (in input order) queued in their shards."""
        cutters, closed = self._cutters, self._closed
        queued: list[RequestRow] = []
        for seq, cid, line, url, model, tokens, inputs, data, _, _ in rows:
            cutter = cutters.get((url, model))
            if cutter is None:
                cutter = cutters[url, model] = self._limits.cutter(url, model, name=self._name)
            if done := cutter.put(url, model, seq, len(data) + 1, tokens, inputs):
                closed.extend(done)
            key, pos = cutter.placed
            queued.append(RequestRow(seq, cid, line, url, model, tokens, inputs, data, key, pos))
        return queued

    def mark(self) -> _PlannerMark:
        """Where the planning stands, for :meth:`undo`."""
        cutters = {group: cutter.mark() for group, cutter in self._cutters.items()}
        return self._count, len(self._closed), cutters

    def undo(self, mark: _PlannerMark) -> None:
        """Take back every request placed since :meth:`mark`."""
        self._count, closed, marks = mark
        del self._closed[closed:]
        for group in list(self._cutters):
            if group in marks:
                self._cutters[group].undo(marks[group])
            else:
                del self._cutters[group]

    def finish(self) -> list[NewShard]:
        """Every shard, by key (the requests placed so far fill them)."""
        plans = self._closed + [p for cutter in self._cutters.values() for p in cutter.finish()]
        self._closed, self._cutters = [], {}
        return sorted(
            NewShard(p.key or "", p.url, p.model, len(p.seqs), p.size, p.tokens) for p in plans
        )


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
    now = ctx.clock.now()
    # On the real clock the pages are read and each intent is written in a worker
    # thread (a VirtualClock's auto_advance would take that wait for idleness).
    background = isinstance(ctx.clock, SystemClock)
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
                    background=background,
                )
            )

    for group in await journal.pending_groups():
        cutter = ctx.shard_limits.cutter(group.url, group.model)
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
