"""The simulated world of the fake service: files, batches and their lifecycle on a clock.

Theory of operation
-------------------
Nothing runs in the background. Each batch has at most one *next event* (end of
validation, end of processing, expiry, end of finalizing, end of cancelling), kept in
one heap for the whole service. Before answering a request the service fires, in time
order, every event due by the clock's ``now()``; between events a batch's progress is
a pure function of time (line *i* of an ``in_progress`` batch is done ``(i + 1) /
rate`` after ``in_progress_at``, where ``rate`` is ``lines_per_second`` or the batch's
own speed from ``processing_seconds``, fixed when it starts processing). Firing in
global time order keeps the batches consistent with each other (the enqueued-token
limit sees exactly the batches running at that instant), and ``now`` never moves
backwards, so no status, count or timestamp ever does.

Line results come from the responder the first time they are needed (an observed
count, a cancel, the end of processing) and are cached, so a line's answer never
changes. When a batch ends its result files are written and its per-line state is
dropped, so a finished batch costs only its result files.

Every method here expects the caller to hold :attr:`Engine.lock`.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
import math
import random
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from .._clock import Clock
from .._convert import to_wire
from .._lifecycle import TERMINAL, BatchStatus
from .._models import (
    Batch,
    BatchError,
    BatchErrors,
    BatchRequest,
    BatchUsage,
    File,
    InputTokensDetails,
    LineError,
    LineResponse,
    OutputTokensDetails,
    RequestCounts,
    ResultError,
    ResultHTTPError,
    ResultSuccess,
)
from ._config import FakeConfig
from ._responder import _LINE_TIME, Responder, estimate_tokens
from ._validate import VALIDATION_MESSAGES, ParsedInput, parse_input
from ._wire import http_error_body, json_bytes, stable_hex

__all__ = ["BatchRecord", "CancelRefused", "Engine", "FileRecord"]

_S = BatchStatus

#: Messages of the error lines written for requests that never ran.
NOT_RUN_MESSAGES: Mapping[str, str] = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
}


@attrs.define(eq=False, slots=True)
class FileRecord:
    """A stored file."""

    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: float
    expires_at: int | None
    size: int = 0
    deleted: bool = False

    def model(self) -> File:
        """The wire model of this file."""
        return File(
            id=self.id,
            bytes=self.size,
            created_at=int(self.created_at),
            filename=self.filename,
            purpose=self.purpose,
            status="processed",
            expires_at=self.expires_at,
            status_details=None,
        )


@attrs.define(eq=False, slots=True)
class BatchRecord:
    """The service-side state of one batch."""

    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: Mapping[str, str] | None
    output_expiry_seconds: int | None
    input_content: bytes
    created_at: float
    expires_at: float
    forced_error: BatchError | None = None
    #: the terminal status a forced error ends the batch in (Portkey has two of its own).
    forced_status: BatchStatus = _S.FAILED
    status: BatchStatus = _S.VALIDATING
    model: str | None = None
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    errors: tuple[BatchError, ...] | None = None
    requests: tuple[BatchRequest, ...] = ()
    outcomes: list[tuple[int, Any]] = attrs.field(factory=list)
    #: lines processed when processing stopped early (cancel, expiry); None otherwise.
    stop_at: int | None = None
    total: int = 0
    #: lines per second in ``in_progress``, fixed when the batch starts processing
    #: (``config.lines_per_second``, or from ``config.processing_seconds``); 0 = never.
    rate: float = 0.0
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    enqueued_tokens: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    version: int = 0
    #: the wire form of the last snapshot, and the (version, lines done) it was made at.
    wire: dict[str, Any] | None = None
    wire_key: tuple[int, int] = (-1, -1)


class CancelRefused(Exception):
    """The batch has already finished and cannot be cancelled."""

    def __init__(self, status: BatchStatus) -> None:
        super().__init__(status.value)
        self.status = status


def _ts(value: float | None) -> int | None:
    return None if value is None else math.floor(value)


def _as_int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _usage_of(body: Any) -> tuple[int, int, int, int]:
    """(input, cached, output, reasoning) tokens from a response body's ``usage``."""
    usage = body.get("usage") if isinstance(body, Mapping) else None
    if not isinstance(usage, Mapping):
        return 0, 0, 0, 0
    given_in = usage.get("prompt_tokens", usage.get("input_tokens"))
    given_out = usage.get("completion_tokens", usage.get("output_tokens"))
    details_in = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    details_out = usage.get("completion_tokens_details") or usage.get("output_tokens_details")
    cached = details_in.get("cached_tokens") if isinstance(details_in, Mapping) else 0
    reasoning = details_out.get("reasoning_tokens") if isinstance(details_out, Mapping) else 0
    return _as_int(given_in), _as_int(cached), _as_int(given_out), _as_int(reasoning)


