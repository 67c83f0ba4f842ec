"""The main job: a whole request set through the Batch API, resumable, exactly once.

:class:`BatchRun` takes a JSONL file (or an iterable of requests) and drives it end to
end::

    preflight -> journal -> shard -> upload -> create -> track (fleet) -> collect
              -> retry rounds -> results (each custom_id exactly once)

Every step is written to the journal (:mod:`aiobatch._journal`) before it is acted on,
so a run killed at any point and started again with the same journal continues where it
stopped:

- a shard whose upload may have happened is looked up by its file name
  (``aiobatch-<run>-<shard>.jsonl``, same size) before it is uploaded again;
- a shard whose create may have happened is looked up by its create key (in the batch's
  metadata, beside ``aiobatch_run`` and ``aiobatch_shard``) and by its input file, once
  the create had time to land (``create_settle``), and adopted; it is created again
  only when the lookup proved that no batch was made, so no shard gets a second batch;
- a batch's output and error files are streamed into the journal in chunks, each chunk
  committed with the count of lines read, so a collection cut short resumes after the
  last committed line and no result is recorded twice.

Lines that failed for a retryable reason (the batch expired or was cancelled, an HTTP
408, 429 or 5xx, or the line never came back) go into new batches, up to
``max_rounds`` rounds; permanent errors (other 4xx) are final results. A batch that
failed with ``token_limit_exceeded`` is created again from the file already uploaded,
after a backoff, without spending its requests' rounds (at most ``max_recreates`` times
per shard). A batch that failed validation naming lines of its file ends those lines,
and its other lines go into a new batch without spending a round; when a named line is
not one of the file's, no line is blamed and every line spends a round. Whatever
happens, no request goes into more than ``max_batches_per_request`` batches: the run
stops with :class:`~aiobatch.errors.TooManyBatchesError` first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from pathlib import Path
from typing import IO, Any, Literal, TypeAlias
from urllib.parse import urlsplit

import attrs

from ._aio import cancel_and_wait, sleep_or_set
from ._client import BatchClient
from ._convert import decode_result_line
from ._create import CREATE_KEY_METADATA
from ._fleet import BatchDone, DoneReason, Fleet, FleetConfig, StatusChanged, TrackingError
from ._journal import Journal, ShardRow, dumps_compact
from ._lifecycle import TERMINAL, BatchStatus, parse_status_aliases
from ._models import (
    Batch,
    File,
    ResultError,
    ResultHTTPError,
    ResultLine,
    ResultSuccess,
    alias_status,
)
from ._preflight import LineProblem, Preflight, PreparedRequest
from ._progress import RunProgress
from ._report import RunReport, format_duration, read_report
from ._retry import DEFAULT_MAX_RETRY_WAIT, RetryPolicy, cap_server_wait
from ._shard import plan_shards
from .errors import (
    AiobatchError,
    AmbiguousCreateError,
    APIStatusError,
    AuthenticationError,
    ClosedError,
    ConnectError,
    DecodeError,
    InputError,
    InvalidTransitionError,
    JournalError,
    LookupIncompleteError,
    NotFoundError,
    PermissionDeniedError,
    PreflightError,
    RunError,
    StepFailedError,
    TooManyBatchesError,
    TransportError,
    UnreachableError,
    describe,
)

__all__ = [
    "BatchRun",
    "RequestSource",
    "RunConfig",
    "RunResult",
    "cancel_batches",
    "request_cancel",
    "run_is_live",
]

logger = logging.getLogger("aiobatch.run")

#: What a run reads its requests from: a JSONL file, or request objects (or their JSON
#: lines), sync or async.
RequestSource: TypeAlias = (
    "str | os.PathLike[str] | Iterable[Mapping[str, Any] | str | bytes] "
    "| AsyncIterable[Mapping[str, Any] | str | bytes]"
)

#: Error-file codes (``error.code``) of lines that never ran and may run again.
RETRYABLE_LINE_CODES = frozenset(
    {
        "batch_expired",
        "batch_cancelled",
        "batch_canceled",
        "rate_limit_exceeded",
        "server_error",
        "internal_error",
        "timeout",
        "service_unavailable",
    }
)
#: Batch-level error codes (``errors.data[].code``) that say the input itself is bad:
#: running it again cannot help.
PERMANENT_BATCH_CODES = frozenset(
    {
        "invalid_json_line",
        "duplicate_custom_id",
        "url_mismatch",
        "model_mismatch",
        "missing_required_parameter",
        "invalid_request",
        "invalid_url",
        "invalid_method",
        "empty_file",
        "too_many_requests_in_file",
        "file_too_large",
        "too_many_tasks",
        "streaming_unsupported",
        "model_not_found",
        "unsupported_model",
    }
)
TOKEN_LIMIT_CODE = "token_limit_exceeded"
#: Batches a request may go into, beyond its ``1 + max_rounds``, by default (see
#: ``RunConfig.max_batches_per_request``): re-sends that spend no round.
_FREE_BATCHES = 10
#: Creates of one shard that came to nothing, in a row, when ``max_step_failures`` is None.
_MAX_SETBACKS = 10
#: Attempts per call (the client's own retries) until the server has answered the run
#: once: a wrong address is told within ``unreachable_after``, by the run's own tries.
_QUICK_ATTEMPTS = 3
#: A result file answered 404 this many times is taken as gone (deleted or expired).
_GONE_AFTER = 3
#: Seconds allowed between this machine's clock and the server's when a lookup bounds
#: a batch's or a file's ``created_at`` by when this run started the call.
_SKEW = 900.0
_TERMINAL_STATUSES = frozenset(status.value for status in TERMINAL)
_SUCCESS_TOKENS = (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens"))


def _positive(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (isinstance(value, bool) or value <= 0):
        raise ValueError(f"RunConfig.{attribute.name} must be positive, got {value!r}")


def _seconds(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"RunConfig.{attribute.name} must be > 0 seconds, got {value!r}")


def _non_negative(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or value < 0:
        raise ValueError(f"RunConfig.{attribute.name} must be >= 0, got {value!r}")


def _order(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value not in ("input", "completion"):
        raise ValueError(f"RunConfig.order must be 'input' or 'completion', got {value!r}")


@attrs.frozen(kw_only=True)
class RunConfig:
    """How a :class:`BatchRun` shards, submits, retries and collects.

    Durations are seconds on the client's clock.

    Attributes:
        max_lines: requests per batch; None takes the provider's limit (OpenAI 50,000,
            Azure 100,000).
        max_bytes: bytes per batch input file; None takes the provider's (200 MB).
        max_rounds: retry rounds for lines that failed for a retryable reason (0 for
            none): a line runs at most ``1 + max_rounds`` times.
        order: the order of :meth:`BatchRun.results` and of the output file:
            ``"input"`` (default) or ``"completion"``.
        skip_invalid: skip input lines that fail preflight (they are reported) instead
            of stopping before anything is uploaded.
        completion_window: every batch's window (``24h``).
        metadata: extra metadata for every batch (at most 13 pairs: aiobatch adds
            ``aiobatch_run``, ``aiobatch_shard`` and ``aiobatch_create_key``).
        enqueued_token_limits: model -> the most estimated prompt tokens to have
            enqueued (in batches not yet ended) at once; shards are also cut to fit.
            Models not listed have no client-side limit.
        token_estimator: estimates a request body's prompt tokens (default
            :func:`aiobatch._preflight.estimate_tokens`, about 4 characters a token).
        fleet: how batches are polled (default :class:`FleetConfig` defaults).
        batch_timeout: cancel a batch still open this long after its creation and keep
            its finished lines (the rest go to a retry round); None for no limit.
        max_submissions: shards uploaded and created at once.
        max_collections: batches whose files are read at once.
        collect_chunk: result lines committed to the journal per transaction, at most.
        collect_chunk_bytes: result bytes after which a transaction is committed (so a
            collection holds about this much, plus one line, however long the lines
            are).
        retry_coalesce: how long lines waiting for a retry round gather before they
            are sharded (sooner when nothing else is open).
        token_limit_backoff: the first wait before re-creating a batch that failed with
            ``token_limit_exceeded``; it doubles per failure of that shard.
        token_limit_max_backoff: the longest such wait.
        max_recreates: re-creates per shard after ``token_limit_exceeded``, after which
            its lines end with that error.
        max_batches_per_request: the most batches any one request is put in (not
            counting the ``token_limit_exceeded`` re-creates of one batch, which
            ``max_recreates`` bounds); a run about to go past it stops with
            :class:`~aiobatch.errors.TooManyBatchesError` instead. None:
            ``1 + max_rounds + 10``, room for re-sends that spend no round (after a
            batch failed because of other lines, or was cancelled by the run).
        step_backoff: the first wait before trying a failed step (upload, create
            lookup, collection) again; it doubles per failure (with jitter), up to 5
            minutes. Each failed attempt is logged (WARNING) with its error, the
            attempt number, the next try and the time left before the run gives up.
        give_up_after: seconds one step may keep failing (from the start of its first
            failed attempt) before the run stops with
            :class:`~aiobatch.errors.StepFailedError` (the journal stays resumable);
            the last try is made at that time. Each attempt includes the client's own
            retries (its :class:`RetryPolicy`). A 429 is the server pacing the run: it
            never stops it. None: no time limit.
        max_step_failures: also stop after this many failures of one step in a row
            (None, the default: ``give_up_after`` alone decides). It also bounds the
            creates of a shard that come to nothing (its file gone, a lost create
            proved never made): 10 when None.
        unreachable_after: before the server has answered the run once, seconds of
            connection failures (its name does not resolve, the connection is
            refused or times out) after which the run stops with
            :class:`~aiobatch.errors.UnreachableError`: a wrong address, not an
            outage. Until then each call makes at most 3 attempts of its own (quick
            retries; the run's steps try again). Once it has answered,
            ``give_up_after`` applies and calls make the client's full retries.
        max_retry_wait: the longest the run (and its fleet) waits on one server's
            ``retry-after``; a longer one is cut to this, with a WARNING, and the run
            then tries again.
        output_lag_retries: retrieves of a ``completed`` batch that reports finished
            requests but no ``output_file_id`` yet, before its lines count as missing.
        cancel_poll_interval: how often the run looks for a cancel request in its
            journal (``aiobatch cancel``).
        cancel_timeout: after a cancel, how long to wait for the open batches to reach
            ``cancelled`` (and to collect them); None waits as long as it takes.
        work_dir: where shard files are written before upload (default: beside the
            journal); each is deleted once uploaded.
        input_expires_after: seconds after which the provider deletes each uploaded
            input file (``expires_after``; OpenAI takes 3600 to 2592000); None keeps
            them. Mind ``token_limit_exceeded`` re-creates, which need the file.
        delete_files: delete each batch's input, output and error files once its
            results are in the journal (Azure allows 500 input files per resource;
            OpenAI keeps files until they expire).
        status_aliases: batch status strings aiobatch does not know, each mapped to
            the status it stands for (``{"succeeded": "completed"}``; see
            :class:`~aiobatch.Fleet`). A batch in an unknown, unmapped status is
            collected once it carries result files, or ``fleet.unknown_status_grace``
            seconds after its ``expires_at``: its shard ends ``ended_unknown_status``
            and its lines without a result ``batch_unknown_status`` (retryable).
    """

    max_lines: int | None = attrs.field(default=None, validator=_positive)
    max_bytes: int | None = attrs.field(default=None, validator=_positive)
    max_rounds: int = attrs.field(default=3, validator=_non_negative)
    order: Literal["input", "completion"] = attrs.field(default="input", validator=_order)
    skip_invalid: bool = False
    completion_window: str = "24h"
    metadata: Mapping[str, str] = attrs.field(factory=dict)
    enqueued_token_limits: Mapping[str, int] = attrs.field(factory=dict)
    token_estimator: Callable[[Mapping[str, Any]], int] | None = None
    fleet: FleetConfig | None = None
    batch_timeout: float | None = attrs.field(default=None, validator=_positive)
    max_submissions: int = attrs.field(default=8, validator=_positive)
    max_collections: int = attrs.field(default=4, validator=_positive)
    collect_chunk: int = attrs.field(default=2000, validator=_positive)
    collect_chunk_bytes: int = attrs.field(default=8 * 1024 * 1024, validator=_positive)
    retry_coalesce: float = attrs.field(default=30.0, validator=_non_negative)
    token_limit_backoff: float = attrs.field(default=60.0, validator=_non_negative)
    token_limit_max_backoff: float = attrs.field(default=1800.0, validator=_non_negative)
    max_recreates: int = attrs.field(default=100, validator=_non_negative)
    max_batches_per_request: int | None = attrs.field(default=None, validator=_positive)
    step_backoff: float = attrs.field(default=5.0, validator=_non_negative)
    give_up_after: float | None = attrs.field(default=600.0, validator=_positive)
    max_step_failures: int | None = attrs.field(default=None, validator=_positive)
    unreachable_after: float = attrs.field(default=30.0, validator=_seconds)
    max_retry_wait: float = attrs.field(default=DEFAULT_MAX_RETRY_WAIT, validator=_seconds)
    output_lag_retries: int = attrs.field(default=3, validator=_non_negative)
    cancel_poll_interval: float = attrs.field(default=5.0, validator=_positive)
    cancel_timeout: float | None = attrs.field(default=None, validator=_positive)
    work_dir: str | None = None
    input_expires_after: int | None = attrs.field(default=None, validator=_positive)
    delete_files: bool = False
    status_aliases: Mapping[str, BatchStatus] = attrs.field(
        factory=dict, converter=parse_status_aliases
    )

    def __attrs_post_init__(self) -> None:
        if len(self.metadata) > 13:
            raise ValueError(
                f"RunConfig.metadata has {len(self.metadata)} pairs; at most 13 fit beside "
                "aiobatch's own three (16 in all)"
            )
        for name, value in self.metadata.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise ValueError(f"RunConfig.metadata must map str to str, got {name!r}: {value!r}")
            if len(name) > 64 or len(value) > 512:
                raise ValueError(
                    f"RunConfig.metadata[{name[:20]!r}...]: keys are at most 64 characters "
                    "and values at most 512"
                )
            if name.startswith("aiobatch_"):
                raise ValueError(f"RunConfig.metadata[{name!r}]: aiobatch_ keys are aiobatch's")
        for name, limit in self.enqueued_token_limits.items():
            if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
                raise ValueError(
                    f"RunConfig.enqueued_token_limits[{name!r}] must be a positive int, "
                    f"got {limit!r}"
                )


@attrs.frozen(slots=True)
class RunResult:
    """The final result of one request.

    Attributes:
        custom_id: the request's id.
        index: the request's 0-based position among the accepted input requests.
        result: the result line (a success, an HTTP error, or an error that never got
            a response; aiobatch's own errors, such as a line the server never
            returned after the last round, are :class:`ResultError` with ``id`` None).
        attempts: retryable failures before this result (0 when it came first time).
        batch_id: the batch that produced it; for aiobatch's own errors the batch the
            error is about (the one that expired, failed or lost the line), None when
            no batch was made (the create was refused).
    """

    custom_id: str
    index: int
    result: ResultLine
    attempts: int
    batch_id: str | None

    @property
    def ok(self) -> bool:
        """The request succeeded."""
        return isinstance(self.result, ResultSuccess)


class _Stop(Exception):
    """A step gave up because the run is stopping."""


@attrs.define
class _Streak:
    """The failures in a row of one step: how many, and since when."""

    count: int = 0
    #: ``clock.monotonic()`` at the start of the first failed attempt (None: no failure).
    since: float | None = None
    #: ``clock.monotonic()`` at the start of the attempt being made.
    started: float = 0.0

    def reset(self) -> None:
        self.count = 0
        self.since = None


def _unreachable_host(error: ConnectError, base_url: str) -> str:
    """The host (and port, when given) a connection failed to, without user info."""
    netloc = urlsplit(error.url or base_url).netloc
    return netloc.rpartition("@")[2] or error.url or base_url


def _own_error(custom_id: str, code: str, message: str) -> bytes:
    """A result line aiobatch writes itself (no batch produced one)."""
    return dumps_compact(
        {
            "id": None,
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
    )


def _line_tokens(result: ResultLine) -> tuple[int, int]:
    if not isinstance(result, ResultSuccess):
        return 0, 0
    body = result.response.body
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    for prompt, completion in _SUCCESS_TOKENS:
        if prompt in usage:
            p, c = usage.get(prompt), usage.get(completion, 0)
            return (
                p if isinstance(p, int) and not isinstance(p, bool) else 0,
                c if isinstance(c, int) and not isinstance(c, bool) else 0,
            )
    return 0, 0


def _classify(result: ResultLine) -> tuple[str, str | None, bool]:
    """(kind, code, retryable) of a result line."""
    if isinstance(result, ResultSuccess):
        return "success", None, False
    if isinstance(result, ResultHTTPError):
        status = result.status_code
        body = result.response.body
        code: str | None = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            raw = body["error"].get("code")
            code = str(raw) if raw is not None else None
        retryable = status in (408, 429) or status >= 500
        return "http_error", code or f"http_{status}", retryable
    assert isinstance(result, ResultError)
    code = result.error.code
    return "error", code, code in RETRYABLE_LINE_CODES


def _file_lines(path: str, digest: Any) -> Iterator[bytes]:
    """A file's lines without their newlines, feeding every byte to ``digest``."""
    with open(path, "rb") as fh:
        for raw in fh:
            digest.update(raw)
            yield raw.rstrip(b"\n")


def _write_lines(path: Path, lines: Iterable[bytes]) -> int:
    """Write lines (each followed by a newline) to ``path``; return the bytes written."""
    size = 0
    with open(path, "wb") as fh:
        for data in lines:
            fh.write(data)
            fh.write(b"\n")
            size += len(data) + 1
    return size


def _undecodable(
    raw: bytes, members: Mapping[str, tuple[int, int, str]]
) -> tuple[int, str, int] | None:
    """(seq, custom_id, attempts) of the queued request a result line that does not
    decode names, if it is JSON with a ``custom_id`` at all."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    cid = value.get("custom_id") if isinstance(value, dict) else None
    member = members.get(cid) if isinstance(cid, str) else None
    if member is None or member[2] != "queued":
        return None
    assert isinstance(cid, str)
    return member[0], cid, member[1]


def _check_output(output: str | None) -> None:
    """Refuse, before any work, an output file that cannot be written at the end."""
    if output is not None:
        if os.path.isdir(output):
            raise InputError(f"the output path {output} is a directory; give a file path")
        folder = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(folder):
            raise InputError(f"the output file's folder {folder} does not exist")


def _empty_input(name: str) -> PreflightError:
    """An input file that holds no request (empty, or only blank lines): the caller's
    mistake (a wrong or truncated file), not a run of nothing."""
    message = "the file holds no requests (it is empty or has only blank lines)"
    problem = LineProblem(
        source=name, line=0, custom_id=None, field=None, code="empty_input", message=message
    )
    return PreflightError(
        f"{name}: {message}; nothing was uploaded",
        problems=(problem,),
        count=1,
        source=name,
    )


def _describe_errors(batch: Batch, most: int = 5) -> str:
    """A failed batch's errors (``errors.data``) in one line: code, line, message."""
    errors = batch.errors.data if batch.errors is not None else ()
    parts = [
        f"{error.code or 'error'}"
        + (f" at line {error.line}" if error.line is not None else "")
        + (f": {error.message}" if error.message else "")
        for error in errors
    ]
    if not parts:
        return "no errors given"
    shown = "; ".join(parts[:most])
    return shown + (f" (and {len(parts) - most} more)" if len(parts) > most else "")


def _token_limited(batch: Batch) -> bool:
    errors = batch.errors.data if batch.errors is not None else ()
    return any(error.code == TOKEN_LIMIT_CODE for error in errors)


async def find_shard_batch(client: BatchClient, row: ShardRow) -> Batch | None:
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
    assert row.create_key is not None
    since = (row.create_started_at or row.planned_at) - _SKEW
    with contextlib.suppress(LookupIncompleteError):
        found = await client.find_created_batch(row.create_key, since=since, max_pages=1000)
        if found is not None:
            return found
    earlier = set(row.history.split())
    async for batch in client.list_batches():
        ours = batch.input_file_id == row.file_id and batch.id not in earlier
        if ours and not (batch.status is BatchStatus.FAILED and _token_limited(batch)):
            return batch
        if batch.created_at < since:
            return None
    return None


def _fingerprint(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


class _Lock:
    """An exclusive lock on a journal, held by the process that runs it (released by
    the OS when the process dies, however it dies)."""

    def __init__(self, path: str) -> None:
        self._path = path + ".lock"
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        fh = open(self._path, "a+")  # noqa: SIM115 - held for the run's lifetime
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            fh.close()
            raise JournalError(
                f"the journal {self._path[:-5]} is in use by {owner}; one run at a time"
            ) from exc
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


class BatchRun:
    """A whole request set through the Batch API, resumable, each request answered once.

    Create it with the client, the requests and a journal path; :meth:`run` drives it to
    the end and returns the report, :meth:`results` streams the final results as they
    arrive. Running it again with the same journal (after a crash, a cancel, or in a new
    process) continues the same run: the journal, not the source, holds the requests
    then (a file source is only checked to be the same file).

    Args:
        client: the client to call (not closed by the run).
        source: a JSONL file path, or request objects (or their JSON lines), sync or
            async; read once, on the first run.
        journal: the journal file (SQLite), created when missing.
        output: a JSONL file to write every final result to, once the run completes
            (atomically), in ``config.order``.
        config: sharding, retries, concurrency (see :class:`RunConfig`).
        on_progress: called with a :class:`RunProgress` whenever something changed
            (for :class:`aiobatch._progress.ProgressDisplay`); must be quick.
    """

    def __init__(
        self,
        client: BatchClient,
        source: RequestSource | None,
        *,
        journal: str | os.PathLike[str],
        output: str | os.PathLike[str] | None = None,
        config: RunConfig | None = None,
        on_progress: Callable[[RunProgress], None] | None = None,
    ) -> None:
        #: until the server has answered once, the run's calls make few attempts each
        #: (see ``_heard_from_server``); the fleet always uses the client as given.
        self._given_client = client
        self._client = client.with_options(
            retry=attrs.evolve(
                client.retry_policy,
                max_attempts=min(client.retry_policy.max_attempts, _QUICK_ATTEMPTS),
            )
        )
        self._source = source
        self._journal_path = os.fspath(journal)
        self._output = os.fspath(output) if output is not None else None
        self._config = config if config is not None else RunConfig()
        self._on_progress = on_progress
        self._clock = client.clock
        limits = client.provider.limits
        self._max_lines = self._config.max_lines or limits.max_lines
        self._max_bytes = self._config.max_bytes or limits.max_bytes
        self._max_inputs = limits.max_embedding_inputs
        self._journal: Journal | None = None
        self._lock = _Lock(self._journal_path)
        self._run_id = ""
        self._fleet: Fleet | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._submitting: dict[str, asyncio.Task[None]] = {}
        self._collecting: set[str] = set()
        self._shard_of: dict[str, str] = {}
        #: each shard's last status (or state before it has a batch), and how many
        #: shards have each: the progress snapshot reads the counts, not every shard.
        self._status: dict[str, str] = {}
        self._status_counts: collections.Counter[str] = collections.Counter()
        self._changed = asyncio.Event()
        self._results_changed = asyncio.Event()
        self._budget_changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stop_reason: str | None = None
        #: whether the server has answered the run once (any HTTP status): until then a
        #: connection failure is a wrong address, given ``unreachable_after``.
        self._answered = False
        self._network_since = 0.0
        self._failure: BaseException | None = None
        #: estimated prompt tokens reserved per model, and by which shard: a shard
        #: reserves before its create is sent and releases when its batch ends (or when
        #: the create proved that no batch was made).
        self._enqueued: dict[str | None, int] = {}
        self._reserved: dict[str, tuple[str | None, int]] = {}
        #: result files answered 404, and how many times.
        self._gone: dict[str, int] = {}
        #: creates of a shard that came to nothing (its file was not found, or a lost
        #: create proved never made) since it last had a batch: they stop the run at
        #: ``max_step_failures`` although each recovery step succeeds.
        self._setbacks: collections.Counter[str] = collections.Counter()
        self._submit_slots = asyncio.Semaphore(self._config.max_submissions)
        self._collect_slots = asyncio.Semaphore(self._config.max_collections)
        self._retry_since: float | None = None
        self._counts = {"succeeded": 0, "failed": 0, "retrying": 0, "total": 0}
        self._round = 0
        self._started_at = 0.0
        self._state = "new"
        self._runner: asyncio.Task[RunReport] | None = None
        self._finished = asyncio.Event()
        self._ingested = False
        self._step_waits = RetryPolicy(
            initial_delay=self._config.step_backoff,
            max_delay=max(self._config.step_backoff, 300.0),
        )
        # Doubling waits, without jitter: the enqueued tokens drain at the server's pace,
        # and a wait shorter than asked only earns another failure.
        self._token_waits = RetryPolicy(
            initial_delay=self._config.token_limit_backoff,
            max_delay=max(self._config.token_limit_backoff, self._config.token_limit_max_backoff),
            jitter=None,
        )

    # --- public surface ------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        """The run's id ('' before the run opened its journal)."""
        return self._run_id

    @property
    def journal_path(self) -> str:
        """The journal file."""
        return self._journal_path

    def cancel(self) -> None:
        """Cancel the run: no new batches; the open ones are cancelled and their
        finished lines collected; :meth:`run` then returns a ``cancelled`` report. The
        journal stays resumable (the cancelled lines run when the run is started
        again)."""
        self._request_stop("cancelled")

    def stop(self) -> None:
        """Stop the run at once, without cancelling its batches: they keep running on
        the server, and the next run with this journal collects them (what a service
        does on shutdown, and ``aiobatch run`` on SIGTERM). :meth:`run` then returns a
        ``stopped`` report."""
        self._request_stop("stopped")

    async def run(self) -> RunReport:
        """Drive the run to its end (or its cancel) and return the report.

        A cancelled task (or Ctrl-C) cancels the open batches and collects their finished
        lines first (see ``RunConfig.cancel_timeout``), then re-raises.

        Raises:
            PreflightError: the input has bad lines (nothing was uploaded, no journal
                is left behind).
            JournalError: the journal belongs to another input, or another process
                runs it.
            RunError: a step kept failing (:class:`~aiobatch.errors.StepFailedError`,
                after ``give_up_after``; :class:`~aiobatch.errors.UnreachableError`
                when the server could not be reached at all), or the server refused the
                credentials; the journal stays resumable.
        """
        return await self._start()

    def _start(self) -> asyncio.Task[RunReport]:
        if self._runner is None:
            self._runner = asyncio.ensure_future(self._run())
            self._runner.add_done_callback(lambda _: self._finished.set())
        return self._runner

    async def results(self) -> AsyncGenerator[RunResult, None]:
        """The final results, each request's once, as they become final, in
        ``config.order`` (input order yields a result once every earlier request has
        its own). Starts the run when it is not running; ends when the run ends.

        The results are read from the journal (through a connection of their own), so a
        slow reader holds no results in memory and misses none.

        Raises:
            whatever :meth:`run` raises.
        """
        started_here = self._runner is None
        runner = self._start()
        order = self._config.order
        reader: Journal | None = None
        cursor = -1
        try:
            while True:
                finished = runner.done()
                if reader is None and self._ingested:
                    reader = Journal(self._journal_path, readonly=True)
                if reader is not None:
                    self._results_changed.clear()
                    rows = reader.result_rows(order=order, after=cursor, limit=1000)
                    yielded = False
                    for n, seq, cid, attempts, batch_id, data, _kind in rows:
                        if order == "input" and seq != cursor + 1:
                            break
                        cursor = seq if order == "input" else n
                        yielded = True
                        yield RunResult(
                            custom_id=cid,
                            index=seq,
                            result=decode_result_line(data, what=f"the result of {cid!r}"),
                            attempts=attempts,
                            batch_id=batch_id,
                        )
                    if yielded:
                        continue
                if finished:
                    runner.result()  # the run's error, if it failed
                    return
                await sleep_or_set(self._clock, None, self._results_changed, self._finished)
        finally:
            if reader is not None:
                reader.close()
            if started_here and not runner.done():
                # Nobody else awaits the run this iterator started: stop it (its batches
                # keep running; the journal has everything) rather than leave it behind.
                self.stop()
                with contextlib.suppress(Exception):
                    await runner

    def progress(self) -> RunProgress:
        """A snapshot of the run, for display."""
        batches = {name: n for name, n in self._status_counts.items() if n}
        counts = self._counts
        return RunProgress(
            total=counts["total"],
            succeeded=counts["succeeded"],
            failed=counts["failed"],
            retrying=counts["retrying"],
            batches=batches,
            round=self._round,
            elapsed=max(0.0, self._clock.now() - self._started_at) if self._started_at else 0.0,
            state=self._state,
        )

    # --- the run -------------------------------------------------------------------------

    async def _run(self) -> RunReport:
        _check_output(self._output)
        self._lock.acquire()
        try:
            journal = self._open_journal()
            try:
                return await self._drive(journal)
            finally:
                self._journal = None
                journal.close()
                self._results_changed.set()
        finally:
            self._lock.release()

    def _open_journal(self) -> Journal:
        path = self._journal_path
        fresh = not os.path.exists(path)
        if fresh and self._source is None:
            raise JournalError(f"no journal at {path}, and no requests to start a run with")
        return Journal(path, create=True)

    async def _drive(self, journal: Journal) -> RunReport:
        resuming = journal.get_meta("state") is not None
        if not resuming:
            try:
                await self._ingest(journal)
            except BaseException:
                journal.close()
                for suffix in ("", "-wal", "-shm", ".lock"):
                    with contextlib.suppress(OSError):
                        os.unlink(self._journal_path + suffix)
                raise
        else:
            self._check_source(journal)
        self._journal = journal
        self._ingested = True
        self._results_changed.set()
        meta = journal.meta()
        self._run_id = meta["run_id"]
        self._started_at = float(meta["started_at"])
        if meta["state"] == "done":
            self._state = "done"
            self._load_counts(journal)
            self._write_output(journal)
            return read_report(journal)
        # A cancel flag left from an earlier run is stale (that run stopped); one set
        # while this run checked its input is this run's.
        stale = {"cancel_requested": None} if resuming else {}
        journal.set_meta(state="running", updated_at=str(self._clock.now()), **stale)
        self._state = "running"
        self._load_counts(journal)
        fleet_config = self._config.fleet or FleetConfig()
        if fleet_config.max_retry_wait != self._config.max_retry_wait:
            fleet_config = attrs.evolve(fleet_config, max_retry_wait=self._config.max_retry_wait)
        if self._config.batch_timeout is not None or fleet_config.timeout is not None:
            # A deadline cancels the batch and keeps tracking it to its end: its lines
            # must not run elsewhere while it may still run them.
            fleet_config = attrs.evolve(fleet_config, cancel_on_deadline=True)
        fleet = Fleet(
            self._given_client, config=fleet_config, status_aliases=self._config.status_aliases
        )
        self._fleet = fleet
        cancelled: BaseException | None = None
        try:
            events = fleet.events()
            self._spawn(self._consume(events), name="events")
            self._network_since = self._clock.monotonic()
            self._resume(journal)
            try:
                await self._supervise(journal)
            except asyncio.CancelledError as exc:
                cancelled = exc
                self._request_stop("cancelled")
            if self._stop_reason == "cancelled" and self._failure is None:
                await self._wind_down(journal)
        finally:
            await self._shutdown()
        if self._failure is not None:
            journal.set_meta(state="failed", updated_at=str(self._clock.now()))
            self._state = "failed"
            raise self._failure
        if self._stop_reason in ("cancelled", "stopped"):
            state = self._stop_reason
            journal.set_meta(state=state, updated_at=str(self._clock.now()))
            self._state = state
            self._emit_progress()
            if cancelled is not None:
                raise cancelled
            return read_report(journal)
        journal.set_meta(state="done", updated_at=str(self._clock.now()))
        self._state = "done"
        if self._config.work_dir is None:
            with contextlib.suppress(OSError):
                os.rmdir(self._journal_path + ".files")  # only when empty
        self._write_output(journal)
        self._emit_progress()
        return read_report(journal)

    # --- ingest --------------------------------------------------------------------------

    async def _ingest(self, journal: Journal) -> None:
        """Preflight the source into the journal in one transaction: all or nothing."""
        source = self._source
        is_path = isinstance(source, str | os.PathLike)
        name = os.fspath(source) if is_path else "<requests>"  # type: ignore[arg-type]
        preflight = Preflight(
            source=name,
            max_line_bytes=self._max_bytes,
            skip_invalid=self._config.skip_invalid,
            token_estimator=self._config.token_estimator,
        )
        rows: list[tuple[Any, ...]] = []

        def keep(request: PreparedRequest | None) -> None:
            if request is None:
                return
            rows.append(
                (
                    request.seq,
                    request.custom_id,
                    request.line,
                    request.url,
                    request.model,
                    request.tokens,
                    request.inputs,
                    request.data,
                )
            )
            if len(rows) >= 5000:
                journal.add_requests(db, rows)
                rows.clear()

        with journal.transaction() as db:
            if is_path:
                digest = hashlib.sha256()
                for number, raw in enumerate(_file_lines(name, digest), start=1):
                    keep(preflight.check_line(raw, number))
                    if number % 20000 == 0:
                        await asyncio.sleep(0)
                fingerprint = f"sha256:{digest.hexdigest()}"
            else:
                fingerprint = ""
                index = 0
                if isinstance(source, AsyncIterable):
                    async for item in source:
                        index += 1
                        keep(preflight.check_item(item, index))
                else:
                    for item in source:  # type: ignore[union-attr]
                        index += 1
                        keep(preflight.check_item(item, index))
            preflight.finish()
            journal.add_requests(db, rows)
            if preflight.accepted == 0 and preflight.problem_count:
                shown = "\n".join(f"  {p}" for p in preflight.problems[:10])
                raise PreflightError(
                    f"{name}: no valid request; {preflight.problem_count} problems in "
                    f"{preflight.rejected} lines; nothing was uploaded\n{shown}",
                    problems=preflight.problems,
                    count=preflight.problem_count,
                    source=name,
                )
            if is_path and preflight.accepted == 0 and preflight.problem_count == 0:
                raise _empty_input(name)
            now = self._clock.now()
            problems = [str(p) for p in preflight.problems[:100]]
            journal.put_meta(
                db,
                {
                    "run_id": uuid.uuid4().hex[:16],
                    "source": name,
                    "fingerprint": fingerprint,
                    "started_at": repr(now),
                    "updated_at": repr(now),
                    "state": "running",
                    "skipped": str(preflight.rejected),
                    "problems": "\n".join(problems),
                    "order": self._config.order,
                },
            )
        for problem in preflight.problems[:20]:
            logger.warning("skipped invalid input line: %s", problem)
        if preflight.problem_count > 20:
            logger.warning(
                "... %d problems in all; %d invalid input lines skipped",
                preflight.problem_count,
                preflight.rejected,
            )

    def _check_source(self, journal: Journal) -> None:
        source = self._source
        if not isinstance(source, str | os.PathLike):
            return
        recorded = journal.get_meta("fingerprint") or ""
        if recorded and _fingerprint(os.fspath(source)) != recorded:
            raise JournalError(
                f"the journal {self._journal_path} belongs to a run of another input "
                f"({journal.get_meta('source')}); {os.fspath(source)} has changed since. "
                "Use a new journal for new input"
            )

    def _load_counts(self, journal: Journal) -> None:
        report = read_report(journal)
        self._counts = {
            "total": report.requests,
            "succeeded": report.succeeded,
            "failed": report.failed,
            "retrying": journal.retrying_count(),
        }
        self._round = report.rounds

    # --- supervision ---------------------------------------------------------------------

    def _resume(self, journal: Journal) -> None:
        """Pick up every shard where the journal left it."""
        for row in journal.shards("planned", "uploaded", "creating"):
            self._put_status(row.key, row.state)
            self._start_submit(row.key)
        for row in journal.shards("open"):
            assert row.batch_id is not None
            self._track(row)
        for row in journal.shards("collecting"):
            assert row.batch_id is not None
            self._shard_of[row.batch_id] = row.key
            self._put_status(row.key, row.status or "collecting")
            self._spawn(self._collect(row.key, None), name=f"collect {row.key}")
        for row in journal.shards("collected"):
            self._put_status(row.key, row.status or "collected")

    async def _supervise(self, journal: Journal) -> None:
        """Plan shards when lines are pending, until every request has its result."""
        clock = self._clock
        next_cancel_check = clock.monotonic()
        while True:
            self._changed.clear()
            if self._failure is not None or self._stopping.is_set():
                return
            now = clock.monotonic()
            if now >= next_cancel_check:
                next_cancel_check = now + self._config.cancel_poll_interval
                journal.set_meta(updated_at=repr(clock.now()))
                self._emit_progress()  # elapsed time and ETA move on while nothing changes
                if self._cancel_requested(journal):
                    return
            busy = bool(self._submitting or self._collecting or self._shard_of)
            pending = journal.pending_count()
            if pending:
                if self._retry_since is None:
                    self._retry_since = now
                due = self._retry_since + self._config.retry_coalesce
                if not busy or now >= due or journal.has_fresh_pending():
                    self._plan(journal)
                    self._retry_since = None
                    continue
            else:
                self._retry_since = None
                if not busy:
                    if journal.not_done_count() == 0:
                        return
                    if not self._requeue_orphans(journal):
                        raise RunError(
                            f"run {self._run_id}: requests are queued in shards that "
                            "nothing tracks; this is a bug in aiobatch (the journal is intact)"
                        )
                    continue
            wait = next_cancel_check - now
            if pending and self._retry_since is not None:
                wait = min(wait, self._retry_since + self._config.retry_coalesce - now)
            await sleep_or_set(clock, wait, self._changed)

    def _cancel_requested(self, journal: Journal) -> bool:
        """Whether ``aiobatch cancel`` flagged the journal; if so the run starts
        cancelling."""
        if not journal.get_meta("cancel_requested"):
            return False
        if not self._stopping.is_set():
            logger.warning("run %s: cancel requested in the journal", self._run_id)
        self._request_stop("cancelled")
        return True

    def _requeue_orphans(self, journal: Journal) -> bool:
        """Requests left ``queued`` in a shard that is already collected (which should
        not happen) become pending again; True when there were any."""
        moved = journal.requeue_orphans()
        if moved:
            logger.warning(
                "run %s: %d request(s) were queued in collected shards; submitting them again",
                self._run_id,
                moved,
            )
        return moved > 0

    def _plan(self, journal: Journal) -> None:
        """Shard every pending request (by url and model, within the limits) and record
        each shard's intent before anything is uploaded.

        Requests are read group by group in chunks, and each shard is recorded as soon
        as it is cut, so planning holds one chunk and the open shard, however many
        requests are pending.
        """
        limits = self._config.enqueued_token_limits
        now = self._clock.now()
        index = journal.shard_count()
        keys: list[str] = []
        for url, model in journal.pending_groups():
            embeddings = url.rstrip("/").endswith("/embeddings")
            for plan in plan_shards(
                journal.pending_items(url, model),
                max_lines=self._max_lines,
                max_bytes=self._max_bytes,
                max_tokens=limits.get(model) if model is not None else None,
                max_inputs=self._max_inputs if embeddings else None,
            ):
                key = f"s{index:06d}"
                index += 1
                try:
                    with journal.transaction() as db:
                        round_ = journal.add_shard(
                            db,
                            key=key,
                            url=plan.url,
                            model=plan.model,
                            seqs=plan.seqs,
                            size=plan.size,
                            tokens=plan.tokens,
                            planned_at=now,
                        )
                        self._check_batches(journal, db, key)
                except TooManyBatchesError as exc:
                    # Not recorded: its requests stay pending, for a run with a higher
                    # limit (the shards recorded before it are resumed by that run).
                    self._failure = exc
                    self._stopping.set()
                    return
                self._round = max(self._round, round_)
                keys.append(key)
        for key in keys:
            self._put_status(key, "planned")
            self._start_submit(key)
        if keys:
            logger.info("run %s: planned %d batch(es)", self._run_id, len(keys))
        self._emit_progress()

    def _check_batches(self, journal: Journal, db: Any, key: str) -> None:
        """Refuse a shard that would put a request in more batches than allowed."""
        limit = self._config.max_batches_per_request
        if limit is None:
            limit = 1 + self._config.max_rounds + _FREE_BATCHES
        custom_id, batches = journal.most_batches(db, key)
        if batches > limit:
            raise TooManyBatchesError(
                f"run {self._run_id}: request {custom_id!r} would go into batch number "
                f"{batches}, past max_batches_per_request={limit}: the server keeps failing "
                "its batches in a way that spends no retry round (see the warnings above "
                "for its errors). Nothing more was created and the journal is intact: look "
                "into the server's errors, then run again with a higher "
                "max_batches_per_request to go on",
                custom_id=custom_id,
                batches=batches,
                limit=limit,
            )

    def _spawn(self, coroutine: Any, *, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()
            self._stopping.set()
        self._changed.set()

    def _request_stop(self, reason: str) -> None:
        if not self._stopping.is_set():
            self._stop_reason = reason
            self._state = "cancelling" if reason == "cancelled" else "stopping"
            self._stopping.set()
            self._changed.set()
            self._budget_changed.set()
            self._emit_progress()

    async def _wind_down(self, journal: Journal) -> None:
        """After a cancel: let in-flight submissions finish their step, cancel every open
        batch, and collect what they finished."""
        journal.set_meta(state="cancelling", updated_at=repr(self._clock.now()))
        fleet = self._fleet
        assert fleet is not None
        deadline = (
            self._clock.monotonic() + self._config.cancel_timeout
            if self._config.cancel_timeout is not None
            else math.inf
        )
        while self._submitting and self._failure is None:
            await self._wait_changed(deadline)
            if self._clock.monotonic() >= deadline:
                break
        # A create whose answer was lost may have made a batch: find it, to cancel it
        # (a create still being sent, past the cancel timeout, is left to the next run).
        for row in journal.shards("creating"):
            if row.key in self._submitting:
                continue
            try:
                await self._resolve_create(journal, row, during_cancel=True)
            except AiobatchError as exc:
                logger.warning(
                    "run %s: could not tell whether shard %s has a batch (%s); the next run "
                    "looks again",
                    self._run_id,
                    row.key,
                    describe(exc),
                )
        for batch_id in fleet.open_ids:
            key = self._shard_of.get(batch_id)
            if key is not None:
                journal.update_shard(key, cancel_reason="run")
            with contextlib.suppress(KeyError):
                fleet.cancel(batch_id)
        while (self._shard_of or self._collecting) and self._failure is None:
            if self._clock.monotonic() >= deadline:
                logger.warning(
                    "run %s: %d batch(es) still cancelling at the cancel timeout; the "
                    "journal keeps them for the next run",
                    self._run_id,
                    len(fleet.open_ids),
                )
                break
            await self._wait_changed(deadline)

    async def _wait_changed(self, deadline: float) -> None:
        self._changed.clear()
        left = None if deadline == math.inf else deadline - self._clock.monotonic()
        await sleep_or_set(self._clock, left, self._changed)

    async def _shutdown(self) -> None:
        await cancel_and_wait(self._tasks)
        if self._fleet is not None:
            await self._fleet.aclose()
            self._fleet = None

    # --- submission ----------------------------------------------------------------------

    def _start_submit(self, key: str) -> None:
        if key not in self._submitting:
            task = self._spawn(self._submit(key), name=f"submit {key}")
            self._submitting[key] = task
            task.add_done_callback(lambda _: self._submitting.pop(key, None))

    async def _submit(self, key: str) -> None:
        """Take one shard from its recorded state to an open, tracked batch.

        Waits that are not work (a token-limit backoff, the enqueued-token budget) are
        made outside the submission slots, so shards held back never hold up others.
        """
        journal = self._db()
        streak = _Streak()
        clock = self._clock
        while not self._stopping.is_set():
            row = journal.shard(key)
            try:
                if row.state == "planned":
                    async with self._submit_slots:
                        streak.started = clock.monotonic()
                        await self._upload(journal, row)
                elif row.state == "uploaded":
                    if row.not_before is not None:
                        await self._pause(row.not_before - self._clock.now())
                    await self._admit(row)
                    async with self._submit_slots:
                        streak.started = clock.monotonic()
                        await self._create(journal, row)
                elif row.state == "creating":
                    async with self._submit_slots:
                        streak.started = clock.monotonic()
                        await self._resolve_create(journal, row)
                else:
                    return
                streak.reset()
                self._heard_from_server()
            except _Stop:
                return
            except (RunError, JournalError):  # a journal that fails is not a step to retry
                raise
            except (AuthenticationError, PermissionDeniedError) as exc:
                raise RunError(
                    f"run {self._run_id}: the server refused the credentials ({exc}); "
                    "the journal is intact: fix them and run again"
                ) from exc
            except ClosedError as exc:
                raise RunError(
                    f"run {self._run_id}: the client was closed under the run; the journal "
                    "is intact: run again to continue"
                ) from exc
            except AiobatchError as exc:
                delay = self._step_failed(f"shard {key} ({row.state})", streak, exc)
            else:
                continue
            try:
                await self._pause(delay)
            except _Stop:
                return

    def _step_failed(self, what: str, streak: _Streak, exc: AiobatchError) -> float:
        """Count a failed attempt of a step, log it, and say how long to wait before the
        next one.

        A rate limit (429) is the server pacing the run, not a failing step: it does not
        count, so it never stops the run (OpenAI allows 2,000 creates an hour), and its
        ``retry-after`` is waited out (at most ``max_retry_wait``, then the run asks
        again). Other failures stop the run once the step has failed for
        ``give_up_after`` seconds (``unreachable_after`` for a server that could not be
        reached before it ever answered), or ``max_step_failures`` times; the last wait
        is cut so that the last try is made at that time.

        Returns:
            The wait.

        Raises:
            StepFailedError: the run gives up (UnreachableError: the server could not
                be reached at all).
        """
        config = self._config
        if isinstance(exc, APIStatusError | DecodeError):
            self._heard_from_server()  # the server is there, whatever it said
        asked = exc.retry_after if isinstance(exc, APIStatusError) else None
        if asked is not None and asked > 0:
            asked = cap_server_wait(
                asked, config.max_retry_wait, what=f"run {self._run_id}: {what}", log=logger
            )
        else:
            asked = 0.0
        if isinstance(exc, APIStatusError) and exc.status_code == 429:
            delay = max(self._step_waits.backoff_delay(max(streak.count - 1, 0)), asked)
            logger.warning(
                "run %s: %s: rate limited: %s; next try in %s (a 429 never stops the run)",
                self._run_id,
                what,
                describe(exc),
                format_duration(delay),
            )
            return delay
        streak.count += 1
        if streak.since is None:
            streak.since = streak.started
        elapsed = self._clock.monotonic() - streak.since
        unreachable = isinstance(exc, ConnectError) and not self._answered
        budget, setting = config.give_up_after, "give_up_after"
        if unreachable and (budget is None or config.unreachable_after < budget):
            budget, setting = config.unreachable_after, "unreachable_after"
        limit = config.max_step_failures
        # (A hair of slack: a last try made exactly at the deadline is past it.)
        timed_out = budget is not None and elapsed >= budget - 1e-6
        if timed_out or (limit is not None and streak.count >= limit):
            reason = (
                f"{setting} {format_duration(budget)}"
                if budget is not None and timed_out
                else f"max_step_failures {limit}"
            )
            raise self._gave_up(what, streak.count, elapsed, reason, exc) from exc
        delay = max(self._step_waits.backoff_delay(streak.count - 1), asked)
        if budget is None:
            left = "no time limit (give_up_after None)"
        else:
            delay = min(delay, budget - elapsed)
            left = (
                f"giving up in {format_duration(budget - elapsed)} "
                f"({setting} {format_duration(budget)})"
            )
        logger.warning(
            "run %s: %s: attempt %d failed: %s; next try in %s, %s",
            self._run_id,
            what,
            streak.count,
            describe(exc),
            format_duration(delay),
            left,
        )
        return delay

    def _heard_from_server(self) -> None:
        """The server answered the run: from now on a connection failure is an outage
        (``give_up_after``), and calls make the client's full retries."""
        if not self._answered:
            self._answered = True
            self._client = self._given_client

    def _gave_up(
        self, what: str, attempts: int, elapsed: float, reason: str, exc: AiobatchError
    ) -> StepFailedError:
        """The error a run stops with when a step kept failing."""
        tried = f"{attempts} attempt{'s' if attempts != 1 else ''} in {format_duration(elapsed)}"
        if isinstance(exc, ConnectError) and not self._answered:
            host = _unreachable_host(exc, self._client.provider.base_url)
            why = exc.reason or "cannot connect"
            return UnreachableError(
                f"run {self._run_id}: cannot reach {host}: {why} ({what}: {tried}, no answer "
                f"from the server yet; {reason}). Check the base URL and the network; the "
                "journal is intact: run again to continue",
                host=host,
                reason=why,
                step=what,
                attempts=attempts,
                elapsed=elapsed,
                cause=exc,
            )
        return StepFailedError(
            f"run {self._run_id}: {what} kept failing ({tried}; {reason}): {describe(exc)}; "
            "the journal is intact: run again to continue",
            step=what,
            attempts=attempts,
            elapsed=elapsed,
            cause=exc,
        )

    def _db(self) -> Journal:
        journal = self._journal
        if journal is None:
            raise _Stop
        return journal

    async def _pause(self, seconds: float) -> None:
        """Sleep on the clock; a stop cuts it short (raising :class:`_Stop`)."""
        if seconds > 0:
            await sleep_or_set(self._clock, seconds, self._stopping)
        if self._stopping.is_set():
            raise _Stop

    def _file_name(self, key: str) -> str:
        return f"aiobatch-{self._run_id}-{key}.jsonl"

    def _work_dir(self) -> Path:
        folder = Path(self._config.work_dir or (self._journal_path + ".files"))
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    async def _upload(self, journal: Journal, row: ShardRow) -> None:
        """Upload a planned shard's file, unless an upload of it already landed; then
        delete the extra copies that uploads whose answer was lost left."""
        name = self._file_name(row.key)
        if row.upload_started_at is not None:
            found = await self._find_upload(name, row.bytes, row.upload_started_at)
            if found is not None:
                logger.info("run %s: shard %s: adopted upload %s", self._run_id, row.key, found.id)
                if self._client.provider.quirks.wait_for_processed_file:
                    found = await self._client.wait_for_file(found)
                journal.update_shard(row.key, state="uploaded", file_id=found.id)
                self._set_status(row.key, "uploaded")
                await self._delete_extra_uploads(journal, row, found.id, row.upload_started_at)
                return
        path = self._work_dir() / name
        size = _write_lines(path, journal.shard_lines(row.key))
        if size != row.bytes:
            raise RunError(
                f"run {self._run_id}: shard {row.key} should be {row.bytes} bytes, "
                f"its lines make {size}; the journal is inconsistent"
            )
        # The first attempt's start is kept: the copies of every attempt are looked for.
        started = row.upload_started_at or self._clock.now()
        journal.update_shard(row.key, upload_started_at=started)
        self._set_status(row.key, "uploading")
        try:
            uploaded = await self._client.upload_file(
                path, filename=name, expires_after_seconds=self._config.input_expires_after
            )
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
        journal.update_shard(row.key, state="uploaded", file_id=uploaded.id)
        self._set_status(row.key, "uploaded")
        await self._delete_extra_uploads(journal, row, uploaded.id, started)

    async def _find_upload(self, name: str, size: int, since: float) -> File | None:
        """A usable file named ``name`` of ``size`` bytes created after ``since`` (less a
        margin for clock skew), or None (also when files cannot be listed). A file the
        server marked ``error`` is not usable.

        Raises:
            ConnectError: the server cannot be reached (an upload could not be either).
        """
        horizon = since - _SKEW
        try:
            async for file in self._client.list_files(purpose="batch", order="desc"):
                if file.filename == name and file.bytes == size and file.status != "error":
                    return file
                if file.created_at < horizon:
                    break
        except ConnectError:
            raise
        except AiobatchError as exc:
            logger.warning(
                "could not list files to find %s (%s); uploading it again", name, describe(exc)
            )
        return None

    async def _delete_extra_uploads(
        self, journal: Journal, row: ShardRow, kept: str, since: float
    ) -> None:
        """Delete the other copies of a shard's input file once its file id is recorded:
        an upload whose answer was lost (and was then sent again, or looked up) leaves
        one on the server, unused. A copy is known by its name (unique to the run and the
        shard) and size. Nothing here fails the run: a list or delete that fails is
        logged, and the copies it could not reach stay."""
        name = self._file_name(row.key)
        horizon = since - _SKEW
        extras: list[str] = []
        try:
            async for file in self._client.list_files(purpose="batch", order="desc"):
                if file.filename == name and file.bytes == row.bytes and file.id != kept:
                    extras.append(file.id)
                if file.created_at < horizon:
                    break
        except AiobatchError as exc:
            logger.info(
                "run %s: could not list files to find extra copies of %s (%s)",
                self._run_id,
                name,
                describe(exc),
            )
        deleted = 0
        for file_id in extras:
            try:
                await self._client.delete_file(file_id)
            except AiobatchError as exc:
                logger.warning(
                    "run %s: could not delete %s, an extra copy of the input file of shard "
                    "%s (%s); it is unused and can be deleted by hand",
                    self._run_id,
                    file_id,
                    row.key,
                    describe(exc),
                )
                continue
            deleted += 1
        if deleted:
            with journal.transaction() as db:
                total = int(journal.get_meta("extra_uploads_deleted") or 0) + deleted
                journal.put_meta(db, {"extra_uploads_deleted": str(total)})
            logger.warning(
                "run %s: %d extra cop%s of the input file of shard %s (%s), left by lost "
                "upload answers, deleted; the batch uses %s",
                self._run_id,
                deleted,
                "y" if deleted == 1 else "ies",
                row.key,
                name,
                kept,
            )

    def _set_back(self, key: str, why: str) -> None:
        self._setbacks[key] += 1
        if self._setbacks[key] >= (self._config.max_step_failures or _MAX_SETBACKS):
            raise RunError(
                f"run {self._run_id}: shard {key} could not get a batch after "
                f"{self._setbacks[key]} creates ({why}); the journal is intact"
            )

    async def _create(self, journal: Journal, row: ShardRow) -> None:
        """Create the batch of an uploaded shard; the create key is journaled first.
        A cancel flag is looked at first (a cheap read), so that a cancel requested since
        the run last looked makes no new batch."""
        assert row.file_id is not None
        if self._cancel_requested(journal):
            raise _Stop
        key = f"{self._run_id}:{row.key}:{row.creates}"
        journal.update_shard(
            row.key, state="creating", create_key=key, create_started_at=self._clock.now()
        )
        self._set_status(row.key, "creating")
        metadata = {
            **self._config.metadata,
            "aiobatch_run": self._run_id,
            "aiobatch_shard": row.key,
            CREATE_KEY_METADATA: key,
        }
        try:
            batch = await self._client.create_batch(
                row.file_id,
                row.url,
                completion_window=self._config.completion_window,
                metadata=metadata,
            )
        except AmbiguousCreateError:
            raise  # stays 'creating' (and reserved): looked up on the next step
        except NotFoundError:
            # The file is gone (or not visible yet): upload it again.
            self._unreserve(row.key)
            journal.update_shard(row.key, state="planned", file_id=None, upload_started_at=None)
            self._set_status(row.key, "planned")
            self._set_back(row.key, "its input file was not found")
            raise
        except (TransportError, APIStatusError) as exc:
            # No attempt made a batch (the client proved it).
            self._unreserve(row.key)
            if isinstance(exc, APIStatusError) and exc.status_code in (400, 422):
                self._reject_shard(journal, row, "batch_create_rejected", describe(exc))
                return
            journal.update_shard(row.key, state="uploaded")
            self._set_status(row.key, "uploaded")
            raise
        self._opened(journal, row.key, batch)

    async def _resolve_create(
        self, journal: Journal, row: ShardRow, *, during_cancel: bool = False
    ) -> None:
        """A create may have been sent: adopt its batch, or (when the lookup proved it
        absent, see :func:`find_shard_batch`) create it again; a lookup that fails is
        tried again later.

        A create may still be on its way to the server (sent just before a crash or a
        stop): the lookup is trusted only ``create_settle`` seconds after the create
        started, as the client does after an ambiguous failure.
        """
        started = row.create_started_at or row.planned_at
        settle = started + self._client.create_settle - self._clock.now()
        if during_cancel:
            await self._clock.sleep(max(settle, 0.0))
        else:
            await self._pause(settle)
        found = await find_shard_batch(self._client, row)
        if found is not None:
            logger.info("run %s: shard %s: adopted batch %s", self._run_id, row.key, found.id)
            self._opened(journal, row.key, found)
            return
        self._unreserve(row.key)
        journal.update_shard(row.key, state="uploaded")
        self._set_status(row.key, "uploaded")
        self._set_back(row.key, "a lost create proved never made")

    def _opened(self, journal: Journal, key: str, batch: Batch) -> None:
        self._setbacks.pop(key, None)
        journal.update_shard(key, state="open", batch_id=batch.id, status=batch.status.value)
        self._track(journal.shard(key), batch)

    def _track(self, row: ShardRow, batch: Batch | None = None, *, deadline: bool = True) -> None:
        assert row.batch_id is not None
        assert self._fleet is not None
        self._shard_of[row.batch_id] = row.key
        self._put_status(row.key, row.status or "validating")
        if row.status not in _TERMINAL_STATUSES:
            self._reserve(row)
        timeout = self._config.batch_timeout if deadline else None
        if timeout is not None:
            created = row.create_started_at or row.planned_at
            timeout = max(0.0, created + timeout - self._clock.now())
        self._fleet.add(batch if batch is not None else row.batch_id, timeout=timeout)
        self._emit_progress()

    async def _admit(self, row: ShardRow) -> None:
        """Wait until the shard's tokens fit its model's enqueued-token limit."""
        limit = self._config.enqueued_token_limits.get(row.model or "")
        if limit is None:
            return
        while row.key not in self._reserved and (
            self._enqueued.get(row.model, 0) > 0
            and self._enqueued.get(row.model, 0) + row.tokens > limit
        ):
            self._budget_changed.clear()
            await sleep_or_set(self._clock, None, self._budget_changed, self._stopping)
            if self._stopping.is_set():
                raise _Stop
        self._reserve(row)

    def _reserve(self, row: ShardRow) -> None:
        """Count a shard's tokens as enqueued for its model (once)."""
        if row.key not in self._reserved:
            self._reserved[row.key] = (row.model, row.tokens)
            self._enqueued[row.model] = self._enqueued.get(row.model, 0) + row.tokens

    def _unreserve(self, key: str) -> None:
        """A shard's batch ended (or was proved never made): its tokens are free."""
        reserved = self._reserved.pop(key, None)
        if reserved is not None:
            model, tokens = reserved
            self._enqueued[model] = max(0, self._enqueued.get(model, 0) - tokens)
            self._budget_changed.set()

    def _reject_shard(self, journal: Journal, row: ShardRow, code: str, message: str) -> None:
        """The server refused the shard's batch: every queued line ends with ``code``."""
        self._settle(journal, row, None, code, message, retryable=False, status="rejected")

    # --- tracking ------------------------------------------------------------------------

    async def _consume(self, events: AsyncIterator[Any]) -> None:
        async for event in events:
            if isinstance(event, StatusChanged):
                key = self._shard_of.get(event.batch_id)
                journal = self._journal
                if key is not None and journal is not None:
                    journal.update_shard(key, status=event.batch.status.value)
                    self._set_status(key, event.batch.status.value)
            elif isinstance(event, BatchDone):
                key = self._shard_of.get(event.batch_id)
                if key is not None:
                    self._collecting.add(key)
                    self._spawn(self._collect(key, event), name=f"collect {key}")
            elif isinstance(event, TrackingError):
                self._tracking_failed(event.error)
        # The events end only when the fleet stopped on its own (the run cancels this
        # task before it closes the fleet): nothing tracks the batches any more.
        raise RunError(
            f"run {self._run_id}: the fleet stopped tracking the batches (was the client "
            "closed?); the journal is intact: run again to continue"
        )

    def _tracking_failed(self, error: AiobatchError) -> None:
        """A resumed run's first calls may be the fleet's polls: while the server has
        never answered, polls that cannot connect stop the run after
        ``unreachable_after`` (the fleet reports every few failures in a row).

        Raises:
            UnreachableError: the server could not be reached for that long.
        """
        fleet = self._fleet
        if isinstance(error, APIStatusError) or (fleet is not None and fleet.stats.observations):
            self._heard_from_server()
        if self._answered or not isinstance(error, ConnectError):
            return
        elapsed = self._clock.monotonic() - self._network_since
        budget = self._config.unreachable_after
        if elapsed >= budget:
            failures = fleet.stats.failures if fleet is not None else 0
            reason = f"unreachable_after {format_duration(budget)}"
            raise self._gave_up(
                "tracking the open batches", failures, elapsed, reason, error
            ) from error

    def _set_status(self, key: str, status: str) -> None:
        self._put_status(key, status)
        self._emit_progress()

    def _put_status(self, key: str, status: str) -> None:
        old = self._status.get(key)
        if old == status:
            return
        if old is not None:
            self._status_counts[old] -= 1
        self._status[key] = status
        self._status_counts[status] += 1

    def _emit_progress(self) -> None:
        callback = self._on_progress
        if callback is not None:
            try:
                callback(self.progress())
            except Exception:  # a display must never break the run
                logger.exception("progress callback failed")

    # --- collection ----------------------------------------------------------------------

    async def _collect(self, key: str, done: BatchDone | None) -> None:
        """Read a finished batch's files into the journal and settle every line."""
        self._collecting.add(key)
        try:
            journal = self._db()
            self._unreserve(key)
            if done is not None and self._fleet is not None:
                self._fleet.forget(done.batch_id)
            streak = _Streak()
            async with self._collect_slots:
                while True:
                    streak.started = self._clock.monotonic()
                    try:
                        await self._collect_once(journal, key, done)
                        self._heard_from_server()
                        if self._config.delete_files:
                            await self._delete_files(journal.shard(key))
                        return
                    except (TransportError, APIStatusError, DecodeError) as exc:
                        delay = self._step_failed(f"collecting shard {key}", streak, exc)
                        await self._clock.sleep(delay)
                        done = None
        finally:
            self._collecting.discard(key)
            if self._journal is not None:
                row = self._journal.shard(key)
                if row.state == "collected" and row.batch_id is not None:
                    self._shard_of.pop(row.batch_id, None)
            self._changed.set()

    async def _collect_once(self, journal: Journal, key: str, done: BatchDone | None) -> None:
        row = journal.shard(key)
        if row.state == "collected":
            return
        assert row.batch_id is not None
        batch: Batch | None = done.batch if done is not None else None
        if row.state == "open":
            if done is not None and done.reason is DoneReason.NOT_FOUND:
                self._settle(journal, row, None, "batch_not_found", "the server lost the batch")
                return
            ended = done is not None and done.reason is DoneReason.UNKNOWN_STATUS
            if batch is None or not (batch.is_terminal or ended):
                batch = await self._retrieve(row.batch_id)
            if not (batch.is_terminal or ended):
                # The fleet stopped tracking a batch that still runs (its deadline):
                # cancel it and track it to its end, so no line runs twice.
                self._cancel_and_track(journal, row, batch)
                return
            if batch.status is BatchStatus.FAILED and _token_limited(batch):
                self._recreate(journal, row, batch)
                return
            batch = await self._with_output(batch)
            journal.update_shard(
                key,
                state="collecting",
                status=batch.status.value,
                output_file_id=batch.output_file_id,
                error_file_id=batch.error_file_id,
            )
            row = journal.shard(key)
        elif batch is None:
            assert row.batch_id is not None
            try:
                batch = await self._retrieve(row.batch_id)
            except NotFoundError:
                # The batch is gone, but the journal knows its status and files.
                batch = Batch(
                    id=row.batch_id,
                    endpoint=row.url,
                    input_file_id=row.file_id or "",
                    completion_window=None,
                    status=BatchStatus(row.status or "completed"),
                    created_at=0,
                    output_file_id=row.output_file_id,
                    error_file_id=row.error_file_id,
                )
        members = journal.shard_members(key)
        for column, progress in (
            ("output_file_id", "output_done"),
            ("error_file_id", "error_done"),
        ):
            file_id = getattr(row, column)
            if not file_id or (column == "error_file_id" and file_id == row.output_file_id):
                continue
            try:
                await self._read_file(journal, row, members, file_id, progress)
            except NotFoundError:
                gone = self._gone.get(file_id, 0) + 1
                self._gone[file_id] = gone
                if gone < _GONE_AFTER:
                    raise
                logger.warning(
                    "run %s: the %s %s of batch %s is gone (404 %d times); its lines not "
                    "collected yet count as missing",
                    self._run_id,
                    column.replace("_id", "").replace("_", " "),
                    file_id,
                    row.batch_id,
                    gone,
                )
                journal.update_shard(key, **{column: None})
                row = journal.shard(key)
        self._settle_batch(journal, journal.shard(key), batch)

    async def _delete_files(self, row: ShardRow) -> None:
        """``delete_files``: a collected shard's input, output and error files go; a file
        that cannot be deleted is logged and left."""
        if row.state != "collected":
            return
        for file_id in dict.fromkeys((row.file_id, row.output_file_id, row.error_file_id)):
            if file_id is None:
                continue
            try:
                await self._client.delete_file(file_id)
            except AiobatchError as exc:
                logger.info("run %s: could not delete file %s: %s", self._run_id, file_id, exc)

    def _cancel_and_track(self, journal: Journal, row: ShardRow, batch: Batch) -> None:
        assert self._fleet is not None
        logger.warning(
            "run %s: batch %s (shard %s) is still %s at its deadline; cancelling it",
            self._run_id,
            batch.id,
            row.key,
            batch.wire_status,
        )
        journal.update_shard(row.key, cancel_reason=row.cancel_reason or "deadline")
        self._track(journal.shard(row.key), batch, deadline=False)
        self._fleet.cancel(batch.id)

    def _recreate(self, journal: Journal, row: ShardRow, batch: Batch) -> None:
        """``token_limit_exceeded``: create the batch again from the same file, later."""
        if row.creates >= self._config.max_recreates:
            message = batch.outcome
            self._settle(journal, row, batch, TOKEN_LIMIT_CODE, message, retryable=False)
            return
        delay = self._token_waits.backoff_delay(row.creates)
        logger.warning(
            "run %s: batch %s (shard %s) failed with token_limit_exceeded; re-creating it "
            "from file %s in %.0fs",
            self._run_id,
            batch.id,
            row.key,
            row.file_id,
            delay,
        )
        assert row.batch_id is not None
        self._shard_of.pop(row.batch_id, None)
        journal.update_shard(
            row.key,
            state="uploaded",
            creates=row.creates + 1,
            not_before=self._clock.now() + delay,
            batch_id=None,
            status=None,
            create_key=None,
            history=f"{row.history} {batch.id}".strip(),
            cancel_reason=None,
            note=f"token_limit_exceeded on {batch.id}",
        )
        self._set_status(row.key, "uploaded")
        if not self._stopping.is_set():
            self._start_submit(row.key)

    async def _with_output(self, batch: Batch) -> Batch:
        """A ``completed`` batch that reports finished requests but no output file yet
        (a lag seen on OpenAI): retrieve it again a few times."""
        tries = 0
        while (
            batch.status is BatchStatus.COMPLETED
            and batch.output_file_id is None
            and batch.request_counts is not None
            and batch.request_counts.completed > 0
            and tries < self._config.output_lag_retries
        ):
            await self._clock.sleep(self._step_waits.backoff_delay(tries))
            tries += 1
            batch = await self._retrieve(batch.id)
        return batch

    async def _retrieve(self, batch_id: str) -> Batch:
        """The batch now, its status mapped by ``status_aliases``."""
        return alias_status(
            await self._client.retrieve_batch(batch_id), self._config.status_aliases
        )

    async def _read_file(
        self,
        journal: Journal,
        row: ShardRow,
        members: dict[str, tuple[int, int, str]],
        file_id: str,
        column: str,
    ) -> None:
        """Stream one result file into the journal, resuming after the lines already
        committed; each chunk of lines is one transaction with the new line count."""
        skip = int(getattr(row, column))
        number = 0
        finals: list[tuple[Any, ...]] = []
        retries: list[tuple[int, int, bytes | None]] = []
        tokens = [0, 0]
        chunk = self._config.collect_chunk
        chunk_bytes = self._config.collect_chunk_bytes
        held = [0]  # bytes of the lines waiting for the next commit
        cancelled_by_run = row.cancel_reason == "run"

        def commit(upto: int) -> None:
            with journal.transaction() as db:
                journal.add_results(db, finals)
                journal.retry_later(db, retries)
                journal.update_shard(
                    row.key,
                    db,
                    **{column: upto},
                    input_tokens=row.input_tokens + tokens[0],
                    output_tokens=row.output_tokens + tokens[1],
                )
            row.input_tokens += tokens[0]
            row.output_tokens += tokens[1]
            tokens[0] = tokens[1] = 0
            held[0] = 0
            self._counted(finals, retries)
            finals.clear()
            retries.clear()
            self._results_changed.set()

        async with contextlib.aclosing(self._client.iter_file_lines(file_id)) as lines:
            async for raw in lines:
                number += 1
                if number <= skip or not raw.strip():
                    continue
                try:
                    result = decode_result_line(raw, what=f"line {number} of file {file_id}")
                except DecodeError as exc:
                    # The request ran (and was paid): end it with the decode error rather
                    # than run it again, when the line says which request it is.
                    seq_cid = _undecodable(raw, members)
                    logger.warning("run %s: a result line does not decode: %s", self._run_id, exc)
                    if seq_cid is not None:
                        seq, cid, attempts = seq_cid
                        members[cid] = (seq, attempts, "resolved")
                        line = _own_error(cid, "undecodable_result", describe(exc))
                        finals.append(
                            (
                                seq,
                                "error",
                                "undecodable_result",
                                row.key,
                                row.batch_id,
                                attempts,
                                0,
                                0,
                                line,
                            )
                        )
                    continue
                member = members.get(result.custom_id)
                if member is None or member[2] != "queued":
                    if member is None:
                        logger.warning(
                            "run %s: batch %s returned custom_id %r, which it was not sent",
                            self._run_id,
                            row.batch_id,
                            result.custom_id,
                        )
                    continue
                seq, attempts, _ = member
                members[result.custom_id] = (seq, attempts, "resolved")
                kind, code, retryable = _classify(result)
                data = bytes(raw).strip()
                held[0] += len(data)
                if retryable and cancelled_by_run and code in ("batch_cancelled", "batch_canceled"):
                    # Our own cancel: the line runs again as if for the first time.
                    retries.append((seq, attempts, None))
                elif retryable and attempts < self._config.max_rounds:
                    retries.append((seq, attempts + 1, data))
                else:
                    used_in, used_out = _line_tokens(result)
                    tokens[0] += used_in
                    tokens[1] += used_out
                    finals.append(
                        (seq, kind, code, row.key, row.batch_id, attempts, used_in, used_out, data)
                    )
                if len(finals) + len(retries) >= chunk or held[0] >= chunk_bytes:
                    commit(number)
                    await asyncio.sleep(0)  # let the other batches' tasks run
        commit(number)

    def _counted(
        self, finals: list[tuple[Any, ...]], retries: list[tuple[int, int, bytes | None]]
    ) -> None:
        for final in finals:
            if final[1] == "success":
                self._counts["succeeded"] += 1
            else:
                self._counts["failed"] += 1
            if final[5] > 0:
                self._counts["retrying"] -= 1
        for seq_attempts in retries:
            if seq_attempts[1] == 1:
                self._counts["retrying"] += 1
        self._counts["retrying"] = max(0, self._counts["retrying"])

    def _settle_batch(self, journal: Journal, row: ShardRow, batch: Batch) -> None:
        """Every line of a collected batch without a result line gets its outcome."""
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
            strays = sorted({n for n in named if not 1 <= n <= row.lines})
            if strays:
                # Lines the file does not have (a server numbering from 0, or otherwise):
                # no line can be blamed by its number, so none is ended for it and every
                # line spends a round (at most 1 + max_rounds batches).
                retryable = True
                what = "lines" if len(strays) > 1 else "line"
                listed = ", ".join(map(str, strays))
                message = (
                    f"batch {batch.id} failed naming {what} {listed}, which its "
                    f"{row.lines}-line file does not have: {batch.outcome}"
                )
                then = "its lines go to a retry round (or end, out of rounds)"
            elif errors and len(named) == len(errors):
                # The batch failed because of the lines its errors name: those end with
                # their error, the others never ran and run again.
                self._fail_lines(journal, row, batch)
                retryable = free = True
                message = f"batch {batch.id} failed because of other lines: {batch.outcome}"
                then = "the named lines end with their error, the others are sent again"
            else:
                retryable = not (codes & PERMANENT_BATCH_CODES)
                if named:
                    self._fail_lines(journal, row, batch)
                then = (
                    "its lines go to a retry round (or end, out of rounds)"
                    if retryable
                    else "its lines end"
                )
            logger.warning(
                "run %s: batch %s (shard %s, %d lines) failed: %s; %s",
                self._run_id,
                batch.id,
                row.key,
                row.lines,
                _describe_errors(batch),
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
                self._run_id,
                batch.id,
                row.key,
                batch.wire_status,
            )
        else:  # Portkey's file_upload_failed / batch_start_failed, and the like
            code, message, retryable = "batch_failed", batch.outcome, True
        self._settle(
            journal, row, batch, code, message, retryable=retryable, free=free, status=ended
        )

    def _fail_lines(self, journal: Journal, row: ShardRow, batch: Batch) -> None:
        """A failed batch's errors that name input lines end those lines."""
        assert batch.errors is not None
        by_line: dict[int, tuple[str, str]] = {}
        for error in batch.errors.data:
            if error.line is not None:
                by_line.setdefault(error.line, (error.code or "batch_failed", error.message or ""))
        queued = journal.queued_at(row.key)
        finals = []
        for number, (code, message) in by_line.items():
            if number in queued:
                seq, cid, attempts = queued[number]
                line = _own_error(cid, code, message)
                finals.append((seq, "error", code, row.key, row.batch_id, attempts, 0, 0, line))
        with journal.transaction() as db:
            journal.add_results(db, finals)
        self._counted(finals, [])

    def _settle(
        self,
        journal: Journal,
        row: ShardRow,
        batch: Batch | None,
        code: str,
        message: str,
        *,
        retryable: bool = True,
        free: bool = False,
        status: str | None = None,
    ) -> None:
        """Give every still-queued line of a shard its outcome and close the shard, with
        ``status`` (default: the batch's, or ``not_found`` without one).

        A retryable line spends one of its rounds, unless the line is not at fault
        (``free``: its batch failed because of other lines; or the run cancelled it).
        """
        cancelled_by_run = row.cancel_reason == "run" and code == "batch_cancelled"
        free = free or cancelled_by_run
        finals: list[tuple[Any, ...]] = []
        retries: list[tuple[int, int, bytes | None]] = []
        for seq, cid, attempts in journal.queued_at(row.key).values():
            data = _own_error(cid, code, message)
            if retryable and free:
                retries.append((seq, attempts, None))
            elif retryable and attempts < self._config.max_rounds:
                retries.append((seq, attempts + 1, data))
            else:
                finals.append((seq, "error", code, row.key, row.batch_id, attempts, 0, 0, data))
        if status is None:
            status = batch.status.value if batch is not None else "not_found"
        with journal.transaction() as db:
            journal.add_results(db, finals)
            journal.retry_later(db, retries)
            journal.update_shard(row.key, db, state="collected", status=status, note=message)
        self._counted(finals, retries)
        self._set_status(row.key, status)
        if row.batch_id is not None:
            self._shard_of.pop(row.batch_id, None)
        self._results_changed.set()
        self._changed.set()

    # --- output --------------------------------------------------------------------------

    def _write_output(self, journal: Journal) -> None:
        """Write every final result to the output file, atomically, in order."""
        target = self._output
        if target is None:
            return
        temp = f"{target}.{os.getpid()}.part"
        with open(temp, "wb") as fh:
            for data in journal.result_lines(order=self._config.order):
                fh.write(data)
                fh.write(b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, target)
        journal.set_meta(output_written=os.path.abspath(target))


def request_cancel(journal_path: str | os.PathLike[str], *, busy_timeout: float = 10.0) -> None:
    """Ask the run that holds a journal to cancel (what ``aiobatch cancel`` does); the run
    sees it within ``cancel_poll_interval`` seconds.

    Raises:
        JournalError: no journal there, or it stayed busy for ``busy_timeout`` seconds
            (a run checking its input holds it).
    """
    with Journal(journal_path, busy_timeout=busy_timeout) as journal:
        journal.set_meta(cancel_requested=repr(time.time()))


def run_is_live(journal_path: str | os.PathLike[str]) -> bool:
    """Whether a process holds the journal (runs it) right now."""
    lock = _Lock(os.fspath(journal_path))
    try:
        lock.acquire()
    except JournalError:
        return True
    lock.release()
    return False


async def cancel_batches(journal_path: str | os.PathLike[str], client: BatchClient) -> list[str]:
    """Cancel the open batches of a run that is not running (its process died or was
    stopped), so they stop spending; what they finished is collected when the run is
    started again. The cancels count as the run's own: their cancelled lines do not
    spend retry rounds.

    Returns:
        The ids of the batches a cancel was sent for.

    Raises:
        JournalError: a process runs the journal (use :func:`request_cancel`), or there
            is no journal.
    """
    path = os.fspath(journal_path)
    lock = _Lock(path)
    lock.acquire()
    sent: list[str] = []
    try:
        with Journal(path) as journal:
            for row in journal.shards("creating"):
                started = row.create_started_at or row.planned_at
                await client.clock.sleep(
                    max(0.0, started + client.create_settle - client.clock.now())
                )
                found = await find_shard_batch(client, row)
                if found is not None:
                    journal.update_shard(
                        row.key, state="open", batch_id=found.id, status=found.status.value
                    )
            for key, batch_id in journal.open_batches():
                journal.update_shard(key, cancel_reason="run")
                try:
                    await client.cancel_batch(batch_id)
                except (APIStatusError, InvalidTransitionError) as exc:
                    # Already finished (409) or gone (404): nothing to stop.
                    logger.info("batch %s was not cancelled: %s", batch_id, exc)
                    continue
                sent.append(batch_id)
    finally:
        lock.release()
    return sent
