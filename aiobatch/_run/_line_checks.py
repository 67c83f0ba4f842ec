"""The checks of one batch input line that need nothing but the line: what a request's
fields must be, the ``custom_id`` made for a request without one, what a request counts
against a batch's limits, and the compact encoding of a line as it is uploaded.

:class:`~aiobatch._run._preflight.Preflight` runs them on each line; it holds what spans
lines (duplicates, the n-th identical request's generated id, the problems recorded).
A problem here is ``(custom_id, field, code, message)``, before Preflight records it as
a :class:`~aiobatch._run._preflight.LineProblem`. :func:`check_fields` checks that:

* ``custom_id``, when present and not null, is a non-empty string (``invalid_type`` /
  ``invalid_value``) that matches the provider's pattern, if it has one (when it is
  absent or null, Preflight makes one from the request's content, see
  :func:`generated_custom_id`);
* ``method``, when present, is ``"POST"`` (when absent, Preflight adds
  ``"method": "POST"``);
* ``url`` is a string that starts with ``/`` and has no whitespace;
* ``body`` is an object with a non-empty string ``model`` and without ``stream: true``
  (``stream_not_supported``).

A line is read as JSON by ``_read_json`` (``NaN`` and ``Infinity`` are not JSON) and
written by ``_encode`` (compact, on one line). No state and no IO.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, NoReturn

from .. import _json

__all__ = ["check_fields", "count_inputs", "estimate_tokens", "generated_custom_id"]

#: UTF-8 of the characters that some readers take for a line end inside a JSON string
#: (Python's ``str.splitlines``): NEL, LINE SEPARATOR, PARAGRAPH SEPARATOR.
_LINE_BREAKS = (
    (b"\xc2\x85", b"\\u0085"),
    (b"\xe2\x80\xa8", b"\\u2028"),
    (b"\xe2\x80\xa9", b"\\u2029"),
)

#: A whitespace character (what ``str.isspace`` says is one).
_SPACE = re.compile(r"\s")
#: A UTF-16 surrogate left unpaired by a JSON escape (``"\\ud800"``): no Unicode text.
_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(value: str) -> str | None:
    """What keeps ``value`` (an id, a url, a model) from being stored as text, if
    anything: an unpaired surrogate (which JSON's ``\\u`` escapes can make and UTF-8
    cannot hold), or the character NUL (which PostgreSQL's text cannot hold)."""
    if "\x00" in value:
        return "contains the character NUL (\\u0000), which a journal cannot store"
    if not value.isascii() and _SURROGATE.search(value) is not None:
        return "has an unpaired surrogate escape (\\ud800-\\udfff): it is not Unicode text"
    return None


def count_inputs(url: str, body: Mapping[str, Any]) -> int:
    """How many inputs a request counts against a batch's input limit.

    OpenAI allows 50,000 embedding inputs per ``/v1/embeddings`` batch in all: an
    embeddings request whose ``input`` is a list of texts, or a list of token arrays,
    counts one per element (a flat list of token ids is one input). Every other request
    counts 1.
    """
    if not url.rstrip("/").endswith("/embeddings"):
        return 1
    value = body.get("input")
    if isinstance(value, list) and value and not all(isinstance(v, int) for v in value):
        return len(value)
    return 1


def estimate_tokens(body: Mapping[str, Any]) -> int:
    """Estimate the prompt tokens of a request body, as counted against the enqueued-token
    limit.

    This is an estimate, not a tokenizer: about one token per 4 bytes of UTF-8 text
    (English text runs at about 4 characters a token; for other scripts bytes are
    closer to the truth than characters), plus 4 tokens per chat message and 3 per
    request. The text counted is that of ``messages[].content`` (a string or a list of
    parts with ``"text"``), ``input`` (a string, a list of strings, token arrays whose
    ints count one token each, or Responses-style items with ``content`` / ``text``),
    ``prompt`` (the same shapes) and ``instructions``. Images, audio, tools and other
    fields are not counted. The result is never 0.

    Args:
        body: the request body.

    Returns:
        The estimated number of prompt tokens (at least 3).
    """
    text_bytes = 0
    token_ints = 0
    pending: list[Any] = []
    messages = body.get("messages")
    message_count = 0
    if isinstance(messages, list):
        for message in messages:
            if type(message) is dict or isinstance(message, Mapping):
                message_count += 1
                content = message.get("content")
                if type(content) is str:  # the common case, counted at once
                    text_bytes += len(content) if content.isascii() else _utf8_size(content)
                elif content is not None:
                    pending.append(content)
    for name in ("input", "prompt", "instructions"):
        value = body.get(name)
        if value is not None:
            pending.append(value)
    while pending:
        value = pending.pop()
        if value is None:
            continue
        if isinstance(value, str):
            text_bytes += _utf8_size(value)
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int):
            token_ints += 1
        elif isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, Mapping):
            if value.get("role") is not None:
                message_count += 1
            pending.append(value.get("text"))
            pending.append(value.get("content"))
    return (text_bytes + 3) // 4 + token_ints + 4 * message_count + 3


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def generated_custom_id(method: str, url: str, body: Mapping[str, Any]) -> str:
    """The ``custom_id`` made for a request that has none: ``"auto-"`` and the first 20
    hex digits of the SHA-256 of the canonical JSON (sorted keys, compact, UTF-8) of
    ``{"method", "url", "body"}``.

    The same request always gets the same id. :class:`~aiobatch._run._preflight.Preflight`
    appends ``-2``, ``-3``... to the n-th occurrence of identical requests, so the ids of
    a source depend only on its content and order.
    """
    canonical = json.dumps(
        {"method": method, "url": url, "body": body},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    digest = hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()
    return "auto-" + digest[:20]


#: A problem of a line before it is recorded: (custom_id, field, code, message).
_Problem = tuple[str | None, str | None, str, str]


def check_fields(
    request: dict[str, Any],
    custom_id: Any,
    method: Any,
    url: Any,
    body: Any,
    id_pattern: re.Pattern[str] | None,
) -> tuple[list[_Problem], str | None, str | None]:
    """Every check of a request's fields: its problems, the ``custom_id`` to name in
    them (and that the line claims), and its model. ``id_pattern``: what every
    ``custom_id`` must match in full (None: any non-empty string)."""
    found: list[_Problem] = []
    problem_id: str | None = None
    if custom_id is not None:
        if not isinstance(custom_id, str):
            message = f"must be a string, not {_json_type(custom_id)}"
            found.append((None, "custom_id", "invalid_type", message))
        elif not custom_id:
            found.append((None, "custom_id", "invalid_value", "must not be empty"))
        elif (why := text_problem(custom_id)) is not None:
            found.append((None, "custom_id", "invalid_value", why))
        elif id_pattern is not None and not id_pattern.fullmatch(custom_id):
            message = f"must match {id_pattern.pattern} (the provider's custom_id rule)"
            found.append((custom_id, "custom_id", "invalid_value", message))
        else:
            problem_id = custom_id

    if method is not _ABSENT:
        if not isinstance(method, str):
            message = f"must be the string 'POST', not {_json_type(method)}"
            found.append((problem_id, "method", "invalid_type", message))
        elif method != "POST":
            message = f"must be 'POST' (the only method batches support), not {_cut(method)!r}"
            found.append((problem_id, "method", "invalid_value", message))

    if url is None:
        found.append((problem_id, "url", "missing_field", _missing(request, "url")))
    elif not isinstance(url, str):
        message = f"must be a string, not {_json_type(url)}"
        found.append((problem_id, "url", "invalid_type", message))
    elif not url.startswith("/"):
        message = (
            f"must be a path starting with '/', like '/v1/chat/completions', not {_cut(url)!r}"
        )
        found.append((problem_id, "url", "invalid_value", message))
    elif _SPACE.search(url):
        message = f"must not contain whitespace: {_cut(url)!r}"
        found.append((problem_id, "url", "invalid_value", message))
    elif (why := text_problem(url)) is not None:
        found.append((problem_id, "url", "invalid_value", why))

    model: str | None = None
    if body is None:
        found.append((problem_id, "body", "missing_field", _missing(request, "body")))
    elif not isinstance(body, dict):
        message = f"must be a JSON object, not {_json_type(body)}"
        found.append((problem_id, "body", "invalid_type", message))
    else:
        model_value = body.get("model")
        if model_value is None:
            message = _missing(body, "model")
            found.append((problem_id, "body.model", "missing_field", message))
        elif not isinstance(model_value, str):
            message = f"must be a string, not {_json_type(model_value)}"
            found.append((problem_id, "body.model", "invalid_type", message))
        elif not model_value:
            found.append((problem_id, "body.model", "invalid_value", "must not be empty"))
        elif (why := text_problem(model_value)) is not None:
            found.append((problem_id, "body.model", "invalid_value", why))
        else:
            model = model_value
        if body.get("stream") is True:
            message = "streaming is not supported in batches (stream=true)"
            found.append((problem_id, "body.stream", "stream_not_supported", message))
    return found, problem_id, model


class _Absent:
    """The marker of a field that is not there (``None`` is JSON null)."""


_ABSENT: Any = _Absent()


class _UnencodableError(ValueError):
    """A request object that has no JSON encoding (NaN, a set, a cycle...)."""


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value")


_read_json = _json.loader(parse_constant=_reject_constant)


def _encode(request: Mapping[str, Any]) -> bytes:
    """Compact JSON of ``request``, as UTF-8, safe to put on one line.

    Characters that some readers take for a line end (NEL, U+2028, U+2029) are written
    as ``\\u`` escapes; a request holding a lone surrogate is written all in ASCII.
    """
    obj = request if isinstance(request, dict) else dict(request)
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise _UnencodableError(str(exc)) from None
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        ascii_text = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        return ascii_text.encode("ascii")
    if b"\xc2\x85" in data or b"\xe2\x80" in data:
        for char, escape in _LINE_BREAKS:
            data = data.replace(char, escape)
    return data


def _needs_encoding(raw: bytes) -> bool:
    """Whether a valid line holds a byte sequence that a reader could take for a line end
    (LF or CR between JSON tokens, NEL / U+2028 / U+2029 inside a string): then it is
    re-encoded onto one line."""
    return (
        b"\n" in raw
        or b"\r" in raw
        or b"\xc2\x85" in raw
        or (b"\xe2\x80" in raw and (b"\xe2\x80\xa8" in raw or b"\xe2\x80\xa9" in raw))
    )


def _strip_line_end(raw: bytes) -> bytes:
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw


def _without_id(request: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in request.items() if k not in ("custom_id", "method")}


def _missing(obj: Mapping[str, Any], name: str) -> str:
    return "is required" if name not in obj else "is required (it is null)"


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _cut(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters, for a message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
