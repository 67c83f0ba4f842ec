"""The fake batch service: server-side rate limiting and per-batch processing speeds.

Time is a VirtualClock; nothing waits on wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from conftest import API_KEY, FakeApi, chat_line
from test_fake_schemas import validator

from aiobatch import BatchClient, RetryPolicy
from aiobatch.cli import build_parser, main
from aiobatch.cli._fake import build_fake_service, describe
from aiobatch.errors import TransportError
from aiobatch.testing import (
    FakeBatchService,
    FakeConfig,
    Fault,
    FaultKind,
    RateLimit,
    RateLimiter,
    ResponderResult,
    VirtualClock,
    chat_requests,
    current_line_time,
)
from aiobatch.testing._ratelimit import go_duration
from aiobatch.transport import Request

RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
)


def limited(make_api: Callable[..., FakeApi], **limit: Any) -> FakeApi:
    """A driver for a service limited by ``RateLimit(**limit)``."""
    return make_api(rate_limit=RateLimit(**limit))


async def statuses(api: FakeApi, count: int, path: str = "/batches") -> list[int]:
    """Send ``count`` GETs of ``path`` at the current instant; their statuses."""
    return [(await api.raw("GET", path)).status for _ in range(count)]


# -- the limit -----------------------------------------------------------------------------


async def test_limit_admits_exactly_burst_plus_rate_over_a_window(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """Over one second from a full bucket, exactly burst + rate requests get through."""
    api = limited(make_api, requests_per_second=20, burst=20)
    start = clock.now()
    assert await statuses(api, 25) == [200] * 20 + [429] * 5
    for step in range(1, 21):
        clock.advance_to(start + step / 20)
        assert await statuses(api, 3) == [200, 429, 429], step
    limiter = api.service.rate_limiter
    assert (limiter.admitted, limiter.refused) == (40, 45)
    assert api.service.request_count("GET", "/batches") == 85


async def test_random_arrivals_never_beat_the_bucket(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """For seeded random arrivals, no window admits more than burst + floor(T * rate)."""
    rate, burst = 5.0, 3
    api = limited(make_api, requests_per_second=rate, burst=burst)
    rng = random.Random(7)
    admitted: list[float] = []
    for _ in range(400):
        clock.advance(rng.expovariate(12.0))
        if (await api.raw("GET", "/batches")).status == 200:
            admitted.append(clock.now())
    assert api.service.rate_limiter.refused > 0
    for i, first in enumerate(admitted):
        for j in range(i, len(admitted)):
            window = admitted[j] - first
            assert j - i + 1 <= burst + math.floor(window * rate + 1e-6), (i, j, window)
    # The bucket is also work-conserving: busy for 400 arrivals, it admitted what it earned.
    elapsed = admitted[-1] - admitted[0]
    assert len(admitted) >= math.floor(elapsed * rate)


async def test_rate_limited_answer_has_openai_body_and_headers(
    make_api: Callable[..., FakeApi],
) -> None:
    """A 429 carries OpenAI's rate-limit body, retry-after(-ms) and x-ratelimit headers."""
    api = limited(make_api, requests_per_second=20, burst=20)
    await statuses(api, 20)
    response = await api.raw("GET", "/batches")
    assert response.status == 429
    headers = response.headers
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"].startswith("req_")
    assert "date" in headers
    assert headers["retry-after-ms"] == "50"
    assert headers["retry-after"] == "1"
    assert headers["x-ratelimit-limit-requests"] == "20"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "1s"
    body = json.loads(await response.read())
    assert not list(validator("ErrorResponse").iter_errors(body))
    error = body["error"]
    assert error["type"] == "requests"
    assert error["code"] == "rate_limit_exceeded"
    assert error["param"] is None
    assert error["message"].startswith("Rate limit reached for requests in organization org-fake")
    assert "Please try again in 50ms." in error["message"]


async def test_admitted_answers_count_down_remaining_and_reset(
    make_api: Callable[..., FakeApi],
) -> None:
    """Every admitted answer says how many requests are left and when the bucket is full."""
    api = limited(make_api, requests_per_second=20, burst=20)
    seen = []
    for _ in range(5):
        response = await api.raw("GET", "/batches")
        assert response.status == 200
        assert "retry-after" not in response.headers
        assert "retry-after-ms" not in response.headers
        seen.append(tuple(response.headers[name] for name in RATE_HEADERS))
    assert seen == [
        ("20", "19", "50ms"),
        ("20", "18", "100ms"),
        ("20", "17", "150ms"),
        ("20", "16", "200ms"),
        ("20", "15", "250ms"),
    ]


