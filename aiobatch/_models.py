"""Frozen wire models for the Batch and Files APIs.

These classes hold data only; they never parse. Every wire quirk (nulls, unknown
fields, the shape of result lines, the millisecond and ISO-8601 timestamps and the
capitalised or foreign statuses some providers send) lives in :mod:`aiobatch._convert`.
Timestamps are integer Unix seconds, whatever the provider sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

from ._lifecycle import MEANINGS, TERMINAL, BatchStatus

__all__ = [
    "BATCH_TIMESTAMPS",
    "Batch",
    "BatchError",
    "BatchErrors",
    "BatchPage",
    "BatchRequest",
    "BatchUsage",
    "ErrorBody",
    "File",
    "FileDeleted",
    "FilePage",
    "InputTokensDetails",
    "LineError",
    "LineResponse",
    "OutputTokensDetails",
    "RequestCounts",
    "ResultError",
    "ResultHTTPError",
    "ResultLine",
    "ResultSuccess",
    "ResultSummary",
]


@attrs.frozen
class RequestCounts:
    """How many of a batch's requests are done."""

    total: int = 0
    completed: int = 0
    failed: int = 0


@attrs.frozen
class InputTokensDetails:
    """Breakdown of input tokens."""

    cached_tokens: int = 0


@attrs.frozen
class OutputTokensDetails:
    """Breakdown of output tokens."""

    reasoning_tokens: int = 0


