"""The coalescing of :class:`~aiobatch.BatchedOpenAI`: when a group of calls is flushed
(full by the provider's limits or ``RunConfig.enqueued_token_limits``, or its oldest call
waited ``max_wait``), the batch run of each flush and its journal file, and how its
results resolve the calls waiting for them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ._aio import cancel_and_wait, sleep_or_set
from ._batched_calls import _Call, _Flush, _Group
from ._client import BatchClient
from ._clock import Clock
from ._models import ResultLine
from ._run import BatchEvent, BatchRun, RunConfig
from ._run._progress import RunProgress
from ._run._records import PreparedRequest
from ._run._sqlite import JournalFile
from .errors import ClosedError

logger = logging.getLogger("aiobatch.batched")

_JOURNAL_SUFFIX = ".journal"


class _Flushing:
    """Queuing calls in groups and running their flushes (a mixin of the client)."""

    _client: BatchClient
    _clock: Clock
    _config: RunConfig
    _folder: str | None
    _temp: str | None
    _max_wait: float
    _max_lines: int
    _max_bytes: int
    _max_inputs: int
    _on_progress: Callable[[RunProgress], None] | None
    _on_event: Callable[[BatchEvent], None] | None
    _groups: dict[tuple[str, str], _Group]
    _known: dict[str, tuple[bytes | ResultLine, str | None]]
    _resuming: dict[str, _Flush]
    _flushes: set[_Flush]
    _progress: dict[str, RunProgress]
    _wake: asyncio.Event
    _queued: int
    _submitted: int
    _started: int
    _falling: dict[str, tuple[ResultLine, str | None] | None]
    _online_keys: set[str]

    if TYPE_CHECKING:

        def progress(self) -> RunProgress: ...

        def _release_of(self, call: _Call) -> None: ...

        def _resolve(self, call: _Call, line: ResultLine, batch_id: str | None) -> None: ...

        def _count_duplicate(self, line: ResultLine) -> None: ...

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


def _read_journal(journal: JournalFile) -> tuple[dict[str, tuple[bytes, str | None]], set[str]]:
    """A flush journal's final results by key, and its keys without one.

    Raises:
        JournalError: its results cannot be read (their ``-data`` file is missing or
            cut short, the file is damaged).
    """
    finals: dict[str, tuple[bytes, str | None]] = {}
    after = -1
    while rows := journal.result_rows(order="completion", after=after):
        after = rows[-1].n
        finals.update((row.custom_id, (row.data, row.batch_id)) for row in rows)
    return finals, journal.ids_without_result()
