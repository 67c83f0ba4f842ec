"""A run's settings (:class:`RunConfig`), what it reads (:data:`RequestSource`) and what
it yields (:class:`RunResult`)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, Callable, Iterable, Mapping
from typing import Any, Literal, TypeAlias

import attrs

from .._fleet import FleetConfig
from .._lifecycle import BatchStatus, parse_status_aliases
from .._models import ResultLine, ResultSuccess
from .._retry import DEFAULT_MAX_RETRY_WAIT
from .._validators import non_negative, positive, positive_or_none

__all__ = ["Price", "RequestSource", "RunConfig", "RunResult"]

#: Batches a request may go into, beyond its ``1 + max_rounds``, by default (see
#: ``RunConfig.max_batches_per_request``): re-sends that spend no round.
FREE_BATCHES = 10

#: What a run reads its requests from: a JSONL file, or request objects (or their JSON
#: lines), sync or async.
RequestSource: TypeAlias = (
    "str | os.PathLike[str] | Iterable[Mapping[str, Any] | str | bytes] "
    "| AsyncIterable[Mapping[str, Any] | str | bytes]"
)


@attrs.frozen
class Price:
    """A model's batch prices, in dollars per million tokens.

    Attributes:
        input: a million prompt tokens.
        output: a million completion tokens.
    """

    input: float = attrs.field(validator=non_negative)
    output: float = attrs.field(validator=non_negative)

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """The dollars that many tokens cost."""
        return (input_tokens * self.input + output_tokens * self.output) / 1_000_000


def _prices(value: Mapping[str, Price | tuple[float, float]]) -> Mapping[str, Price]:
    """Model -> :class:`Price`; a pair ``(input, output)`` is taken as one."""
    return {
        str(model): price if isinstance(price, Price) else Price(*price)
        for model, price in value.items()
    }


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
            :func:`aiobatch._run._line_checks.estimate_tokens`, about 4 characters a token).
        fleet: how batches are polled (default :class:`FleetConfig` defaults); its
            ``requests_per_second`` paces the fleet's own polls only.
        requests_per_second: the provider account's request budget for every request
            of the run (uploads, creates, polls, downloads, each retry), on a PostgreSQL
            journal shared with the run's workers (each takes its share; give each the
            same); its burst is ``fleet.burst``. None (the default): no budget beyond
            the fleet's for its polls. Ignored on a SQLite journal.
        batch_timeout: cancel a batch still open this long after its creation and keep
            its finished lines (the rest go to a retry round); None for no limit.
        max_submissions: shards uploaded and created at once.
        max_collections: batches whose files are read at once.
        collect_chunk: result lines committed to the journal per transaction, at most,
            shared by the collections under way (with ``n`` reading at once, each
            commits after an ``n``-th of it).
        collect_chunk_bytes: result bytes after which a transaction is committed,
            shared the same way (so the collections together hold about this much, and
            the chunk each is writing meanwhile, plus a line each, however long the
            lines are and however many batches end at once).
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
        prices: model -> its :class:`Price` (or an ``(input, output)`` pair), in
            dollars per million tokens at batch prices: the report then has each
            model's cost (``RunReport.cost_by_model``) beside its tokens.
    """

    max_lines: int | None = attrs.field(default=None, validator=positive_or_none)
    max_bytes: int | None = attrs.field(default=None, validator=positive_or_none)
    max_rounds: int = attrs.field(default=3, validator=non_negative)
    order: Literal["input", "completion"] = attrs.field(default="input", validator=_order)
    skip_invalid: bool = False
    completion_window: str = "24h"
    metadata: Mapping[str, str] = attrs.field(factory=dict)
    enqueued_token_limits: Mapping[str, int] = attrs.field(factory=dict)
    token_estimator: Callable[[Mapping[str, Any]], int] | None = None
    fleet: FleetConfig | None = None
    requests_per_second: float | None = attrs.field(default=None, validator=positive_or_none)
    batch_timeout: float | None = attrs.field(default=None, validator=positive_or_none)
    max_submissions: int = attrs.field(default=8, validator=positive)
    max_collections: int = attrs.field(default=4, validator=positive)
    # 4,000, not 2,000: at 300,000 requests (benchmarks/bench_run_100k.py) 8.28-9.26 s
    # outside the fake against 8.47-9.35 s (3 alternated runs each, medians 8.36 s and
    # 9.15 s), and the runner's peak growth 17.0 MB at 10,000 and 26.2 MB at 1,000,000
    # requests, against 13.0 and 22.5 MB: a run holds its chunk at any size. 8,000
    # took 20.4 and 34.1 MB, 13.7 MB apart.
    collect_chunk: int = attrs.field(default=4000, validator=positive)
    collect_chunk_bytes: int = attrs.field(default=8 * 1024 * 1024, validator=positive)
    retry_coalesce: float = attrs.field(default=30.0, validator=non_negative)
    token_limit_backoff: float = attrs.field(default=60.0, validator=non_negative)
    token_limit_max_backoff: float = attrs.field(default=1800.0, validator=non_negative)
    max_recreates: int = attrs.field(default=100, validator=non_negative)
    max_batches_per_request: int | None = attrs.field(default=None, validator=positive_or_none)
    step_backoff: float = attrs.field(default=5.0, validator=non_negative)
    give_up_after: float | None = attrs.field(default=600.0, validator=positive_or_none)
    max_step_failures: int | None = attrs.field(default=None, validator=positive_or_none)
    unreachable_after: float = attrs.field(default=30.0, validator=positive)
    max_retry_wait: float = attrs.field(default=DEFAULT_MAX_RETRY_WAIT, validator=positive)
    output_lag_retries: int = attrs.field(default=3, validator=non_negative)
    cancel_poll_interval: float = attrs.field(default=5.0, validator=positive)
    cancel_timeout: float | None = attrs.field(default=None, validator=positive_or_none)
    work_dir: str | None = None
    input_expires_after: int | None = attrs.field(default=None, validator=positive_or_none)
    delete_files: bool = False
    status_aliases: Mapping[str, BatchStatus] = attrs.field(
        factory=dict, converter=parse_status_aliases
    )
    prices: Mapping[str, Price] = attrs.field(factory=dict, converter=_prices)

    @property
    def batch_limit(self) -> int:
        """The most batches one request may go into (``max_batches_per_request``)."""
        if self.max_batches_per_request is not None:
            return self.max_batches_per_request
        return 1 + self.max_rounds + FREE_BATCHES

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
