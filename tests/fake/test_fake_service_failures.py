"""The fake batch service: asynchronous validation failures (the batch goes ``failed``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from conftest import FakeApi, chat_line, jsonl

from aiobatch._convert import structure
from aiobatch._models import Batch
from aiobatch.testing import VirtualClock, estimate_tokens

VALIDATION_SECONDS = 7.0


async def _fail(
    api: FakeApi, clock: VirtualClock, content: bytes, endpoint: str = "/v1/chat/completions"
) -> dict[str, Any]:
    """Submit content, check create succeeded, and return the batch after validation."""
    file = await api.upload(content)
    batch = await api.create(file["id"], endpoint=endpoint)
    assert batch["status"] == "validating"
    clock.advance(VALIDATION_SECONDS)
    failed = await api.batch(batch["id"])
    assert failed["status"] == "failed"
    assert failed["failed_at"] == batch["created_at"] + int(VALIDATION_SECONDS)
    assert failed["in_progress_at"] is None
    assert failed["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert failed["output_file_id"] is None
    assert failed["error_file_id"] is None
    assert failed["errors"]["object"] == "list"
    for error in failed["errors"]["data"]:
        assert set(error) == {"code", "message", "param", "line"}
        assert error["message"]
    structure(failed, Batch)  # the client's decoder accepts it
    clock.advance(3600)
    assert await api.batch(batch["id"]) == failed  # failed is final
    return failed


@pytest.fixture
def vapi(make_api: Callable[..., FakeApi]) -> FakeApi:
    """A service that validates for VALIDATION_SECONDS."""
    return make_api(validation_seconds=VALIDATION_SECONDS)


BROKEN_CASES: list[tuple[str, list[Any], str, str | None, int | None]] = [
    # (case id, lines, code, param, line)
    (
        "bad-json",
        [chat_line("a"), '{"custom_id": "b", ', chat_line("c")],
        "invalid_json_line",
        None,
        2,
    ),
    ("not-object", [chat_line("a"), "[1, 2]"], "invalid_json_line", None, 2),
    (
        "duplicate",
        [chat_line("a"), chat_line("b"), chat_line("a")],
        "duplicate_custom_id",
        "custom_id",
        3,
    ),
    (
        "url",
        [chat_line("a"), chat_line("b", url="/v1/embeddings")],
        "url_mismatch",
        "url",
        2,
    ),
    (
        "model",
        [chat_line("a", model="gpt-4o"), chat_line("b", model="gpt-4o-mini")],
        "model_mismatch",
        "body.model",
        2,
    ),
    (
        "no-body",
        [chat_line("a"), {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions"}],
        "missing_required_parameter",
        "body",
        2,
    ),
    (
        "no-custom-id",
        [{"method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-4o-mini"}}],
        "missing_required_parameter",
        "custom_id",
        1,
    ),
    (
        "no-model",
        [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}],
        "missing_required_parameter",
        "body.model",
        1,
    ),
    (
        "get",
        [{**chat_line("a"), "method": "GET"}],
        "invalid_request",
        "method",
        1,
    ),
    ("stream", [chat_line("a", stream=True)], "streaming_unsupported", "body.stream", 1),
]


@pytest.mark.parametrize(
    ("lines", "code", "param", "line"),
    [case[1:] for case in BROKEN_CASES],
    ids=[case[0] for case in BROKEN_CASES],
)
async def test_bad_line_fails_the_batch_after_validation(
    vapi: FakeApi,
    clock: VirtualClock,
    lines: list[Any],
    code: str,
    param: str | None,
    line: int,
) -> None:
    """A bad line is accepted at create and fails the batch later with its code and line."""
    failed = await _fail(vapi, clock, jsonl(lines))
    (error,) = failed["errors"]["data"]
    assert error["code"] == code
    assert error["param"] == param
    assert error["line"] == line


async def test_every_bad_line_is_reported(vapi: FakeApi, clock: VirtualClock) -> None:
    """Several bad lines give one error each, with their own line numbers."""
    lines = [chat_line("a"), "nope", chat_line("a"), chat_line("c", url="/v1/completions")]
    failed = await _fail(vapi, clock, jsonl(lines))
    found = [(e["code"], e["line"]) for e in failed["errors"]["data"]]
    assert found == [("invalid_json_line", 2), ("duplicate_custom_id", 3), ("url_mismatch", 4)]


async def test_line_numbers_count_blank_lines(vapi: FakeApi, clock: VirtualClock) -> None:
    """Blank lines are skipped but still count for line numbers."""
    content = json.dumps(chat_line("a")).encode() + b"\n\n" + b"garbage\n"
    failed = await _fail(vapi, clock, content)
    assert failed["errors"]["data"][0]["line"] == 3


async def test_reported_errors_are_capped(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """errors.data holds at most max_validation_errors entries."""
    api = make_api(validation_seconds=VALIDATION_SECONDS, max_validation_errors=3)
    failed = await _fail(api, clock, jsonl(["x"] * 10))
    assert len(failed["errors"]["data"]) == 3


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
async def test_empty_file_fails_with_empty_file(
    vapi: FakeApi, clock: VirtualClock, content: bytes
) -> None:
    """A file with no lines fails with empty_file."""
    failed = await _fail(vapi, clock, content)
    (error,) = failed["errors"]["data"]
    assert error["code"] == "empty_file"
    assert error["line"] is None


async def test_too_many_lines_fails_with_too_many_tasks(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """More lines than max_lines fails with too_many_tasks; exactly max_lines is fine."""
    api = make_api(validation_seconds=VALIDATION_SECONDS, max_lines=3)
    failed = await _fail(api, clock, jsonl([chat_line(str(i)) for i in range(4)]))
    (error,) = failed["errors"]["data"]
    assert error["code"] == "too_many_tasks"
    assert "3" in error["message"]
    ok = await api.submit([chat_line(str(i)) for i in range(3)])
    clock.advance(VALIDATION_SECONDS)
    assert (await api.batch(ok["id"]))["status"] != "failed"


def test_default_line_limit_is_50000() -> None:
    """The default max_lines is OpenAI's 50,000."""
    from aiobatch.testing import FakeConfig

    assert FakeConfig().max_lines == 50_000


