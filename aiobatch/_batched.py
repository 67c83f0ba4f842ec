"""The coalescing client: ordinary awaited calls, gathered into batches, answered one by one.

:class:`BatchedOpenAI` has the shape of the official SDK's ``AsyncOpenAI`` for the
endpoints a batch can call (``chat.completions.create(**params)``, ``embeddings``,
``responses``, ``completions``, ``moderations``). Each call is checked at once (the run
layer's preflight), given a deterministic key, and queued in the group of its
``(endpoint, model)``. A group is flushed when it is full (the provider's lines, bytes,
embedding inputs, or ``RunConfig.enqueued_token_limits`` of its model), when its oldest
call has waited ``max_wait``, on :meth:`BatchedOpenAI.flush` and on close. A flush hands
its requests to one :class:`~aiobatch.BatchRun` with a journal file of its own (in the
client's journal folder), whose results resolve the awaiting calls.

Exactly once across reruns: a request's key is the hash of its canonical body plus its
occurrence among identical requests of this client. On start, the client reads the
journals already in its folder: a call whose key has a final result there is answered
from it, and a journal with unfinished requests is run again (its run adopts its
batches), so a harness run again after a crash pays for nothing twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import attrs

from ._aio import cancel_and_wait, sleep_or_set
from ._client import BatchClient
from ._convert import decode_result_line, to_wire, usage_tokens
from ._models import LineResponse, ResultError, ResultHTTPError, ResultLine, ResultSuccess
from ._retry import is_transient_status
from ._run import BatchEvent, BatchRun, RunConfig
from ._run._outcomes import CANCELLED_CODES
from ._run._preflight import Preflight, generated_custom_id
from ._run._progress import RunProgress
from ._run._records import PreparedRequest
from .errors import (
    AiobatchError,
    APIStatusError,
    BatchedTimeoutError,
    BatchEndedError,
    ClosedError,
    InputError,
    RequestFailedError,
    RequestNotRunError,
)

__all__ = ["BATCHED_ENDPOINTS", "BatchedOpenAI", "BatchedResult", "BatchedStats"]

logger = logging.getLogger("aiobatch.batched")

#: The endpoints a batched call may go to, and the official SDK type of each answer.
BATCHED_ENDPOINTS: Mapping[str, tuple[str, str]] = {
    "/v1/chat/completions": ("openai.types.chat", "ChatCompletion"),
    "/v1/embeddings": ("openai.types", "CreateEmbeddingResponse"),
    "/v1/responses": ("openai.types.responses", "Response"),
    "/v1/completions": ("openai.types", "Completion"),
    "/v1/moderations": ("openai.types", "ModerationCreateResponse"),
}

_JOURNAL_SUFFIX = ".journal"
#: The file (in the journal folder) of the answers of calls sent online.
ONLINE_ANSWERS = "online-answers.sqlite"
_ENDED_CODES = frozenset({"batch_expired", *CANCELLED_CODES})


@attrs.frozen(slots=True)
class BatchedResult:
    """A batched call's answer when the ``openai`` package is not used.

    Attributes:
        body: the response body, decoded JSON.
        status_code: the line's HTTP status.
        request_id: the line's request id, when the server gave one.
        custom_id: the request's key in its batch.
        batch_id: the batch it came from (None when it came from a journal without one).
    """

    body: Any
    status_code: int
    request_id: str | None
    custom_id: str
    batch_id: str | None

    @property
    def usage(self) -> Any:
        """The body's ``usage``, when it has one."""
        return self.body.get("usage") if isinstance(self.body, Mapping) else None


@attrs.frozen(slots=True)
class BatchedStats:
    """What a :class:`BatchedOpenAI` holds and did.

    Attributes:
        queued: calls waiting in a group for their flush.
        submitted: calls flushed into a batch run and waiting for their result.
        done: calls answered with a success.
        failed: calls answered with an error (a failed line, or a request not run).
        cancelled: calls whose caller was cancelled.
        reused: calls answered from a journal of an earlier run, without a new batch.
        flushes: batch runs started (including the ones resumed on start).
        online: calls sent to the online endpoint and waiting for its answer.
        fallbacks: calls sent to the online endpoint (``realtime_fallback``), at full
            price.
        duplicate_results: results that came from a batch for a request already
            answered online: paid twice (kept in the journal, never returned).
        duplicate_input_tokens, duplicate_output_tokens: the tokens of those results
            (their ``usage``), the duplicate cost.
    """

    queued: int
    submitted: int
    done: int
    failed: int
    cancelled: int
    reused: int
    flushes: int
    online: int = 0
    fallbacks: int = 0
    duplicate_results: int = 0
    duplicate_input_tokens: int = 0
    duplicate_output_tokens: int = 0

    @property
    def pending(self) -> int:
        """Calls not answered yet (queued, submitted or online)."""
        return self.queued + self.submitted + self.online


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
    owner: BatchedOpenAI
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
        owner: BatchedOpenAI,
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


