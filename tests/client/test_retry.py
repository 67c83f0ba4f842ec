"""The retry policy: what is retried, how long it waits, the loop, and testing mode."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Iterator

import attrs
import backoff
import pytest

import aiobatch
from aiobatch._convert import summarize_result_line
from aiobatch._retry import (
    RetryPolicy,
    RetryState,
    is_ambiguous,
    is_retry_testing,
    is_transient,
    is_transient_status,
    may_commit_late,
    parse_http_date,
    parse_retry_after,
    poll_intervals,
    retry_after_of,
    retry_reason,
    set_retry_testing,
)
from aiobatch._run._outcomes import classify
from aiobatch.errors import (
    ClosedError,
    ConnectError,
    DecodeError,
    RateLimitError,
    TransportError,
    TransportTimeoutError,
    UnknownStatusError,
    status_error_class,
)
from aiobatch.testing import VirtualClock
from aiobatch.transport import InMemoryTransport, Request, Response

NOW = 1_750_000_000.0
URL = "https://api.example.test/v1/batches"


@pytest.fixture(autouse=True)
def _no_global_testing_mode() -> Iterator[None]:
    """Every test starts and ends with the global testing mode off."""
    with set_retry_testing(False):
        yield


class RecordingClock(VirtualClock):
    """A virtual clock that records every sleep."""

    def __init__(self) -> None:
        super().__init__(NOW)
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await super().sleep(seconds)


def scripted(*outcomes: object) -> tuple[InMemoryTransport, list[Request]]:
    """A transport answering with ``outcomes`` in turn (status, (status, headers), or error)."""
    queue = list(outcomes)
    seen: list[Request] = []

    async def handler(request: Request) -> Response:
        seen.append(request)
        outcome = queue.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        if isinstance(outcome, tuple):
            status, headers = outcome
            return Response(status, headers, b"{}")
        assert isinstance(outcome, int)
        return Response(outcome, {}, b"{}")

    return InMemoryTransport(handler), seen


def no_jitter(**kwargs: object) -> RetryPolicy:
    return RetryPolicy(jitter=None, **kwargs)  # type: ignore[arg-type]


# --- what is retryable -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (ConnectError("refused"), True),
        (TransportTimeoutError("slow"), True),
        (TransportError("reset"), True),
        (ValueError("a bug"), False),
        (TimeoutError("not from a transport"), False),
    ],
)
def test_retry_reason_for_errors(error: BaseException, retryable: bool) -> None:
    """Every transport failure is retryable; exceptions from elsewhere are not."""
    assert (retry_reason(error=error) is not None) is retryable


@pytest.mark.parametrize(
    ("status", "headers", "retryable"),
    [
        (200, {}, False),
        (400, {}, False),
        (401, {}, False),
        (403, {}, False),
        (404, {}, False),
        (422, {}, False),
        (408, {}, True),
        (409, {}, True),
        (429, {}, True),
        (500, {}, True),
        (502, {}, True),
        (503, {}, True),
        (504, {}, True),
        (529, {}, True),
        (400, {"x-should-retry": "true"}, True),
        (400, {"x-should-retry": "TRUE"}, True),
        (503, {"x-should-retry": "false"}, False),
        (429, {"x-should-retry": " False "}, False),
        (503, {"x-should-retry": "maybe"}, True),
        (404, {"x-should-retry": "maybe"}, False),
        (200, {"x-should-retry": "true"}, False),
    ],
)
def test_retry_reason_for_statuses(status: int, headers: dict[str, str], retryable: bool) -> None:
    """408, 409, 429 and 5xx are retried; x-should-retry overrides; successes never are."""
    assert (retry_reason(status=status, headers=headers) is not None) is retryable


def _status_error(status: int, retry_after: float | None = None) -> Exception:
    """The error the client raises for an HTTP error status."""
    return status_error_class(status)("refused", status_code=status, retry_after=retry_after)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectError("refused"), True),
        (TransportTimeoutError("slow"), True),
        (TransportError("reset"), True),
        (_status_error(408), True),
        (_status_error(409), True),
        (_status_error(429), True),
        (_status_error(500), True),
        (_status_error(503), True),
        (_status_error(400), False),
        (_status_error(401), False),
        (_status_error(404), False),
        (_status_error(422), False),
        (DecodeError("Batch", "not JSON"), False),
        (UnknownStatusError("succeeded", batch_id="batch_1"), False),
        (ClosedError("closed"), False),
        (ValueError("a bug"), False),
    ],
)
def test_is_transient_says_which_failures_pass_by_themselves(
    error: BaseException, transient: bool
) -> None:
    """Network failures and 408, 409, 429, 5xx answers are transient; nothing else is."""
    assert is_transient(error) is transient


def test_retry_reason_and_is_transient_are_one_rule_for_every_status() -> None:
    """A status a call is retried on is exactly a status whose error is transient."""
    for status in range(400, 600):
        retried = retry_reason(status=status) is not None
        assert retried is is_transient_status(status) is is_transient(_status_error(status))


def test_a_result_line_409_is_final_while_an_api_call_409_is_transient() -> None:
    """The result-line rule retries 408, 429 and 5xx lines but not 409 lines."""
    for status, again in ((408, True), (409, False), (429, True), (500, True), (400, False)):
        line = summarize_result_line(
            f'{{"id": "r", "custom_id": "c", "response": {{"status_code": {status}, '
            f'"request_id": "q", "body": {{}}}}, "error": null}}'
        )
        assert classify(line)[2] is again, status
    assert is_transient(_status_error(409))


def test_every_429_is_a_rate_limit_error() -> None:
    """The client's error for a 429 is a RateLimitError, so one isinstance check tells it."""
    assert isinstance(_status_error(429), RateLimitError)


