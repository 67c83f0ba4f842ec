"""The fake batch service: the lifecycle on the clock, results, usage and responders."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from conftest import FakeApi, chat_line

from aiobatch._convert import decode_result_line, structure
from aiobatch._lifecycle import REACHABLE, BatchStatus
from aiobatch._models import Batch, BatchRequest, ResultError, ResultHTTPError, ResultSuccess
from aiobatch.testing import (
    DefaultResponder,
    FakeBatchService,
    FakeConfig,
    LineErrorRule,
    VirtualClock,
    estimate_tokens,
)

TIMESTAMPS = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


async def test_lifecycle_follows_the_configured_timings(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """validating -> in_progress -> finalizing -> completed at the configured times."""
    api = make_api(validation_seconds=10, lines_per_second=2, finalizing_seconds=5)
    batch = await api.submit([chat_line(f"r{i}") for i in range(4)])
    created = batch["created_at"]
    bid = batch["id"]

    clock.advance(9.9)
    assert (await api.batch(bid))["status"] == "validating"
    clock.advance(0.1)
    seen = await api.batch(bid)
    assert seen["status"] == "in_progress"
    assert seen["in_progress_at"] == created + 10
    assert seen["model"] == "gpt-4o-mini"
    assert seen["request_counts"] == {"total": 4, "completed": 0, "failed": 0}
    clock.advance(0.5)
    assert (await api.batch(bid))["request_counts"]["completed"] == 1
    clock.advance(0.5)
    assert (await api.batch(bid))["request_counts"]["completed"] == 2
    clock.advance(1.0)
    seen = await api.batch(bid)
    assert seen["status"] == "finalizing"
    assert seen["finalizing_at"] == created + 12
    assert seen["output_file_id"] is None
    clock.advance(4.9)
    assert (await api.batch(bid))["status"] == "finalizing"
    clock.advance(0.1)
    seen = await api.batch(bid)
    assert seen["status"] == "completed"
    assert seen["completed_at"] == created + 17
    assert seen["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
    assert seen["output_file_id"] is not None
    assert seen["error_file_id"] is None
    for key in ("failed_at", "expired_at", "cancelling_at", "cancelled_at", "errors"):
        assert seen[key] is None


async def test_default_config_finishes_a_small_batch_within_seconds(
    api: FakeApi, clock: VirtualClock
) -> None:
    """With the default timings a 10-line batch completes within 5 seconds of clock time."""
    batch = await api.submit([chat_line(f"r{i}") for i in range(10)])
    clock.advance(5)
    assert (await api.batch(batch["id"]))["status"] == "completed"


async def test_a_poll_may_skip_statuses(api: FakeApi, clock: VirtualClock) -> None:
    """A batch observed only at the start and the end jumps validating -> completed."""
    batch = await api.submit([chat_line("a")])
    clock.advance(3600)
    done = await api.batch(batch["id"])
    assert done["status"] == "completed"
    assert done["created_at"] < done["in_progress_at"] <= done["finalizing_at"]
    assert done["finalizing_at"] < done["completed_at"]


def _check_progress(before: dict[str, Any], after: dict[str, Any]) -> None:
    old, new = BatchStatus(before["status"]), BatchStatus(after["status"])
    assert new is old or new in REACHABLE[old], (old, new)
    for key in ("total", "completed", "failed"):
        assert after["request_counts"][key] >= before["request_counts"][key], key
    for key in TIMESTAMPS:
        if before[key] is not None:
            assert after[key] == before[key], key
    assert after["usage"]["total_tokens"] >= before["usage"]["total_tokens"]


class _JitteryClock(VirtualClock):
    """A clock whose now() sometimes steps back a little, like a wall clock adjusted by NTP."""

    def __init__(self) -> None:
        super().__init__(start=1_750_000_000.0)
        self.calls = 0

    def now(self) -> float:
        self.calls += 1
        return super().now() - (0.7 if self.calls % 3 == 0 else 0.0)


@pytest.mark.parametrize("jittery", [False, True])
async def test_status_counts_and_timestamps_never_move_backwards(jittery: bool) -> None:
    """Across many observations nothing moves backwards, even when the clock jitters."""
    clock: VirtualClock = _JitteryClock() if jittery else VirtualClock()
    service = FakeBatchService(
        clock=clock,
        config=FakeConfig(
            validation_seconds=3, lines_per_second=3, finalizing_seconds=2, cancel_seconds=4
        ),
    )
    api = FakeApi(service)
    ids = [(await api.submit([chat_line(f"{b}-{i}") for i in range(12)]))["id"] for b in range(3)]
    last = {bid: await api.batch(bid) for bid in ids}
    steps = [0.1, 0.4, 0.25, 1.0, 0.05, 0.6, 0.3, 2.0, 0.15, 0.9] * 3
    for index, step in enumerate(steps):
        clock.advance(step)
        if index == 8:
            await api.call("POST", f"/batches/{ids[1]}/cancel")
        page = await api.ok("GET", "/batches")
        for seen in page["data"]:
            _check_progress(last[seen["id"]], seen)
            last[seen["id"]] = seen
        for bid in ids:
            seen = await api.batch(bid)
            _check_progress(last[bid], seen)
            last[bid] = seen
    assert {b["status"] for b in last.values()} == {"completed", "cancelled"}


async def _run_to_end(api: FakeApi, clock: VirtualClock, lines: list[Any], polls: int) -> bytes:
    batch = await api.submit(lines)
    for _ in range(polls):
        clock.advance(20 / max(polls, 1))
        await api.batch(batch["id"])
    clock.advance(100)
    done = await api.batch(batch["id"])
    assert done["status"] == "completed"
    return await api.content(done["output_file_id"])


async def test_results_do_not_depend_on_how_often_the_batch_is_polled() -> None:
    """Two services with the same seed give identical output whether polled often or never."""
    lines = [chat_line(f"r{i}", f"question {i}") for i in range(30)]
    outputs = []
    for polls in (0, 40):
        clock = VirtualClock()
        service = FakeBatchService(clock=clock, config=FakeConfig(lines_per_second=3), seed=7)
        outputs.append(await _run_to_end(FakeApi(service), clock, lines, polls))
    assert outputs[0] == outputs[1]


async def test_output_lines_have_the_batch_request_shape(api: FakeApi, clock: VirtualClock) -> None:
    """Output lines have OpenAI's batch request output shape, one per custom_id."""
    custom_ids = [f"req-{i}" for i in range(6)]
    batch = await api.submit([chat_line(c, f"text {c}") for c in custom_ids])
    clock.advance(60)
    done = await api.batch(batch["id"])
    output = await api.content(done["output_file_id"])
    lines = [json.loads(raw) for raw in output.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(custom_ids)
    ids = set()
    for raw, line in zip(output.splitlines(), lines, strict=True):
        assert set(line) == {"id", "custom_id", "response", "error"}
        assert re.fullmatch(r"batch_req_[0-9a-f]+", line["id"])
        ids.add(line["id"])
        assert line["error"] is None
        assert set(line["response"]) == {"status_code", "request_id", "body"}
        assert line["response"]["status_code"] == 200
        assert re.fullmatch(r"req_[0-9a-f]+", line["response"]["request_id"])
        assert isinstance(decode_result_line(raw), ResultSuccess)
    assert len(ids) == len(custom_ids)
    meta = await api.ok("GET", f"/files/{done['output_file_id']}")
    assert meta["purpose"] == "batch_output"
    assert meta["bytes"] == len(output)
    assert meta["filename"].endswith(".jsonl")


async def test_output_order_is_shuffled_unless_disabled(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """By default result lines are not in input order; shuffle_output=False keeps it."""
    custom_ids = [f"r{i:02d}" for i in range(20)]
    orders = []
    for shuffle in (True, False):
        api = make_api(shuffle_output=shuffle)
        batch = await api.submit([chat_line(c) for c in custom_ids])
        clock.advance(60)
        done = await api.batch(batch["id"])
        orders.append([line["custom_id"] for line in await api.lines(done["output_file_id"])])
    shuffled, ordered = orders
    assert sorted(shuffled) == custom_ids
    assert shuffled != custom_ids
    assert ordered == custom_ids


async def test_batch_usage_sums_the_successful_lines(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """Batch usage is the sum of the usage of the lines that succeeded (failed ones excluded)."""
    api = make_api(line_errors=[LineErrorRule(status=500, custom_ids={"r3", "r7"})])
    batch = await api.submit([chat_line(f"r{i}", "x" * (10 * i)) for i in range(10)])
    clock.advance(60)
    done = await api.batch(batch["id"])
    lines = await api.lines(done["output_file_id"])
    assert len(lines) == 8
    prompt = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in lines)
    completion = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in lines)
    assert done["usage"]["input_tokens"] == prompt
    assert done["usage"]["output_tokens"] == completion
    assert done["usage"]["total_tokens"] == prompt + completion
    assert prompt > 0
    assert completion > 0


async def test_counts_and_usage_progress_while_in_progress(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """While in_progress, counts and usage reflect the lines done so far."""
    api = make_api(validation_seconds=1, lines_per_second=1)
    batch = await api.submit([chat_line(f"r{i}") for i in range(10)])
    clock.advance(4)
    seen = await api.batch(batch["id"])
    assert seen["status"] == "in_progress"
    assert seen["request_counts"] == {"total": 10, "completed": 3, "failed": 0}
    partial = seen["usage"]["total_tokens"]
    assert partial > 0
    clock.advance(30)
    assert (await api.batch(batch["id"]))["usage"]["total_tokens"] > partial


async def test_line_errors_go_to_the_error_file(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """Lines hit by a LineErrorRule get an HTTP error response in the error file."""
    api = make_api(
        line_errors=[
            LineErrorRule(status=429, custom_ids={"b"}),
            LineErrorRule(status=400, predicate=lambda cid: cid.startswith("bad-")),
        ]
    )
    batch = await api.submit([chat_line(c) for c in ("a", "b", "bad-1", "c")])
    clock.advance(60)
    done = await api.batch(batch["id"])
    assert done["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    errors = {line["custom_id"]: line for line in await api.lines(done["error_file_id"])}
    assert set(errors) == {"b", "bad-1"}
    assert errors["b"]["response"]["status_code"] == 429
    assert errors["b"]["response"]["body"]["error"]["code"] == "rate_limit_exceeded"
    assert errors["bad-1"]["response"]["status_code"] == 400
    assert errors["bad-1"]["error"] is None
    raw = (await api.content(done["error_file_id"])).splitlines()[0]
    assert isinstance(decode_result_line(raw), ResultHTTPError)
    ok = {line["custom_id"] for line in await api.lines(done["output_file_id"])}
    assert ok == {"a", "c"}


async def test_line_error_ratio_is_deterministic_by_custom_id(clock: VirtualClock) -> None:
    """A ratio rule fails roughly that share of lines, the same ids on every run."""
    config = FakeConfig(line_errors=[LineErrorRule(status=500, ratio=0.3)])
    failed_sets = []
    for _ in range(2):
        service = FakeBatchService(clock=clock, config=config, seed=3)
        api = FakeApi(service)
        batch = await api.submit([chat_line(f"r{i}") for i in range(200)])
        clock.advance(60)
        done = await api.batch(batch["id"])
        failed_sets.append({line["custom_id"] for line in await api.lines(done["error_file_id"])})
        assert 30 <= done["request_counts"]["failed"] <= 90
    assert failed_sets[0] == failed_sets[1]


async def test_output_file_id_is_null_when_nothing_succeeded(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """A completed batch whose every line failed has output_file_id null, error file set."""
    api = make_api(line_errors=[LineErrorRule(status=500, ratio=1.0)])
    batch = await api.submit([chat_line(f"r{i}") for i in range(9)])
    clock.advance(60)
    done = await api.batch(batch["id"])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 9, "completed": 0, "failed": 9}
    assert done["output_file_id"] is None
    assert len(await api.lines(done["error_file_id"])) == 9


async def test_output_expires_after_sets_the_result_file_expiry(
    api: FakeApi, clock: VirtualClock
) -> None:
    """Result files expire output_expires_after.seconds after their own creation."""
    batch = await api.submit(
        [chat_line("a")], output_expires_after={"anchor": "created_at", "seconds": 7200}
    )
    clock.advance(60)
    done = await api.batch(batch["id"])
    meta = await api.ok("GET", f"/files/{done['output_file_id']}")
    assert meta["expires_at"] == meta["created_at"] + 7200
    assert meta["created_at"] == done["completed_at"]


async def test_result_files_default_to_30_days(api: FakeApi, clock: VirtualClock) -> None:
    """Without output_expires_after result files expire 30 days after creation."""
    batch = await api.submit([chat_line("a")])
    clock.advance(60)
    done = await api.batch(batch["id"])
    meta = await api.ok("GET", f"/files/{done['output_file_id']}")
    assert meta["expires_at"] == meta["created_at"] + 30 * 86_400


async def test_result_files_are_listed_as_batch_output(api: FakeApi, clock: VirtualClock) -> None:
    """Result files appear in GET /files?purpose=batch_output."""
    batch = await api.submit([chat_line("a")])
    clock.advance(60)
    done = await api.batch(batch["id"])
    page = await api.ok("GET", "/files", params={"purpose": "batch_output"})
    assert [f["id"] for f in page["data"]] == [done["output_file_id"]]


async def test_get_batch_introspection_matches_the_wire(api: FakeApi, clock: VirtualClock) -> None:
    """service.get_batch returns the same batch a client would decode."""
    batch = await api.submit([chat_line("a")])
    clock.advance(1.5)
    model = await api.service.get_batch(batch["id"])
    assert model == structure(await api.batch(batch["id"]), Batch)
    with pytest.raises(KeyError):
        await api.service.get_batch("batch_missing")


# -- responders ------------------------------------------------------------------------------


async def test_custom_sync_responder_answers_each_line(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """A plain function responder decides each line's status and body."""
    seen: list[BatchRequest] = []

    def responder(request: BatchRequest) -> tuple[int, Any]:
        seen.append(request)
        if request.custom_id == "no":
            return 422, {"error": {"message": "nope", "type": "x", "param": None, "code": None}}
        return 200, {"echo": request.body["messages"][0]["content"]}

    api = make_api(responder=responder)
    batch = await api.submit([chat_line("yes", "ping"), chat_line("no")])
    clock.advance(60)
    done = await api.batch(batch["id"])
    assert [r.custom_id for r in seen] == ["yes", "no"]
    assert seen[0].url == "/v1/chat/completions"
    (ok,) = await api.lines(done["output_file_id"])
    assert ok["response"]["body"] == {"echo": "ping"}
    (bad,) = await api.lines(done["error_file_id"])
    assert bad["response"]["status_code"] == 422


async def test_async_responder_is_awaited(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """A coroutine responder is awaited, and its usage feeds the batch usage."""

    async def responder(request: BatchRequest) -> tuple[int, Any]:
        await asyncio.sleep(0)
        return 200, {"usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}}

    api = make_api(responder=responder)
    batch = await api.submit([chat_line("a"), chat_line("b")])
    clock.advance(60)
    done = await api.batch(batch["id"])
    assert done["request_counts"]["completed"] == 2
    assert done["usage"]["input_tokens"] == 10
    assert done["usage"]["output_tokens"] == 4


async def test_responder_with_a_wrong_return_type_fails_loudly(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """A responder that does not return (status, body) raises a TypeError naming the line."""
    api = make_api(responder=lambda request: {"not": "a tuple"})
    await api.submit([chat_line("line-1")])
    clock.advance(60)
    with pytest.raises(TypeError, match="line-1"):
        await api.call("GET", "/batches")


async def _complete_one(
    api: FakeApi, clock: VirtualClock, line: dict[str, Any], endpoint: str
) -> dict[str, Any]:
    batch = await api.submit([line], endpoint=endpoint)
    clock.advance(60)
    done = await api.batch(batch["id"])
    (result,) = await api.lines(done["output_file_id"] or done["error_file_id"])
    return result  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("endpoint", "body", "object_type"),
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}]},
            "chat.completion",
        ),
        ("/v1/completions", {"prompt": "Once upon"}, "text_completion"),
        ("/v1/embeddings", {"input": ["one", "two"]}, "list"),
        ("/v1/responses", {"input": "hello there"}, "response"),
    ],
)
async def test_default_responder_gives_realistic_shapes(
    api: FakeApi, clock: VirtualClock, endpoint: str, body: dict[str, Any], object_type: str
) -> None:
    """The default responder answers each endpoint with its real object type, model and usage."""
    line = {
        "custom_id": "c1",
        "method": "POST",
        "url": endpoint,
        "body": {"model": "m-1", **body},
    }
    result = await _complete_one(api, clock, line, endpoint)
    reply = result["response"]["body"]
    assert result["response"]["status_code"] == 200
    assert reply["object"] == object_type
    assert reply["model"] == "m-1"
    usage = reply["usage"]
    assert usage["total_tokens"] > 0
    if endpoint == "/v1/embeddings":
        assert [d["index"] for d in reply["data"]] == [0, 1]
        assert len(reply["data"][0]["embedding"]) == 8
        assert reply["data"][0]["embedding"] != reply["data"][1]["embedding"]
    elif endpoint == "/v1/responses":
        assert reply["output"][0]["content"][0]["text"]
        assert usage["input_tokens"] + usage["output_tokens"] == usage["total_tokens"]
    else:
        assert reply["choices"][0]["finish_reason"] == "stop"
        assert usage["prompt_tokens"] + usage["completion_tokens"] == usage["total_tokens"]


def test_default_responder_is_deterministic_and_content_dependent() -> None:
    """The same line gets the same answer; different content gets a different one."""
    responder = DefaultResponder()

    def ask(text: str) -> Any:
        request = BatchRequest(
            custom_id="c",
            url="/v1/chat/completions",
            body={"model": "m", "messages": [{"role": "user", "content": text}]},
        )
        return responder(request)

    assert ask("hello") == ask("hello")
    assert ask("hello") != ask("goodbye")
    assert DefaultResponder()(
        BatchRequest(
            "c",
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "hello"}]},
        )
    ) == ask("hello")