class Engine:
    """Files and batches of one fake service, advanced lazily on ``clock``."""

    def __init__(
        self,
        *,
        clock: Clock,
        config: FakeConfig,
        responder: Responder,
        seed: int,
        expire_batches: bool = True,
        empty_error_file: bool = False,
    ) -> None:
        self.clock = clock
        #: whether unfinished batches expire at ``expires_at`` (Azure's do not).
        self.expire_batches = expire_batches
        #: whether a batch with no failed line still gets an (empty) error file (Azure).
        self.empty_error_file = empty_error_file
        self.config = config
        self.responder = responder
        self.seed = seed
        self.lock = asyncio.Lock()
        self._rng = random.Random(seed)
        self.files: dict[str, FileRecord] = {}
        self.file_order: list[str] = []
        self.file_index: dict[str, int] = {}
        self.batches: dict[str, BatchRecord] = {}
        self.batch_order: list[str] = []
        self.batch_index: dict[str, int] = {}
        self._heap: list[tuple[float, int, str, int]] = []
        self._tick = itertools.count()
        self._enqueued: dict[str, int] = defaultdict(int)
        self._last_now = -math.inf
        self.forced: deque[tuple[BatchError, BatchStatus]] = deque()
        #: batch id -> the status string its answers report instead of the real one.
        self.status_overrides: dict[str, str] = {}
        #: called with each batch that reaches a terminal status, and when (the webhook
        #: sender); it must not block.
        self.on_end: Callable[[BatchRecord, float], None] | None = None
        #: called whenever a batch event is scheduled (the webhook sender's wake-up).
        self.on_schedule: Callable[[], None] | None = None

    # -- time ---------------------------------------------------------------------------

    def now(self) -> float:
        """The clock's time, never earlier than any time returned before."""
        now = self.clock.now()
        if now < self._last_now:
            now = self._last_now
        self._last_now = now
        return now

    async def advance(self, now: float) -> None:
        """Fire, in time order, every batch event due by ``now``."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, batch_id, version = heapq.heappop(heap)
            record = self.batches[batch_id]
            if record.version == version:
                await self._fire(record, when)

    def next_event_at(self) -> float | None:
        """When the earliest pending batch event is due, or None when none is."""
        heap = self._heap
        while heap and self.batches[heap[0][2]].version != heap[0][3]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def new_id(self, prefix: str, digits: int = 32) -> str:
        """A fresh id such as ``batch_<hex>``, from the seeded generator."""
        while True:
            candidate = f"{prefix}{self._rng.getrandbits(4 * digits):0{digits}x}"
            if candidate not in self.files and candidate not in self.batches:
                return candidate

    # -- files ----------------------------------------------------------------------------

    def add_file(
        self, *, filename: str, purpose: str, content: bytes, now: float, expires_at: int | None
    ) -> FileRecord:
        """Store a new file."""
        record = FileRecord(
            id=self.new_id("file-", 24),
            filename=filename,
            purpose=purpose,
            content=content,
            created_at=now,
            expires_at=expires_at,
            size=len(content),
        )
        self.files[record.id] = record
        self.file_index[record.id] = len(self.file_order)
        self.file_order.append(record.id)
        return record

    def get_file(self, file_id: str, now: float) -> FileRecord | None:
        """A live file, or None when unknown, deleted or past its ``expires_at``."""
        record = self.files.get(file_id)
        if record is None or record.deleted:
            return None
        if record.expires_at is not None and now >= record.expires_at:
            self.delete_file(record)
            return None
        return record

    def delete_file(self, record: FileRecord) -> None:
        """Delete a file (its id stays usable as a list cursor)."""
        record.deleted = True
        record.content = b""

    # -- batches --------------------------------------------------------------------------

    def create_batch(
        self,
        *,
        endpoint: str,
        input_file: FileRecord,
        completion_window: str,
        metadata: Mapping[str, str] | None,
        output_expiry_seconds: int | None,
        now: float,
    ) -> BatchRecord:
        """Create a batch in ``validating`` and schedule its first event."""
        record = BatchRecord(
            id=self.new_id("batch_"),
            endpoint=endpoint,
            input_file_id=input_file.id,
            completion_window=completion_window,
            metadata=metadata,
            output_expiry_seconds=output_expiry_seconds,
            input_content=input_file.content,
            created_at=now,
            expires_at=now + self.config.completion_window_seconds,
        )
        if self.forced:
            record.forced_error, record.forced_status = self.forced.popleft()
        self.batches[record.id] = record
        self.batch_index[record.id] = len(self.batch_order)
        self.batch_order.append(record.id)
        self._schedule(record)
        return record

    async def cancel(self, record: BatchRecord, now: float) -> None:
        """Start cancelling; a batch already ``cancelling`` is left as it is.

        Raises:
            CancelRefused: the batch has already finished.
        """
        status = record.status
        if status in TERMINAL:
            raise CancelRefused(status)
        if status is _S.CANCELLING:
            return
        if status is _S.IN_PROGRESS:
            done = self._lines_done(record, now)
            await self._ensure(record, done)
            record.stop_at = done
        elif status is _S.FINALIZING:
            record.stop_at = record.total
        else:
            record.stop_at = 0
        record.status = _S.CANCELLING
        record.cancelling_at = now
        self._schedule(record)

    async def snapshot(self, record: BatchRecord, now: float) -> Batch:
        """The batch model at ``now`` (after :meth:`advance`)."""
        if record.status is _S.IN_PROGRESS:
            await self._ensure(record, self._lines_done(record, now))
        return self._model(record)

    async def snapshot_wire(self, record: BatchRecord, now: float) -> dict[str, Any]:
        """The batch's JSON-ready wire form at ``now`` (after :meth:`advance`).

        The form is cached until the batch changes (every change bumps ``version`` or
        adds a line result), so polling thousands of finished batches stays cheap. The
        returned dict is shared: callers must not modify it. A status override (see
        :attr:`status_overrides`) replaces the ``status`` of the answer only; the
        simulation underneath goes on as usual.
        """
        if record.status is _S.IN_PROGRESS:
            await self._ensure(record, self._lines_done(record, now))
        key = (record.version, len(record.outcomes))
        if record.wire is None or record.wire_key != key:
            record.wire = to_wire(self._model(record))
            record.wire_key = key
        override = self.status_overrides.get(record.id) if self.status_overrides else None
        if override is not None:
            return {**record.wire, "status": override}
        return record.wire

    def _model(self, record: BatchRecord) -> Batch:
        return Batch(
            id=record.id,
            endpoint=record.endpoint,
            input_file_id=record.input_file_id,
            completion_window=record.completion_window,
            status=record.status,
            created_at=math.floor(record.created_at),
            model=record.model,
            errors=BatchErrors(data=record.errors) if record.errors else None,
            output_file_id=record.output_file_id,
            error_file_id=record.error_file_id,
            in_progress_at=_ts(record.in_progress_at),
            expires_at=_ts(record.expires_at),
            finalizing_at=_ts(record.finalizing_at),
            completed_at=_ts(record.completed_at),
            failed_at=_ts(record.failed_at),
            expired_at=_ts(record.expired_at),
            cancelling_at=_ts(record.cancelling_at),
            cancelled_at=_ts(record.cancelled_at),
            request_counts=RequestCounts(record.total, record.completed, record.failed),
            usage=BatchUsage(
                input_tokens=record.input_tokens,
                output_tokens=record.output_tokens,
                total_tokens=record.input_tokens + record.output_tokens,
                input_tokens_details=InputTokensDetails(cached_tokens=record.cached_tokens),
                output_tokens_details=OutputTokensDetails(reasoning_tokens=record.reasoning_tokens),
            ),
            metadata=record.metadata,
        )

    # -- the lifecycle ----------------------------------------------------------------------

    def _processing_end(self, record: BatchRecord) -> float:
        assert record.in_progress_at is not None
        rate = record.rate
        if rate <= 0:
            return math.inf
        return record.in_progress_at + record.total / rate

    def _next_event(self, record: BatchRecord) -> float | None:
        status = record.status
        if status is _S.VALIDATING:
            return min(record.created_at + self.config.validation_seconds, self._expiry(record))
        if status is _S.IN_PROGRESS:
            return min(self._processing_end(record), self._expiry(record))
        if status is _S.FINALIZING:
            assert record.finalizing_at is not None
            return record.finalizing_at + self.config.finalizing_seconds
        if status is _S.CANCELLING:
            assert record.cancelling_at is not None
            return record.cancelling_at + self.config.cancel_seconds
        return None

    def _expiry(self, record: BatchRecord) -> float:
        """When an unfinished batch expires: ``expires_at``, or never (Azure)."""
        return record.expires_at if self.expire_batches else math.inf

    def _schedule(self, record: BatchRecord) -> None:
        record.version += 1
        when = self._next_event(record)
        if when is not None:
            heapq.heappush(self._heap, (when, next(self._tick), record.id, record.version))
            if self.on_schedule is not None:
                self.on_schedule()

    async def _fire(self, record: BatchRecord, when: float) -> None:
        status = record.status
        if status is _S.VALIDATING:
            if record.created_at + self.config.validation_seconds < self._expiry(record):
                self._validate(record, when)
            else:
                await self._stop_early(record, when, _S.EXPIRED)
        elif status is _S.IN_PROGRESS:
            if self._processing_end(record) < self._expiry(record):
                await self._ensure(record, record.total)
                record.status = _S.FINALIZING
                record.finalizing_at = when
            else:
                await self._stop_early(record, when, _S.EXPIRED)
        elif status is _S.FINALIZING:
            await self._finish(record, _S.COMPLETED, when)
        elif status is _S.CANCELLING:
            await self._finish(record, _S.CANCELLED, when)
        self._schedule(record)

    def _parse(self, record: BatchRecord) -> ParsedInput:
        config = self.config
        return parse_input(
            record.input_content,
            endpoint=record.endpoint,
            max_lines=config.max_lines,
            max_embedding_inputs=config.max_embedding_inputs,
            max_errors=config.max_validation_errors,
        )

    def _validate(self, record: BatchRecord, when: float) -> None:
        if record.forced_error is not None:
            self._fail(record, when, (record.forced_error,), status=record.forced_status)
            return
        parsed = self._parse(record)
        if parsed.errors:
            self._fail(record, when, parsed.errors)
            return
        model = parsed.model
        limit = self.config.enqueued_token_limits.get(model) if model is not None else None
        if model is not None and limit is not None:
            tokens = sum(estimate_tokens(r.body) for r in parsed.requests)
            if self._enqueued[model] + tokens > limit:
                message = (
                    f"Enqueued token limit reached for {model} in organization "
                    f"{self.config.organization}. Limit: {limit:,} enqueued tokens. "
                    "Please try again once some in_progress batches have been completed."
                )
                self._fail(record, when, (BatchError("token_limit_exceeded", message),))
                return
            self._enqueued[model] += tokens
            record.enqueued_tokens = tokens
        record.status = _S.IN_PROGRESS
        record.in_progress_at = when
        record.requests = parsed.requests
        record.total = len(parsed.requests)
        record.rate = self._rate(record)
        record.model = model
        record.input_content = b""

    def _rate(self, record: BatchRecord) -> float:
        """The processing speed of a batch that starts ``in_progress`` now."""
        hook = self.config.processing_seconds
        if hook is None:
            return self.config.lines_per_second
        seconds = float(hook(record.id, record.total))
        if not seconds >= 0:
            raise ValueError(
                f"processing_seconds({record.id!r}, {record.total}) must be >= 0 "
                f"(math.inf: never finishes), got {seconds!r}"
            )
        if seconds == 0 or record.total == 0:
            return math.inf
        return record.total / seconds

    def _fail(
        self,
        record: BatchRecord,
        when: float,
        errors: tuple[BatchError, ...],
        *,
        status: BatchStatus = _S.FAILED,
    ) -> None:
        record.status = status
        record.failed_at = when
        record.errors = errors
        record.input_content = b""
        if self.on_end is not None:
            self.on_end(record, when)

    def _lines_done(self, record: BatchRecord, when: float) -> int:
        if record.stop_at is not None:
            return record.stop_at
        if record.status is _S.IN_PROGRESS:
            assert record.in_progress_at is not None
            rate = record.rate
            if rate <= 0 or when <= record.in_progress_at:
                return 0
            if rate == math.inf:
                return record.total
            return min(record.total, int((when - record.in_progress_at) * rate + 1e-9))
        if record.status is _S.FINALIZING:
            return record.total
        return len(record.outcomes)

    def _line_time(self, record: BatchRecord, index: int) -> float:
        """When line ``index`` finished processing."""
        start = record.in_progress_at
        rate = record.rate
        if start is None or rate <= 0:
            return record.created_at
        return start + (index + 1) / rate

    async def _ensure(self, record: BatchRecord, upto: int) -> None:
        """Compute (once) the results of the first ``upto`` lines."""
        outcomes = record.outcomes
        rules = self.config.line_errors
        while len(outcomes) < upto:
            request = record.requests[len(outcomes)]
            result: Any = None
            for rule in rules:
                if rule.matches(request.custom_id, seed=self.seed):
                    body = http_error_body(rule.status, message=rule.message, code=rule.code)
                    result = (rule.status, body)
                    break
            else:
                token = _LINE_TIME.set(self._line_time(record, len(outcomes)))
                try:
                    result = self.responder(request)
                    if inspect.isawaitable(result):
                        result = await result
                finally:
                    _LINE_TIME.reset(token)
            if not isinstance(result, tuple) or len(result) != 2 or not isinstance(result[0], int):
                raise TypeError(
                    f"a responder must return (status_code, body), got {result!r:.100} "
                    f"for custom_id {request.custom_id!r}"
                )
            status, body = result
            outcomes.append((status, body))
            if 200 <= status < 300:
                record.completed += 1
                tokens_in, cached, tokens_out, reasoning = _usage_of(body)
                record.input_tokens += tokens_in
                record.cached_tokens += cached
                record.output_tokens += tokens_out
                record.reasoning_tokens += reasoning
            else:
                record.failed += 1

    async def _stop_early(self, record: BatchRecord, when: float, status: BatchStatus) -> None:
        """End a batch before all lines ran (expiry)."""
        done = self._lines_done(record, when)
        await self._ensure(record, done)
        record.stop_at = done
        await self._finish(record, status, when)

    async def _finish(self, record: BatchRecord, status: BatchStatus, when: float) -> None:
        """Write the result files and move to a terminal ``status``."""
        if record.in_progress_at is None and record.forced_error is None:
            # Ended while validating: list the lines of a valid file as never run.
            parsed = self._parse(record)
            if not parsed.errors:
                record.requests = parsed.requests
                record.total = len(parsed.requests)
                record.model = parsed.model
        stop = record.total if record.stop_at is None else record.stop_at
        await self._ensure(record, stop)
        not_run = "batch_expired" if status is _S.EXPIRED else "batch_cancelled"
        good: list[tuple[str, bytes]] = []
        bad: list[tuple[str, bytes]] = []
        for index, request in enumerate(record.requests):
            line_id = f"batch_req_{stable_hex(record.id, index)}"
            if index < stop:
                code, body = record.outcomes[index]
                # The body is already JSON-ready (it came from the responder): build the
                # line without it, so the converter does not walk it, then put it in.
                response = LineResponse(
                    status_code=code,
                    body=None,
                    request_id=f"req_{stable_hex(record.id, index, 'request')}",
                )
                if 200 <= code < 300:
                    line: Any = ResultSuccess(request.custom_id, response, id=line_id)
                else:
                    line = ResultHTTPError(request.custom_id, response, id=line_id)
                wire = to_wire(line)
                wire["response"]["body"] = body
                (good if 200 <= code < 300 else bad).append((line_id, json_bytes(wire)))
            else:
                error = LineError(code=not_run, message=NOT_RUN_MESSAGES[not_run])
                line = ResultError(request.custom_id, error, id=line_id)
                bad.append((line_id, json_bytes(to_wire(line))))
                record.failed += 1
        record.output_file_id = self._result_file(record, "output", good, when)
        record.error_file_id = self._result_file(record, "error", bad, when)
        record.status = status
        if status is _S.COMPLETED:
            record.completed_at = when
        elif status is _S.EXPIRED:
            record.expired_at = when
        else:
            record.cancelled_at = when
        if record.enqueued_tokens and record.model is not None:
            self._enqueued[record.model] -= record.enqueued_tokens
            record.enqueued_tokens = 0
        record.requests = ()
        record.outcomes = []
        record.input_content = b""
        if self.on_end is not None:
            self.on_end(record, when)

    def _result_file(
        self, record: BatchRecord, kind: str, lines: list[tuple[str, bytes]], when: float
    ) -> str | None:
        if not lines and not (kind == "error" and self.empty_error_file):
            return None
        if self.config.shuffle_output:
            lines.sort(key=lambda item: item[0])
        content = b"".join(data + b"\n" for _, data in lines)
        lifetime = record.output_expiry_seconds or self.config.output_file_expiry_seconds
        created = self.add_file(
            filename=f"{record.id}_{kind}.jsonl",
            purpose="batch_output",
            content=content,
            now=when,
            expires_at=math.floor(when) + lifetime,
        )
        return created.id

    # -- introspection ------------------------------------------------------------------------

    def enqueued_tokens(self, model: str) -> int:
        """Tokens of the validated, unfinished batches of ``model``."""
        return self._enqueued.get(model, 0)

    def not_run_message(self, code: str) -> str:
        """The message of the error lines with ``code``."""
        return NOT_RUN_MESSAGES[code]

    def default_forced_message(self, code: str) -> str:
        """The message for a forced validation failure with ``code``."""
        return VALIDATION_MESSAGES.get(code, f"The batch failed validation ({code}).")
