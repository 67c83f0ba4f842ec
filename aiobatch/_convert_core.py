"""The converter's core: the cattrs converters that read JSON bodies into frozen models,
with every provider quirk as a hook (see :mod:`aiobatch._convert`, whose notes list
them), and the error envelopes of HTTP errors (:func:`parse_error_body`)."""

from __future__ import annotations

import json
import math
import re
import typing
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, TypeVar

import attrs
import cattrs
import cattrs.gen
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    IterableValidationError,
    IterableValidationNote,
)

from ._convert_anthropic import (
    is_anthropic_batch,
    is_anthropic_result,
    openai_batch_data,
    openai_result_data,
)
from ._lifecycle import KNOWN, BatchStatus
from ._models import (
    BATCH_TIMESTAMPS,
    Batch,
    BatchError,
    ErrorBody,
    File,
    LineError,
    LineResponse,
    RequestCounts,
    ResultError,
    ResultHTTPError,
    ResultLine,
    ResultSuccess,
)
from .errors import DecodeError, UnknownStatusError

__all__ = [
    "STATUS_ALIASES",
    "decode",
    "decode_json",
    "map_status",
    "parse_error_body",
    "structure",
]

T = TypeVar("T")
_MAPPING_ORIGINS: tuple[Any, ...] = (Mapping, dict)


def _strict_int(value: Any, _: Any) -> int:
    if type(value) is int:  # the common case, first
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"expected an integer, got {type(value).__name__} {value!r:.60}")
    return value


def _strict_float(value: Any, _: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__} {value!r:.60}")
    return float(value)


def _strict_str(value: Any, _: Any) -> str:
    if type(value) is str:
        return value
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__} {value!r:.60}")
    return value


def _strict_bool(value: Any, _: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {type(value).__name__} {value!r:.60}")
    return value


#: A timestamp at least this large is in milliseconds (see the module notes).
_MS_THRESHOLD = 10**11

_ISO_8601 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:[.,]\d+)?"
    r"\s*(?:([Zz])|([+-])(\d{2})(?::?(\d{2}))?)?"
)


def _timestamp(value: Any, _: Any) -> int:
    """Unix seconds from seconds, milliseconds or an ISO-8601 string."""
    if type(value) is int and value < _MS_THRESHOLD:  # OpenAI's case, first
        return value
    return _unusual_timestamp(value)