@pytest.mark.parametrize(
    ("error", "asked"),
    [
        (_status_error(429, retry_after=2.5), 2.5),
        (_status_error(503, retry_after=30.0), 30.0),
        (_status_error(429), None),
        (ConnectError("refused"), None),
        (ValueError("a bug"), None),
    ],
)
def test_retry_after_of_reads_the_servers_wish(error: BaseException, asked: float | None) -> None:
    """retry_after_of gives the seconds an error's answer asked for, or None."""
    assert retry_after_of(error) == asked


@pytest.mark.parametrize(
    ("error", "status", "ambiguous"),
    [
        (ConnectError("refused"), None, False),
        (TransportTimeoutError("slow"), None, True),
        (TransportError("reset after send"), None, True),
        (None, 500, True),
        (None, 503, True),
        (None, 429, False),
        (None, 409, False),
        (None, 400, False),
    ],
)
def test_is_ambiguous(error: BaseException | None, status: int | None, ambiguous: bool) -> None:
    """Only failures that may have reached the server and acted count as ambiguous."""
    assert is_ambiguous(error, status) is ambiguous


# --- retry hints -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "12.5"}, 0.0125),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),
        ({"retry-after-ms": "nan", "retry-after": "4"}, 4.0),
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": " 2.5 "}, 2.5),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "later"}, None),
        ({"retry-after": "Sun, 15 Jun 2025 15:07:40 GMT"}, 60.0),
        ({"retry-after": "Sun, 15 Jun 2025 15:07:40 -0000"}, 60.0),
        ({"retry-after": "Sun, 15 Jun 2025 15:05:40 GMT"}, -60.0),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    """retry-after-ms wins, then retry-after as seconds, then as an HTTP date from now."""
    # NOW is 2025-06-15 15:06:40 UTC
    assert parse_retry_after(headers, now=NOW) == (
        pytest.approx(expected) if expected is not None else None
    )


# --- delays ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retries_taken", "expected"),
    [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (5, 30.0), (6, 30.0), (10_000, 30.0)],
)
def test_backoff_delay_is_capped_exponential(retries_taken: int, expected: float) -> None:
    """Without jitter the delay doubles from initial_delay up to max_delay."""
    assert no_jitter().backoff_delay(retries_taken) == expected


def test_backoff_delay_follows_the_policy_fields() -> None:
    """initial_delay, exp_base and max_delay shape the schedule."""
    policy = no_jitter(initial_delay=0.5, exp_base=3.0, max_delay=10.0)
    assert [policy.backoff_delay(n) for n in range(4)] == [0.5, 1.5, 4.5, 10.0]


def test_full_jitter_stays_between_zero_and_the_delay() -> None:
    """The default jitter (backoff.full_jitter) draws from [0, delay]."""
    random.seed(7)
    policy = RetryPolicy()
    assert policy.jitter is backoff.full_jitter
    samples = [policy.backoff_delay(2) for _ in range(500)]
    assert all(0.0 <= s <= 4.0 for s in samples)
    assert max(samples) - min(samples) > 2.0  # it does spread


