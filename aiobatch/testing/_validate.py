"""Validation of a batch input file, as the fake service runs it at the end of ``validating``.

Problems found here never fail the create call: the batch is created, then goes
``failed`` with ``errors.data[]`` entries of ``{code, message, param, line}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from .._models import BatchError, BatchRequest

__all__ = [
    "ENDPOINTS",
    "LEGACY_ENDPOINTS",
    "MODEL_REQUIRED",
    "VALIDATION_MESSAGES",
    "ParsedInput",
    "parse_input",
]

#: The endpoints a batch may target (``CreateBatchRequest.endpoint``).
ENDPOINTS: tuple[str, ...] = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)

#: Endpoint names without ``/v1`` that Azure's dated API versions use (its batch how-to
#: creates with ``endpoint="/chat/completions"`` and lines whose ``url`` is the same),
#: and the endpoint each means.
LEGACY_ENDPOINTS: Mapping[str, str] = {"/chat/completions": "/v1/chat/completions"}

#: Endpoints whose lines must name a ``model``.
MODEL_REQUIRED: frozenset[str] = frozenset(
    {"/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions"}
)

#: Default messages of the validation codes (used for forced failures too).
VALIDATION_MESSAGES: Mapping[str, str] = {
    "invalid_json_line": "This line is not parseable as valid JSON.",
    "duplicate_custom_id": "The custom_id for this request is a duplicate of another request.",
    "url_mismatch": "The url for this request does not match the batch endpoint.",
    "model_mismatch": "The model for this request does not match the model of the batch.",
    "too_many_tasks": "The batch has more requests than the limit of requests per batch.",
    "empty_file": "The input file is empty. Please provide a non-empty file.",
    "missing_required_parameter": "A required parameter is missing.",
    "invalid_request": "This request is invalid.",
    "streaming_unsupported": "Streaming is not supported in the Batch API.",
    "token_limit_exceeded": "Enqueued token limit reached. Please try again once some "
    "in_progress batches have been completed.",
}


@attrs.frozen
class ParsedInput:
    """The outcome of validating an input file.

    Attributes:
        requests: the lines, in file order (empty when there are errors).
        model: the model every line names (None when the lines name none).
        errors: what is wrong; empty when the file is valid.
    """

    requests: tuple[BatchRequest, ...]
    model: str | None
    errors: tuple[BatchError, ...]


def _error(
    code: str, message: str, *, line: int | None = None, param: str | None = None
) -> BatchError:
    return BatchError(code=code, message=message, param=param, line=line)


def _embedding_inputs(body: Mapping[str, Any]) -> int:
    raw = body.get("input")
    if isinstance(raw, list):
        if raw and all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
            return 1
        return len(raw)
    return 1


def _check_line(
    raw: bytes, number: int, endpoint: str
) -> tuple[BatchRequest | None, Any, BatchError | None]:
    """Check one line: returns (request, model, None) or (None, None, error)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return (
            None,
            None,
            _error("invalid_json_line", VALIDATION_MESSAGES["invalid_json_line"], line=number),
        )
    if not isinstance(data, dict):
        return (
            None,
            None,
            _error("invalid_json_line", "This line is not a JSON object.", line=number),
        )
    for name in ("custom_id", "method", "url", "body"):
        if name not in data:
            return (
                None,
                None,
                _error(
                    "missing_required_parameter",
                    f"Missing required parameter: '{name}'.",
                    line=number,
                    param=name,
                ),
            )
    custom_id, method, url, body = data["custom_id"], data["method"], data["url"], data["body"]
    if not isinstance(custom_id, str) or not custom_id:
        return (
            None,
            None,
            _error(
                "invalid_request",
                "custom_id must be a non-empty string.",
                line=number,
                param="custom_id",
            ),
        )
    if method != "POST":
        return (
            None,
            None,
            _error(
                "invalid_request",
                f"Invalid method {method!r}: only 'POST' is supported.",
                line=number,
                param="method",
            ),
        )
    if url != endpoint:
        return (
            None,
            None,
            _error(
                "url_mismatch",
                f"The url {url!r} of this request does not match the batch endpoint {endpoint!r}.",
                line=number,
                param="url",
            ),
        )
    if not isinstance(body, dict):
        return (
            None,
            None,
            _error("invalid_request", "body must be a JSON object.", line=number, param="body"),
        )
    if body.get("stream") is True:
        return (
            None,
            None,
            _error(
                "streaming_unsupported",
                VALIDATION_MESSAGES["streaming_unsupported"],
                line=number,
                param="body.stream",
            ),
        )
    model = body.get("model")
    if model is None and LEGACY_ENDPOINTS.get(endpoint, endpoint) in MODEL_REQUIRED:
        return (
            None,
            None,
            _error(
                "missing_required_parameter",
                "Missing required parameter: 'body.model'.",
                line=number,
                param="body.model",
            ),
        )
    return BatchRequest(custom_id=custom_id, url=url, body=body, method="POST"), model, None


