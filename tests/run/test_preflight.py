"""Preflight: input lines are checked, every problem reported, before anything is uploaded."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Mapping
from typing import Any

import attrs
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from aiobatch._run._line_checks import count_inputs, estimate_tokens, generated_custom_id
from aiobatch._run._preflight import LineProblem, Preflight, PreparedRequest
from aiobatch.errors import AiobatchError, InputError, PreflightError


def request(
    custom_id: str | None = "req-1",
    text: str = "hello",
    *,
    model: Any = "gpt-4o-mini",
    url: Any = "/v1/chat/completions",
    **body: Any,
) -> dict[str, Any]:
    """One chat-completions request object (no custom_id when it is None)."""
    line: dict[str, Any] = {
        "method": "POST",
        "url": url,
        "body": {"model": model, "messages": [{"role": "user", "content": text}], **body},
    }
    if custom_id is not None:
        line = {"custom_id": custom_id, **line}
    return line


def encode(obj: Any) -> bytes:
    """A JSON line as a user's tool would write it (with spaces)."""
    return json.dumps(obj).encode()


def check_all(lines: list[bytes], **options: Any) -> tuple[Preflight, list[PreparedRequest]]:
    """Check the lines of one file (numbered from 1); the checker and what it accepted."""
    preflight = Preflight(source="requests.jsonl", **options)
    accepted = [
        prepared
        for number, raw in enumerate(lines, start=1)
        if (prepared := preflight.check_line(raw, number)) is not None
    ]
    return preflight, accepted


def only_problem(raw: bytes, line: int = 1) -> LineProblem:
    """The first problem of a line that must be rejected."""
    preflight = Preflight(source="requests.jsonl")
    assert preflight.check_line(raw, line) is None
    assert preflight.problems
    return preflight.problems[0]