def test_jitter_never_pushes_past_max_delay() -> None:
    """A jitter that adds time (backoff.random_jitter) is clamped to max_delay."""
    random.seed(3)
    policy = RetryPolicy(jitter=backoff.random_jitter, max_delay=30.0)
    assert all(policy.backoff_delay(10) == 30.0 for _ in range(50))
    assert all(1.0 <= policy.backoff_delay(0) <= 2.0 for _ in range(50))


@pytest.mark.parametrize(
    ("headers", "retries_taken", "expected"),
    [
        (None, 0, 1.0),
        (None, 3, 8.0),
        ({"retry-after": "5"}, 0, 5.0),
        ({"retry-after": "5"}, 4, 5.0),
        ({"retry-after-ms": "250"}, 2, 0.25),
        ({"retry-after": "120"}, 0, 120.0),
        ({"retry-after": "120.5"}, 0, None),
        ({"retry-after-ms": "600000"}, 0, None),
        ({"retry-after": "0"}, 1, 2.0),
        ({"retry-after": "-3"}, 1, 2.0),
        ({"retry-after": "garbage"}, 2, 4.0),
        ({"retry-after": "Sun, 15 Jun 2025 15:07:40 GMT"}, 0, 60.0),
        ({"retry-after": "Sun, 15 Jun 2025 15:09:40 GMT"}, 0, None),
    ],
)
def test_compute_delay(
    headers: dict[str, str] | None, retries_taken: int, expected: float | None
) -> None:
    """A positive hint up to 120 s is honoured, a longer one stops retries, else backoff."""
    delay = no_jitter().compute_delay(retries_taken, headers, now=NOW)
    assert delay == (pytest.approx(expected) if expected is not None else None)


