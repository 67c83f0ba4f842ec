"""The converter: wire JSON <-> models, and one typed error for anything malformed."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiobatch._convert import (
    decode,
    decode_json,
    decode_result_line,
    encode_create_batch,
    encode_request_line,
    parse_error_body,
    result_line_bytes,
    structure,
    summarize,
    summarize_result,
    summarize_result_line,
    to_wire,
    upload_form_fields,
)
from aiobatch._convert_results import _summary_fast, _summary_plain
from aiobatch._lifecycle import BatchStatus
from aiobatch._models import (
    Batch,
    BatchPage,
    BatchRequest,
    File,
    FileDeleted,
    FilePage,
    ResultError,
    ResultHTTPError,
    ResultSuccess,
    ResultSummary,
)
from aiobatch.errors import DecodeError, UnknownStatusError

MODELS = [Batch, BatchPage, File, FilePage, FileDeleted]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)

ts = st.integers(min_value=0, max_value=4_000_000_000)
opt_ts = st.none() | ts
ident = st.text(alphabet="abcdef0123456789_", min_size=1, max_size=12)

batch_json = st.fixed_dictionaries(
    {
        "id": ident.map(lambda s: "batch_" + s),
        "object": st.just("batch"),
        "endpoint": st.sampled_from(["/v1/chat/completions", "/v1/embeddings", "/v1/responses"]),
        "input_file_id": ident.map(lambda s: "file-" + s),
        "completion_window": st.just("24h"),
        "status": st.sampled_from([s.value for s in BatchStatus]),
        "created_at": ts,
        "model": st.none() | st.text(max_size=10),
        "errors": st.none()
        | st.fixed_dictionaries(
            {
                "object": st.just("list"),
                "data": st.lists(
                    st.fixed_dictionaries(
                        {
                            "code": st.text(max_size=10),
                            "message": st.text(max_size=10),
                            "param": st.none() | st.text(max_size=5),
                            "line": st.none() | st.integers(1, 10**6),
                        }
                    ),
                    max_size=3,
                ).map(tuple),
            }
        ),
        "output_file_id": st.none() | ident,
        "error_file_id": st.none() | ident,
        "in_progress_at": opt_ts,
        "expires_at": opt_ts,
        "finalizing_at": opt_ts,
        "completed_at": opt_ts,
        "failed_at": opt_ts,
        "expired_at": opt_ts,
        "cancelling_at": opt_ts,
        "cancelled_at": opt_ts,
        "request_counts": st.none()
        | st.fixed_dictionaries(
            {
                "total": st.integers(0, 50_000),
                "completed": st.integers(0, 50_000),
                "failed": st.integers(0, 50_000),
            }
        ),
        "usage": st.none()
        | st.fixed_dictionaries(
            {
                "input_tokens": st.integers(0, 10**9),
                "output_tokens": st.integers(0, 10**9),
                "total_tokens": st.integers(0, 10**9),
                "input_tokens_details": st.fixed_dictionaries(
                    {"cached_tokens": st.integers(0, 10**6)}
                ),
                "output_tokens_details": st.fixed_dictionaries(
                    {"reasoning_tokens": st.integers(0, 10**6)}
                ),
            }
        ),
        "metadata": st.none()
        | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4),
    }
)


def _lists(obj: Any) -> Any:
    """JSON has lists where our models have tuples."""
    if isinstance(obj, dict):
        return {k: _lists(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_lists(v) for v in obj]
    return obj


@given(batch_json)
def test_batch_round_trips(data: dict[str, Any]) -> None:
    """Any schema-valid batch decodes and encodes back to the same JSON."""
    wire = _lists(data)
    batch = decode(json.dumps(wire), Batch)
    assert batch.status is BatchStatus(wire["status"])
    assert _lists(to_wire(batch)) == wire


@given(
    batch_json,
    st.dictionaries(
        st.text(min_size=1, max_size=6).map(lambda s: "x_" + s), json_values, max_size=3
    ),
)
def test_unknown_fields_are_ignored(data: dict[str, Any], extra: dict[str, Any]) -> None:
    """Fields the models do not know are ignored, not errors."""
    wire = _lists(data)
    assert decode(json.dumps({**wire, **extra}), Batch) == decode(json.dumps(wire), Batch)


@pytest.mark.parametrize("model", MODELS)
@given(value=json_values)
def test_arbitrary_json_raises_only_decode_error(model: type[Any], value: Any) -> None:
    """Whatever JSON arrives, decoding either succeeds or raises DecodeError."""
    try:
        structure(value, model)
    except DecodeError as exc:
        assert str(exc).startswith(f"cannot decode {model.__name__}")


@given(value=json_values)
def test_arbitrary_json_result_line_raises_only_decode_error(value: Any) -> None:
    """Arbitrary JSON as a result line decodes or raises DecodeError, nothing else."""
    try:
        decode_result_line(json.dumps(value))
    except DecodeError:
        pass


@given(st.binary(max_size=40))
def test_arbitrary_bytes_raise_only_decode_error(raw: bytes) -> None:
    """Bytes that are not JSON raise DecodeError, never ValueError or UnicodeDecodeError."""
    try:
        decode(raw, Batch)
    except DecodeError:
        pass


def _batch(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "batch_1",
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-1",
        "completion_window": "24h",
        "status": "validating",
        "created_at": 1_700_000_000,
    }
    base.update(over)
    return base


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (_batch(created_at="yesterday"), "$.created_at"),
        (
            _batch(request_counts={"total": 1, "completed": "one", "failed": 0}),
            "$.request_counts.completed",
        ),
        (_batch(errors={"object": "list", "data": {"code": "x"}}), "$.errors.data"),
        (_batch(metadata={"k": 1}), "$.metadata"),
        (_batch(created_at=True), "$.created_at"),
        ({k: v for k, v in _batch().items() if k != "input_file_id"}, "$.input_file_id"),
    ],
)
def test_decode_error_names_the_field(body: dict[str, Any], path: str) -> None:
    """A malformed field is reported with its path in the body."""
    with pytest.raises(DecodeError) as info:
        decode(json.dumps(body), Batch)
    assert info.value.path is not None
    assert info.value.path.startswith(path)
    assert path in str(info.value)


def test_unknown_status_decodes_and_keeps_the_servers_string() -> None:
    """An unknown status decodes as UNKNOWN with the original kept, and encodes back."""
    batch = decode(json.dumps(_batch(status="frobnicating")), Batch)
    assert batch.status is BatchStatus.UNKNOWN
    assert batch.raw_status == "frobnicating"
    assert batch.wire_status == "frobnicating"
    assert not batch.is_terminal
    wire = to_wire(batch)
    assert wire["status"] == "frobnicating"
    assert "raw_status" not in wire


def test_known_status_has_no_raw_status_and_servers_cannot_set_it() -> None:
    """raw_status is None for known statuses, even if the body carries a raw_status key."""
    batch = decode(json.dumps(_batch(status="in_progress", raw_status="completed")), Batch)
    assert batch.status is BatchStatus.IN_PROGRESS
    assert batch.raw_status is None
    assert batch.wire_status == "in_progress"


def test_one_unknown_status_does_not_break_a_list_page() -> None:
    """A page with one batch in an unknown status decodes; that batch is marked UNKNOWN."""
    page = {"data": [_batch(), _batch(id="batch_2", status="JOB_STATE_X")], "has_more": False}
    decoded = decode(json.dumps(page), BatchPage)
    assert [b.status for b in decoded.data] == [BatchStatus.VALIDATING, BatchStatus.UNKNOWN]
    assert decoded.data[1].raw_status == "JOB_STATE_X"


def test_a_non_string_status_is_a_typed_error_with_its_path() -> None:
    """A status that is not even a string is an UnknownStatusError naming where it was."""
    page = {"data": [_batch(), _batch(status=5)], "has_more": False}
    with pytest.raises(UnknownStatusError) as info:
        decode(json.dumps(page), BatchPage)
    assert info.value.path == "$.data[1].status"


def test_page_errors_name_the_item_index() -> None:
    """A bad field inside a list page is reported with the item's index."""
    page = {"data": [_batch(), _batch(created_at="x")], "has_more": False}
    with pytest.raises(DecodeError) as info:
        decode(json.dumps(page), BatchPage)
    assert info.value.path == "$.data[1].created_at"