async def test_too_many_embedding_inputs_fails(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """An embeddings batch with more inputs than max_embedding_inputs fails too_many_tasks."""
    api = make_api(validation_seconds=VALIDATION_SECONDS, max_embedding_inputs=5)
    lines = [
        {
            "custom_id": str(i),
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": ["a", "b", "c"]},
        }
        for i in range(2)
    ]
    failed = await _fail(api, clock, jsonl(lines), endpoint="/v1/embeddings")
    assert failed["errors"]["data"][0]["code"] == "too_many_tasks"


async def test_forced_failure_applies_to_the_next_batches_only(
    vapi: FakeApi, clock: VirtualClock
) -> None:
    """fail_next_batches makes the next batches fail with the given code, then stops."""
    vapi.service.fail_next_batches("token_limit_exceeded", count=2, message="quota")
    for _ in range(2):
        failed = await _fail(vapi, clock, jsonl([chat_line("a")]))
        assert failed["errors"]["data"] == [
            {"code": "token_limit_exceeded", "message": "quota", "param": None, "line": None}
        ]
    batch = await vapi.submit([chat_line("a")])
    clock.advance(VALIDATION_SECONDS)
    assert (await vapi.batch(batch["id"]))["status"] == "in_progress"


async def test_forced_failure_has_a_default_message(vapi: FakeApi, clock: VirtualClock) -> None:
    """A forced failure without a message gets a default one for its code."""
    vapi.service.fail_next_batches("duplicate_custom_id", line=4, param="custom_id")
    failed = await _fail(vapi, clock, jsonl([chat_line("a")]))
    (error,) = failed["errors"]["data"]
    assert (error["code"], error["line"], error["param"]) == ("duplicate_custom_id", 4, "custom_id")
    assert "duplicate" in error["message"]


# -- the enqueued-token limit -----------------------------------------------------------------


def _batch_tokens(lines: list[dict[str, Any]]) -> int:
    return sum(estimate_tokens(line["body"]) for line in lines)


async def test_token_limit_counts_running_batches_of_the_same_model(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """Running batches of the same model count toward the token limit; others do not."""
    lines = [chat_line(f"r{i}", "some prompt text " * 5) for i in range(4)]
    tokens = _batch_tokens(lines)
    api = make_api(
        validation_seconds=1,
        lines_per_second=1,
        enqueued_token_limits={"gpt-4o-mini": tokens * 2},
    )
    first = await api.submit(lines)
    second = await api.submit(lines)
    third = await api.submit(lines)
    other_model = await api.submit([chat_line("o", model="gpt-4o")])
    clock.advance(1)
    statuses = [(await api.batch(b["id"]))["status"] for b in (first, second, third, other_model)]
    assert statuses == ["in_progress", "in_progress", "failed", "in_progress"]
    (error,) = (await api.batch(third["id"]))["errors"]["data"]
    assert error["code"] == "token_limit_exceeded"
    assert "gpt-4o-mini" in error["message"]
    assert f"{tokens * 2:,}" in error["message"]
    assert await api.service.enqueued_tokens("gpt-4o-mini") == tokens * 2
    clock.advance(60)  # the first two complete and release their tokens
    assert await api.service.enqueued_tokens("gpt-4o-mini") == 0
    fourth = await api.submit(lines)
    clock.advance(1)
    assert (await api.batch(fourth["id"]))["status"] == "in_progress"


async def test_token_limit_exactly_reached_is_allowed(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """A batch whose tokens exactly reach the limit passes; one token less of limit fails it."""
    lines = [chat_line("a", "x" * 40)]
    tokens = _batch_tokens(lines)
    for limit, expected in ((tokens, "in_progress"), (tokens - 1, "failed")):
        api = make_api(
            validation_seconds=1,
            lines_per_second=0.01,
            enqueued_token_limits={"gpt-4o-mini": limit},
        )
        batch = await api.submit(lines)
        clock.advance(1)
        assert (await api.batch(batch["id"]))["status"] == expected


async def test_cancelled_batch_releases_its_tokens(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """A cancelled batch stops counting against the limit once cancelled."""
    lines = [chat_line("a", "y" * 80)]
    api = make_api(
        validation_seconds=1,
        lines_per_second=0.001,
        cancel_seconds=5,
        enqueued_token_limits={"gpt-4o-mini": _batch_tokens(lines)},
    )
    first = await api.submit(lines)
    clock.advance(1)
    await api.ok("POST", f"/batches/{first['id']}/cancel")
    assert await api.service.enqueued_tokens("gpt-4o-mini") == _batch_tokens(lines)
    clock.advance(5)
    assert (await api.batch(first["id"]))["status"] == "cancelled"
    assert await api.service.enqueued_tokens("gpt-4o-mini") == 0
    second = await api.submit(lines)
    clock.advance(1)
    assert (await api.batch(second["id"]))["status"] == "in_progress"


async def test_token_limit_sees_other_batches_at_the_right_instant(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """Limits are checked in time order across batches even when nobody observed them."""
    lines = [chat_line("a", "z" * 80)]
    api = make_api(
        validation_seconds=1,
        lines_per_second=1,
        finalizing_seconds=5,
        enqueued_token_limits={"gpt-4o-mini": _batch_tokens(lines)},
    )
    # first: validated at +1, finalizing from +2, completed (tokens released) at +7.
    first = await api.submit(lines)
    clock.advance(2)
    second = await api.submit(lines)  # validates at +3: first still enqueued -> fails
    clock.advance(4.5)
    third = await api.submit(lines)  # validates at +7.5: first released at +7 -> runs
    clock.advance(0.5)
    clock.advance(100)  # one jump over all three events, none observed in between
    first_seen, second_seen, third_seen = [await api.batch(b["id"]) for b in (first, second, third)]
    assert first_seen["status"] == "completed"
    assert second_seen["status"] == "failed"
    assert second_seen["errors"]["data"][0]["code"] == "token_limit_exceeded"
    assert third_seen["status"] == "completed"
    assert third_seen["in_progress_at"] >= first_seen["completed_at"]