def test_max_retry_after_is_configurable() -> None:
    """max_retry_after sets the longest server hint honoured."""
    policy = no_jitter(max_retry_after=10.0)
    assert policy.compute_delay(0, {"retry-after": "10"}) == 10.0
    assert policy.compute_delay(0, {"retry-after": "11"}) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"initial_delay": -1.0},
        {"max_delay": float("nan")},
        {"timeout": -5.0},
        {"max_retry_after": -1.0},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    """Impossible settings fail at construction, not at the first retry."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_is_frozen_and_keyword_only() -> None:
    """A policy cannot change after construction and takes keywords only."""
    policy = RetryPolicy()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        policy.max_attempts = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        RetryPolicy(3)  # type: ignore[call-arg]
    assert RetryPolicy.never().max_attempts == 1


def test_poll_intervals_grow_to_the_maximum() -> None:
    """Poll intervals start at the initial value and grow by half up to the maximum."""
    nxt = poll_intervals(4.0, 20.0)
    assert [nxt() for _ in range(6)] == [4.0, 6.0, 9.0, 13.5, 20.0, 20.0]
    with pytest.raises(ValueError, match="positive"):
        poll_intervals(0.0, 10.0)


# --- the loop ----------------------------------------------------------------------------


@pytest.fixture
async def clock() -> AsyncIterator[RecordingClock]:
    """A recording virtual clock that moves by itself whenever the loop is idle."""
    c = RecordingClock()
    async with c.auto_advance():
        yield c


async def test_loop_retries_server_errors_with_backoff(clock: RecordingClock) -> None:
    """Two 503s then a 200: the 200 comes back after waits of 1 s and 2 s of virtual time."""
    transport, seen = scripted(503, 503, 200)
    response = await no_jitter().send(transport, Request("GET", URL), clock=clock)
    assert response.status == 200
    assert len(seen) == 3
    assert clock.sleeps == [1.0, 2.0]
    assert clock.now() == NOW + 3.0


async def test_loop_honours_retry_after(clock: RecordingClock) -> None:
    """A 429 with retry-after-ms waits exactly what the server asked."""
    transport, _ = scripted((429, {"retry-after-ms": "7500"}), (429, {"retry-after": "3"}), 200)
    response = await no_jitter().send(transport, Request("POST", URL), clock=clock)
    assert response.status == 200
    assert clock.sleeps == [7.5, 3.0]


async def test_loop_gives_up_at_once_when_retry_after_is_too_long(clock: RecordingClock) -> None:
    """A 429 asking for more than max_retry_after comes back unretried, for the caller."""
    transport, seen = scripted((429, {"retry-after": "600"}), 200)
    response = await no_jitter().send(transport, Request("GET", URL), clock=clock)
    assert response.status == 429
    assert len(seen) == 1
    assert clock.sleeps == []


async def test_loop_does_not_retry_client_errors(clock: RecordingClock) -> None:
    """A 400 is returned at once."""
    transport, seen = scripted(400, 200)
    response = await no_jitter().send(transport, Request("GET", URL), clock=clock)
    assert response.status == 400
    assert len(seen) == 1


async def test_loop_honours_x_should_retry(clock: RecordingClock) -> None:
    """x-should-retry: true retries a 400; false stops on a 503."""
    transport, seen = scripted((400, {"x-should-retry": "true"}), 200)
    assert (await no_jitter().send(transport, Request("GET", URL), clock=clock)).status == 200
    assert len(seen) == 2
    transport, seen = scripted((503, {"x-should-retry": "false"}), 200)
    assert (await no_jitter().send(transport, Request("GET", URL), clock=clock)).status == 503
    assert len(seen) == 1


async def test_loop_returns_the_last_response_when_attempts_run_out(clock: RecordingClock) -> None:
    """With max_attempts=3 three 500s are sent and the last one comes back."""
    transport, seen = scripted(500, 500, 500, 200)
    policy = no_jitter(max_attempts=3)
    response = await policy.send(transport, Request("GET", URL), clock=clock)
    assert response.status == 500
    assert len(seen) == 3
    assert clock.sleeps == [1.0, 2.0]


async def test_loop_raises_the_last_network_error(clock: RecordingClock) -> None:
    """Network failures are retried, and the last one is raised when attempts run out."""
    transport, seen = scripted(ConnectError("a"), TransportTimeoutError("b"), ConnectError("c"))
    policy = no_jitter(max_attempts=3)
    with pytest.raises(ConnectError, match="c"):
        await policy.send(transport, Request("GET", URL), clock=clock)
    assert len(seen) == 3


async def test_loop_does_not_retry_foreign_exceptions(clock: RecordingClock) -> None:
    """An exception that is not a TransportError propagates on the first attempt."""
    calls: list[Request] = []

    class Broken:
        async def send(self, request: Request, *, stream: bool = False) -> Response:
            calls.append(request)
            raise RuntimeError("a bug in a transport")

        async def aclose(self) -> None:
            return None

    with pytest.raises(RuntimeError):
        await RetryPolicy().send(Broken(), Request("GET", URL), clock=clock)
    assert len(calls) == 1


async def test_loop_respects_the_overall_timeout(clock: RecordingClock) -> None:
    """A retry whose wait would end past the policy timeout is not made."""
    transport, seen = scripted(503, 503, 503, 200)
    policy = no_jitter(timeout=2.5)
    response = await policy.send(transport, Request("GET", URL), clock=clock)
    assert response.status == 503
    assert len(seen) == 2  # waited 1 s; 1 + 2 > 2.5 so no third attempt
    assert clock.sleeps == [1.0]


async def test_loop_closes_a_streamed_error_before_retrying(clock: RecordingClock) -> None:
    """A streamed retryable response is released before the next attempt."""
    released: list[int] = []
    statuses = [503, 200]

    async def handler(request: Request) -> Response:
        status = statuses.pop(0)

        async def chunks() -> AsyncIterator[bytes]:
            yield b"x"

        async def release() -> None:
            released.append(status)

        return Response(status, {}, chunks=chunks(), release=release)

    response = await no_jitter().send(
        InMemoryTransport(handler), Request("GET", URL), clock=clock, stream=True
    )
    assert response.status == 200
    assert released == [503]
    await response.aclose()


async def test_each_retry_is_logged_without_secrets(
    clock: RecordingClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Each retry logs method, path, attempt, delay and reason at INFO; no headers or query."""
    transport, _ = scripted(ConnectError("x"), (429, {"retry-after": "2"}), 200)
    request = Request(
        "GET", URL, params={"after": "batch_9"}, headers={"Authorization": "Bearer sk-secret"}
    )
    with caplog.at_level(logging.INFO, logger="aiobatch"):
        await no_jitter().send(transport, request, clock=clock)
    records = [r for r in caplog.records if r.name == "aiobatch"]
    assert [r.levelno for r in records] == [logging.INFO, logging.INFO]
    first, second = records
    assert first.getMessage() == (
        "retrying GET /v1/batches (attempt 1 of 6 failed: ConnectError) in 1.000s"
    )
    assert (second.attempt, second.delay, second.reason) == (2, 2.0, "HTTP 429")  # type: ignore[attr-defined]
    assert (second.http_method, second.path) == ("GET", "/v1/batches")  # type: ignore[attr-defined]
    for record in records:
        text = record.getMessage() + repr(record.__dict__)
        assert "sk-secret" not in text
        assert "batch_9" not in text