def parse_input(
    content: bytes,
    *,
    endpoint: str,
    max_lines: int,
    max_embedding_inputs: int,
    max_errors: int,
) -> ParsedInput:
    """Validate an input file for a batch with ``endpoint``.

    Blank lines are skipped; line numbers are 1-based physical lines. Checks, in order:
    the file has lines (``empty_file``) and at most ``max_lines`` of them
    (``too_many_tasks``); then each line is JSON (``invalid_json_line``), has
    ``custom_id``/``method``/``url``/``body`` (``missing_required_parameter``) of the
    right types (``invalid_request``), targets ``endpoint`` (``url_mismatch``), is not
    streamed (``streaming_unsupported``), names a model where the endpoint needs one
    (``missing_required_parameter``, param ``body.model``), uses the model of the first
    line (``model_mismatch``) and a ``custom_id`` not used before
    (``duplicate_custom_id``); finally, for embeddings, the inputs summed over all lines
    are at most ``max_embedding_inputs`` (``too_many_tasks``).

    Args:
        content: the input file.
        endpoint: the batch's endpoint.
        max_lines: the most lines a batch may have.
        max_embedding_inputs: the most embedding inputs an embeddings batch may have.
        max_errors: stop after this many line errors.

    Returns:
        The lines and model, or the errors.
    """
    numbered = [
        (number, raw) for number, raw in enumerate(content.split(b"\n"), start=1) if raw.strip()
    ]
    if not numbered:
        return ParsedInput((), None, (_error("empty_file", VALIDATION_MESSAGES["empty_file"]),))
    if len(numbered) > max_lines:
        message = (
            f"The batch input file has {len(numbered):,} requests; "
            f"the limit is {max_lines:,} requests per batch."
        )
        return ParsedInput((), None, (_error("too_many_tasks", message),))
    errors: list[BatchError] = []
    requests: list[BatchRequest] = []
    seen: set[str] = set()
    batch_model: Any = None
    embedding_inputs = 0
    for number, raw in numbered:
        if len(errors) >= max_errors:
            break
        request, model, error = _check_line(raw, number, endpoint)
        if error is None and request is not None:
            if model is not None and batch_model is None:
                batch_model = model
            if model is not None and model != batch_model:
                error = _error(
                    "model_mismatch",
                    f"The model {model!r} of this request does not match the model "
                    f"{batch_model!r} of the other requests; a batch uses one model.",
                    line=number,
                    param="body.model",
                )
            elif request.custom_id in seen:
                error = _error(
                    "duplicate_custom_id",
                    f"The custom_id {request.custom_id!r} is a duplicate of an earlier request.",
                    line=number,
                    param="custom_id",
                )
        if error is not None:
            errors.append(error)
            continue
        assert request is not None
        seen.add(request.custom_id)
        requests.append(request)
        if endpoint == "/v1/embeddings":
            embedding_inputs += _embedding_inputs(request.body)
    if not errors and embedding_inputs > max_embedding_inputs:
        message = (
            f"The batch has {embedding_inputs:,} embedding inputs; "
            f"the limit is {max_embedding_inputs:,} per batch."
        )
        errors.append(_error("too_many_tasks", message))
    if errors:
        return ParsedInput((), None, tuple(errors))
    model = batch_model if isinstance(batch_model, str) else None
    return ParsedInput(tuple(requests), model, ())