@pytest.mark.parametrize(
    ("line", "path"),
    [
        ('{"custom_id":"c","response":{"status_code":"x"}}', "$.response.status_code"),
        ('{"response":{"status_code":200}}', "$.custom_id"),
        ('{"custom_id":"c","id":5,"error":{"code":"x","message":"m"}}', "$.id"),
        ('{"custom_id":"c","error":{"code":1,"message":"m"}}', "$.error.code"),
    ],
)
def test_result_line_errors_name_the_field(line: str, path: str) -> None:
    """A malformed result line is reported with the path of the bad field."""
    with pytest.raises(DecodeError) as info:
        decode_result_line(line, what="output line 9")
    assert info.value.path == path
    assert str(info.value).startswith("cannot decode output line 9 at " + path)


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 100_000])
def test_deeply_nested_json_is_a_decode_error(body: bytes) -> None:
    """JSON nested past the recursion limit raises DecodeError, not RecursionError."""
    with pytest.raises(DecodeError):
        decode(body, Batch)
    with pytest.raises(DecodeError):
        decode_result_line(body)


def test_create_body_and_upload_fields_have_the_wire_shape() -> None:
    """The create body and upload form fields are encoded as the API documents them."""
    body = json.loads(
        encode_create_batch(
            "file-1", "/v1/embeddings", metadata={"k": "v"}, output_expires_after_seconds=3600
        )
    )
    assert body == {
        "input_file_id": "file-1",
        "endpoint": "/v1/embeddings",
        "completion_window": "24h",
        "metadata": {"k": "v"},
        "output_expires_after": {"anchor": "created_at", "seconds": 3600},
    }
    assert json.loads(encode_create_batch("f", "/v1/responses"))["metadata"] is None
    assert upload_form_fields("batch") == (("purpose", "batch"),)
    assert upload_form_fields("batch", 86400) == (
        ("purpose", "batch"),
        ("expires_after[anchor]", "created_at"),
        ("expires_after[seconds]", "86400"),
    )