class _Create:
    """``namespace.create(**params)`` for one endpoint."""

    def __init__(self, owner: BatchedOpenAI, url: str) -> None:
        self._owner = owner
        self._url = url

    def create(
        self,
        *,
        deadline: float | None = None,
        realtime_fallback: bool | None = None,
        **params: Any,
    ) -> Awaitable[Any]:
        """Send one request through a batch; await what this returns for its answer
        (``deadline`` and ``realtime_fallback``: this call's, instead of the client's;
        not sent). A plain function, as the SDK's ``async def create`` is used: a call
        without a deadline or fallback waits as a future, no coroutine."""
        return self._owner.request(
            self._url, params, deadline=deadline, realtime_fallback=realtime_fallback
        )


class _Chat:
    def __init__(self, owner: BatchedOpenAI) -> None:
        self.completions = _Create(owner, "/v1/chat/completions")


class BatchedOpenAI:
    """Awaitable calls with the shape of ``openai.AsyncOpenAI``, run through batches.

    Use it as an async context manager over a :class:`~aiobatch.BatchClient`::

        async with BatchedOpenAI(client, journal="harness-journals") as openai:
            answers = await asyncio.gather(
                *(openai.chat.completions.create(model="gpt-4o-mini", messages=m) for m in prompts)
            )

    Each call returns when its request's result is in: with the ``openai`` package
    installed, the SDK's own type (``ChatCompletion``, ``CreateEmbeddingResponse``,
    ``Response``, ``Completion``, ``ModerationCreateResponse``), else a
    :class:`BatchedResult`. A line that failed raises
    :class:`~aiobatch.errors.RequestFailedError` (status, code, message, request id); a
    request whose batches expired or were cancelled in every retry round raises
    :class:`~aiobatch.errors.BatchEndedError`, any other request that never ran
    :class:`~aiobatch.errors.RequestNotRunError`.

    Args:
        client: the client to send with (not closed by this one).
        journal: a folder for the journals (one SQLite file per flush), created when
            missing: calls answered there before (a crashed or finished earlier run of
            the same harness) are answered from it. None: a temporary folder, removed
            on close (nothing survives the process).
        max_wait: seconds the oldest call of a group waits before the group is flushed.
        max_pending: the most calls held (queued or submitted); beyond it, a call waits
            for room (and the groups are flushed at once).
        reuse: answer calls from the journals of earlier runs (True), or always send
            them (False: fresh samples; the folder's journals are left alone).
        config: the run settings of every flush (``order`` is always completion).
        sdk_types: return the ``openai`` SDK's types (None: when it is installed).
        on_progress: called with a :class:`~aiobatch.RunProgress` summed over every
            flush, whenever one changed (for :class:`~aiobatch.ProgressDisplay`).
        deadline: seconds a call waits for its result before it raises
            :class:`~aiobatch.errors.BatchedTimeoutError` (None: no limit); a call's
            ``create(deadline=...)`` overrides it.
        realtime_fallback: a call whose deadline passes is sent to the ordinary online
            endpoint instead (at full price) and answered from there; so is a call whose
            batches expired or were cancelled in every round. The online answer is
            journaled (a rerun gets it from the journal); a result its batch brings
            later is kept in the batch's journal, never returned, and counted in
            :meth:`stats` as a duplicate (``duplicate_results`` and their tokens). A
            batch whose every call went online is cancelled. A call's
            ``create(realtime_fallback=...)`` overrides it.
        on_event: called with a :class:`~aiobatch.BatchCreated` when a flush's batch is
            open on the server (its id, endpoint, model and request count) and a
            :class:`~aiobatch.BatchEnded` when it ends (its status and request counts);
            must be quick (its exceptions are logged, never propagated).

    Raises:
        ValueError: ``max_wait`` is negative or ``max_pending`` is not positive.
    """

    def __init__(
        self,
        client: BatchClient,
        *,
        journal: str | os.PathLike[str] | None = None,
        max_wait: float = 30.0,
        max_pending: int = 100_000,
        reuse: bool = True,
        config: RunConfig | None = None,
        sdk_types: bool | None = None,
        on_progress: Callable[[RunProgress], None] | None = None,
        on_event: Callable[[BatchEvent], None] | None = None,
        deadline: float | None = None,
        realtime_fallback: bool = False,
    ) -> None:
        if not max_wait >= 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait!r}")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive int, got {max_pending!r}")
        _check_deadline(deadline)
        self._deadline = deadline
        self._fallback = realtime_fallback
        self._client = client
        self._clock = client.clock
        self._folder = os.fspath(journal) if journal is not None else None
        self._temp: str | None = None
        self._max_wait = float(max_wait)
        self._reuse = reuse
        base = config if config is not None else RunConfig()
        self._config = attrs.evolve(base, order="completion")
        limits = client.provider.limits
        self._max_lines = base.max_lines or limits.max_lines
        self._max_bytes = base.max_bytes or limits.max_bytes
        self._max_inputs = limits.max_embedding_inputs
        self._id_pattern = limits.custom_id_pattern
        self._check = self._new_check()
        self._sdk = _sdk_available() if sdk_types is None else sdk_types
        self._on_progress = on_progress
        self._on_event = on_event
        #: slots of ``max_pending`` free, and the calls waiting for one
        self._free = max_pending
        self._room_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._groups: dict[tuple[str, str], _Group] = {}
        self._occurrences: dict[str, int] = {}
        self._known: dict[str, tuple[bytes | ResultLine, str | None]] = {}
        self._resuming: dict[str, _Flush] = {}
        self._flushes: set[_Flush] = set()
        self._progress: dict[str, RunProgress] = {}
        self._wake = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None
        self._state = "new"
        self._queued = self._submitted = 0
        self._done = self._failed = self._cancelled = self._reused = self._started = 0
        self._online = self._fallbacks = 0
        self._duplicates = self._duplicate_in = self._duplicate_out = 0
        #: keys whose call is being answered online -> the batch's result, if it came
        #: meanwhile.
        self._falling: dict[str, tuple[ResultLine, str | None] | None] = {}
        #: keys with a journaled online answer (a batch's result for one is a duplicate).
        self._online_keys: set[str] = set()
        self._answers: _OnlineAnswers | None = None
        self._online_idle = asyncio.Event()
        self._online_idle.set()
        self.chat = _Chat(self)
        self.embeddings = _Create(self, "/v1/embeddings")
        self.responses = _Create(self, "/v1/responses")
        self.completions = _Create(self, "/v1/completions")
        self.moderations = _Create(self, "/v1/moderations")

    # --- life ----------------------------------------------------------------------------

    async def __aenter__(self) -> BatchedOpenAI:
        await self.start()
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        await self.aclose(cancel=exc_type is not None and exc_type is not GeneratorExit)

    async def start(self) -> None:
        """Open the journal folder: index the answers already there, resume the journals
        left unfinished (their batches are adopted, not made again). Idempotent."""
        if self._state != "new":
            return
        if self._folder is None:
            self._temp = tempfile.mkdtemp(prefix="aiobatch-batched-")
        else:
            os.makedirs(self._folder, exist_ok=True)
            if self._reuse:
                for path, pending in self._index_folder():  # a few reads, once
                    # a request answered online is not run again
                    pending -= self._online_keys
                    if pending:
                        self._start_flush(path, None, [], expected=pending)
        self._state = "open"
        self._ticker = asyncio.ensure_future(self._tick())

    def _index_folder(self) -> list[tuple[str, set[str]]]:
        """Read every journal of the folder: its final results go into ``_known``; the
        journals with requests still open are returned, with those requests' keys."""
        assert self._folder is not None
        unfinished: list[tuple[str, set[str]]] = []
        for name in sorted(os.listdir(self._folder)):
            if not name.endswith(_JOURNAL_SUFFIX):
                continue
            path = os.path.join(self._folder, name)
            try:
                finals, open_keys = _read_journal(path)
            except sqlite3.DatabaseError as exc:
                logger.warning("batched: skipping %s, which cannot be read: %s", path, exc)
                continue
            self._known.update(finals)
            if open_keys:
                unfinished.append((path, open_keys))
        online = os.path.join(self._folder, ONLINE_ANSWERS)
        if os.path.exists(online):
            try:
                answers = _read_online_answers(online)
            except sqlite3.DatabaseError as exc:
                logger.warning("batched: skipping %s, which cannot be read: %s", online, exc)
            else:
                self._known.update(answers)  # the answer the caller got wins
                self._online_keys.update(answers)
        return unfinished

    async def flush(self) -> None:
        """Flush every group now (their batch runs start; this does not wait for them)."""
        self._flush_all()

    def _flush_all(self) -> None:
        for group in list(self._groups.values()):
            self._flush_group(group)

    async def aclose(self, *, cancel: bool = False) -> None:
        """Close: flush the groups and wait for every call's answer (``cancel=False``),
        or cancel the open batches and fail the calls still waiting with
        :class:`~aiobatch.errors.ClosedError` (``cancel=True``). No call is left
        hanging either way. The client given is not closed."""
        if self._state == "closed":
            return
        if self._state == "new":
            self._state = "closed"
            return
        self._state = "closing"
        if cancel:
            for group in list(self._groups.values()):
                for call in group.take():
                    self._fail(call, ClosedError("the batched client was closed with cancel=True"))
            for flush in list(self._flushes):
                flush.run.cancel()
        else:
            await self.flush()
        while self._flushes:
            tasks = [flush.task for flush in self._flushes if flush.task is not None]
            await asyncio.wait(tasks)
        await self._online_idle.wait()
        if self._answers is not None:
            self._answers.close()
        self._state = "closed"
        if self._ticker is not None:
            await cancel_and_wait([self._ticker])
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)

    # --- observing -----------------------------------------------------------------------

    def stats(self) -> BatchedStats:
        """Counts of the calls held and answered."""
        return BatchedStats(
            queued=self._queued,
            submitted=self._submitted,
            done=self._done,
            failed=self._failed,
            cancelled=self._cancelled,
            reused=self._reused,
            flushes=self._started,
            online=self._online,
            fallbacks=self._fallbacks,
            duplicate_results=self._duplicates,
            duplicate_input_tokens=self._duplicate_in,
            duplicate_output_tokens=self._duplicate_out,
        )

    def progress(self) -> RunProgress:
        """Every flush's :class:`~aiobatch.RunProgress`, summed (the state is this
        client's: ``running`` while open, ``done`` once closed)."""
        batches: dict[str, int] = {}
        total = succeeded = failed = retrying = round_ = 0
        elapsed = 0.0
        for snapshot in self._progress.values():
            total += snapshot.total
            succeeded += snapshot.succeeded
            failed += snapshot.failed
            retrying += snapshot.retrying
            round_ = max(round_, snapshot.round)
            elapsed = max(elapsed, snapshot.elapsed)
            for status, count in snapshot.batches.items():
                batches[status] = batches.get(status, 0) + count
        state = {"closed": "done", "closing": "stopping"}.get(self._state, "running")
        return RunProgress(
            total=total + self._queued,
            succeeded=succeeded,
            failed=failed,
            retrying=retrying,
            batches=batches,
            round=round_,
            elapsed=elapsed,
            state=state,
        )

    # --- calls ---------------------------------------------------------------------------

    def request(
        self,
        url: str,
        body: Mapping[str, Any],
        *,
        deadline: float | None = None,
        realtime_fallback: bool | None = None,
    ) -> Awaitable[Any]:
        """Send one request body to ``url`` (one of :data:`BATCHED_ENDPOINTS`) through a
        batch; await what this returns for what the endpoint's ``create`` returns. The
        errors below are raised when it is awaited (bad input is found at once: nothing
        is queued).

        Raises:
            InputError: the endpoint is not batchable, or the body is one a batch
                refuses (``stream=True``, no model, larger than a batch); raised at
                once, nothing is queued.
            ClosedError: the client is not open.
            RequestFailedError, BatchEndedError, RequestNotRunError: the request's
                line failed (or its online answer was an HTTP error).
            BatchedTimeoutError: ``deadline`` (or the client's) passed first, without
                ``realtime_fallback``.
            TransportError: with ``realtime_fallback``, the online request could not
                be sent (after the client's retries).
        """
        fallback = self._fallback if realtime_fallback is None else realtime_fallback
        try:
            _check_deadline(deadline)
            if deadline is None:
                deadline = self._deadline
            if self._state != "open":
                raise ClosedError(
                    f"the batched client is {self._state}; use it inside 'async with'"
                )
            if url not in BATCHED_ENDPOINTS:
                raise InputError(
                    f"{url} is not an endpoint batches can call; use one of "
                    + ", ".join(BATCHED_ENDPOINTS)
                )
            call = self._prepare(url, body, plain=deadline is None and not fallback)
        except (AiobatchError, ValueError) as exc:
            return _raise(exc)
        del body  # encoded in the call: the caller's objects are not held while it waits
        known = self._known.pop(call.key, None)
        if known is not None:
            self._reused += 1
            line = known[0]
            if not isinstance(line, (ResultSuccess, ResultHTTPError, ResultError)):
                line = decode_result_line(line, what=f"the journaled result of {call.key}")
            call.plain = True
            self._resolve(call, line, known[1])
            return _Awaiting(call)
        resumed = self._resuming.pop(call.key, None)
        if resumed is not None:
            resumed.expected.discard(call.key)
            resumed.waiting[call.key] = call
            call.home = resumed
            self._submitted += 1
        elif self._free and not self._room_waiters:
            self._free -= 1
            self._hold(call)
        else:
            return self._after_room(call, deadline, fallback)
        if call.plain:
            return _Awaiting(call)
        return self._await(call, deadline, fallback)

    def _hold(self, call: _Call) -> None:
        """Queue a call that took a slot of ``max_pending``."""
        call.slot = True
        self._enqueue(call)
        if not self._free:
            self._flush_all()  # max_pending reached: the held calls go out now

    async def _after_room(self, call: _Call, deadline: float | None, fallback: bool) -> Any:
        """Wait for a slot of ``max_pending``, queue the call, and await it."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._room_waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # handed over just now: passed on
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._room_waiters.remove(waiter)
        if self._state != "open":
            self._release_slot()
            raise ClosedError("the batched client was closed while this call waited for room")
        self._hold(call)
        if call.plain:
            return await call
        return await self._await(call, deadline, fallback)

    def _release_slot(self) -> None:
        """A slot of ``max_pending`` free again: to the first call waiting for one."""
        while self._room_waiters:
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    def _plain_cancelled(self, call: _Call) -> None:
        """A plain call's caller cancelled it: take it out."""
        self._withdraw(call)
        self._cancelled += 1

    async def _await(self, call: _Call, deadline: float | None, fallback: bool) -> Any:
        """Await a call with a deadline or a fallback: its answer."""
        try:
            if deadline is not None and not await self._within(call, deadline):
                if fallback:
                    return await self._go_online(call)
                self._withdraw(call)
                self._failed += 1
                raise BatchedTimeoutError(
                    f"request {call.key} ({call.url}, {call.model}) had no result after its "
                    f"deadline of {deadline:g} s; if it was sent, its batch keeps it and its "
                    "result goes to the journal",
                    custom_id=call.key,
                    url=call.url,
                    model=call.model,
                    deadline=deadline,
                )
            line, batch_id = await call
            if fallback and isinstance(line, ResultError) and line.error.code in _ENDED_CODES:
                return await self._go_online(call)  # its batches expired or were cancelled
        except asyncio.CancelledError:
            self._withdraw(call)
            self._cancelled += 1
            raise
        return self._answer(call, line, batch_id)

    def _resolve(self, call: _Call, line: ResultLine, batch_id: str | None) -> None:
        """Resolve a call's future: a plain call's with its answer or its error, any
        other's with its result line (its coroutine answers)."""
        if call.done():
            return
        if not call.plain:
            call.set_result((line, batch_id))
            return
        try:
            answer = self._answer(call, line, batch_id)
        except Exception as exc:
            call.set_exception(exc)
        else:
            call.set_result(answer)

    def _prepare(self, url: str, body: Mapping[str, Any], *, plain: bool) -> _Call:
        """Check the request as a batch line and give it its key (raises at once)."""
        base = generated_custom_id("POST", url, body)
        occurrence = self._occurrences.get(base, 0) + 1
        key = f"{base}-{occurrence}"
        check = self._check
        prepared = check.check_item(
            {"custom_id": key, "method": "POST", "url": url, "body": body}, 1
        )
        if prepared is None:  # its problems are raised; the next call gets a fresh check
            self._check = self._new_check()
            check.finish()
        assert prepared is not None
        assert prepared.model is not None
        limit = self._config.enqueued_token_limits.get(prepared.model)
        if limit is not None and prepared.tokens > limit:
            raise InputError(
                f"the request has about {prepared.tokens:,} prompt tokens; at most {limit:,} "
                f"may be enqueued for {prepared.model} (RunConfig.enqueued_token_limits)"
            )
        if prepared.inputs > self._max_inputs:
            raise InputError(
                f"the request has {prepared.inputs:,} embedding inputs; a batch takes at most "
                f"{self._max_inputs:,}"
            )
        self._occurrences[base] = occurrence
        return _Call(
            key,
            url,
            prepared.model,
            prepared.data,
            prepared.tokens,
            prepared.inputs,
            plain=plain,
            owner=self,
            loop=asyncio.get_running_loop(),
        )

    def _new_check(self) -> Preflight:
        """The check of the calls' request lines (one for every call while they pass:
        it remembers no id, so it holds nothing per call)."""
        return Preflight(
            max_line_bytes=self._max_bytes,
            custom_id_pattern=self._id_pattern,
            remember_ids=False,
        )

    def _enqueue(self, call: _Call) -> None:
        model = call.model
        group = self._groups.get((call.url, model))
        if group is None:
            group = self._groups[(call.url, model)] = _Group(call.url, model)
        limit = self._config.enqueued_token_limits.get(model)
        if group.calls and (
            len(group.calls) + 1 > self._max_lines
            or group.size + len(call.data) + 1 > self._max_bytes
            or group.inputs + call.inputs > self._max_inputs
            or (limit is not None and group.tokens + call.tokens > limit)
        ):
            self._flush_group(group)
        first = not group.calls
        group.add(call, self._clock.monotonic())
        self._queued += 1
        if len(group.calls) >= self._max_lines:
            self._flush_group(group)
        elif first:
            self._wake.set()

    async def _within(self, future: asyncio.Future[Any], seconds: float) -> bool:
        """Whether ``future`` is done within ``seconds`` on the client's clock."""
        timer = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait([future, timer], return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait([timer])
        return future.done()

    def _withdraw(self, call: _Call) -> None:
        """Take a call nobody waits for any more (or that goes online) out of its group
        or its flush: a queued call is never sent; a sent call's result is dropped when
        it comes (its journal keeps it)."""
        home = call.home
        if home is None:
            return
        call.home = None
        if isinstance(home, _Group):
            home.remove(call)
            self._queued -= 1
        elif home.waiting.pop(call.key, None) is not None:
            self._submitted -= 1
        self._release_of(call)
        call.cancel()

    async def _go_online(self, call: _Call) -> Any:
        """Answer a call from the online endpoint (``realtime_fallback``): its journaled
        answer, or its error raised. A result its batch brings meanwhile or later is a
        duplicate; when the online request fails, such a result answers instead."""
        flush = call.home if isinstance(call.home, _Flush) else None
        self._falling[call.key] = None
        self._withdraw(call)
        self._fallbacks += 1
        self._online += 1
        self._online_idle.clear()
        if flush is not None:
            flush.fell_back = True
            self._cancel_if_unwanted(flush)
        try:
            line, final = await self._send_online(call)
            if final:
                self._journal_online(call, line)
        except asyncio.CancelledError:
            self._falling.pop(call.key, None)
            raise
        except Exception:
            late = self._falling.pop(call.key, None)
            if late is not None and not isinstance(late[0], ResultError):
                return self._answer(call, *late)  # the batch answered after all
            self._failed += 1
            raise
        finally:
            self._online -= 1
            if not self._online:
                self._online_idle.set()
        late = self._falling.pop(call.key, None)
        if late is not None:
            if not final and not isinstance(late[0], ResultError):
                return self._answer(call, *late)  # a batch answer beats a retryable error
            self._count_duplicate(late[0])
        return self._answer(call, line, None)

    async def _send_online(self, call: _Call) -> tuple[ResultLine, bool]:
        """The call's request sent to the online endpoint (retried as the client
        retries): its answer as a result line, and whether that is final (a success, or
        an error that sending again would not change)."""
        body = json.loads(call.data)["body"]
        try:
            response = await self._client.send_online(call.url, body)
        except APIStatusError as exc:
            answer = LineResponse(
                status_code=exc.status_code, body=exc.body, request_id=exc.request_id
            )
            final = not is_transient_status(exc.status_code)
            return ResultHTTPError(custom_id=call.key, response=answer), final
        return ResultSuccess(custom_id=call.key, response=response), True

    def _journal_online(self, call: _Call, line: ResultLine) -> None:
        """Keep an online answer in the journal folder (before the caller gets it)."""
        if self._answers is None:
            folder = self._folder if self._folder is not None else self._temp
            assert folder is not None
            self._answers = _OnlineAnswers(os.path.join(folder, ONLINE_ANSWERS))
        data = json.dumps(to_wire(line), separators=(",", ":"), ensure_ascii=False).encode()
        self._answers.add(call.key, call.url, data, self._clock.now())
        self._online_keys.add(call.key)

    def _count_duplicate(self, line: ResultLine) -> None:
        """A batch's result for a request answered online: paid twice."""
        if isinstance(line, ResultError):
            return  # it did not run: no cost
        self._duplicates += 1
        if isinstance(line, ResultSuccess):
            used_in, used_out = usage_tokens(line.response.body)
            self._duplicate_in += used_in
            self._duplicate_out += used_out
        logger.info(
            "batched: request %s, answered online, also came from its batch (a duplicate "
            "cost; kept in the journal, not returned)",
            line.custom_id,
        )

    def _cancel_if_unwanted(self, flush: _Flush) -> None:
        """Cancel a flush's batch run when no call waits for it any more (a batch cannot
        drop single lines)."""
        task = flush.task
        if not flush.waiting and not flush.expected and task is not None and not task.done():
            logger.info("batched: every call of %s went online; cancelling it", flush.path)
            flush.run.cancel()

    def _release_of(self, call: _Call) -> None:
        if call.slot:
            call.slot = False
            self._release_slot()

    def _answer(self, call: _Call, line: ResultLine, batch_id: str | None) -> Any:
        """The call's return value, or its error raised."""
        if isinstance(line, ResultSuccess):
            self._done += 1
            return self._result(call, line, batch_id)
        self._failed += 1
        if isinstance(line, ResultHTTPError):
            raise _status_error(call, line, batch_id)
        assert isinstance(line, ResultError)
        code = line.error.code
        error_class = BatchEndedError if code in _ENDED_CODES else RequestNotRunError
        raise error_class(
            line.error.message or "no message",
            code=code,
            custom_id=call.key,
            batch_id=batch_id,
        )

    def _result(self, call: _Call, line: ResultSuccess, batch_id: str | None) -> Any:
        response = line.response
        if self._sdk and isinstance(response.body, dict):
            module, name = BATCHED_ENDPOINTS[call.url]
            sdk_type: Any = getattr(importlib.import_module(module), name)
            return sdk_type.construct(**response.body)
        return BatchedResult(
            body=response.body,
            status_code=response.status_code,
            request_id=response.request_id,
            custom_id=call.key,
            batch_id=batch_id,
        )

    def _fail(self, call: _Call, error: BaseException) -> None:
        self._queued -= 1
        self._release_of(call)
        if not call.done():
            call.set_exception(error)
            self._failed += 1

    # --- flushing ------------------------------------------------------------------------

    def _flush_group(self, group: _Group) -> None:
        calls = group.take()
        if not calls:
            return
        self._queued -= len(calls)
        self._submitted += len(calls)
        folder = self._folder if self._folder is not None else self._temp
        assert folder is not None
        name = f"flush-{int(self._clock.now())}-{uuid.uuid4().hex[:12]}{_JOURNAL_SUFFIX}"
        self._start_flush(os.path.join(folder, name), calls, calls, expected=set())

    def _start_flush(
        self, path: str, source: list[_Call] | None, calls: list[_Call], *, expected: set[str]
    ) -> None:
        # PreparedRequest: the run takes them as they are, made as it reads them (a
        # list would hold them all for as long as the run goes)
        lines: Iterator[Any] | None = None
        if source is not None:
            lines = (
                PreparedRequest(
                    seq=0,
                    url=call.url,
                    model=call.model,
                    tokens=call.tokens,
                    inputs=call.inputs,
                    custom_id=call.key,
                    data=call.data,
                )
                for call in source
            )
        key = path

        def progress(snapshot: RunProgress) -> None:
            self._progress[key] = snapshot
            if self._on_progress is not None:
                self._on_progress(self.progress())

        run = BatchRun(
            self._client,
            lines,
            journal=path,
            config=self._config,
            on_progress=progress,
            on_batch=self._on_event,
        )
        flush = _Flush(path, run, {call.key: call for call in calls}, expected)
        for call in calls:
            call.home = flush
        for pending in expected:
            self._resuming[pending] = flush
        self._flushes.add(flush)
        self._started += 1
        flush.task = asyncio.ensure_future(self._drive(flush))

    async def _drive(self, flush: _Flush) -> None:
        """Run one flush and resolve its calls as their results arrive."""
        runner = asyncio.ensure_future(flush.run.run())
        error: BaseException | None = None
        try:
            async for result in flush.run.results():
                self._settle(flush, result.custom_id, result.result, result.batch_id)
            await runner
        except Exception as exc:
            error = exc
            logger.error("batched: the batch run of %s failed: %s", flush.path, exc)
        except asyncio.CancelledError:
            await cancel_and_wait([runner])
            raise
        finally:
            self._flushes.discard(flush)
            leftover = list(flush.waiting.values())
            flush.waiting.clear()
            for pending in flush.expected:
                self._resuming.pop(pending, None)
            for call in leftover:
                call.home = None
                self._submitted -= 1
                self._release_of(call)
                if not call.done():
                    if error is None:
                        error = ClosedError(
                            "the batched client was closed with cancel=True before this "
                            "request's result came; its journal keeps it for the next run"
                        )
                    call.set_exception(error)

    def _settle(self, flush: _Flush, key: str, line: ResultLine, batch_id: str | None) -> None:
        call = flush.waiting.pop(key, None)
        if call is None:
            if key in self._falling:  # its online answer is on its way
                if self._falling[key] is None:
                    self._falling[key] = (line, batch_id)
            elif key in self._online_keys:  # answered online: paid twice
                self._count_duplicate(line)
                if key in flush.expected:
                    flush.expected.discard(key)
                    self._resuming.pop(key, None)
            elif key in flush.expected:  # resumed, nobody asked yet: kept for the asker
                flush.expected.discard(key)
                self._resuming.pop(key, None)
                self._known[key] = (line, batch_id)
            return
        call.home = None
        self._submitted -= 1
        self._release_of(call)
        self._resolve(call, line, batch_id)

    async def _tick(self) -> None:
        """Flush each group whose oldest call has waited ``max_wait``."""
        while True:
            now = self._clock.monotonic()
            wait: float | None = None
            for group in list(self._groups.values()):
                if not group.calls:
                    continue
                due = group.since + self._max_wait
                if due <= now:
                    self._flush_group(group)
                else:
                    wait = due - now if wait is None else min(wait, due - now)
            self._wake.clear()
            await sleep_or_set(self._clock, wait, self._wake)


async def _raise(error: BaseException) -> Any:
    """A call's error, raised where it is awaited (as the SDK's ``create`` raises)."""
    raise error


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and not deadline > 0:
        raise ValueError(f"deadline must be > 0 seconds, got {deadline!r}")


def _sdk_available() -> bool:
    try:
        importlib.import_module("openai.types.chat")
    except ImportError:
        return False
    return True


def _status_error(call: _Call, line: ResultHTTPError, batch_id: str | None) -> RequestFailedError:
    response = line.response
    body = response.body
    envelope = body.get("error") if isinstance(body, dict) else None
    envelope = envelope if isinstance(envelope, dict) else {}
    message = envelope.get("message")
    return RequestFailedError(
        message if isinstance(message, str) else f"the request failed with {response.status_code}",
        status_code=response.status_code,
        custom_id=call.key,
        batch_id=batch_id,
        request_id=response.request_id,
        body=body,
        error_type=_str_or_none(envelope.get("type")),
        error_code=_str_or_none(envelope.get("code")),
        error_param=_str_or_none(envelope.get("param")),
        url=call.url,
    )


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class _OnlineAnswers:
    """The answers of calls sent online, by key, in a SQLite file of the journal folder
    (written in the loop's thread, as the run's journal is: one small commit each)."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS answers (custom_id TEXT PRIMARY KEY, url TEXT NOT NULL, "
            "data BLOB NOT NULL, answered_at REAL NOT NULL)"
        )

    def add(self, key: str, url: str, data: bytes, at: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO answers (custom_id, url, data, answered_at) "
            "VALUES (?, ?, ?, ?)",
            (key, url, data, at),
        )

    def close(self) -> None:
        self._db.close()


def _read_online_answers(path: str) -> dict[str, tuple[bytes, str | None]]:
    """The online answers kept in ``path``, by key (read-only)."""
    db = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True)
    try:
        return {
            str(key): (bytes(data), None)
            for key, data in db.execute("SELECT custom_id, data FROM answers")
        }
    finally:
        db.close()


def _read_journal(path: str) -> tuple[dict[str, tuple[bytes, str | None]], set[str]]:
    """A flush journal's final results by key, and its keys without one (read-only)."""
    db = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True)
    try:
        finals: dict[str, tuple[bytes, str | None]] = {}
        for key, data, batch_id in db.execute(
            "SELECT q.custom_id, r.data, r.batch_id FROM results r JOIN requests q ON q.seq = r.seq"
        ):
            finals[str(key)] = (bytes(data), batch_id)
        open_keys = {
            str(key)
            for (key,) in db.execute(
                "SELECT custom_id FROM requests WHERE seq NOT IN (SELECT seq FROM results)"
            )
        }
        return finals, open_keys
    finally:
        db.close()
