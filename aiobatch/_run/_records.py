"""The records a run and its journal trade: frozen attrs classes or named tuples, never
bare positional tuples.

- :class:`PreparedRequest`: one accepted request (preflight makes it; the journal keeps
  it); :class:`RequestRow` is the same request as an ingest writes it, and
  :class:`PendingRequest` what planning reads back of it (named tuples: one per input
  line, so they must be cheap);
- :class:`RequestGroup`: the requests that may share a batch (endpoint, model);
- :class:`ShardPlan`: one batch-to-be, as planning cut it; :class:`NewShard`: one cut
  by the ingest of a new run;
- :class:`Shard`: a shard's journal row (its state is a :class:`ShardState`);
- :class:`Member` and :class:`QueuedLine`: a shard's requests, as collection matches
  result lines to them (by ``custom_id``, or by line in the shard's file);
- :class:`FinalResult` and :class:`RetryLine`: what collection decided for a request: its
  final result, or another round (named tuples: one per result line; a tuple of plain
  values is cheap to make, and the garbage collector stops tracking it, so a chunk of
  them waiting for its commit adds nothing to a full collection's pause);
  :class:`NamedResult`: a final result line as collection read it, named by its
  ``custom_id`` (the journal finds its request as it records it);
- :class:`ResultRow`: a final result read back for :meth:`BatchRun.results`;
- :class:`RunMeta` and :class:`JournalCounts`: the run's own facts and its figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

import attrs

from ._states import ShardState

__all__ = [
    "FailedRequest",
    "FinalResult",
    "JournalCounts",
    "ModelTokens",
    "Member",
    "NamedResult",
    "NewShard",
    "PendingRequest",
    "PreparedRequest",
    "QueuedLine",
    "RequestGroup",
    "RequestRow",
    "ResultRow",
    "RetryLine",
    "RunMeta",
    "Shard",
    "ShardPlan",
    "token_pairs",
]


def _line_size(request: PreparedRequest) -> int:
    return len(request.data) + 1


@attrs.frozen(slots=True, kw_only=True)
class PreparedRequest:
    """One accepted request line, ready to be sharded and uploaded.

    Attributes:
        seq: 0-based position among the accepted requests, in input order.
        url: the line's ``url``, e.g. ``"/v1/chat/completions"``; a batch has one.
        model: the line's ``body.model``; a batch has one.
        tokens: the estimated prompt tokens of the request (see
            :func:`~aiobatch._run._line_checks.estimate_tokens`).
        inputs: the inputs the request counts against a batch's input limit: the
            number of texts (or token arrays) of an embeddings request's ``input``
            list, else 1.
        line: 1-based line number in the source (for an iterable source, the 1-based
            index of the item); 0 when not known.
        custom_id: the line's ``custom_id``, given or generated ('' when not known).
        data: the JSONL line to upload, without its newline (may be left empty when
            only its ``size`` matters, as in :func:`plan_shards
            <aiobatch._run._planning.plan_shards>`). It is the input line's bytes unchanged
            when the line had a ``custom_id`` and a ``method``; otherwise the request
            re-encoded as compact JSON.
        size: the bytes the line takes in a shard file, newline included (>= 1).
        generated_id: whether ``custom_id`` was generated because the line had none.
    """

    seq: int
    url: str
    model: str | None
    tokens: int
    inputs: int = 1
    line: int = 0
    custom_id: str = ""
    data: bytes = b""
    size: int = attrs.field(default=attrs.Factory(_line_size, takes_self=True))
    generated_id: bool = False

    def row(self) -> RequestRow:
        """The request as an ingest writes it."""
        return RequestRow(
            self.seq,
            self.custom_id,
            self.line,
            self.url,
            self.model,
            self.tokens,
            self.inputs,
            self.data,
        )


class RequestRow(NamedTuple):
    """An accepted request as an ingest writes it into the journal (the fields of
    :class:`PreparedRequest` that the journal keeps, in the order of its columns).

    ``shard`` and ``pos``: the shard it is queued in and its line in the shard's file
    (1-based), when the ingest planned it (see :class:`NewShard`); None: it is pending,
    for the run's planning step."""

    seq: int
    custom_id: str
    line: int
    url: str
    model: str | None
    tokens: int
    inputs: int
    data: bytes
    shard: str | None = None
    pos: int | None = None


class NewShard(NamedTuple):
    """A shard planned by the ingest of a new run, recorded with its requests: its row
    (``planned``, round 0) in the journal. Its requests are the rows queued in it,
    each in its first batch.

    Attributes:
        key: its key (``s000042``), unique in the run.
        url: the endpoint of every request in it.
        model: the model of every request in it.
        lines: how many requests it holds.
        size: the bytes of its input file.
        tokens: the estimated prompt tokens of its requests.
    """

    key: str
    url: str
    model: str | None
    lines: int
    size: int
    tokens: int


