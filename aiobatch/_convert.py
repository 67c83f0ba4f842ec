"""The one place that knows the wire format: JSON bodies <-> frozen models.

Every quirk of the wire lives here and nowhere else: nulls where the schema says a
value, unknown fields (ignored), the untagged union of result lines (told apart by
``response``/``error`` and the HTTP status), strict scalar types (a string is never
silently turned into a number).

Two cattrs converters with the same hooks are kept: a fast one for the common path,
and one with detailed validation that runs only after the fast one failed, to say
exactly which field was wrong. Whatever goes wrong, callers see one
:class:`~aiobatch.errors.DecodeError` that names the field.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs
import cattrs
import cattrs.gen

from ._lifecycle import BatchStatus
from ._models import (
    BatchRequest,
    ErrorBody,
    LineError,
    LineResponse,
    ResultError,
    ResultHTTPError,
    ResultLine,
    ResultSuccess,
)
from .errors import DecodeError, UnknownStatusError

__all__ = [
    "decode",
    "decode_json",
    "decode_result_line",
    "encode_request_line",
    "parse_error_body",
    "structure",
    "to_wire",
]

T = TypeVar("T")
_MAPPING_ORIGINS: tuple[Any, ...] = (Mapping, dict)


def _strict_int(value: Any, _: Any) -> int:
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
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__} {value!r:.60}")
    return value


def _strict_bool(value: Any, _: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {type(value).__name__} {value!r:.60}")
    return value


def _status(value: Any, _: Any) -> BatchStatus:
    return BatchStatus.parse(value)


def _is_homogeneous_tuple(tp: Any) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis


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
            return tuple(item_hook(v, item) for v in value)

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
        inner = cattrs.gen.make_dict_structure_fn(tp, conv)

        def hook(value: Any, _: Any) -> Any:
            if not isinstance(value, dict):
                raise TypeError(f"expected an object, got {type(value).__name__}")
            return inner(value)

        return hook

    conv.register_structure_hook_factory(attrs.has, attrs_guard)
    conv.register_structure_hook(ResultLine, _structure_result_line)
    conv.register_unstructure_hook(BatchStatus, lambda s: s.value)
    return conv


def _structure_result_line(value: Any, _: Any) -> ResultLine:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    custom_id = _strict_str(value.get("custom_id"), str) if "custom_id" in value else None
    if custom_id is None:
        raise KeyError("custom_id")
    line_id = value.get("id")
    if line_id is not None:
        line_id = _strict_str(line_id, str)
    response = value.get("response")
    error = value.get("error")
    if response is not None:
        resp = _FAST.structure(response, LineResponse)
        if 200 <= resp.status_code < 300:
            return ResultSuccess(custom_id=custom_id, response=resp, id=line_id)
        return ResultHTTPError(custom_id=custom_id, response=resp, id=line_id)
    if error is not None:
        return ResultError(custom_id=custom_id, error=_FAST.structure(error, LineError), id=line_id)
    raise ValueError("a result line needs a response or an error, and this one has neither")


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
            status_error = _find_unknown_status(exc)
            if status_error is not None:
                path = "$.status" if isinstance(data, dict) and "status" in data else None
                raise UnknownStatusError(status_error.value, what=name, path=path) from exc
            path, detail = _describe(exc)
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
    except (ValueError, UnicodeDecodeError) as exc:
        snippet = body[:80] if isinstance(body, str) else body[:80].decode("utf-8", "replace")
        raise DecodeError(what, f"not valid JSON ({exc}); body starts {snippet!r}") from exc


def decode(body: bytes | str, cls: type[T], *, what: str | None = None) -> T:
    """Parse a JSON body into a model; every failure is a :class:`DecodeError`."""
    name = what or cls.__name__
    return structure(decode_json(body, what=name), cls, what=name)


def decode_result_line(line: bytes | str, *, what: str = "result line") -> ResultLine:
    """Parse one line of a batch output or error file."""
    return structure(decode_json(line, what=what), ResultLine, what=what)  # type: ignore[arg-type]


def parse_error_body(data: Any) -> ErrorBody | None:
    """Read OpenAI's ``{"error": {...}}`` envelope; None when the body has another shape."""
    if not isinstance(data, dict):
        return None
    inner = data.get("error")
    if isinstance(inner, dict) and isinstance(inner.get("message"), str):
        try:
            return _FAST.structure(inner, ErrorBody)
        except Exception:
            return ErrorBody(message=inner["message"])
    if isinstance(inner, str):
        return ErrorBody(message=inner)
    return None


def to_wire(obj: Any) -> Any:
    """Turn a model into JSON-ready data, in the wire's shape (nulls kept)."""
    if isinstance(obj, ResultSuccess | ResultHTTPError):
        return {
            "id": obj.id,
            "custom_id": obj.custom_id,
            "response": _FAST.unstructure(obj.response),
            "error": None,
        }
    if isinstance(obj, ResultError):
        return {
            "id": obj.id,
            "custom_id": obj.custom_id,
            "response": None,
            "error": _FAST.unstructure(obj.error),
        }
    return _FAST.unstructure(obj)


def encode_request_line(request: BatchRequest) -> bytes:
    """Serialise one input line (no trailing newline)."""
    return json.dumps(
        {
            "custom_id": request.custom_id,
            "method": request.method,
            "url": request.url,
            "body": request.body,
        },
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