async def test_retry_after_is_accurate(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """A retry just before retry-after-ms is refused; one at retry-after-ms succeeds."""
    api = limited(make_api, requests_per_second=3, burst=2)
    start = clock.now()
    assert await statuses(api, 2) == [200, 200]
    refused = await api.raw("GET", "/batches")
    assert refused.status == 429
    assert refused.headers["retry-after-ms"] == "334"  # 1/3 s, rounded up to the ms
    assert refused.headers["retry-after"] == "1"
    clock.advance_to(start + 0.333)
    early = await api.raw("GET", "/batches")
    assert early.status == 429
    assert early.headers["retry-after-ms"] == "1"
    clock.advance_to(start + 0.334)
    assert (await api.raw("GET", "/batches")).status == 200
    assert (await api.raw("GET", "/batches")).status == 429


async def test_a_client_that_honours_retry_after_gets_everything_through(
    clock: VirtualClock,
) -> None:
    """BatchClient calls beyond the burst wait out the 429s and succeed at the rate."""
    config = FakeConfig(rate_limit=RateLimit(requests_per_second=20, burst=20))
    service = FakeBatchService(clock=clock, config=config)
    start = clock.now()
    client = BatchClient(
        api_key=API_KEY,
        base_url="http://fake.local/v1",
        transport=service.transport(),
        retry=RetryPolicy(jitter=None, max_attempts=10),
        clock=clock,
    )
    async with client, clock.auto_advance():
        pages = await asyncio.gather(*(client.list_batches_page() for _ in range(25)))
    assert len(pages) == 25
    limiter = service.rate_limiter
    assert limiter.admitted == 25
    # 5 calls over the burst, one token every 50 ms: the last gets through 250 ms in.
    assert clock.now() - start == pytest.approx(0.25, abs=1e-6)
    assert limiter.refused == sum(range(1, 6))


async def test_rate_limited_create_has_no_effect(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """A refused create makes no batch and is logged as a 429 with FaultKind.RATE_LIMITED."""
    api = limited(make_api, requests_per_second=1, burst=1, method="POST", path="/batches")
    uploaded = await api.upload(b'{"custom_id": "a"}\n')
    payload = {
        "input_file_id": uploaded["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    assert (await api.raw("POST", "/batches", json_body=payload)).status == 200
    response = await api.raw("POST", "/batches", json_body=payload)
    assert response.status == 429
    assert len(api.service.batch_ids) == 1
    record = api.service.requests[-1]
    assert (record.method, record.path, record.status) == ("POST", "/batches", 429)
    assert record.fault is FaultKind.RATE_LIMITED
    assert record.request_id == response.headers["x-request-id"]
    assert record.at == clock.now()
    assert api.service.rate_limiter.refused == 1
    clock.advance(1)
    assert (await api.raw("POST", "/batches", json_body=payload)).status == 200
    assert len(api.service.batch_ids) == 2


async def test_tokens_refill_only_up_to_the_burst(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """After a long pause the bucket holds burst tokens, not rate times the pause."""
    api = limited(make_api, requests_per_second=2, burst=5)
    limiter = api.service.rate_limiter
    assert limiter.tokens(clock.now()) == 5
    assert await statuses(api, 6) == [200] * 5 + [429]
    assert limiter.tokens(clock.now()) == 0
    clock.advance(1.25)
    assert limiter.tokens(clock.now()) == pytest.approx(2.5)
    assert await statuses(api, 3) == [200, 200, 429]
    clock.advance(3600)
    assert limiter.tokens(clock.now()) == 5
    assert await statuses(api, 6) == [200] * 5 + [429]


async def test_path_and_method_restrict_the_limit(make_api: Callable[..., FakeApi]) -> None:
    """Only matching requests take tokens or get 429; others carry no rate headers."""
    api = limited(make_api, requests_per_second=1, burst=1, path="/v1/batches*")
    for _ in range(3):
        files = await api.raw("GET", "/files")
        assert files.status == 200
        assert not set(RATE_HEADERS) & set(files.headers)
    first = await api.raw("GET", "/batches")
    assert first.status == 200
    assert first.headers["x-ratelimit-remaining-requests"] == "0"
    assert (await api.raw("GET", "/batches/batch_missing")).status == 429
    assert (await api.raw("GET", "/files")).status == 200

    posts = limited(make_api, requests_per_second=1, burst=1, method="post")
    assert await statuses(posts, 3) == [200, 200, 200]
    assert (await posts.raw("POST", "/batches", json_body={})).status == 400
    assert (await posts.raw("POST", "/batches", json_body={})).status == 429


async def test_no_limit_by_default(api: FakeApi) -> None:
    """Without rate_limit nothing is refused and no rate-limit header is sent."""
    assert api.service.config.rate_limit is None
    for _ in range(200):
        response = await api.raw("GET", "/batches")
        assert response.status == 200
        assert not set(RATE_HEADERS) & set(response.headers)
    assert api.service.rate_limiter.refused == 0
    assert api.service.rate_limiter.admit("GET", "/batches", 0.0) is None


async def test_faults_still_fire_and_faulted_requests_use_tokens(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """Dropped and faulted requests take a token; a refused one leaves faults armed."""
    api = limited(make_api, requests_per_second=1, burst=2)
    service = api.service
    service.faults.add(Fault.drop(path="/batches"))
    service.faults.add(Fault.http(503, retry_after=4, path="/batches"))
    with pytest.raises(TransportError):
        await api.raw("GET", "/batches")
    faulted = await api.raw("GET", "/batches")
    assert faulted.status == 503
    assert faulted.headers["retry-after"] == "4"  # the fault's own hint
    assert faulted.headers["x-ratelimit-remaining-requests"] == "0"
    assert (await api.raw("GET", "/batches")).status == 429
    assert service.rate_limiter.admitted == 2

    service.faults.add(Fault.http(500, path="/batches"))
    assert (await api.raw("GET", "/batches")).status == 429
    assert len(service.faults) == 1  # the refused request never reached the fault plan
    clock.advance(1)
    assert (await api.raw("GET", "/batches")).status == 500
    assert len(service.faults) == 0
    kinds = [r.fault for r in service.requests]
    assert kinds == [
        FaultKind.DROP_BEFORE,
        FaultKind.HTTP,
        FaultKind.RATE_LIMITED,
        FaultKind.RATE_LIMITED,
        FaultKind.HTTP,
    ]
    assert [f.fault.status for f in service.faults.fired] == [500, 503, 500]


async def test_rate_limit_headers_reach_http_clients(
    clock: VirtualClock, aiohttp_server: Any
) -> None:
    """Over real HTTP a 429 and its headers arrive as the service sent them."""
    from aiobatch.testing import make_app

    config = FakeConfig(rate_limit=RateLimit(requests_per_second=10, burst=1))
    server = await aiohttp_server(make_app(FakeBatchService(clock=clock, config=config)))
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        url = server.make_url("/v1/batches")
        async with session.get(url) as ok:
            assert ok.status == 200
            assert ok.headers["x-ratelimit-reset-requests"] == "100ms"
        async with session.get(url) as refused:
            assert refused.status == 429
            assert refused.headers["retry-after-ms"] == "100"
            assert (await refused.json())["error"]["code"] == "rate_limit_exceeded"


def test_rate_limit_validates_its_fields() -> None:
    """A rate must be positive and finite, a burst a whole number >= 1 (default: rate up)."""
    assert RateLimit(20).burst == 20
    assert RateLimit(2.5).burst == 3
    assert RateLimit(0.5).burst == 1
    assert RateLimit(1, path="/v1/batches", method="get") == RateLimit(
        1, burst=1, path="/batches", method="GET"
    )
    for bad in (0, -1, math.inf, math.nan):
        with pytest.raises(ValueError, match="requests_per_second"):
            RateLimit(bad)
    for bad_burst in (0, 1.5, True):
        with pytest.raises(ValueError, match="burst"):
            RateLimit(1, burst=bad_burst)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="RATE_LIMITED"):
        Fault(FaultKind.RATE_LIMITED)
    assert "refused=0" in repr(RateLimiter(RateLimit(1)))


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-1, "0s"),
        (0.0004, "1ms"),
        (0.05, "50ms"),
        (0.999, "999ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (60, "1m0s"),
        (360.25, "6m0.25s"),
        (3723, "1h2m3s"),
    ],
)
def test_reset_durations_are_go_style(seconds: float, text: str) -> None:
    """x-ratelimit-reset-requests is written the way Go prints a duration."""
    assert go_duration(seconds) == text


# -- per-batch speeds ------------------------------------------------------------------------


class LineTimes:
    """A responder that remembers when each line was done (current_line_time)."""

    def __init__(self) -> None:
        self.times: dict[str, float | None] = {}

    def __call__(self, request: Any) -> ResponderResult:
        self.times[request.custom_id] = current_line_time()
        return 200, {"ok": True}


async def test_processing_seconds_sets_each_batch_completion_time(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """Each batch spends processing_seconds(batch_id, lines) in progress, counts spread evenly."""
    seconds: dict[str, float] = {}
    calls: list[tuple[str, int]] = []

    def processing(batch_id: str, lines: int) -> float:
        calls.append((batch_id, lines))
        return seconds[batch_id]

    responder = LineTimes()
    api = make_api(
        validation_seconds=1,
        finalizing_seconds=1,
        lines_per_second=1000,
        processing_seconds=processing,
        responder=responder,
        shuffle_output=False,
    )
    start = clock.now()
    batches = [
        await api.submit([chat_line(f"{name}{i}") for i in range(4)]) for name in ("a", "b", "c")
    ]
    ids = [b["id"] for b in batches]
    seconds.update(zip(ids, (8.0, 40.0, 100.0), strict=True))
    progress: dict[str, list[int]] = {batch_id: [] for batch_id in ids}
    for second in range(1, 110):
        clock.advance_to(start + second)
        for batch_id in ids:
            progress[batch_id].append((await api.batch(batch_id))["request_counts"]["completed"])
    assert sorted(calls) == sorted((batch_id, 4) for batch_id in ids)  # once per batch
    for batch_id, secs in seconds.items():
        final = await api.batch(batch_id)
        assert final["status"] == "completed"
        assert final["in_progress_at"] == int(start) + 1
        assert final["finalizing_at"] == int(start) + 1 + secs
        assert final["completed_at"] == int(start) + 2 + secs
        # line i is done (i + 1) * secs / 4 after in_progress_at
        expected = [min(4, max(0, math.floor((s - 1) * 4 / secs))) for s in range(1, 110)]
        assert progress[batch_id] == expected, batch_id
    for name, secs in zip("abc", (8.0, 40.0, 100.0), strict=True):
        for i in range(4):
            assert responder.times[f"{name}{i}"] == pytest.approx(start + 1 + (i + 1) * secs / 4)


async def test_seeded_random_speeds_are_repeatable(clock: VirtualClock) -> None:
    """A hook seeded by batch id spreads completions out, identically on every run."""

    def speed(batch_id: str, lines: int) -> float:
        return random.Random(batch_id).uniform(60, 7200)

    async def run() -> list[float]:
        clock = VirtualClock(start=1_750_000_000.0)
        config = FakeConfig(processing_seconds=speed, validation_seconds=0, finalizing_seconds=0)
        service = FakeBatchService(clock=clock, config=config, seed=3)
        api = FakeApi(service)
        ids = [(await api.submit([chat_line("x"), chat_line("y")]))["id"] for _ in range(30)]
        clock.advance(7300)
        done = [await api.batch(batch_id) for batch_id in ids]
        assert all(batch["status"] == "completed" for batch in done)
        return [batch["completed_at"] - batch["in_progress_at"] for batch in done]

    first, second = await run(), await run()
    assert first == second
    assert len(set(first)) == len(first)
    assert min(first) >= 59
    assert max(first) <= 7200


async def test_processing_seconds_zero_infinite_and_invalid(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """0 finishes every line at once, inf none (the batch expires), negative is an error."""
    answers = {"fast": 0.0, "never": math.inf, "bad": -1.0}
    names: dict[str, str] = {}

    def processing(batch_id: str, lines: int) -> float:
        return answers[names[batch_id]]

    api = make_api(
        validation_seconds=1,
        finalizing_seconds=1,
        completion_window_seconds=50,
        processing_seconds=processing,
    )
    for name in ("fast", "never"):
        names[(await api.submit([chat_line("a"), chat_line("b")]))["id"]] = name
    clock.advance(1)
    fast, never = list(names)
    now_fast = await api.batch(fast)
    assert now_fast["status"] == "finalizing"
    assert now_fast["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    clock.advance(30)
    assert (await api.batch(never))["request_counts"]["completed"] == 0
    clock.advance(30)
    expired = await api.batch(never)
    assert expired["status"] == "expired"
    assert expired["request_counts"] == {"total": 2, "completed": 0, "failed": 2}

    bad = await api.submit([chat_line("a")])
    names[bad["id"]] = "bad"
    clock.advance(1)
    with pytest.raises(ValueError, match="processing_seconds"):
        await api.batch(bad["id"])


async def test_cancel_keeps_the_lines_done_at_the_batch_speed(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """A cancel mid-way keeps exactly the lines the batch's own speed had finished."""
    api = make_api(
        validation_seconds=1,
        cancel_seconds=1,
        lines_per_second=1000,
        processing_seconds=lambda batch_id, lines: 10.0,
    )
    batch = await api.submit([chat_line(f"r{i}") for i in range(10)])
    clock.advance(1 + 4.5)  # 4 of 10 lines done (one a second)
    assert (await api.batch(batch["id"]))["request_counts"]["completed"] == 4
    await api.ok("POST", f"/batches/{batch['id']}/cancel")
    clock.advance(1)
    cancelled = await api.batch(batch["id"])
    assert cancelled["status"] == "cancelled"
    assert cancelled["request_counts"] == {"total": 10, "completed": 4, "failed": 6}


async def test_processing_seconds_through_the_client(clock: VirtualClock) -> None:
    """Batches created through BatchClient finish when processing_seconds says."""
    config = FakeConfig(
        validation_seconds=0,
        finalizing_seconds=0,
        processing_seconds=lambda batch_id, lines: 600.0 * lines,
        rate_limit=RateLimit(requests_per_second=20),
    )
    service = FakeBatchService(clock=clock, config=config)
    start = clock.now()
    async with BatchClient(
        api_key=API_KEY,
        base_url="http://fake.local/v1",
        transport=service.transport(),
        retry=RetryPolicy(jitter=None),
        clock=clock,
    ) as client:
        created = []
        for lines in (1, 2, 3):
            uploaded = await client.upload_file(chat_requests(lines))
            created.append(await client.create_batch(uploaded.id, "/v1/chat/completions"))
        clock.advance(1200)
        states = [await client.retrieve_batch(batch.id) for batch in created]
    assert [s.status.value for s in states] == ["completed", "completed", "in_progress"]
    assert states[2].request_counts.completed == 2
    assert [s.completed_at for s in states[:2]] == [int(start) + 600, int(start) + 1200]


# -- the command line ------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["fake-server", *argv])


def test_rate_limit_flags_reach_the_service() -> None:
    """--rate-limit, --burst and --rate-limit-path configure the service's RateLimit."""
    service = build_fake_service(
        _args("--rate-limit", "20", "--burst", "40", "--rate-limit-path", "/batches*")
    )
    assert service.config.rate_limit == RateLimit(20, burst=40, path="/batches*")
    assert service.rate_limiter.limit == service.config.rate_limit
    assert build_fake_service(_args("--rate-limit", "2.5")).config.rate_limit == RateLimit(2.5)
    assert build_fake_service(_args()).config.rate_limit is None


def test_banner_shows_the_rate_limit() -> None:
    """The start-up summary names the rate and burst, or says there is no limit."""
    text = describe(build_fake_service(_args("--rate-limit", "20")), key_required=False)
    assert "rate limit 20 req/s, burst 20" in text
    text = describe(
        build_fake_service(_args("--rate-limit", "5", "--rate-limit-path", "/batches*")),
        key_required=False,
    )
    assert "rate limit 5 req/s, burst 5 on /batches*" in text
    assert "no rate limit" in describe(build_fake_service(_args()), key_required=False)


def test_help_lists_the_rate_limit_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """``aiobatch fake-server --help`` documents the rate-limit flags."""
    with pytest.raises(SystemExit):
        main(["fake-server", "--help"])
    out = capsys.readouterr().out
    for flag in ("--rate-limit", "--burst", "--rate-limit-path"):
        assert flag in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--rate-limit", "0"],
        ["--rate-limit", "-3"],
        ["--rate-limit", "fast"],
        ["--rate-limit", "inf"],
        ["--rate-limit", "5", "--burst", "0"],
        ["--rate-limit", "5", "--burst", "2.5"],
    ],
)
def test_bad_rate_limit_flags_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Non-positive or malformed rates and bursts exit 2 with a message."""
    with pytest.raises(SystemExit) as info:
        main(["fake-server", *argv])
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--burst", "5"], ["--rate-limit-path", "/batches"]])
def test_burst_or_path_without_a_rate_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """--burst or --rate-limit-path without --rate-limit exits 2 before serving."""
    assert main(["fake-server", *argv]) == 2
    assert "need --rate-limit" in capsys.readouterr().err


async def test_handle_with_a_request_object(clock: VirtualClock) -> None:
    """service.handle(Request(...)) is limited like any transport's requests."""
    service = FakeBatchService(
        clock=clock, config=FakeConfig(rate_limit=RateLimit(requests_per_second=1, burst=1))
    )
    request = Request("GET", "http://fake.local/v1/batches", headers={"authorization": "Bearer k"})
    assert (await service.handle(request)).status == 200
    assert (await service.handle(request)).status == 429
    assert service.rate_limiter.refused == 1