def without(key: str, obj: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` without ``key``."""
    return {k: v for k, v in obj.items() if k != key}


DROP: Any = object()
ID = "req-1"


def bad(body_fields: Mapping[str, Any] | None = None, /, **top: Any) -> bytes:
    """The line of request(ID) with body fields and top-level fields replaced (DROP: removed)."""
    obj = request(ID)
    obj["body"] = without_drops({**obj["body"], **(body_fields or {})})
    obj.update(top)
    return encode(without_drops(obj))


def without_drops(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` without the fields set to DROP."""
    return {k: v for k, v in obj.items() if v is not DROP}


BAD_LINES = [
    pytest.param(b"\xff\xfe{}", None, None, "invalid_utf8", id="invalid-utf8"),
    pytest.param(b'{"custom_id": "a",', None, None, "invalid_json", id="truncated-json"),
    pytest.param(b'{"custom_id": NaN}', None, None, "invalid_json", id="nan-is-not-json"),
    pytest.param(b"[1, 2]", None, None, "not_an_object", id="array"),
    pytest.param(b'"text"', None, None, "not_an_object", id="string"),
    pytest.param(bad(custom_id=7), None, "custom_id", "invalid_type", id="id-int"),
    pytest.param(bad(custom_id=""), None, "custom_id", "invalid_value", id="id-empty"),
    pytest.param(bad(method="GET"), ID, "method", "invalid_value", id="method-get"),
    pytest.param(bad(method="post"), ID, "method", "invalid_value", id="method-lowercase"),
    pytest.param(bad(method=1), ID, "method", "invalid_type", id="method-int"),
    pytest.param(bad(url=DROP), ID, "url", "missing_field", id="url-missing"),
    pytest.param(bad(url=None), ID, "url", "missing_field", id="url-null"),
    pytest.param(bad(url=["/v1"]), ID, "url", "invalid_type", id="url-array"),
    pytest.param(bad(url="v1/embeddings"), ID, "url", "invalid_value", id="url-relative"),
    pytest.param(bad(url=""), ID, "url", "invalid_value", id="url-empty"),
    pytest.param(bad(url="/v1/chat completions"), ID, "url", "invalid_value", id="url-space"),
    pytest.param(bad(body=DROP), ID, "body", "missing_field", id="body-missing"),
    pytest.param(bad(body="hi"), ID, "body", "invalid_type", id="body-string"),
    pytest.param(bad(body=[{"model": "m"}]), ID, "body", "invalid_type", id="body-array"),
    pytest.param(bad({"model": DROP}), ID, "body.model", "missing_field", id="model-missing"),
    pytest.param(bad({"model": None}), ID, "body.model", "missing_field", id="model-null"),
    pytest.param(bad({"model": 4}), ID, "body.model", "invalid_type", id="model-int"),
    pytest.param(bad({"model": ""}), ID, "body.model", "invalid_value", id="model-empty"),
    pytest.param(bad({"stream": True}), ID, "body.stream", "stream_not_supported", id="stream"),
    # JSON escapes of a lone UTF-16 surrogate: no Unicode text (for the journal, the server).
    pytest.param(bad(custom_id="a\ud800b"), None, "custom_id", "invalid_value", id="id-surrogate"),
    pytest.param(
        bad({"model": "m\udc00"}), ID, "body.model", "invalid_value", id="model-surrogate"
    ),
    pytest.param(bad(url="/v1/\ud800"), ID, "url", "invalid_value", id="url-surrogate"),
    # NUL: PostgreSQL's text cannot hold it.
    pytest.param(bad(custom_id="a\x00b"), None, "custom_id", "invalid_value", id="id-nul"),
    pytest.param(bad({"model": "m\x00"}), ID, "body.model", "invalid_value", id="model-nul"),
    pytest.param(bad(url="/v1/\x00"), ID, "url", "invalid_value", id="url-nul"),
]


@pytest.mark.parametrize(("raw", "custom_id", "field", "code"), BAD_LINES)
def test_each_kind_of_bad_line_is_reported(
    raw: bytes, custom_id: str | None, field: str | None, code: str
) -> None:
    """Each kind of bad line is rejected with its code, line number, custom_id and field."""
    problem = only_problem(raw, line=17)
    assert (problem.code, problem.line, problem.custom_id, problem.field) == (
        code,
        17,
        custom_id,
        field,
    )
    assert problem.source == "requests.jsonl"
    assert problem.message


@pytest.mark.parametrize(("raw", "custom_id", "field", "code"), BAD_LINES)
def test_a_bad_line_is_reported_the_same_after_a_good_line_of_its_url(
    raw: bytes, custom_id: str | None, field: str | None, code: str
) -> None:
    """A bad line after good lines of the same url gets the same problems as alone."""
    preflight, accepted = check_all([encode(request("good-1")), encode(request("good-2")), raw])
    assert len(accepted) == 2
    alone = Preflight(source="requests.jsonl")
    assert alone.check_line(raw, 3) is None
    assert preflight.problems == alone.problems


def _judged(preflight: Preflight, raw: bytes, line: int) -> object:
    """What a preflight makes of one line: its request (but its number), or its problems."""
    before = preflight.problem_count
    prepared = preflight.check_line(raw, line)
    if prepared is None:
        return preflight.problems[before:]
    return attrs.evolve(prepared, seq=0)


_ABSENT: Any = object()
_ids = st.one_of(
    st.just(_ABSENT), st.none(), st.just(""), st.just(7), st.sampled_from(["a", "b-1", "c d"])
)
_methods = st.sampled_from([_ABSENT, "POST", "post", "GET", None, 1])
_urls = st.sampled_from(
    [
        *(_ABSENT, None, 3, "", "v1/x", "/v1/a b", "/v1/\u00a0"),
        *("/v1/chat/completions", "/v1/embeddings", "/v1/embeddings/"),
    ]
)
_bodies = st.one_of(
    st.just(_ABSENT),
    st.sampled_from([None, "text", [1]]),
    st.fixed_dictionaries(
        {},
        optional={
            "model": st.sampled_from(["m", "", None, 4]),
            "stream": st.sampled_from([True, False, None, 1]),
            "input": st.sampled_from(["t", ["a", "b"], [[1], [2, 3]], [1, 2]]),
            "messages": st.just([{"role": "user", "content": "hi \u2028 there"}]),
        },
    ),
)


@given(_ids, _methods, _urls, _bodies, st.booleans(), st.booleans())
@example("c d", "POST", "/v1/chat/completions", {"model": "m"}, False, True)
@example("a", "POST", "/v1/chat/completions", {"model": "m", "stream": True}, False, False)
@example("a", "POST", "/v1/embeddings", {"model": "e", "input": ["a", "b"]}, True, False)
def test_a_line_is_judged_the_same_after_a_good_line_of_its_url(
    custom_id: Any, method: Any, url: Any, body: Any, spaced: bool, pattern: bool
) -> None:
    """Any line, good or bad, is accepted or rejected alike (same request, same problems)
    whether or not a good line of the same url came before it."""
    fields = {"custom_id": custom_id, "method": method, "url": url, "body": body}
    obj = {k: v for k, v in fields.items() if v is not _ABSENT}
    raw = json.dumps(obj, separators=(", ", ": ") if spaced else (",", ":")).encode()
    options: dict[str, Any] = {"custom_id_pattern": r"[a-z0-9-]+"} if pattern else {}
    warm = Preflight(source="in.jsonl", **options)
    good = {"custom_id": "good", "url": None if url is _ABSENT else url, "body": {"model": "m"}}
    warm.check_line(json.dumps(good).encode(), 1)  # accepted when the url is good
    alone = Preflight(source="in.jsonl", **options)
    assert _judged(warm, raw, 2) == _judged(alone, raw, 2)


def test_embeddings_lines_after_the_first_count_their_inputs() -> None:
    """Every embeddings line counts its inputs, not only the first of its url."""
    lines = [
        encode({"custom_id": f"e{n}", "url": "/v1/embeddings", "body": {"model": "e", "input": x}})
        for n, x in enumerate([["a", "b"], ["a", "b", "c"], "one", [[1], [2]]])
    ]
    _, accepted = check_all(lines)
    assert [p.inputs for p in accepted] == [2, 3, 1, 2]


def test_duplicate_custom_id_names_the_first_line() -> None:
    """A custom_id used again is a duplicate, and the problem names the line that had it first."""
    lines = [encode(request("a")), encode(request("b")), encode(request("a", "other"))]
    preflight, accepted = check_all(lines)
    assert [p.custom_id for p in accepted] == ["a", "b"]
    [problem] = preflight.problems
    assert (problem.code, problem.line, problem.custom_id, problem.field) == (
        "duplicate_custom_id",
        3,
        "a",
        "custom_id",
    )
    assert "line 1" in problem.message


def test_undone_lines_are_resolved_again_as_if_never_tried() -> None:
    """Lines resolved after mark() and undone resolve again as on a checker that never
    tried them: same requests and numbers, same problems and counts."""
    first = [encode(request(f"a{n}")) for n in (1, 2)]
    later = [encode(request("b")), bad({"stream": True}, custom_id="c"), encode(request("b"))]
    later += [encode(request("d"))]

    def items(preflight: Preflight, lines: list[bytes], start: int) -> list[Any]:
        return [preflight.inspect_line(raw, n) for n, raw in enumerate(lines, start=start)]

    tried = Preflight(source="in.jsonl", remember_ids=False)
    tried.resolve(items(tried, first, 1), {})
    mark = tried.mark()
    tried.resolve(items(tried, later, 3), {})
    tried.undo(mark)
    fresh = Preflight(source="in.jsonl", remember_ids=False)
    fresh.resolve(items(fresh, first, 1), {})
    got = tried.resolve(items(tried, later, 3), {"b": 1})
    assert got == fresh.resolve(items(fresh, later, 3), {"b": 1})
    assert [p.seq for p in got if p is not None] == [2]
    assert (tried.problems, tried.problem_count, tried.rejected, tried.accepted) == (
        fresh.problems,
        fresh.problem_count,
        fresh.rejected,
        fresh.accepted,
    )


def test_a_rejected_line_still_claims_its_custom_id() -> None:
    """Ids are unique across the source: a bad line's id makes a later good line a duplicate."""
    lines = [encode(request("a", stream=True)), encode(request("a"))]
    preflight, accepted = check_all(lines)
    assert accepted == []
    assert [(p.line, p.code) for p in preflight.problems] == [
        (1, "stream_not_supported"),
        (2, "duplicate_custom_id"),
    ]


def test_line_too_large() -> None:
    """A line over max_line_bytes (newline counted) is rejected; one that fits exactly is not."""
    raw = encode(request("big"))
    preflight, accepted = check_all([raw], max_line_bytes=len(raw) + 1)
    assert len(accepted) == 1 and preflight.problem_count == 0
    preflight, accepted = check_all([raw], max_line_bytes=len(raw))
    assert accepted == []
    [problem] = preflight.problems
    assert (problem.code, problem.line, problem.custom_id, problem.field) == (
        "line_too_large",
        1,
        "big",
        None,
    )


def test_line_too_large_counts_the_bytes_as_uploaded() -> None:
    """The size limit applies to the line as uploaded (re-encoded when method was added)."""
    spaced = json.dumps(without("method", request("x")), indent=None, separators=(" , ", " : "))
    raw = spaced.encode()
    preflight = Preflight(max_line_bytes=len(raw))
    prepared = preflight.check_line(raw, 1)
    assert prepared is not None
    assert len(prepared.data) + 1 <= len(raw)


def test_all_problems_of_a_file_are_reported() -> None:
    """Checking goes on to the end of the file: every bad line is reported, not just the first."""
    lines = [
        encode(request("ok-1")),
        b"not json",
        encode(request("s", stream=True)),
        encode(request("ok-2")),
        encode(request("m", model=None, url="chat")),
        encode(request("ok-1")),
    ]
    preflight, accepted = check_all(lines)
    assert [p.custom_id for p in accepted] == ["ok-1", "ok-2"]
    assert [(p.line, p.code, p.field) for p in preflight.problems] == [
        (2, "invalid_json", None),
        (3, "stream_not_supported", "body.stream"),
        (5, "invalid_value", "url"),
        (5, "missing_field", "body.model"),
        (6, "duplicate_custom_id", "custom_id"),
    ]
    assert preflight.problem_count == 5
    assert preflight.rejected == 4
    assert preflight.accepted == 2
    with pytest.raises(PreflightError) as caught:
        preflight.finish()
    error = caught.value
    assert error.count == 5
    assert error.source == "requests.jsonl"
    assert error.problems == preflight.problems
    text = str(error)
    assert "5 problems" in text
    assert "nothing was uploaded" in text
    assert "requests.jsonl:3: custom_id 's': body.stream: streaming is not supported" in text


def test_preflight_error_is_an_input_error() -> None:
    """PreflightError is the caller's fault: an InputError, a ValueError and an AiobatchError."""
    assert issubclass(PreflightError, InputError)
    assert issubclass(InputError, ValueError)
    assert issubclass(InputError, AiobatchError)


def test_error_message_lists_the_first_ten_and_counts_the_rest() -> None:
    """The error message lists the first 10 problems and says how many more there are."""
    preflight, _ = check_all([b"{"] * 25)
    with pytest.raises(PreflightError) as caught:
        preflight.finish()
    text = str(caught.value)
    assert "25 problems in 25 input lines" in text
    assert "requests.jsonl:10:" in text
    assert "requests.jsonl:11:" not in text
    assert "15 more" in text


def test_only_max_kept_problems_are_kept_but_all_counted() -> None:
    """Past max_kept_problems problems are counted but not kept."""
    preflight, _ = check_all([b"{"] * 7, max_kept_problems=3)
    assert [p.line for p in preflight.problems] == [1, 2, 3]
    assert preflight.problem_count == 7
    with pytest.raises(PreflightError) as caught:
        preflight.finish()
    assert caught.value.count == 7
    assert len(caught.value.problems) == 3


def test_skip_invalid_records_problems_but_does_not_raise() -> None:
    """With skip_invalid, bad lines are still reported in problems but finish() does not raise."""
    lines = [encode(request("a")), b"{", encode(request("b"))]
    preflight, accepted = check_all(lines, skip_invalid=True)
    preflight.finish()
    assert [p.custom_id for p in accepted] == ["a", "b"]
    assert [p.seq for p in accepted] == [0, 1]
    assert [p.line for p in accepted] == [1, 3]
    assert [(p.line, p.code) for p in preflight.problems] == [(2, "invalid_json")]


def test_clean_source_finishes_quietly() -> None:
    """A source without problems finishes without raising."""
    preflight, accepted = check_all([encode(request("a"))])
    preflight.finish()
    assert preflight.problems == ()
    assert len(accepted) == 1


def test_a_surrogate_pair_escape_is_text() -> None:
    """A custom_id and model written with a surrogate pair escape (an emoji) are accepted."""
    raw = b'{"custom_id": "a\\ud83d\\ude00", "method": "POST", "url": "/v1/chat/completions", '
    raw += b'"body": {"model": "m\\ud83d\\ude00"}}'
    _, accepted = check_all([raw])
    assert [(p.custom_id, p.model, p.data) for p in accepted] == [("a😀", "m😀", raw)]


def test_valid_line_is_uploaded_byte_for_byte() -> None:
    """A valid line with custom_id and method is uploaded exactly as written."""
    raw = (
        b'{ "custom_id" : "a",  "method":"POST", '
        b'"url":"/v1/embeddings", "body":{"model":"e","input":"x"}}  '
    )
    _, [prepared] = check_all([raw])
    assert prepared.data == raw
    assert prepared.generated_id is False


def test_prepared_request_fields() -> None:
    """An accepted line carries its seq, line, custom_id, url, model and a token estimate."""
    raw = encode(request("a", model="gpt-4.1", url="/v1/responses"))
    _, [prepared] = check_all([b"", raw])
    assert prepared.seq == 0
    assert prepared.line == 2
    assert prepared.custom_id == "a"
    assert prepared.url == "/v1/responses"
    assert prepared.model == "gpt-4.1"
    assert prepared.tokens == estimate_tokens(json.loads(raw)["body"])


def test_crlf_lines_are_accepted_without_their_cr() -> None:
    """Lines of a CRLF file are checked and uploaded without the trailing CR."""
    raw = encode(request("a"))
    _, [prepared] = check_all([raw + b"\r"])
    assert prepared.data == raw


def test_blank_lines_are_skipped() -> None:
    """Blank and whitespace-only lines are skipped: no request and no problem."""
    preflight, accepted = check_all([b"", b"   ", b"\r", b"\t", encode(request("a"))])
    assert [p.line for p in accepted] == [5]
    assert preflight.problem_count == 0
    assert preflight.rejected == 0


def test_only_ascii_whitespace_makes_a_line_blank() -> None:
    """A line of ASCII whitespace (vertical tab and form feed too) is blank; one holding a
    non-breaking space is not, and is reported as not JSON."""
    preflight, accepted = check_all([b"\x0b\x0c \t\r", b" \xc2\xa0 ", encode(request("a"))])
    assert [p.line for p in accepted] == [3]
    assert [(p.line, p.code) for p in preflight.problems] == [(2, "invalid_json")]


def test_byte_order_mark_on_the_first_line_is_dropped() -> None:
    """A UTF-8 byte-order mark at the start of the file is not part of the first line."""
    raw = encode(request("a"))
    _, [prepared] = check_all([b"\xef\xbb\xbf" + raw])
    assert prepared.data == raw


def test_missing_method_is_added() -> None:
    """A line without method gets "method": "POST" and is re-encoded compactly."""
    obj = without("method", request("a", "héllo"))
    _, [prepared] = check_all([encode(obj)])
    assert json.loads(prepared.data) == {**obj, "method": "POST"}
    expected = json.dumps(json.loads(prepared.data), separators=(",", ":"), ensure_ascii=False)
    assert prepared.data == expected.encode()
    assert "héllo".encode() in prepared.data


def test_generated_custom_id_is_a_hash_of_the_request() -> None:
    """A line without custom_id gets "auto-" + 20 hex digits of SHA-256 of its canonical JSON."""
    obj = request(None)
    canonical = json.dumps(
        {"method": "POST", "url": obj["url"], "body": obj["body"]},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    expected = "auto-" + hashlib.sha256(canonical.encode()).hexdigest()[:20]
    _, [prepared] = check_all([encode(obj)])
    assert prepared.custom_id == expected
    assert prepared.generated_id is True
    assert json.loads(prepared.data) == {"custom_id": expected, **obj}
    assert generated_custom_id("POST", obj["url"], obj["body"]) == expected


def test_null_custom_id_is_generated_too() -> None:
    """A null custom_id is treated as absent: one is generated."""
    obj = request(None) | {"custom_id": None}
    _, [prepared] = check_all([encode(obj)])
    assert prepared.custom_id == generated_custom_id("POST", obj["url"], obj["body"])
    assert json.loads(prepared.data)["custom_id"] == prepared.custom_id


def test_generated_ids_are_deterministic_and_identical_requests_get_suffixes() -> None:
    """The same input gives the same ids; the n-th identical request gets "-n"."""
    lines = [
        encode(request(None, "x")),
        encode(request(None, "y")),
        encode(without("method", request(None, "x"))),
        encode(request(None, "x")),
    ]
    first = [p.custom_id for p in check_all(lines)[1]]
    second = [p.custom_id for p in check_all(lines)[1]]
    assert first == second
    base = first[0]
    assert first[2:] == [f"{base}-2", f"{base}-3"]
    assert first[1] != base
    assert len(set(first)) == 4


def test_generated_id_is_independent_of_key_order() -> None:
    """Two requests that differ only in key order get the same generated id."""
    a = b'{"url":"/v1/embeddings","body":{"model":"e","input":"x"}}'
    b = b'{"body":{"input":"x","model":"e"},"url":"/v1/embeddings","method":"POST"}'
    [pa] = check_all([a])[1]
    [pb] = check_all([b])[1]
    assert pa.custom_id == pb.custom_id


def test_generated_id_colliding_with_an_explicit_id_is_a_duplicate() -> None:
    """A generated id that another line uses explicitly is a duplicate_custom_id problem."""
    obj = request(None)
    generated = generated_custom_id("POST", obj["url"], obj["body"])
    preflight, accepted = check_all([encode(request(generated, "other")), encode(obj)])
    assert [p.line for p in accepted] == [1]
    [problem] = preflight.problems
    assert (problem.code, problem.line, problem.custom_id, problem.field) == (
        "duplicate_custom_id",
        2,
        generated,
        "custom_id",
    )
    assert "line 1" in problem.message


def test_a_line_can_have_several_problems() -> None:
    """Independent problems of one line are all reported, in field order."""
    raw = encode({"custom_id": 3, "method": "GET", "url": "x", "body": {"stream": True}})
    preflight, _ = check_all([raw])
    assert [(p.field, p.code) for p in preflight.problems] == [
        ("custom_id", "invalid_type"),
        ("method", "invalid_value"),
        ("url", "invalid_value"),
        ("body.model", "missing_field"),
        ("body.stream", "stream_not_supported"),
    ]
    assert preflight.rejected == 1


def test_stream_false_is_fine() -> None:
    """stream=false is not a problem."""
    _, accepted = check_all([encode(request("a", stream=False))])
    assert len(accepted) == 1


def test_unknown_urls_and_models_are_accepted() -> None:
    """Preflight accepts any path-like url and any model: the sharder groups by them."""
    lines = [
        encode(request("a", url="/v1/custom/endpoint", model="m1")),
        encode(request("b", model="m2")),
    ]
    preflight, accepted = check_all(lines)
    assert preflight.problem_count == 0
    assert [(p.url, p.model) for p in accepted] == [
        ("/v1/custom/endpoint", "m1"),
        ("/v1/chat/completions", "m2"),
    ]


def test_line_with_a_bare_cr_inside_is_re_encoded_onto_one_line() -> None:
    """A line holding a bare CR (whitespace to JSON, a line end to some readers) is re-encoded."""
    raw = b'{"custom_id":"a",\r"method":"POST","url":"/v1/embeddings","body":{"model":"e"}}'
    _, [prepared] = check_all([raw])
    assert b"\r" not in prepared.data
    assert json.loads(prepared.data) == json.loads(raw)


def test_unicode_line_separators_are_escaped_in_uploaded_lines() -> None:
    """U+2028 inside a string (a line end to some readers) is uploaded as an escape."""
    _, [prepared] = check_all(
        [encode(request("a", "one\u2028two")).replace(b"\\u2028", "\u2028".encode())]
    )
    assert "\u2028".encode() not in prepared.data
    assert json.loads(prepared.data)["body"]["messages"][0]["content"] == "one\u2028two"


def test_check_item_accepts_a_dict_and_encodes_it_compactly() -> None:
    """A dict item is uploaded as compact JSON (non-ASCII kept) and numbered by its index."""
    preflight = Preflight()
    obj = request("a", "naïve")
    prepared = preflight.check_item(obj, 1)
    assert prepared is not None
    assert prepared.data == json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    assert prepared.line == 1
    assert obj == request("a", "naïve")  # not modified


def test_check_item_accepts_json_lines_as_str_and_bytes() -> None:
    """A str or bytes item is a JSON line, uploaded unchanged when valid."""
    preflight = Preflight()
    text = json.dumps(request("a"))
    first = preflight.check_item(text, 1)
    second = preflight.check_item(encode(request("b")), 2)
    assert first is not None and first.data == text.encode()
    assert second is not None and second.data == encode(request("b"))
    assert [first.seq, second.seq] == [0, 1]


def test_check_item_with_a_pretty_printed_line_uploads_one_line() -> None:
    """A str item spanning several lines (pretty-printed JSON) is re-encoded onto one line."""
    preflight = Preflight()
    prepared = preflight.check_item(json.dumps(request("a"), indent=2), 1)
    assert prepared is not None
    assert b"\n" not in prepared.data
    assert json.loads(prepared.data) == request("a")


@pytest.mark.parametrize(
    ("item", "code"),
    [
        pytest.param(42, "not_an_object", id="int"),
        pytest.param(None, "not_an_object", id="none"),
        pytest.param(["a"], "not_an_object", id="list"),
        pytest.param("[]", "not_an_object", id="json-array"),
        pytest.param("{", "invalid_json", id="bad-json"),
        pytest.param("\ud800", "invalid_utf8", id="lone-surrogate-str"),
        pytest.param({"custom_id": "a", "body": {"x": float("nan")}}, "invalid_json", id="nan"),
        pytest.param({"custom_id": "a", "body": {1, 2}}, "invalid_json", id="set"),
    ],
)
def test_check_item_rejects_what_is_not_a_request(item: Any, code: str) -> None:
    """An item that is neither a request object nor a JSON line of one is rejected."""
    preflight = Preflight()
    assert preflight.check_item(item, 4) is None
    [problem] = preflight.problems
    assert (problem.source, problem.line, problem.code, problem.field) == (
        "<requests>",
        4,
        code,
        None,
    )


def test_check_item_duplicates_name_the_item() -> None:
    """Duplicates in an iterable source name the earlier item."""
    preflight = Preflight()
    preflight.check_item(request("a"), 1)
    preflight.check_item(request("a"), 2)
    [problem] = preflight.problems
    assert problem.code == "duplicate_custom_id"
    assert "item 1" in problem.message


def test_check_item_generates_ids_like_check_line() -> None:
    """A dict without custom_id gets the same generated id as the same request in a file."""
    obj = request(None)
    from_item = Preflight().check_item(obj, 1)
    from_line = Preflight().check_line(encode(obj), 1)
    assert from_item is not None and from_line is not None
    assert from_item.custom_id == from_line.custom_id
    assert from_item.data == from_line.data


def test_lone_surrogate_escape_survives_re_encoding() -> None:
    """A JSON \\ud800 escape (valid JSON, not encodable as UTF-8) still makes a valid line."""
    raw = b'{"url":"/v1/embeddings","body":{"model":"e","input":"\\ud800"}}'
    _, [prepared] = check_all([raw])
    assert json.loads(prepared.data)["body"]["input"] == "\ud800"
    assert prepared.custom_id.startswith("auto-")


def test_custom_token_estimator_is_used() -> None:
    """A token_estimator given to Preflight estimates each request's tokens from its body."""
    seen: list[Mapping[str, Any]] = []

    def estimator(body: Mapping[str, Any]) -> int:
        seen.append(body)
        return 99

    preflight = Preflight(token_estimator=estimator)
    prepared = preflight.check_item(request("a"), 1)
    assert prepared is not None and prepared.tokens == 99
    assert seen == [request("a")["body"]]


def test_token_estimator_must_return_a_count() -> None:
    """A token_estimator that returns a negative number is a caller's bug: ValueError."""
    preflight = Preflight(token_estimator=lambda body: -1)
    with pytest.raises(ValueError, match="token estimator"):
        preflight.check_item(request("a"), 1)


@pytest.mark.parametrize(
    "options", [{"max_line_bytes": 0}, {"max_kept_problems": -1}], ids=["line-bytes", "kept"]
)
def test_bad_options_are_rejected(options: dict[str, Any]) -> None:
    """Nonsensical limits are rejected when the checker is made."""
    with pytest.raises(ValueError, match=next(iter(options))):
        Preflight(**options)


def test_problem_str_names_source_line_id_and_field() -> None:
    """str(problem) is "source:line: custom_id 'id': field: message", without unknown parts."""
    problem = LineProblem(
        "requests.jsonl",
        17,
        "req-3",
        "body.stream",
        "stream_not_supported",
        "streaming is not supported in batches (stream=true)",
    )
    assert str(problem) == (
        "requests.jsonl:17: custom_id 'req-3': body.stream: "
        "streaming is not supported in batches (stream=true)"
    )
    bare = LineProblem("<requests>", 2, None, None, "invalid_json", "not valid JSON")
    assert str(bare) == "<requests>:2: not valid JSON"


def test_problems_and_prepared_requests_are_frozen_and_picklable() -> None:
    """Problems and prepared requests are immutable values that survive pickling."""
    preflight, [prepared] = check_all([encode(request("a")), b"{"], skip_invalid=True)
    [problem] = preflight.problems
    for value in (prepared, problem):
        assert pickle.loads(pickle.dumps(value)) == value
    with pytest.raises(AttributeError):
        prepared.seq = 5  # type: ignore[misc]


def user(content: Any, role: str = "user") -> dict[str, Any]:
    """One chat message."""
    return {"role": role, "content": content}


def text_part(text: str) -> dict[str, Any]:
    """One text content part."""
    return {"type": "text", "text": text}


IMAGE_PART = {"type": "image_url", "image_url": {"url": "x" * 400}}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param({}, 3, id="empty"),
        pytest.param({"messages": [user("abcd" * 10)]}, 3 + 4 + 10, id="chat"),
        pytest.param(
            {"messages": [user([text_part("abcdefgh"), IMAGE_PART])]}, 3 + 4 + 2, id="parts"
        ),
        pytest.param({"messages": [user("abc", "system"), user("abcde")]}, 3 + 8 + 2, id="two"),
        pytest.param({"input": "abcdefgh"}, 3 + 2, id="input-string"),
        pytest.param({"input": ["abcd", "abcd"]}, 3 + 2, id="input-strings"),
        pytest.param({"input": [[1, 2, 3], [4, 5]]}, 3 + 5, id="input-token-arrays"),
        pytest.param({"prompt": "abcd", "instructions": "abcd"}, 3 + 2, id="prompt-instructions"),
        pytest.param(
            {"input": [user([{"type": "input_text", "text": "abcd"}])]}, 3 + 4 + 1, id="items"
        ),
        pytest.param({"input": "é" * 4}, 3 + 2, id="utf8-bytes"),
    ],
)
def test_estimate_tokens(body: dict[str, Any], expected: int) -> None:
    """The estimate is ~1 token per 4 UTF-8 bytes of prompt text, +4 per message, +3 per request."""
    assert estimate_tokens({"model": "m", **body}) == expected


def test_estimate_tokens_is_never_zero() -> None:
    """Even a body with no text is estimated at more than 0 tokens."""
    assert estimate_tokens({}) > 0


@pytest.mark.parametrize(
    ("url", "body", "expected"),
    [
        ("/v1/embeddings", {"model": "e", "input": ["a", "b", "c"]}, 3),
        ("/v1/embeddings", {"model": "e", "input": [[1, 2], [3]]}, 2),
        ("/v1/embeddings", {"model": "e", "input": [1, 2, 3]}, 1),
        ("/v1/embeddings", {"model": "e", "input": "one text"}, 1),
        ("/v1/chat/completions", {"model": "m", "input": ["a", "b"]}, 1),
    ],
)
def test_count_inputs(url: str, body: dict[str, Any], expected: int) -> None:
    """Embedding requests count one input per text or token array; others count 1."""
    assert count_inputs(url, body) == expected