def test_default_responder_caps_completion_tokens() -> None:
    """max_tokens caps completion tokens and marks the choice finish_reason=length."""
    status, body = DefaultResponder()(
        BatchRequest(
            "c",
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "x" * 200}], "max_tokens": 2},
        )
    )
    assert status == 200
    assert body["usage"]["completion_tokens"] == 2
    assert body["choices"][0]["finish_reason"] == "length"


def test_default_responder_uses_the_prompt_token_estimate() -> None:
    """Prompt tokens in the default responses are estimate_tokens of the prompt."""
    messages = [{"role": "user", "content": "a" * 41}]
    _, body = DefaultResponder()(
        BatchRequest("c", "/v1/chat/completions", {"model": "m", "messages": messages})
    )
    assert body["usage"]["prompt_tokens"] == estimate_tokens(messages)
    assert estimate_tokens({"model": "a-very-long-model-name", "x": "abcd"}) == 1
    # Keys do not count; integers inside a list (pre-tokenised input) count one token each.
    assert estimate_tokens({"input": [1, 2, 3], "max_tokens": 999}) == 3


@pytest.mark.parametrize(
    ("url", "body", "param"),
    [
        ("/v1/chat/completions", {"model": "m"}, "messages"),
        ("/v1/completions", {"model": "m"}, "prompt"),
        ("/v1/embeddings", {"model": "m"}, "input"),
        ("/v1/images/generations", {"prompt": "cat"}, "url"),
    ],
)
def test_default_responder_rejects_incomplete_or_unsupported_lines(
    url: str, body: dict[str, Any], param: str
) -> None:
    """A line missing its endpoint's required parameter, or an unsimulated endpoint, is a 400."""
    status, reply = DefaultResponder()(BatchRequest("c", url, body))
    assert status == 400
    assert reply["error"]["param"] == param