class PendingRequest(NamedTuple):
    """A pending request as planning reads it back from the journal: what cutting it
    into a shard needs (see :class:`PreparedRequest` for the fields). A named tuple:
    planning reads every request, and one is made about 5x faster than a
    :class:`PreparedRequest` (0.035 s against 0.19 s per 100,000)."""

    seq: int
    size: int
    tokens: int
    inputs: int
    url: str
    model: str | None


@attrs.frozen(slots=True)
class RequestGroup:
    """The requests one batch may hold together: one endpoint, one model.

    Attributes:
        url: the endpoint.
        model: the model (None when the requests name none).
    """

    url: str
    model: str | None


@attrs.frozen(slots=True)
class ShardPlan:
    """One planned batch: which requests go in it.

    Attributes:
        url: the endpoint of every request in it.
        model: the model of every request in it.
        seqs: the requests' ``seq``, in input order.
        size: the bytes of its input file.
        tokens: the estimated prompt tokens of its requests.
        inputs: the inputs of its requests (see :attr:`PreparedRequest.inputs`).
    """

    url: str
    model: str | None
    seqs: tuple[int, ...]
    size: int
    tokens: int
    inputs: int = 0


@attrs.frozen(slots=True, kw_only=True)
class Shard:
    """One shard's journal row.

    Attributes:
        key: its key (``s000042``), unique in the run.
        round: the most retryable failures any of its requests had when it was planned.
        url, model: the endpoint and model of its requests.
        lines, bytes, tokens: how many requests, the bytes of its file, their estimated
            prompt tokens.
        state: where it is (see :mod:`aiobatch._run._states`).
        planned_at: when its intent was recorded (the run's clock).
        upload_started_at: when its last upload was started (None before one).
        file_id: its uploaded input file.
        creates: its batches that failed with ``token_limit_exceeded`` and were created
            again.
        create_key: the key of its last create (in the batch's metadata).
        create_started_at: when its last create was started.
        not_before: no create before this time (a token-limit backoff).
        batch_id: its batch, once known.
        status: its batch's last status (or its own outcome: ``rejected``,
            ``not_found``).
        output_file_id, error_file_id: its batch's result files.
        output_done, error_done: lines of each file already collected.
        cancel_reason: ``run`` (the run cancelled it) or ``deadline``; None otherwise.
        history: the ids of its earlier batches (token-limit re-creates), space
            separated.
        input_tokens, output_tokens: tokens of its final results so far.
        note: why it ended as it did, or why it went back.
    """

    key: str
    round: int
    url: str
    model: str | None
    lines: int
    bytes: int
    tokens: int
    state: ShardState = attrs.field(converter=ShardState)
    planned_at: float
    upload_started_at: float | None = None
    file_id: str | None = None
    creates: int = 0
    create_key: str | None = None
    create_started_at: float | None = None
    not_before: float | None = None
    batch_id: str | None = None
    status: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    output_done: int = 0
    error_done: int = 0
    cancel_reason: str | None = None
    history: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    note: str | None = None


#: The shard fields a journal stores, in order.
SHARD_FIELDS: tuple[str, ...] = tuple(field.name for field in attrs.fields(Shard))


@attrs.frozen(slots=True)
class Member:
    """One request of a shard, as collection matches result lines by ``custom_id``.

    Attributes:
        seq: the request's position.
        attempts: its retryable failures so far.
        queued: it waits for its outcome from this shard (False: it has its result,
            or went back to pending).
    """

    seq: int
    attempts: int
    queued: bool


@attrs.frozen(slots=True)
class QueuedLine:
    """A request of a shard still waiting for its outcome (keyed by its 1-based line
    in the shard's file).

    Attributes:
        seq: the request's position.
        custom_id: its id.
        attempts: its retryable failures so far.
    """

    seq: int
    custom_id: str
    attempts: int


class FinalResult(NamedTuple):
    """A request's final result, as the journal records it.

    Attributes:
        seq: the request's position.
        kind: ``success``, ``http_error`` or ``error``.
        code: the error code (None for a success).
        shard: the shard that produced it (None when no shard did).
        batch_id: the batch it came from, or is about.
        attempts: retryable failures before it.
        input_tokens, output_tokens: the tokens its ``usage`` gives.
        data: the result line (JSON), as written to the output file.
    """

    seq: int
    kind: str
    code: str | None
    shard: str | None
    batch_id: str | None
    attempts: int
    data: bytes
    input_tokens: int = 0
    output_tokens: int = 0


class NamedResult(NamedTuple):
    """A result line that ends its request whatever the request's attempts (a success,
    or a failure that is never retried), named by the ``custom_id`` it gives: see
    :meth:`Journal.record_named <aiobatch._run._journal.Journal.record_named>`.

    Attributes:
        custom_id: the request it names.
        kind: ``success``, ``http_error`` or ``error``.
        code: the error code (None for a success).
        input_tokens, output_tokens: the tokens its ``usage`` gives.
        data: the result line (JSON), as written to the output file.
    """

    custom_id: str
    kind: str
    code: str | None
    input_tokens: int
    output_tokens: int
    data: bytes


