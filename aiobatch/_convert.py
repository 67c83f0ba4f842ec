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
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    IterableValidationError,
    IterableValidationNote,
)

from ._lifecycle import KNOWN, BatchStatus
from ._models import (
    Batch,
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
    "encode_create_batch",
    "encode_request_line",
    "parse_error_body",
    "structure",
    "to_wire",
    "upload_form_fields",
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


def _status(value: Any, _: Any) -> BatchStatus:
    if value is BatchStatus.UNKNOWN:  # set by _unknown_status below, with raw_status
        return value
    return BatchStatus.parse(value)


#: Where an unknown status string is parked while a Batch is built (never a wire key).
_RAW_STATUS_KEY = "\x00raw_status"


def _unknown_status(value: Any) -> Any:
    """Turn an unknown status string into UNKNOWN, keeping the string in raw_status."""
    if isinstance(value, dict):
        status = value.get("status")
        if isinstance(status, str) and status not in _KNOWN_VALUES:
            return {**value, "status": BatchStatus.UNKNOWN, _RAW_STATUS_KEY: status}
    return value


_KNOWN_VALUES = frozenset(s.value for s in KNOWN)


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
        if tp is Batch:
            renames = {"raw_status": cattrs.gen.override(rename=_RAW_STATUS_KEY)}
            inner = cattrs.gen.make_dict_structure_fn(tp, conv, **renames)  # type: ignore[arg-type]
        else:
            inner = cattrs.gen.make_dict_structure_fn(tp, conv)
        if not detailed and tp is not Batch:
            # A non-object fails inside the generated function (TypeError), and the
            # detailed converter then says what was wrong: no guard on the fast path.
            return inner

        def hook(value: Any, _: Any) -> Any:
            if not isinstance(value, dict):
                raise TypeError(f"expected an object, got {type(value).__name__}")
            return inner(_unknown_status(value) if tp is Batch else value)

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


def encode_create_batch(
    input_file_id: str,
    endpoint: str,
    *,
    completion_window: str = "24h",
    metadata: Mapping[str, str] | None = None,
    output_expires_after_seconds: int | None = None,
) -> bytes:
    """The JSON body of ``POST /batches``."""
    payload: dict[str, Any] = {
        "input_file_id": input_file_id,
        "endpoint": endpoint,
        "completion_window": completion_window,
        "metadata": dict(metadata) if metadata else None,
    }
    if output_expires_after_seconds is not None:
        payload["output_expires_after"] = {
            "anchor": "created_at",
            "seconds": int(output_expires_after_seconds),
        }
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def upload_form_fields(
    purpose: str, expires_after_seconds: int | None = None
) -> tuple[tuple[str, str], ...]:
    """The plain form fields of ``POST /files`` (nested fields in bracket notation)."""
    fields: tuple[tuple[str, str], ...] = (("purpose", purpose),)
    if expires_after_seconds is not None:
        fields += (
            ("expires_after[anchor]", "created_at"),
            ("expires_after[seconds]", str(int(expires_after_seconds))),
        )
    return fields
