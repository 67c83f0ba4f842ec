"""Retry rounds of a run (BatchRun): which failed lines run again, how many times, and
the bound on the batches a run creates for the same requests.

Every test drives the in-memory fake service on a virtual clock and checks what a user
sees: the service's batches and their input files, the results, the report and the log.
Where the fake has no switch for a server behaviour (result lines that carry only an
``error.code``), a small handler in front of the service plays it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import Handler, chat_line, client_for, config, in_front, service_on

from aiobatch import BatchRun, ResultError, RunReport, RunResult
from aiobatch.errors import RunError, TooManyBatchesError
from aiobatch.testing import FakeBatchService, LineErrorRule, VirtualClock
from aiobatch.transport import Request, Response

MODEL = "gpt-4o-mini"


def requests(n: int, prefix: str = "r") -> list[dict[str, Any]]:
    """``n`` chat requests with custom_ids ``{prefix}-0``... and distinct prompts."""
    return [chat_line(f"{prefix}-{i}", f"question {i}", model=MODEL) for i in range(n)]


def write_jsonl(path: Path, lines: Iterable[Mapping[str, Any]]) -> Path:
    """Write request objects as a JSONL file; returns the path."""
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


async def run_to_end(run: BatchRun) -> tuple[RunReport, list[RunResult]]:
    """Run to the end with results() read alongside."""
    streamed = asyncio.ensure_future(_all_results(run))
    try:
        report = await run.run()
        return report, await streamed
    finally:
        if not streamed.done():
            streamed.cancel()


async def _all_results(run: BatchRun) -> list[RunResult]:
    return [result async for result in run.results()]


def error_code(result: RunResult) -> str | None:
    """The ``error.code`` of a result that never got a response (None otherwise)."""
    return result.result.error.code if isinstance(result.result, ResultError) else None


async def sent_in(service: FakeBatchService) -> Counter[str]:
    """How many batches each custom_id was sent in (from the batches' input files)."""
    counts: Counter[str] = Counter()
    for batch_id in service.batch_ids:
        batch = await service.get_batch(batch_id)
        for line in service.file_content(batch.input_file_id).splitlines():
            counts[json.loads(line)["custom_id"]] += 1
    return counts


# --- a failed batch that names input lines --------------------------------------------------


@pytest.mark.parametrize("line", [0, 6, 99], ids=["line-0", "past-the-end", "far-past"])
async def test_a_failed_batch_naming_a_line_its_file_lacks_spends_a_round(
    clock: VirtualClock, tmp_path: Path, caplog: pytest.LogCaptureFixture, line: int
) -> None:
    """A batch failing with errors that name a line its file does not have (0, or past
    the end) blames no line: every line spends a round, so the run makes 1 + max_rounds
    batches, ends each request once with batch_failed, and warns with the server's error."""
    service = service_on(clock)
    service.fail_next_batches("invalid_request", line=line, message="this line is wrong", count=40)
    source = write_jsonl(tmp_path / "in.jsonl", requests(5))
    caplog.set_level(logging.WARNING, logger="aiobatch.run")
    async with client_for(clock, service.transport()) as client:
        run = BatchRun(
            client, source, journal=tmp_path / "run.journal", config=config(max_rounds=2)
        )
        async with clock.auto_advance():
            report, results = await run_to_end(run)

    assert len(service.batch_ids) == 3  # 1 + max_rounds
    assert (await sent_in(service)) == {f"r-{i}": 3 for i in range(5)}
    assert sorted(r.custom_id for r in results) == [f"r-{i}" for i in range(5)]
    for result in results:
        assert not result.ok
        assert error_code(result) == "batch_failed"
        assert result.attempts == 2
        assert result.batch_id == service.batch_ids[-1]
    assert report.state == "done"
    assert dict(report.errors) == {"batch_failed": 5}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for batch_id in service.batch_ids:
        (message,) = [m for m in warned if batch_id in m]
        assert "invalid_request" in message
        assert f"line {line}" in message
        assert "this line is wrong" in message


async def test_a_failed_batch_naming_a_line_past_the_end_once_retries_the_lines(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """When only the first batch fails naming a line its file lacks, the lines spend one
    round and succeed in the next batch."""
    service = service_on(clock)
    service.fail_next_batches("invalid_request", line=42)
    source = write_jsonl(tmp_path / "in.jsonl", requests(5))
    async with client_for(clock, service.transport()) as client:
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=config())
        async with clock.auto_advance():
            report, results = await run_to_end(run)
    assert len(service.batch_ids) == 2
    assert all(r.ok and r.attempts == 1 for r in results)
    assert (report.succeeded, report.rounds) == (5, 1)


async def test_a_failed_batch_naming_its_lines_warns_and_ends_those_lines(
    clock: VirtualClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch that fails naming a line of its file ends that line and sends the others
    again without spending their rounds, and says so in a warning naming the batch."""
    service = service_on(clock)
    service.fail_next_batches("invalid_request", line=3, message="bad prompt here")
    source = write_jsonl(tmp_path / "in.jsonl", requests(5))
    caplog.set_level(logging.WARNING, logger="aiobatch.run")
    async with client_for(clock, service.transport()) as client:
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=config())
        async with clock.auto_advance():
            report, results = await run_to_end(run)
    by_id = {r.custom_id: r for r in results}
    assert not by_id["r-2"].ok
    assert error_code(by_id["r-2"]) == "invalid_request"
    assert all(by_id[f"r-{i}"].ok and by_id[f"r-{i}"].attempts == 0 for i in (0, 1, 3, 4))
    assert report.rounds == 0
    failed = service.batch_ids[0]
    (message,) = [r.getMessage() for r in caplog.records if failed in r.getMessage()]
    assert "line 3" in message
    assert "bad prompt here" in message


async def test_a_batch_failed_for_one_named_line_resubmits_the_other_lines(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A batch that fails validation because of one input line (errors.data names the
    line) ends that line with its error; the other lines never ran and are submitted
    again, so they succeed."""
    service = service_on(clock)
    service.fail_next_batches(
        "invalid_request", line=2, param="body.model", message="the model cannot take this"
    )
    items = requests(5)
    source = write_jsonl(tmp_path / "in.jsonl", items)
    async with client_for(clock, service.transport()) as client:
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=config())
        async with clock.auto_advance():
            report, results = await run_to_end(run)
    outcome = {r.custom_id: r for r in results}
    assert not outcome["r-1"].ok  # line 2 of the only shard
    assert report.errors.get("invalid_request") == 1
    assert [cid for cid, r in outcome.items() if not r.ok] == ["r-1"], dict(report.errors)


# --- the bound on batches per request ------------------------------------------------------


def _always_failing_line_1(service: FakeBatchService) -> None:
    """Every batch (of the first 40) fails validation naming its line 1, whatever
    request is there."""
    service.fail_next_batches("invalid_request", line=1, count=40)


async def test_a_request_is_never_sent_in_more_batches_than_the_guard_allows(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """Batches that keep failing because of other lines re-send a request without
    spending its rounds; past max_batches_per_request the run stops with
    TooManyBatchesError, having created no more batches; a resumed run stops the same
    way at once, and one with a higher limit finishes."""
    service = service_on(clock)
    _always_failing_line_1(service)
    source = write_jsonl(tmp_path / "in.jsonl", requests(6))
    journal = tmp_path / "run.journal"
    async with client_for(clock, service.transport()) as client:
        for _ in range(2):
            run = BatchRun(
                client, source, journal=journal, config=config(max_batches_per_request=3)
            )
            async with clock.auto_advance():
                with pytest.raises(TooManyBatchesError) as caught:
                    await run.run()
            assert isinstance(caught.value, RunError)
            assert caught.value.limit == 3
            assert caught.value.custom_id == "r-3"
            assert "max_batches_per_request" in str(caught.value)
            assert len(service.batch_ids) == 3
        run = BatchRun(client, source, journal=journal, config=config(max_batches_per_request=6))
        async with clock.auto_advance():
            report, results = await run_to_end(run)
    assert report.state == "done"
    assert len(service.batch_ids) == 6
    assert sorted(r.custom_id for r in results) == [f"r-{i}" for i in range(6)]
    assert all(error_code(r) == "invalid_request" for r in results)
    assert max((await sent_in(service)).values()) == 6


@pytest.mark.parametrize("max_rounds", [0, 2])
async def test_by_default_a_request_goes_in_at_most_11_batches_beyond_its_rounds(
    clock: VirtualClock, tmp_path: Path, max_rounds: int
) -> None:
    """Without max_batches_per_request, a request is sent in at most 1 + max_rounds + 10
    batches before the run stops with TooManyBatchesError."""
    service = service_on(clock)
    _always_failing_line_1(service)
    source = write_jsonl(tmp_path / "in.jsonl", requests(30))
    async with client_for(clock, service.transport()) as client:
        run = BatchRun(
            client, source, journal=tmp_path / "run.journal", config=config(max_rounds=max_rounds)
        )
        async with clock.auto_advance():
            with pytest.raises(TooManyBatchesError) as caught:
                await run.run()
    assert caught.value.limit == 1 + max_rounds + 10
    assert max((await sent_in(service)).values()) == 1 + max_rounds + 10


# --- which failed result lines run again --------------------------------------------------


def error_lines_for(service: FakeBatchService, codes: Mapping[str, str]) -> Any:
    """A transport to ``service`` whose result files answer each custom_id in ``codes``
    with a line that never got a response, ``error.code`` set to its code (as some
    compatible servers write for a line they dropped)."""

    async def handler(request: Request, forward: Handler) -> Response:
        response = await forward(request)
        if request.method != "GET" or not request.url.endswith("/content"):
            return response
        lines = []
        for raw in (await response.read()).splitlines():
            item = json.loads(raw)
            code = codes.get(item.get("custom_id"))
            if code is not None and "response" in item:
                item["response"] = None
                item["error"] = {"code": code, "message": f"the server said {code}"}
            lines.append(json.dumps(item).encode())
        headers = {k: v for k, v in response.headers.items() if k != "content-length"}
        return Response(response.status, headers, b"".join(line + b"\n" for line in lines))

    return in_front(service, handler)


#: (how the line failed, whether it runs again): HTTP statuses of the line's response.
STATUS_ROWS = [
    (408, True),
    (429, True),
    (500, True),
    (502, True),
    (503, True),
    (400, False),
    (401, False),
    (404, False),
    (422, False),
]
#: ``error.code`` of a line that got no response.
CODE_ROWS = [
    ("batch_expired", True),
    ("batch_cancelled", True),
    ("batch_canceled", True),
    ("rate_limit_exceeded", True),
    ("server_error", True),
    ("internal_error", True),
    ("timeout", True),
    ("service_unavailable", True),
    ("invalid_prompt", False),
    ("content_policy_violation", False),
]


async def _one_line_run(
    clock: VirtualClock, tmp_path: Path, service: FakeBatchService, transport: Any, rounds: int
) -> tuple[RunResult, int]:
    """Run one request ``x`` with ``max_rounds=rounds``: its result, and the batches it
    was sent in."""
    source = write_jsonl(tmp_path / "in.jsonl", [chat_line("x", model=MODEL)])
    async with client_for(clock, transport) as client:
        run = BatchRun(
            client, source, journal=tmp_path / "run.journal", config=config(max_rounds=rounds)
        )
        async with clock.auto_advance():
            _report, results = await run_to_end(run)
    (result,) = results
    return result, (await sent_in(service))["x"]


@pytest.mark.parametrize(("status", "retried"), STATUS_ROWS)
async def test_a_line_answered_with_an_http_error_runs_again_only_when_transient(
    clock: VirtualClock, tmp_path: Path, status: int, retried: bool
) -> None:
    """A line answered with 408, 429 or 5xx goes to a retry round; any other 4xx is its
    final result at once."""
    service = service_on(clock, line_errors=[LineErrorRule(status=status, custom_ids={"x"})])
    result, sent = await _one_line_run(clock, tmp_path, service, service.transport(), 1)
    assert getattr(result.result, "status_code", None) == status
    assert (sent, result.attempts) == ((2, 1) if retried else (1, 0))


@pytest.mark.parametrize(("code", "retried"), CODE_ROWS)
async def test_a_line_that_got_no_response_runs_again_only_for_a_transient_code(
    clock: VirtualClock, tmp_path: Path, code: str, retried: bool
) -> None:
    """A line with no response goes to a retry round when its error code says it never
    ran or failed transiently (expired, cancelled, rate limited, server error, timeout,
    unavailable); any other code is its final result at once."""
    service = service_on(clock)
    transport = error_lines_for(service, {"x": code})
    result, sent = await _one_line_run(clock, tmp_path, service, transport, 1)
    assert error_code(result) == code
    assert (sent, result.attempts) == ((2, 1) if retried else (1, 0))


# --- how many times a line runs -------------------------------------------------------------


@pytest.mark.parametrize("rounds", [0, 1, 3])
@pytest.mark.parametrize("how", ["its-result-line", "its-batch"])
async def test_a_line_that_always_fails_transiently_runs_exactly_1_plus_max_rounds_times(
    clock: VirtualClock, tmp_path: Path, rounds: int, how: str
) -> None:
    """A line that fails for a retryable reason every time (a 500 answer, or its whole
    batch failing) is sent in exactly 1 + max_rounds batches and ends with that error."""
    if how == "its-result-line":
        service = service_on(clock, line_errors=[LineErrorRule(status=500, custom_ids={"x"})])
    else:
        service = service_on(clock)
        service.fail_next_batches("server_error", count=10)
    result, sent = await _one_line_run(clock, tmp_path, service, service.transport(), rounds)
    assert sent == 1 + rounds
    assert len(service.batch_ids) == 1 + rounds
    assert result.attempts == rounds
    assert not result.ok
    if how == "its-result-line":
        assert getattr(result.result, "status_code", None) == 500
    else:
        assert error_code(result) == "batch_failed"