def test_documented_nulls_are_accepted() -> None:
    """Every nullable Batch field may be null, as real responses send them."""
    nullable = [
        "model", "errors", "output_file_id", "error_file_id", "in_progress_at", "expires_at",
        "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
        "cancelled_at", "request_counts", "usage", "metadata",
    ]  # fmt: skip
    batch = decode(json.dumps(_batch(**dict.fromkeys(nullable))), Batch)
    assert all(getattr(batch, name) is None for name in nullable)


def test_result_lines_are_a_tagged_union() -> None:
    """2xx responses are successes, other statuses HTTP errors, no response an error line."""
    ok = decode_result_line(
        '{"id":"batch_req_1","custom_id":"a","response":{"status_code":200,"request_id":"r","body":{"x":1}},"error":null}'
    )
    bad = decode_result_line(
        '{"id":"batch_req_2","custom_id":"b","response":{"status_code":429,"request_id":"r","body":{}},"error":null}'
    )
    gone = decode_result_line(
        '{"id":"batch_req_3","custom_id":"c","response":null,"error":{"code":"batch_expired","message":"late"}}'
    )
    assert isinstance(ok, ResultSuccess) and ok.body == {"x": 1}
    assert isinstance(bad, ResultHTTPError) and bad.status_code == 429
    assert isinstance(gone, ResultError) and gone.code == "batch_expired"
    for line in (ok, bad, gone):
        assert decode_result_line(json.dumps(to_wire(line))) == line


@pytest.mark.parametrize(
    "line",
    [
        '{"custom_id":"a","response":null,"error":null}',
        '{"response":{"status_code":200,"body":{}}}',
        '{"custom_id":"a","response":{"status_code":"200"}}',
        "[1,2]",
        '{"custom_id":"a"',
    ],
)
def test_bad_result_lines_raise_decode_error(line: str) -> None:
    """A result line with neither response nor error, or malformed, is a DecodeError."""
    with pytest.raises(DecodeError):
        decode_result_line(line, what="output line 3")


def test_error_envelope_is_unwrapped() -> None:
    """OpenAI's {"error": {...}} envelope is read; other shapes give None."""
    body = parse_error_body(
        {"error": {"message": "nope", "type": "invalid_request_error", "param": None, "code": "x"}}
    )
    assert body is not None and (body.message, body.code) == ("nope", "x")
    assert parse_error_body({"status": "failure", "detail": 5}) is None
    assert parse_error_body({"unrelated": True}) is None
    assert parse_error_body("text") is None


def test_request_line_encoding_is_compact_json() -> None:
    """An input line encodes to one JSON object with the four wire fields."""
    line = encode_request_line(BatchRequest("r1", "/v1/embeddings", {"model": "m", "input": "é"}))
    assert b"\n" not in line
    assert json.loads(line) == {
        "custom_id": "r1",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "m", "input": "é"},
    }


def test_decode_json_reports_a_snippet() -> None:
    """Invalid JSON errors quote the start of the body."""
    with pytest.raises(DecodeError, match="<html>"):
        decode_json(b"<html>oops</html>", what="Batch")


