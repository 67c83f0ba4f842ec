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

This module owns the client class, its SDK-shaped namespaces, its life (start, flush,
close), its counts and the path of one call (checked, keyed, held, awaited, withdrawn).
The rest is in sibling modules: ``_batched_calls`` (the call objects and where they wait),
``_batched_groups`` (the coalescing and the flushes' batch runs), ``_batched_online`` (the
realtime fallback and its online-answers file) and ``_batched_results`` (the answers:
SDK types, :class:`BatchedResult`, typed errors, :class:`BatchedStats`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs

from ._aio import cancel_and_wait
from ._batched_calls import _Awaiting, _Call, _check_deadline, _Flush, _Group, _raise
from ._batched_groups import _JOURNAL_SUFFIX, _Flushing, _read_journal
from ._batched_online import ONLINE_ANSWERS, _Online, _OnlineAnswers, _read_online_answers
from ._batched_results import (
    _ENDED_CODES,
    BATCHED_ENDPOINTS,
    BatchedResult,
    BatchedStats,
    _Answering,
    _sdk_available,
)
from ._client import BatchClient
from ._convert import decode_result_line
from ._models import ResultError, ResultHTTPError, ResultLine, ResultSuccess
from ._run import BatchEvent, RunConfig
from ._run._line_checks import generated_custom_id
from ._run._preflight import Preflight
from ._run._progress import RunProgress
from ._run._sqlite import JournalFile
from .errors import (
    AiobatchError,
    BatchedTimeoutError,
    ClosedError,
    InputError,
    JournalError,
)

__all__ = ["BATCHED_ENDPOINTS", "BatchedOpenAI", "BatchedResult", "BatchedStats"]

logger = logging.getLogger("aiobatch.batched")


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


class BatchedOpenAI(_Answering, _Online, _Flushing):
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
                journal = JournalFile(path, readonly=True)
            except (sqlite3.DatabaseError, JournalError) as exc:
                logger.warning("batched: skipping %s, which cannot be read: %s", path, exc)
                continue
            with journal:
                # Not skipped once open: the requests of a journal whose results cannot
                # be read (their -data file lost) would be sent, and paid, again.
                finals, open_keys = _read_journal(journal)
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

    def _release_of(self, call: _Call) -> None:
        if call.slot:
            call.slot = False
            self._release_slot()

    def _fail(self, call: _Call, error: BaseException) -> None:
        self._queued -= 1
        self._release_of(call)
        if not call.done():
            call.set_exception(error)
            self._failed += 1