async def test_retry_state_counts_attempts(clock: RecordingClock) -> None:
    """RetryState records each failure and stops at max_attempts."""
    state = RetryState(no_jitter(max_attempts=2), clock, "POST", URL)
    assert await state.backoff(error=TransportError("x")) is True
    assert await state.backoff(error=TransportError("x")) is False
    assert state.attempts == 2
    assert "POST" in repr(state)


# --- testing mode ------------------------------------------------------------------------


async def test_for_testing_zeroes_waits_but_keeps_decisions(clock: RecordingClock) -> None:
    """for_testing() retries the same failures with zero waits and the given attempts."""
    policy = RetryPolicy.for_testing(max_attempts=3)
    transport, seen = scripted(503, (429, {"retry-after": "30"}), 503, 200)
    response = await policy.send(transport, Request("GET", URL), clock=clock)
    assert response.status == 503
    assert len(seen) == 3
    assert clock.sleeps == [0.0, 0.0]
    assert clock.now() == NOW
    transport, seen = scripted((429, {"retry-after": "600"}), 200)
    assert (await policy.send(transport, Request("GET", URL), clock=clock)).status == 429
    assert len(seen) == 1


async def test_global_testing_mode_zeroes_every_policy(clock: RecordingClock) -> None:
    """set_retry_testing(True) zeroes the waits of any policy while the block runs."""
    assert not is_retry_testing()
    with set_retry_testing(True):
        assert is_retry_testing()
        transport, seen = scripted(503, 503, 200)
        assert (await RetryPolicy().send(transport, Request("GET", URL), clock=clock)).status == 200
        assert len(seen) == 3
        assert clock.sleeps == [0.0, 0.0]
    assert not is_retry_testing()
    transport, _ = scripted(503, 200)
    await no_jitter().send(transport, Request("GET", URL), clock=clock)
    assert clock.sleeps[-1] == 1.0


async def test_global_testing_mode_caps_attempts(clock: RecordingClock) -> None:
    """max_attempts in testing mode caps every policy's attempts."""
    with set_retry_testing(True, max_attempts=1):
        transport, seen = scripted(503, 200)
        assert (await RetryPolicy().send(transport, Request("GET", URL), clock=clock)).status == 503
        assert len(seen) == 1


def test_global_testing_mode_nests_and_restores() -> None:
    """Each context restores the mode that was in force before it."""
    with set_retry_testing(True, max_attempts=2):
        with set_retry_testing(False):
            assert not is_retry_testing()
            with set_retry_testing(True, max_attempts=1):
                assert is_retry_testing()
            assert not is_retry_testing()
        assert is_retry_testing()
        state = RetryState(RetryPolicy(), VirtualClock(), "GET", URL)
        assert state.max_attempts == 2
    assert not is_retry_testing()


def test_global_testing_mode_switches_without_a_with_block() -> None:
    """Called plainly, set_retry_testing switches at once and stays switched."""
    set_retry_testing(True)
    try:
        assert is_retry_testing()
    finally:
        set_retry_testing(False)
    assert not is_retry_testing()
    with pytest.raises(ValueError, match="max_attempts"):
        set_retry_testing(True, max_attempts=0)


def test_testing_switch_is_public() -> None:
    """The switch and the policy are importable from the package root."""
    assert aiobatch.set_retry_testing is set_retry_testing
    assert aiobatch.is_retry_testing is is_retry_testing
    assert aiobatch.RetryPolicy is RetryPolicy


# --- budgets, deadlines and what a failure may have done ---------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Sun, 15 Jun 2025 15:06:40 GMT", 1_750_000_000.0),
        ("Sunday, 15-Jun-25 15:06:40 GMT", 1_750_000_000.0),
        ("Sun Jun 15 15:06:40 2025", 1_750_000_000.0),
        ("", None),
        (None, None),
        ("yesterday", None),
    ],
)
def test_parse_http_date(text: str | None, expected: float | None) -> None:
    """HTTP dates in the three RFC 9110 forms parse to Unix seconds; junk gives None."""
    assert parse_http_date(text) == expected


