"""The calls of :class:`~aiobatch.BatchedOpenAI` and where they wait: :class:`_Call` (a
call and the future its caller awaits), :class:`_Awaiting` (what ``create()`` returns for
a plain call), :class:`_Group` (the calls of one ``(endpoint, model)`` queued for their
flush) and :class:`_Flush` (one batch run over flushed calls).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import attrs

from ._run import BatchRun


class _Owner(Protocol):
    """The client a call is of, as the call sees it."""

    def _plain_cancelled(self, call: _Call) -> None: ...


class _Call(asyncio.Future[Any]):
    """One call, and the future its caller awaits: resolved with the call's answer (or
    its error) when ``plain``; else with its ``(result line, batch id)``, which the
    caller's coroutine turns into the answer (a call with a deadline or a fallback).

    A plain call is awaited as it is: no task or coroutine of ours waits for it."""

    __slots__ = (
        "data",
        "home",
        "inputs",
        "key",
        "model",
        "owner",
        "plain",
        "slot",
        "tokens",
        "url",
    )

    key: str
    url: str
    model: str
    data: bytes
    tokens: int
    inputs: int
    plain: bool
    #: the client it is of (told when a plain call is cancelled)
    owner: _Owner
    #: where it waits: its group (queued), its flush (submitted), or nowhere.
    home: _Group | _Flush | None
    #: it holds one of ``max_pending``'s slots (a call of a resumed journal does not).
    slot: bool

    def __init__(
        self,
        key: str,
        url: str,
        model: str,
        data: bytes,
        tokens: int,
        inputs: int,
        *,
        plain: bool,
        owner: _Owner,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(loop=loop)
        self.owner = owner
        self.key = key
        self.url = url
        self.model = model
        self.data = data
        self.tokens = tokens
        self.inputs = inputs
        self.plain = plain
        self.home = None
        self.slot = False

    def cancel(self, msg: Any | None = None) -> bool:
        """Cancel the future; a plain call's client takes it out (no callback per call
        is needed for that)."""
        if not super().cancel(msg):
            return False
        if self.plain:
            self.owner._plain_cancelled(self)
        return True


class _Awaiting:
    """What ``create()`` returns for a plain call: a coroutine (as the SDK's ``create``
    returns one: awaited, gathered, run as a task) that waits for the call's future,
    with no frame of its own."""

    __slots__ = ("call",)

    def __init__(self, call: _Call) -> None:
        self.call = call

    def __await__(self) -> _Awaiting:
        return self

    def __iter__(self) -> _Awaiting:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        """Step it: the call's future while it is not done (the task waits for it),
        then its answer (or its error raised)."""
        call = self.call
        if not call.done():
            call._asyncio_future_blocking = True
            return call
        raise StopIteration(call.result())

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        """The caller's task was cancelled (or an error thrown in): the call is taken
        out, the error raised."""
        self.call.cancel()
        raise typ if val is None else val

    def close(self) -> None:
        """Nothing to close (the call stays queued; its answer is dropped)."""


@attrs.define(slots=True, eq=False)
class _Group:
    """The calls of one ``(endpoint, model)`` waiting for their flush."""

    url: str
    model: str
    calls: dict[str, _Call] = attrs.field(factory=dict)
    size: int = 0
    tokens: int = 0
    inputs: int = 0
    since: float = 0.0

    def add(self, call: _Call, now: float) -> None:
        if not self.calls:
            self.since = now
        self.calls[call.key] = call
        call.home = self
        self.size += len(call.data) + 1
        self.tokens += call.tokens
        self.inputs += call.inputs

    def remove(self, call: _Call) -> None:
        if self.calls.pop(call.key, None) is not None:
            self.size -= len(call.data) + 1
            self.tokens -= call.tokens
            self.inputs -= call.inputs

    def take(self) -> list[_Call]:
        calls = list(self.calls.values())
        for call in calls:
            call.home = None
        self.calls = {}
        self.size = self.tokens = self.inputs = 0
        return calls


@attrs.define(eq=False)
class _Flush:
    """One batch run over flushed calls (or a journal resumed on start)."""

    path: str
    run: BatchRun
    #: the calls that wait for its results.
    waiting: dict[str, _Call]
    #: keys of a resumed journal not final yet that nobody asked for (their answers are
    #: kept for the asker).
    expected: set[str] = attrs.field(factory=set)
    task: asyncio.Task[None] | None = None
    #: a call of it went online (``realtime_fallback``).
    fell_back: bool = False


async def _raise(error: BaseException) -> Any:
    """A call's error, raised where it is awaited (as the SDK's ``create`` raises)."""
    raise error


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and not deadline > 0:
        raise ValueError(f"deadline must be > 0 seconds, got {deadline!r}")