def _unusual_timestamp(value: Any) -> int:
    if isinstance(value, str):
        return _iso_seconds(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"expected a Unix timestamp or an ISO-8601 time, got {type(value).__name__} "
            f"{value!r:.60}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise TypeError(f"expected a Unix timestamp, got {value!r}")
    if abs(value) >= _MS_THRESHOLD:
        return math.floor(value / 1000) if isinstance(value, float) else value // 1000
    return math.floor(value)


def _iso_seconds(text: str) -> int:
    match = _ISO_8601.fullmatch(text.strip())
    if match is None:
        raise TypeError(f"expected a Unix timestamp or an ISO-8601 time, got {text!r:.60}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=timezone.utc)
    except ValueError as exc:
        raise TypeError(f"not a valid time: {text!r:.60} ({exc})") from None
    offset = 0
    sign = match.group(8)
    if sign is not None:
        offset = int(match.group(9)) * 3600 + int(match.group(10) or 0) * 60
        offset = -offset if sign == "-" else offset
    return int(moment.timestamp()) - offset  # the fraction is dropped: floored


def _optional_timestamp(value: Any, _: Any) -> int | None:
    if value is None:
        return None
    if type(value) is int and value < _MS_THRESHOLD:
        return value
    return _unusual_timestamp(value)


def _count(value: Any, tp: Any) -> int:
    """A request count; null (Azure, while validating) is 0, and a string of digits
    (Vertex AI's int64 counts, which Portkey passes on as JSON strings) is its number."""
    if type(value) is int:
        return value
    if value is None:
        return 0
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return _strict_int(value, tp)


def _error_code(value: Any, tp: Any) -> str | None:
    """A batch error's code: a string, or a number as its digits (Vertex AI's
    ``google.rpc.Status`` code, passed on by Portkey as ``errors.data[]``)."""
    if value is None or type(value) is str:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _strict_str(value, tp)


def _object_tag(default: str) -> Callable[[Any, Any], str]:
    """The ``object`` field of a model: the constant it is, whatever a compatible server
    sent (null, nothing, or another tag: the endpoint said what the object is)."""

    def hook(value: Any, _: Any) -> str:
        return default

    return hook


#: Per-class field hooks for the provider quirks (see the module notes).
_FIELD_HOOKS: dict[type, dict[str, Callable[[Any, Any], Any]]] = {
    Batch: {
        "created_at": _timestamp,
        "object": _object_tag("batch"),
        **dict.fromkeys(
            BATCH_TIMESTAMPS[1:],
            _optional_timestamp,
        ),
    },
    File: {
        "created_at": _timestamp,
        "expires_at": _optional_timestamp,
        "object": _object_tag("file"),
    },
    RequestCounts: {"total": _count, "completed": _count, "failed": _count},
    BatchError: {"code": _error_code},
}


def _status(value: Any, _: Any) -> BatchStatus:
    if type(value) is BatchStatus:  # set by _normalise_batch below, with raw_status
        return value
    return BatchStatus.parse(value)


#: Where the server's status string is parked while a Batch is built (never a wire key).
_RAW_STATUS_KEY = "\x00raw_status"

_S = BatchStatus

#: Status strings (after CamelCase and capitals are folded to snake_case) that are not
#: OpenAI's but mean one of its statuses. Bedrock's pass through Portkey snake-cased
#: (reference/batch-api.md §3.5); the American spellings come from Anthropic-style
#: servers. ``partially_completed`` is a finished batch with some failed requests:
#: ``completed``, the failures in the error file. ``stopping`` / ``stopped`` are a
#: cancel in progress / done (LiteLLM maps them the same way).
STATUS_ALIASES: Mapping[str, BatchStatus] = {
    "submitted": _S.VALIDATING,
    "scheduled": _S.VALIDATING,
    "stopping": _S.CANCELLING,
    "stopped": _S.CANCELLED,
    "partially_completed": _S.COMPLETED,
    "canceling": _S.CANCELLING,
    "canceled": _S.CANCELLED,
}

_KNOWN_VALUES = frozenset(s.value for s in KNOWN)
_CAMEL_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def map_status(text: str) -> BatchStatus:
    """The status a provider's status string stands for; UNKNOWN when none."""
    if text in _KNOWN_VALUES:
        return _S(text)
    key = _CAMEL_HUMP.sub("_", text.strip()).replace("-", "_").replace(" ", "_").lower()
    if key in _KNOWN_VALUES:
        return _S(key)
    return STATUS_ALIASES.get(key, _S.UNKNOWN)


def _normalise_batch(value: dict[str, Any]) -> dict[str, Any]:
    """The slow path of a Batch body: map a foreign status (keeping the server's string
    in raw_status) and fill in a missing completion_window or endpoint (Bedrock batches
    through Portkey carry neither)."""
    status = value.get("status")
    if isinstance(status, str) and status not in _KNOWN_VALUES:
        value = {**value, "status": map_status(status), _RAW_STATUS_KEY: status}
    for name in _OPTIONAL_BATCH_KEYS:
        if name not in value:
            value = {**value, name: None}
    return value


#: Batch fields with no default that some servers leave out (read as None).
_OPTIONAL_BATCH_KEYS = ("completion_window", "endpoint")


def _is_homogeneous_tuple(tp: Any) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis


def _noted(exc: Exception, note: Any) -> Exception:
    notes = [*getattr(exc, "__notes__", []), note]
    setattr(exc, "__notes__", notes)  # noqa: B010 - add_note() is 3.11+ and takes str only
    return exc


def _make_converter(*, detailed: bool) -> cattrs.Converter:
    conv = cattrs.Converter(detailed_validation=detailed, forbid_extra_keys=False)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(BatchStatus, _status)
    conv.register_structure_hook_func(lambda t: t is Any, lambda v, _: v)

    def tuple_factory(tp: Any) -> Callable[[Any, Any], Any]:
        (item,) = typing.get_args(tp)[:1]
        item_hook = conv.get_structure_hook(item)

        def hook(value: Any, _: Any) -> tuple[Any, ...]:
            if not isinstance(value, list):
                raise TypeError(f"expected a list, got {type(value).__name__}")
            if not detailed:
                return tuple(item_hook(v, item) for v in value)
            out = []
            for index, v in enumerate(value):
                try:
                    out.append(item_hook(v, item))
                except Exception as exc:
                    note = IterableValidationNote(f"Structuring item @ index {index}", index, item)
                    raise IterableValidationError(
                        f"While structuring {tp!r}", [_noted(exc, note)], tp
                    ) from None
            return tuple(out)

        return hook

    conv.register_structure_hook_factory(_is_homogeneous_tuple, tuple_factory)

    def mapping_factory(tp: Any) -> Callable[[Any, Any], Any]:
        key_t, val_t = typing.get_args(tp) or (Any, Any)
        key_hook = conv.get_structure_hook(key_t)
        val_hook = conv.get_structure_hook(val_t)

        def hook(value: Any, _: Any) -> dict[Any, Any]:
            if not isinstance(value, dict):
                raise TypeError(f"expected an object, got {type(value).__name__}")
            return {key_hook(k, key_t): val_hook(v, val_t) for k, v in value.items()}

        return hook

    conv.register_structure_hook_factory(
        lambda tp: typing.get_origin(tp) in _MAPPING_ORIGINS, mapping_factory
    )

    def attrs_guard(tp: Any) -> Callable[[Any, Any], Any]:
        overrides: dict[str, Any] = {
            name: cattrs.gen.override(struct_hook=hook)
            for name, hook in _FIELD_HOOKS.get(tp, {}).items()
        }
        if tp is Batch:
            overrides["raw_status"] = cattrs.gen.override(rename=_RAW_STATUS_KEY)
        inner = cattrs.gen.make_dict_structure_fn(tp, conv, **overrides)
        if tp is Batch:
            known = _KNOWN_VALUES

            def batch_hook(value: Any, _: Any) -> Any:
                if not isinstance(value, dict):
                    raise TypeError(f"expected an object, got {type(value).__name__}")
                status = value.get("status")
                if (
                    type(status) is str
                    and status in known
                    and "completion_window" in value
                    and "endpoint" in value
                ):
                    return inner(value)  # the common case: nothing to normalise
                if is_anthropic_batch(value):
                    return inner(openai_batch_data(value, _RAW_STATUS_KEY))
                return inner(_normalise_batch(value))

            return batch_hook
        if not detailed:
            # A non-object fails inside the generated function (TypeError), and the
            # detailed converter then says what was wrong: no guard on the fast path.
            return inner

        def hook(value: Any, _: Any) -> Any:
            if not isinstance(value, dict):
                raise TypeError(f"expected an object, got {type(value).__name__}")
            return inner(value)

        return hook

    def optional_scalar(strict: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def hook(value: Any, tp: Any) -> Any:
            return None if value is None else strict(value, tp)

        return hook

    # Nullable scalars are most of a Batch: one hook call each, not a union dispatch.
    conv.register_structure_hook(int | None, optional_scalar(_strict_int))
    conv.register_structure_hook(str | None, optional_scalar(_strict_str))

    conv.register_structure_hook_factory(attrs.has, attrs_guard)
    conv.register_structure_hook(ResultLine, _result_line_hook(conv, detailed=detailed))
    conv.register_unstructure_hook(BatchStatus, lambda s: s.value)
    plain_batch = cattrs.gen.make_dict_unstructure_fn(Batch, conv)

    def unstructure_batch(batch: Batch) -> dict[str, Any]:
        data = plain_batch(batch)
        raw = data.pop("raw_status")
        if raw is not None:
            data["status"] = raw
        return data

    conv.register_unstructure_hook(Batch, unstructure_batch)
    return conv


def _result_line_hook(conv: cattrs.Converter, *, detailed: bool) -> Callable[[Any, Any], Any]:
    """Structure the untagged union of result lines, naming the failing field."""

    def field(value: dict[str, Any], name: str, tp: Any) -> Any:
        try:
            if name not in value:
                raise KeyError(name)
            return conv.structure(value[name], tp)
        except Exception as exc:
            if not detailed:
                raise
            note = AttributeValidationNote(f"Structuring result line @ attribute {name}", name, tp)
            raise ClassValidationError(
                "While structuring a result line", [_noted(exc, note)], ResultSuccess
            ) from None

    def hook(value: Any, _: Any) -> ResultLine:
        if not isinstance(value, dict):
            raise TypeError(f"expected an object, got {type(value).__name__}")
        if is_anthropic_result(value):
            value = openai_result_data(value)
        custom_id: str = field(value, "custom_id", str)
        line_id: str | None = field(value, "id", str | None) if "id" in value else None
        if value.get("response") is not None:
            resp: LineResponse = field(value, "response", LineResponse)
            if 200 <= resp.status_code < 300:
                return ResultSuccess(custom_id=custom_id, response=resp, id=line_id)
            return ResultHTTPError(custom_id=custom_id, response=resp, id=line_id)
        if value.get("error") is not None:
            error: LineError = field(value, "error", LineError)
            return ResultError(custom_id=custom_id, error=error, id=line_id)
        raise ValueError("a result line needs a response or an error, and this one has neither")

    return hook


_FAST = _make_converter(detailed=False)
_DETAILED = _make_converter(detailed=True)


def _format_leaf(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, UnknownStatusError):
        return exc.detail
    text = str(exc)
    return text if text else f"invalid value for {getattr(type_, '__name__', type_)}"


def _describe(exc: BaseException) -> tuple[str | None, str]:
    """Turn a cattrs failure into (path, message)."""
    if isinstance(exc, cattrs.BaseValidationError):
        messages = cattrs.transform_error(exc, path="$", format_exception=_format_leaf)
        if messages:
            first = messages[0]
            if " @ " in first:
                detail, _, path = first.rpartition(" @ ")
                extra = f" (and {len(messages) - 1} more)" if len(messages) > 1 else ""
                return path, detail + extra
            return None, first
    return None, f"{type(exc).__name__}: {exc}"


def structure(data: Any, cls: type[T], *, what: str | None = None) -> T:
    """Build a model from decoded JSON.

    Raises:
        DecodeError: the data does not fit ``cls``; the error names the field.
        UnknownStatusError: a batch status string we do not know.
    """
    try:
        return _FAST.structure(data, cls)
    except Exception as fast_exc:
        name: str = what or str(getattr(cls, "__name__", cls))
        try:
            _DETAILED.structure(data, cls)
        except Exception as exc:
            path, detail = _describe(exc)
            status_error = _find_unknown_status(exc)
            if status_error is not None:
                raise UnknownStatusError(status_error.value, what=name, path=path) from exc
            raise DecodeError(name, detail, path=path) from exc
        path, detail = _describe(fast_exc)  # pragma: no cover - the two converters agree
        raise DecodeError(name, detail, path=path) from fast_exc  # pragma: no cover


def _find_unknown_status(exc: BaseException) -> UnknownStatusError | None:
    if isinstance(exc, UnknownStatusError):
        return exc
    for sub in getattr(exc, "exceptions", ()):
        found = _find_unknown_status(sub)
        if found is not None:
            return found
    return None


def decode_json(body: bytes | str, *, what: str) -> Any:
    """Parse a JSON document.

    Raises:
        DecodeError: the body is not valid JSON.
    """
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        snippet = body[:80] if isinstance(body, str) else body[:80].decode("utf-8", "replace")
        raise DecodeError(what, f"not valid JSON ({exc}); body starts {snippet!r}") from exc


def decode(body: bytes | str, cls: type[T], *, what: str | None = None) -> T:
    """Parse a JSON body into a model; every failure is a :class:`DecodeError`."""
    name = what or cls.__name__
    return structure(decode_json(body, what=name), cls, what=name)


def _text(value: Any) -> str | None:
    """A field of an error envelope as text: strings as they are, numbers (Azure sends
    ``"code": 401`` as often as ``"401"``) as their digits, anything else dropped."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def parse_error_body(data: Any) -> ErrorBody | None:
    """Read an error body's message (and type, code, param when it has them).

    The shapes understood, in order:

    * OpenAI's ``{"error": {"message", "type", "param", "code"}}`` (Azure's is the same
      with fewer keys, ``{"error": {"code": "401", "message": ...}}``; Portkey's wrapped
      provider errors add a top-level ``"provider"``);
    * ``{"error": "text"}``;
    * Portkey's gateway failures ``{"status": "failure", "message": ...}`` (500 from the
      batches handler, 401 for a bad Portkey key), read with ``type`` ``"failure"``;
    * Azure API Management's ``{"statusCode": 401, "message": ...}``, its status as the
      ``code``;
    * ``{"detail": "text"}`` from small compatible servers (FastAPI's default).

    Returns:
        The envelope, or None when the body has none of these shapes.
    """
    if not isinstance(data, dict):
        return None
    inner = data.get("error")
    if isinstance(inner, dict) and isinstance(inner.get("message"), str):
        try:
            return _FAST.structure(inner, ErrorBody)
        except Exception:
            return ErrorBody(
                message=inner["message"],
                type=_text(inner.get("type")),
                param=_text(inner.get("param")),
                code=_text(inner.get("code")),
            )
    if isinstance(inner, str):
        return ErrorBody(message=inner)
    message = data.get("message")
    if isinstance(message, str):
        if data.get("status") == "failure":
            return ErrorBody(message=message, type="failure")
        return ErrorBody(message=message, code=_text(data.get("statusCode", data.get("code"))))
    detail = data.get("detail")
    if isinstance(detail, str):
        return ErrorBody(message=detail)
    return None
