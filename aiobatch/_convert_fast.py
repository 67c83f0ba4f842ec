"""The converter's lean reading of result lines with msgspec (``aiobatch[fast]``).

Part of :mod:`aiobatch._convert` (:mod:`._convert_results` imports it when msgspec is
installed): the same summary as ``_convert_results._summary_plain``, several times
faster, because msgspec reads only the fields the summary needs (and checks their types)
and skips the rest of the line (a chat reply of kilobytes is never made into Python
objects). Any line of another shape gives None, and the typed decode decides.
"""

from __future__ import annotations

import msgspec

from ._models import ResultSummary

__all__ = ["summary"]

_UNSET = msgspec.UNSET


class _Usage(msgspec.Struct):
    prompt_tokens: int | msgspec.UnsetType = _UNSET
    completion_tokens: int | msgspec.UnsetType = _UNSET
    input_tokens: int | msgspec.UnsetType = _UNSET
    output_tokens: int | msgspec.UnsetType = _UNSET


class _BodyError(msgspec.Struct):
    code: str | None = None


class _Body(msgspec.Struct):
    usage: _Usage | None = None
    error: _BodyError | None = None


class _Response(msgspec.Struct):
    status_code: int
    body: _Body | None = None
    request_id: str | None = None


class _LineError(msgspec.Struct):
    code: str | None
    message: str | None


class _Line(msgspec.Struct):
    custom_id: str
    id: str | None = None
    response: _Response | None = None
    error: _LineError | None = None


_decode = msgspec.json.Decoder(_Line).decode


def _tokens(usage: _Usage | None) -> tuple[int, int]:
    """(input, output) tokens: the first field pair that is there (as
    ``_convert_results.usage_tokens``)."""
    if usage is None:
        return 0, 0
    if not isinstance(usage.prompt_tokens, msgspec.UnsetType):
        completion = usage.completion_tokens
        return usage.prompt_tokens, 0 if isinstance(completion, msgspec.UnsetType) else completion
    if not isinstance(usage.input_tokens, msgspec.UnsetType):
        output = usage.output_tokens
        return usage.input_tokens, 0 if isinstance(output, msgspec.UnsetType) else output
    return 0, 0


def summary(line: bytes | str) -> ResultSummary | None:
    """The summary of a result line of the usual shape; None for any other."""
    try:
        value = _decode(line)
    except (ValueError, RecursionError):
        return None  # another shape, or no JSON: the typed decode decides
    response = value.response
    if response is not None:
        status = response.status_code
        body = response.body
        if 200 <= status < 300:
            used = _tokens(body.usage) if body is not None else (0, 0)
            return ResultSummary(value.custom_id, "success", status, None, *used)
        error = body.error if body is not None else None
        code = error.code if error is not None else None
        return ResultSummary(value.custom_id, "http_error", status, code)
    if value.error is None:
        return None
    return ResultSummary(value.custom_id, "error", None, value.error.code)