async def test_missing_messages_line_lands_in_the_error_file(
    api: FakeApi, clock: VirtualClock
) -> None:
    """A chat line without messages passes validation but fails with a 400 in the error file."""
    line = {
        "custom_id": "x",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini"},
    }
    batch = await api.submit([line, chat_line("ok")])
    clock.advance(60)
    done = await api.batch(batch["id"])
    assert done["status"] == "completed"
    (bad,) = await api.lines(done["error_file_id"])
    assert bad["custom_id"] == "x"
    assert bad["response"]["status_code"] == 400
    assert bad["response"]["body"]["error"]["code"] == "missing_required_parameter"


async def test_moderations_batch_without_model_completes(api: FakeApi, clock: VirtualClock) -> None:
    """Moderation lines need no model and get moderation results."""
    line = {"custom_id": "m1", "method": "POST", "url": "/v1/moderations", "body": {"input": "hi"}}
    result = await _complete_one(api, clock, line, "/v1/moderations")
    assert result["response"]["status_code"] == 200
    assert result["response"]["body"]["results"][0]["flagged"] is False


async def test_results_are_decodable_by_the_converter(api: FakeApi, clock: VirtualClock) -> None:
    """Every result line the fake writes decodes with aiobatch's own result-line decoder."""
    batch = await api.submit([chat_line(f"r{i}") for i in range(5)])
    clock.advance(1.02)
    await api.ok("POST", f"/batches/{batch['id']}/cancel")
    clock.advance(60)
    done = await api.batch(batch["id"])
    kinds = set()
    for file_id in (done["output_file_id"], done["error_file_id"]):
        for raw in (await api.content(file_id)).splitlines():
            kinds.add(type(decode_result_line(raw)))
    assert kinds == {ResultSuccess, ResultError}