@attrs.frozen
class BatchUsage:
    """Token usage of a whole batch (batches created after 2025-09-07)."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    input_tokens_details: InputTokensDetails | None = None
    output_tokens_details: OutputTokensDetails | None = None


@attrs.frozen
class BatchError:
    """One reason a batch failed validation (``errors.data[]``)."""

    code: str | None = None
    message: str | None = None
    param: str | None = None
    #: 1-based line of the input file, when the error is about one line.
    line: int | None = None


@attrs.frozen
class BatchErrors:
    """The ``errors`` object of a failed batch."""

    data: tuple[BatchError, ...] = ()
    object: str = "list"


#: The Batch fields that are times (Unix seconds once decoded), in lifecycle order.
BATCH_TIMESTAMPS: tuple[str, ...] = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


@attrs.frozen
class Batch:
    """A snapshot of one batch, as the server reported it."""

    id: str
    #: The batch's endpoint (``/v1/chat/completions``); None when the server did not say
    #: (Bedrock batches through Portkey carry none).
    endpoint: str | None
    input_file_id: str
    #: ``"24h"``; None when the server did not say (Vertex AI through Portkey sends null).
    completion_window: str | None
    status: BatchStatus
    created_at: int
    object: Literal["batch"] = "batch"
    model: str | None = None
    errors: BatchErrors | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts | None = None
    usage: BatchUsage | None = None
    metadata: Mapping[str, str] | None = None
    #: The status string exactly as the server sent it, when it is not ``status.value``:
    #: a provider's spelling mapped onto the state machine (``"Validating"``,
    #: ``"InProgress"``, ``"submitted"``, ``"stopped"``, ``"partially_completed"``...), or
    #: a string aiobatch does not know (``status`` is then :attr:`BatchStatus.UNKNOWN`);
    #: None when the server sent ``status.value`` itself.
    raw_status: str | None = None

    @property
    def is_terminal(self) -> bool:
        """Whether the batch has finished and will not change again."""
        return self.status in TERMINAL

    @property
    def wire_status(self) -> str:
        """The status string as the server sent it."""
        return self.raw_status if self.raw_status is not None else self.status.value

    @property
    def lifecycle_status(self) -> BatchStatus | str:
        """What to hand :meth:`BatchLifecycle.observe <aiobatch.BatchLifecycle.observe>`:
        ``status``, or the server's string when it is UNKNOWN (so that observing it
        raises an :class:`~aiobatch.errors.UnknownStatusError` that names it)."""
        status = self.status
        if status is BatchStatus.UNKNOWN and self.raw_status is not None:
            return self.raw_status
        return status

    @property
    def outcome(self) -> str:
        """What the batch's status means, in one sentence, with the server's first error
        message when there is one (``failed``, Portkey's ``file_upload_failed`` and
        ``batch_start_failed``). The meanings are :data:`aiobatch.MEANINGS`."""
        text = MEANINGS[self.status]
        if self.raw_status is not None and self.status is not BatchStatus.UNKNOWN:
            text = f"{text} (the server said {self.raw_status!r})"
        elif self.status is BatchStatus.UNKNOWN:
            text = f"{text}: {self.raw_status!r}"
        errors = self.errors.data if self.errors is not None else ()
        if errors and errors[0].message:
            first = errors[0]
            code = f"{first.code}: " if first.code else ""
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            text = f"{text}; {code}{first.message}{more}"
        return text


def alias_status(batch: Batch, aliases: Mapping[str, BatchStatus]) -> Batch:
    """``batch`` with a status aiobatch does not know replaced by the one ``aliases``
    maps its string to (``raw_status`` keeps the server's string); ``batch`` itself
    when its status is known or not mapped."""
    if batch.status is BatchStatus.UNKNOWN and batch.raw_status is not None:
        mapped = aliases.get(batch.raw_status)
        if mapped is not None:
            return attrs.evolve(batch, status=mapped)
    return batch


@attrs.frozen
class BatchPage:
    """One page of ``GET /v1/batches``."""

    data: tuple[Batch, ...]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
    object: str = "list"


@attrs.frozen
class File:
    """A file stored by the server."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    object: Literal["file"] = "file"
    status: str | None = None
    expires_at: int | None = None
    status_details: str | None = None


@attrs.frozen
class FilePage:
    """One page of ``GET /v1/files``."""

    data: tuple[File, ...]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
    object: str = "list"


@attrs.frozen
class FileDeleted:
    """The answer to ``DELETE /v1/files/{id}``."""

    id: str
    deleted: bool
    object: str = "file"


@attrs.frozen
class ErrorBody:
    """OpenAI's error envelope, ``{"error": {...}}``, unwrapped."""

    message: str
    type: str | None = None
    param: str | None = None
    code: str | None = None


@attrs.frozen
class BatchRequest:
    """One line of a batch input file."""

    custom_id: str
    url: str
    body: Mapping[str, Any]
    method: str = "POST"


@attrs.frozen
class LineResponse:
    """The HTTP result of one request in a batch."""

    status_code: int
    body: Any = None
    request_id: str | None = None


@attrs.frozen
class LineError:
    """Why a request in a batch was never executed (e.g. ``batch_expired``)."""

    code: str | None
    message: str | None


@attrs.frozen
class ResultSuccess:
    """A request that succeeded (HTTP 2xx); found in the output file."""

    custom_id: str
    response: LineResponse
    id: str | None = None
    kind: Literal["success"] = "success"

    @property
    def body(self) -> Any:
        """The response body of the request."""
        return self.response.body


@attrs.frozen
class ResultHTTPError:
    """A request the endpoint answered with an HTTP error; found in the error file."""

    custom_id: str
    response: LineResponse
    id: str | None = None
    kind: Literal["http_error"] = "http_error"

    @property
    def status_code(self) -> int:
        """The HTTP status the endpoint answered with."""
        return self.response.status_code


@attrs.frozen
class ResultError:
    """A request that produced no HTTP response (expired, cancelled...); in the error file."""

    custom_id: str
    error: LineError
    id: str | None = None
    kind: Literal["error"] = "error"

    @property
    def code(self) -> str | None:
        """The error code, such as ``batch_expired``."""
        return self.error.code


#: One line of a batch output or error file.
ResultLine = ResultSuccess | ResultHTTPError | ResultError


@attrs.frozen(slots=True)
class ResultSummary:
    """What a run reads of a result line: whose it is and how it ended (the line itself
    is kept as it came). See :func:`aiobatch._convert.summarize_result_line`.

    Attributes:
        custom_id: the request's id.
        kind: ``success``, ``http_error`` or ``error`` (as :data:`ResultLine`).
        status_code: the HTTP status of a line with a response (None for an error line).
        code: the code of an error line; of an HTTP error, its body's ``error.code``
            (as text); None otherwise.
        input_tokens, output_tokens: the tokens a success's ``usage`` gives (0 when it
            gives none).
    """

    custom_id: str
    kind: Literal["success", "http_error", "error"]
    status_code: int | None = None
    code: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