_count = st.one_of(
    st.integers(min_value=-5, max_value=10**6),
    st.booleans(),
    st.none(),
    st.floats(0, 9),
    st.text(max_size=2),
)
_usage = st.dictionaries(
    st.sampled_from(
        ["prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "total_tokens"]
    ),
    _count,
    max_size=5,
)
_body = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "usage": st.one_of(_usage, json_values),
            "error": st.one_of(
                st.fixed_dictionaries({}, optional={"code": json_values, "message": json_values}),
                json_values,
            ),
            "choices": json_values,
        },
    ),
)
_text_or = st.one_of(st.text(max_size=6), st.none(), st.integers(0, 9))
_response = st.fixed_dictionaries(
    {},
    optional={
        "status_code": st.one_of(
            st.sampled_from([200, 201, 299, 300, 400, 408, 429, 500, 503]),
            st.just(200.0),
            st.booleans(),
            st.text(max_size=3),
        ),
        "body": _body,
        "request_id": _text_or,
    },
)
_line_error = st.fixed_dictionaries({}, optional={"code": _text_or, "message": _text_or})
result_objects = st.fixed_dictionaries(
    {},
    optional={
        "custom_id": st.one_of(st.text(max_size=6), st.integers(0, 9), st.none()),
        "id": _text_or,
        "response": st.one_of(st.none(), _response, json_values),
        "error": st.one_of(st.none(), _line_error, json_values),
    },
)


def _summary_or_error(read: Callable[[Any], ResultSummary]) -> Callable[[Any], object]:
    def call(line: str | bytes) -> object:
        try:
            return read(line)
        except DecodeError:
            return DecodeError

    return call


def _with_fallback(lean: Callable[[Any], ResultSummary | None]) -> Callable[[Any], ResultSummary]:
    def read(line: str | bytes) -> ResultSummary:
        found = lean(line)
        return found if found is not None else summarize(decode_result_line(line))

    return read


_LEAN_READERS = {"plain": _with_fallback(_summary_plain), "default": summarize_result_line}
if _summary_fast is not None:
    _LEAN_READERS["msgspec"] = _with_fallback(_summary_fast)


@given(result_objects, st.booleans())
def test_the_lean_reading_of_a_result_line_agrees_with_the_typed_decode(
    value: dict[str, Any], spaced: bool
) -> None:
    """What a run reads of any result line (custom_id, kind, status, code, tokens), with
    or without msgspec, is what the typed decode says; a line it refuses is refused."""
    line = json.dumps(value, separators=(", ", ": ") if spaced else (",", ":"))
    expected = _summary_or_error(lambda text: summarize(decode_result_line(text)))(line)
    for name, read in _LEAN_READERS.items():
        assert _summary_or_error(read)(line) == expected, name


@pytest.mark.parametrize(
    "line",
    [
        '{"custom_id":"a","custom_id":"b","response":{"status_code":200,"body":{}}}',
        '{"custom_id":"a","response":{"status_code":200,"body":{"usage":{"prompt_tokens":NaN}}}}',
        '{"custom_id":"a","response":{"status_code":200,"body":{"n":1e400}}}',
        '{"custom_id":"\\ud800","error":{"code":"x","message":null}}',
        '\ufeff{"custom_id":"a","error":{"code":"x","message":null}}',
        '{"custom_id":"a","response":{"status_code":500,"body":{"error":{"code":7}}}}',
        '{"custom_id":"a","response":{"status_code":200,"body":' + "[" * 3000 + "]" * 3000 + "}}",
    ],
)
def test_unusual_result_lines_read_the_same_lean_or_typed(line: str) -> None:
    """Duplicate keys, NaN, numbers out of range, lone surrogates, a byte-order mark, a
    numeric error code and deep nesting read as the typed decode reads them."""
    typed = _summary_or_error(lambda text: summarize(decode_result_line(text)))
    for form in (line, line.encode("utf-8", "surrogatepass")):
        expected = typed(form)
        for name, read in _LEAN_READERS.items():
            assert _summary_or_error(read)(form) == expected, name


_anthropic_results = st.fixed_dictionaries(
    {"custom_id": st.text(max_size=6)},
    optional={
        "result": st.one_of(
            st.fixed_dictionaries(
                {"type": st.just("succeeded")},
                optional={"message": st.fixed_dictionaries({"content": st.just([])})},
            ),
            st.fixed_dictionaries({"type": st.sampled_from(["canceled", "expired", "mystery"])}),
            json_values,
        ),
        "response": st.one_of(st.none(), _response),
        "error": st.one_of(st.none(), _line_error),
    },
)


def _pair_or_error(read: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def call(line: bytes) -> object:
        try:
            return read(line)
        except DecodeError:
            return DecodeError

    return call


@given(st.one_of(result_objects, _anthropic_results), st.booleans())
def test_a_result_line_read_once_gives_its_summary_and_its_openai_bytes(
    value: dict[str, Any], spaced: bool
) -> None:
    """summarize_result gives what summarize_result_line and result_line_bytes give for
    any result line, OpenAI's or Anthropic's (a line that does not decode is refused)."""
    line = b"  " + json.dumps(value, separators=(", ", ": ") if spaced else (",", ":")).encode()
    expected = _pair_or_error(lambda raw: (summarize_result_line(raw), result_line_bytes(raw)))
    assert _pair_or_error(summarize_result)(line) == expected(line)