class RetryLine(NamedTuple):
    """A request that goes back to pending for another round.

    Attributes:
        seq: the request's position.
        attempts: its retryable failures, this one included (unchanged when the failure
            was not its own).
        last_error: the failure's result line; None when the request runs again as if
            for the first time (the run cancelled its batch).
    """

    seq: int
    attempts: int
    last_error: bytes | None


@attrs.frozen(slots=True, kw_only=True)
class ResultRow:
    """A final result read back from the journal.

    Attributes:
        n: its place in completion order.
        seq: the request's position in input order.
        custom_id: the request's id.
        attempts: retryable failures before it.
        batch_id: the batch it came from, or is about.
        data: the result line.
        kind: ``success``, ``http_error`` or ``error``.
    """

    n: int
    seq: int
    custom_id: str
    attempts: int
    batch_id: str | None
    data: bytes
    kind: str


@attrs.frozen(slots=True, kw_only=True)
class RunMeta:
    """A run's own facts.

    Attributes:
        run_id: the run's id (in every batch's ``aiobatch_run`` metadata).
        source: the input file as given, or ``<requests>``.
        fingerprint: ``sha256:...`` of the input file ('' for other sources).
        state: ``running``, ``cancelling``, ``cancelled``, ``stopped``, ``done`` or
            ``failed``.
        started_at: when the run started (the run's clock).
        updated_at: when the run last recorded that it was alive.
        skipped: input lines skipped by preflight.
        problems: the first problems preflight found, one per line.
        order: the output order (``input`` or ``completion``).
        cancel_requested: when ``aiobatch cancel`` flagged the run (None: not flagged).
        output_written: the output file, once written.
        extra_uploads_deleted: extra copies of shard input files (left by uploads whose
            answer was lost) the run deleted.
    """

    run_id: str
    source: str = ""
    fingerprint: str = ""
    state: str = "running"
    started_at: float = 0.0
    updated_at: float = 0.0
    skipped: int = 0
    problems: str = ""
    order: str = "input"
    cancel_requested: str | None = None
    output_written: str | None = None
    extra_uploads_deleted: int = 0


def _frozen(value: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(value))


@attrs.frozen(slots=True, kw_only=True)
class JournalCounts:
    """A run's figures, read in one go.

    Attributes:
        requests: requests by state (``pending``, ``queued``, ``done``).
        kinds: final results by kind.
        codes: final errors by code (the kind when there is no code).
        input_tokens, output_tokens: tokens of the final results.
        retried: requests that failed for a retryable reason and were sent again (or
            ended) since.
        shard_states: shards by state.
        statuses: shards by their batch's last status (or their state before it).
        batches: batches created.
        recreated: batches re-created after ``token_limit_exceeded``.
        rounds: retry rounds used.
        last_step: the latest step a shard recorded (planned, upload or create
            started), on the run's clock.
    """

    requests: Mapping[str, int] = attrs.field(factory=dict, converter=_frozen)
    kinds: Mapping[str, int] = attrs.field(factory=dict, converter=_frozen)
    codes: Mapping[str, int] = attrs.field(factory=dict, converter=_frozen)
    input_tokens: int = 0
    output_tokens: int = 0
    retried: int = 0
    shard_states: Mapping[str, int] = attrs.field(factory=dict, converter=_frozen)
    statuses: Mapping[str, int] = attrs.field(factory=dict, converter=_frozen)
    batches: int = 0
    recreated: int = 0
    rounds: int = 0
    last_step: float = 0.0


@attrs.frozen(slots=True, kw_only=True)
class FailedRequest:
    """A request whose final result is an error, with the request line itself.

    Attributes:
        seq: the request's position in input order.
        custom_id: the request's id.
        kind: ``http_error`` or ``error``.
        code: the error code (None when the result has none).
        batch_id: the batch it came from, or is about.
        attempts: retryable failures before it.
        request: the request line as uploaded (no newline).
        result: the error result line, as written to the output file.
    """

    seq: int
    custom_id: str
    kind: str
    code: str | None
    batch_id: str | None
    attempts: int
    request: bytes
    result: bytes


@attrs.frozen(slots=True)
class ModelTokens:
    """The tokens of a model's final results: ``input`` (prompt) and ``output``
    (completion)."""

    input: int
    output: int


def token_pairs(tokens: Mapping[str, ModelTokens]) -> dict[str, tuple[int, int]]:
    """``tokens`` as the (input, output) pairs of :attr:`RunReport.tokens_by_model`."""
    return {model: (t.input, t.output) for model, t in tokens.items()}
