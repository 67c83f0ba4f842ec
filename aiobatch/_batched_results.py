"""The answers of :class:`~aiobatch.BatchedOpenAI`'s calls: the endpoints it may call and
the official SDK type of each, :class:`BatchedResult` (an answer without the ``openai``
package), :class:`BatchedStats`, and the mixin that turns a call's result line into its
return value or its typed error (:class:`~aiobatch.errors.RequestFailedError`,
:class:`~aiobatch.errors.BatchEndedError`, :class:`~aiobatch.errors.RequestNotRunError`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import attrs

from ._batched_calls import _Call
from ._models import ResultError, ResultHTTPError, ResultLine, ResultSuccess
from ._run._outcomes import CANCELLED_CODES
from .errors import BatchEndedError, RequestFailedError, RequestNotRunError

#: The endpoints a batched call may go to, and the official SDK type of each answer.
BATCHED_ENDPOINTS: Mapping[str, tuple[str, str]] = {
    "/v1/chat/completions": ("openai.types.chat", "ChatCompletion"),
    "/v1/embeddings": ("openai.types", "CreateEmbeddingResponse"),
    "/v1/responses": ("openai.types.responses", "Response"),
    "/v1/completions": ("openai.types", "Completion"),
    "/v1/moderations": ("openai.types", "ModerationCreateResponse"),
}

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


class _Answering:
    """The answer of a call from its result line (a mixin of the client)."""

    _done: int
    _failed: int
    _sdk: bool

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
