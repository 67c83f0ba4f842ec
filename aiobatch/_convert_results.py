"""The converter's result lines: a batch's output and error lines decoded, re-encoded in
the OpenAI shape, and summarised for a run (part of :mod:`aiobatch._convert`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ._convert_anthropic import is_anthropic_result
from ._convert_core import decode_json, structure
from ._convert_encode import to_wire
from ._models import BatchErrors, ResultHTTPError, ResultLine, ResultSuccess, ResultSummary

_summary_fast: Callable[[bytes | str], ResultSummary | None] | None
try:  # the optional extra aiobatch[fast]
    from ._convert_fast import summary as _summary_fast
except ImportError:  # pragma: no cover - depends on the environment
    _summary_fast = None

__all__ = [
    "decode_batch_output_line",
    "decode_result_line",
    "result_line_bytes",
    "summarize",
    "summarize_result",
    "summarize_result_line",
    "usage_tokens",
]


def decode_result_line(line: bytes | str, *, what: str = "result line") -> ResultLine:
    """Parse one line of a batch output or error file, or of a run's output.

    Args:
        line: the line (JSON; surrounding whitespace is ignored).
        what: how an error names the line (``"line 3 of results.jsonl"``).

    Returns:
        A :class:`ResultSuccess`, :class:`ResultHTTPError` or :class:`ResultError`.

    Raises:
        DecodeError: the line is not JSON, or not a result line.
    """
    return structure(decode_json(line, what=what), ResultLine, what=what)  # type: ignore[arg-type]


def result_line_bytes(raw: bytes) -> bytes:
    """A result line's bytes in the OpenAI shape (``id``, ``custom_id``, ``response``,
    ``error``): ``raw`` itself (stripped) when it is in that shape, else the line decoded
    and encoded again (Anthropic's ``{"custom_id", "result"}`` lines), so that a run's
    output has one shape whatever the provider."""
    data = bytes(raw).strip()
    if b'"result"' in data:
        parsed = decode_json(data, what="result line")
        if isinstance(parsed, dict) and is_anthropic_result(parsed):
            result = decode_result_line(data)
            return json.dumps(to_wire(result), separators=(",", ":"), ensure_ascii=False).encode()
    return data


#: The ``usage`` fields of a success's prompt and completion tokens: Chat Completions
#: and Completions name them one way, the Responses API the other.
_USAGE_TOKENS = (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens"))


def _token_count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def usage_tokens(body: Any) -> tuple[int, int]:
    """(input, output) tokens of a success's response body, from its ``usage``: the
    first of its field pairs that is there; a count that is not an integer is 0."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    for prompt, completion in _USAGE_TOKENS:
        if prompt in usage:
            return _token_count(usage.get(prompt)), _token_count(usage.get(completion, 0))
    return 0, 0


def _body_error_code(body: Any) -> str | None:
    """The ``error.code`` of an HTTP error's response body, as text, if it has one."""
    error = body.get("error") if isinstance(body, dict) else None
    raw = error.get("code") if isinstance(error, dict) else None
    return str(raw) if raw is not None else None


def summarize(result: ResultLine) -> ResultSummary:
    """What a run reads of a decoded result line (see :class:`ResultSummary`)."""
    if isinstance(result, ResultSuccess):
        used = usage_tokens(result.response.body)
        return ResultSummary(result.custom_id, "success", result.response.status_code, None, *used)
    if isinstance(result, ResultHTTPError):
        code = _body_error_code(result.response.body)
        return ResultSummary(result.custom_id, "http_error", result.status_code, code)
    return ResultSummary(result.custom_id, "error", None, result.error.code)


def summarize_result_line(line: bytes | str, *, what: str = "result line") -> ResultSummary:
    """:func:`summarize` of :func:`decode_result_line`, without building the models
    for a line of the usual shape: only what the summary needs is read (by msgspec when
    it is installed, ``aiobatch[fast]``). A line of any other shape takes the typed
    decode, which decides; the summary is the same either way.

    Raises:
        DecodeError: the line does not decode (as :func:`decode_result_line`).
    """
    summary = _summary_fast(line) if _summary_fast is not None else _summary_plain(line)
    if summary is None:
        summary = summarize(decode_result_line(line, what=what))
    return summary


def summarize_result(raw: bytes, *, what: str = "result line") -> tuple[ResultSummary, bytes]:
    """:func:`summarize_result_line` and :func:`result_line_bytes` of one line, reading
    it once: a line the lean reading takes is in the OpenAI shape (it has a
    ``response`` or an ``error`` object, which an Anthropic line has not), so its bytes
    are ``raw`` stripped, without looking for ``"result"`` through the whole line.

    Raises:
        DecodeError: the line does not decode (as :func:`decode_result_line`).
    """
    summary = _summary_fast(raw) if _summary_fast is not None else _summary_plain(raw)
    if summary is not None:
        return summary, raw.strip()
    return summarize(decode_result_line(raw, what=what)), result_line_bytes(raw)


def _summary_plain(line: bytes | str) -> ResultSummary | None:
    """The summary of a line of the usual shape, read with :mod:`json`; None for any
    other shape (or what is no JSON): the typed decode then decides. (With msgspec,
    :func:`aiobatch._convert_fast.summary` does the same.)"""
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if type(value) is not dict:
        return None
    custom_id = value.get("custom_id")
    line_id = value.get("id")
    if type(custom_id) is not str or not (line_id is None or type(line_id) is str):
        return None
    response = value.get("response")
    if response is not None:
        if type(response) is not dict:
            return None
        status = response.get("status_code")
        request_id = response.get("request_id")
        if type(status) is not int or not (request_id is None or type(request_id) is str):
            return None
        body = response.get("body")
        if 200 <= status < 300:
            return ResultSummary(custom_id, "success", status, None, *usage_tokens(body))
        return ResultSummary(custom_id, "http_error", status, _body_error_code(body))
    error = value.get("error")
    if type(error) is not dict or "code" not in error or "message" not in error:
        return None
    code, message = error["code"], error["message"]
    if not (code is None or type(code) is str) or not (message is None or type(message) is str):
        return None
    return ResultSummary(custom_id, "error", None, code)


def decode_batch_output_line(
    line: bytes | str, *, what: str = "batch output line"
) -> ResultLine | BatchErrors:
    """Parse one line of Portkey's ``GET /batches/{id}/output``.

    The gateway streams the output file, except for a batch with no output file and
    ``errors``: then it answers with the ``errors`` object itself, as JSON, and status
    200 (reference/batch-api.md §3.2). That object (``{"object": "list", "data": [...]}``,
    no ``custom_id``) is returned as :class:`BatchErrors`; so is an empty object ``{}``
    (an empty ``errors`` some servers send for a batch without a successful line), as
    ``BatchErrors`` with no data.
    """
    data = decode_json(line, what=what)
    if (
        isinstance(data, dict)
        and "custom_id" not in data
        and (not data or isinstance(data.get("data"), list))
    ):
        return structure(data, BatchErrors, what=what)
    return structure(data, ResultLine, what=what)  # type: ignore[arg-type]