@pytest.mark.parametrize(
    ("error", "status", "late"),
    [
        (TransportTimeoutError("t"), None, True),
        (TransportError("reset"), None, True),
        (ConnectError("refused"), None, False),
        (None, 504, True),
        (None, 502, True),
        (None, 500, False),
        (None, 503, False),
        (None, 429, False),
    ],
)
def test_may_commit_late(error: BaseException | None, status: int | None, late: bool) -> None:
    """Timeouts, lost connections and gateway errors leave the server possibly still working."""
    assert may_commit_late(error, status) is late


def test_retry_state_cuts_attempt_timeouts_to_the_budget() -> None:
    """bound() cuts attempt timeouts to the budget; no-timeout requests only to a deadline."""
    clock = VirtualClock(NOW)
    state = RetryState(no_jitter(timeout=100.0), clock, "GET", URL)
    request = Request("GET", URL, timeout=120.0)
    assert state.bound(request).timeout == 100.0
    clock.advance(70)
    assert state.bound(request).timeout == 30.0
    assert state.remaining() == 30.0
    assert state.bound(Request("GET", URL)).timeout is None  # uploads keep the default
    short = Request("GET", URL, timeout=5.0)
    assert state.bound(short) is short
    clock.advance(40)
    assert state.bound(request).timeout == 0.0
    hard = RetryState(no_jitter(timeout=None), clock, "GET", URL, deadline=clock.now() + 8)
    assert hard.bound(Request("GET", URL)).timeout == 8.0
    assert hard.deadline == clock.now() + 8
    assert RetryState(no_jitter(timeout=None), clock, "GET", URL).remaining() is None


async def test_loop_bounds_slow_attempts_by_the_policy_timeout(clock: RecordingClock) -> None:
    """Hanging answers are cut so the whole call ends at the policy's 10 s timeout."""

    async def hang(request: Request) -> Response:
        await clock.sleep(1000)
        return Response(200, {}, b"{}")

    with pytest.raises(TransportTimeoutError):
        await no_jitter(timeout=10.0).send(
            InMemoryTransport(hang, clock=clock), Request("GET", URL, timeout=120.0), clock=clock
        )
    assert clock.now() == NOW + 10.0


async def test_loop_honours_an_explicit_deadline(clock: RecordingClock) -> None:
    """A deadline shorter than the policy's budget ends the call, waits included."""
    transport, seen = scripted(503, 503, 503, 200)
    response = await no_jitter().send(
        transport, Request("GET", URL), clock=clock, deadline=clock.monotonic() + 2.5
    )
    assert response.status == 503
    assert len(seen) == 2
    assert clock.sleeps == [1.0]


async def test_retry_state_records_ambiguous_failures(clock: RecordingClock) -> None:
    """state.ambiguous says whether any failed attempt may have taken effect."""
    state = RetryState(RetryPolicy.for_testing(), clock, "DELETE", URL)
    transport, _ = scripted(429, 200)
    await no_jitter().send(transport, Request("DELETE", URL), clock=clock, state=state)
    assert state.ambiguous is False
    transport, _ = scripted(TransportError("reset"), 404)
    state = RetryState(RetryPolicy.for_testing(), clock, "DELETE", URL)
    response = await no_jitter().send(transport, Request("DELETE", URL), clock=clock, state=state)
    assert (response.status, state.ambiguous, state.attempts) == (404, True, 2)


def test_poll_intervals_with_jitter_stay_within_bounds() -> None:
    """Jittered intervals stay within [1 - jitter, 1] x nominal and repeat with a seed."""
    nxt = poll_intervals(4.0, 20.0, jitter=0.2, rng=random.Random(7))
    got = [nxt() for _ in range(50)]
    plain = poll_intervals(4.0, 20.0)
    for value, nominal in zip(got, (plain() for _ in range(50)), strict=True):
        assert 0.8 * nominal <= value <= nominal
    assert len(set(got[5:])) == 45  # at the maximum they still differ
    again = poll_intervals(4.0, 20.0, jitter=0.2, rng=random.Random(7))
    assert [again() for _ in range(50)] == got
    with pytest.raises(ValueError, match="jitter"):
        poll_intervals(1.0, 2.0, jitter=1.5)
