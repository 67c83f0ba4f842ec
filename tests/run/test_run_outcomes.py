"""Outcomes of a whole run (BatchRun) against the fake service on a virtual clock.

Each test plays a server-side situation (an expiry, a cancel, token limits, faults on
the control plane, line errors, batches finishing out of order, sharding limits, result
files that lag, are gone or are long) and checks what a user can observe: the service's
batches and files, the output file, the report, and the results stream. Expected line
sets come from the fake's own files. Where the fake has no switch for a server behaviour
(a lagging ``output_file_id``, a result file that is gone), a small handler in front of
the service plays it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    API_KEY,
    BASE_URL,
    FakeApi,
    Handler,
    Ticker,
    chat_line,
    client_for,
    config,
    error_response,
    in_front,
    jsonl,
    path_of,
    requests,
    run_to_end,
    service_on,
    shard_rows,
    write_jsonl,
)

from aiobatch import (
    Batch,
    BatchClient,
    BatchRun,
    BatchStatus,
    RetryPolicy,
    RunConfig,
    RunProgress,
    RunReport,
    RunResult,
)
from aiobatch._run._line_checks import estimate_tokens as default_estimate_tokens
from aiobatch._run._report import format_report
from aiobatch.errors import AiobatchError
from aiobatch.testing import (
    FakeBatchService,
    FakeConfig,
    Fault,
    FaultKind,
    LineErrorRule,
    VirtualClock,
    chat_requests,
    estimate_tokens,
)
from aiobatch.transport import Request, Response

MODEL = "gpt-4o-mini"

#: The fake's end-of-life timestamp of a batch, by terminal status.
_ENDED_AT = {
    BatchStatus.COMPLETED: "completed_at",
    BatchStatus.FAILED: "failed_at",
    BatchStatus.EXPIRED: "expired_at",
    BatchStatus.CANCELLED: "cancelled_at",
}


class Harness:
    """A fake service, a run on it, and helpers to read what the service holds."""

    def __init__(self, tmp_path: Path, clock: VirtualClock, service: FakeBatchService) -> None:
        self.tmp_path = tmp_path
        self.clock = clock
        self.service = service
        self.journal = tmp_path / "run.journal"
        self.output = tmp_path / "out.jsonl"

    def write_input(self, data: bytes, name: str = "input.jsonl") -> Path:
        """Write an input file; returns its path."""
        path = self.tmp_path / name
        path.write_bytes(data)
        return path

    async def run(
        self,
        source: Any,
        run_config: RunConfig | None = None,
        *,
        retry: RetryPolicy | None = None,
        during: Callable[[], Any] | None = None,
    ) -> tuple[RunReport, list[RunResult]]:
        """Run to the end with results() consumed alongside; ``during`` is an extra
        coroutine factory run beside it (on the same clock)."""
        async with BatchClient(
            api_key=API_KEY,
            base_url=BASE_URL,
            transport=self.service.transport(),
            clock=self.clock,
            retry=retry or RetryPolicy.for_testing(max_attempts=3),
        ) as client:
            run = BatchRun(
                client,
                source,
                journal=self.journal,
                output=self.output,
                config=run_config or config(),
            )
            async with self.clock.auto_advance():
                side = asyncio.ensure_future(during()) if during is not None else None
                streamed = asyncio.ensure_future(_collect(run))
                try:
                    report = await run.run()
                    results = await streamed
                    if side is not None:
                        await side
                finally:
                    for task in (streamed, side):
                        if task is not None and not task.done():
                            task.cancel()
        return report, results

    def output_lines(self) -> list[dict[str, Any]]:
        """The decoded lines of the output file."""
        return [json.loads(line) for line in self.output.read_bytes().splitlines()]

    async def batches(self) -> list[Batch]:
        """Every batch on the service, oldest first, as it is now."""
        return [await self.service.get_batch(bid) for bid in self.service.batch_ids]

    def file_lines(self, file_id: str | None) -> list[dict[str, Any]]:
        """The decoded lines of a stored file ([] for None)."""
        if file_id is None:
            return []
        return [json.loads(line) for line in self.service.file_content(file_id).splitlines()]

    def input_ids(self, batch: Batch) -> list[str]:
        """The custom_ids of a batch's input file, in file order."""
        return [line["custom_id"] for line in self.file_lines(batch.input_file_id)]


async def _collect(run: BatchRun) -> list[RunResult]:
    return [result async for result in run.results()]


@pytest.fixture
def make_harness(tmp_path: Path, clock: VirtualClock) -> Callable[..., Harness]:
    """Build a Harness on a fake service (FakeConfig fields as keyword arguments)."""

    def make(*, seed: int = 0, **fake: Any) -> Harness:
        settings = {"request_log_size": None, **fake}
        service = FakeBatchService(clock=clock, config=FakeConfig(**settings), seed=seed)
        return Harness(tmp_path, clock, service)

    return make


def ids(prefix: str, count: int) -> list[str]:
    """The custom_ids chat_requests(count, prefix=prefix) makes."""
    return [f"{prefix}-{i}" for i in range(count)]


def assert_exactly_once(
    results: Iterable[RunResult], lines: list[dict[str, Any]], expected: Iterable[str]
) -> None:
    """Every expected custom_id has exactly one result, in the stream and the file."""
    wanted = sorted(expected)
    streamed = [r.custom_id for r in results]
    written = [line["custom_id"] for line in lines]
    assert sorted(streamed) == wanted
    assert sorted(written) == wanted


def ended_at(batch: Batch) -> int:
    """When a terminal batch ended (the fake's whole-second timestamp)."""
    value = getattr(batch, _ENDED_AT[batch.status])
    assert value is not None, batch
    return int(value)


# --- 1. expired batches --------------------------------------------------------------------


async def test_expired_batch_keeps_finished_lines_and_resubmits_only_the_rest(
    make_harness: Callable[..., Harness],
) -> None:
    """An expired batch keeps its finished lines; only the unfinished ones go to a new batch."""
    # 10 lines over 198 s, but the window closes 99 s into processing: about half ran.
    h = make_harness(
        completion_window_seconds=100.0,
        validation_seconds=1.0,
        processing_seconds=lambda _bid, lines: 198.0 if lines == 10 else 1.0,
    )
    source = h.write_input(chat_requests(10))
    report, results = await h.run(source)

    batches = await h.batches()
    assert [b.status for b in batches] == [BatchStatus.EXPIRED, BatchStatus.COMPLETED]
    expired, retry = batches
    kept = {line["custom_id"]: line for line in h.file_lines(expired.output_file_id)}
    assert 0 < len(kept) < 10
    unfinished = [cid for cid in ids("req", 10) if cid not in kept]
    expired_errors = {line["custom_id"] for line in h.file_lines(expired.error_file_id)}
    assert expired_errors == set(unfinished)
    assert h.input_ids(retry) == unfinished

    lines = h.output_lines()
    assert_exactly_once(results, lines, ids("req", 10))
    written = {line["custom_id"]: line for line in lines}
    by_id = {r.custom_id: r for r in results}
    for cid, line in kept.items():
        assert written[cid] == line
        assert by_id[cid].batch_id == expired.id
        assert by_id[cid].attempts == 0
        assert by_id[cid].ok
    retry_lines = {line["custom_id"]: line for line in h.file_lines(retry.output_file_id)}
    for cid in unfinished:
        assert written[cid] == retry_lines[cid]
        assert by_id[cid].batch_id == retry.id
        assert by_id[cid].attempts == 1
        assert by_id[cid].ok
    assert report.state == "done"
    assert (report.succeeded, report.failed, report.pending) == (10, 0, 0)
    assert report.retried == len(unfinished)
    assert report.rounds == 1
    assert report.batches == 2


# --- 2. cancelled batches ------------------------------------------------------------------


def _cancel_midway(h: Harness, *, after_lines: int) -> Callable[[], Any]:
    """A coroutine factory: cancel the first batch through the API once it has run
    ``after_lines`` lines (someone else cancelling it on the server)."""

    async def cancel() -> None:
        api = FakeApi(h.service)
        while True:
            await h.clock.sleep(1.0)
            if not h.service.batch_ids:
                continue
            batch = await h.service.get_batch(h.service.batch_ids[0])
            counts = batch.request_counts
            if (
                batch.status is BatchStatus.IN_PROGRESS
                and counts
                and counts.completed >= after_lines
            ):
                await api.ok("POST", f"/batches/{batch.id}/cancel")
                return

    return cancel


@pytest.mark.parametrize("how", ["server", "batch_timeout"])
@pytest.mark.parametrize("max_rounds", [3, 0])
async def test_cancelled_batch_keeps_finished_lines(
    make_harness: Callable[..., Harness], how: str, max_rounds: int
) -> None:
    """A batch cancelled mid-way keeps finished lines; the rest re-run, or end batch_cancelled."""
    # 10 lines over 100 s: one line every 10 s.
    h = make_harness(
        validation_seconds=1.0,
        cancel_seconds=2.0,
        processing_seconds=lambda _bid, lines: 100.0 if lines == 10 else 1.0,
    )
    source = h.write_input(chat_requests(10))
    if how == "server":
        run_config = config(max_rounds=max_rounds)
        during = _cancel_midway(h, after_lines=3)
    else:
        run_config = config(max_rounds=max_rounds, batch_timeout=45.0)
        during = None
    report, results = await h.run(source, run_config, during=during)

    batches = await h.batches()
    cancelled = batches[0]
    assert cancelled.status is BatchStatus.CANCELLED
    kept = {line["custom_id"]: line for line in h.file_lines(cancelled.output_file_id)}
    assert 0 < len(kept) < 10
    unfinished = [cid for cid in ids("req", 10) if cid not in kept]
    lines = h.output_lines()
    assert_exactly_once(results, lines, ids("req", 10))
    written = {line["custom_id"]: line for line in lines}
    by_id = {r.custom_id: r for r in results}
    for cid, line in kept.items():
        assert written[cid] == line
        assert (by_id[cid].batch_id, by_id[cid].attempts, by_id[cid].ok) == (cancelled.id, 0, True)
    assert report.state == "done"
    if max_rounds:
        assert len(batches) == 2
        retry = batches[1]
        assert retry.status is BatchStatus.COMPLETED
        assert h.input_ids(retry) == unfinished
        for cid in unfinished:
            assert (by_id[cid].batch_id, by_id[cid].attempts, by_id[cid].ok) == (retry.id, 1, True)
        assert (report.succeeded, report.failed) == (10, 0)
        assert report.retried == len(unfinished)
    else:
        assert len(batches) == 1
        for cid in unfinished:
            assert written[cid]["error"]["code"] == "batch_cancelled"
            assert written[cid]["response"] is None
            result = by_id[cid]
            assert not result.ok
            assert result.attempts == 0
        assert (report.succeeded, report.failed) == (len(kept), len(unfinished))
        assert dict(report.errors) == {"batch_cancelled": len(unfinished)}
        assert report.retried == 0
        assert report.rounds == 0


# --- 3. token_limit_exceeded ---------------------------------------------------------------


async def test_token_limit_exceeded_recreates_from_the_same_file_after_a_backoff(
    make_harness: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    """token_limit_exceeded re-creates a batch from its uploaded file after a backoff, no rounds."""
    h = make_harness(validation_seconds=1.0)
    h.service.fail_next_batches("token_limit_exceeded", count=2)
    source = h.write_input(chat_requests(20))
    caplog.set_level(logging.WARNING, logger="aiobatch.run")
    report, results = await h.run(source, config(max_lines=10, token_limit_backoff=120.0))

    assert h.service.request_count("POST", "/files") == 2  # one upload per shard, no more
    batches = await h.batches()
    assert len(batches) == 4
    failed = [b for b in batches if b.status is BatchStatus.FAILED]
    assert len(failed) == 2
    assert all(b.errors and b.errors.data[0].code == "token_limit_exceeded" for b in failed)
    delays = {
        m.group(1): float(m.group(2))
        for m in (
            re.search(r"batch (\S+) .*token_limit_exceeded.* in (\d+)s", record.getMessage())
            for record in caplog.records
        )
        if m
    }
    assert set(delays) == {b.id for b in failed}
    for bad in failed:
        shard = bad.metadata["aiobatch_shard"] if bad.metadata else None
        later = [
            b
            for b in batches[batches.index(bad) + 1 :]
            if b.metadata and b.metadata["aiobatch_shard"] == shard
        ]
        assert later, f"shard {shard} was not re-created"
        again = later[0]
        assert again.input_file_id == bad.input_file_id
        assert 0 <= delays[bad.id] <= 120.0
        assert again.created_at >= ended_at(bad) + math.floor(delays[bad.id] - 0.5)
    final = {b.metadata["aiobatch_shard"]: b for b in batches if b.metadata}
    assert len(final) == 2
    assert all(b.status is BatchStatus.COMPLETED for b in final.values())

    lines = h.output_lines()
    assert_exactly_once(results, lines, ids("req", 20))
    assert all(r.ok and r.attempts == 0 for r in results)
    assert {r.batch_id for r in results} == {b.id for b in final.values()}
    assert (report.succeeded, report.failed) == (20, 0)
    assert report.rounds == 0
    assert report.retried == 0
    assert (report.batches, report.recreated) == (len(batches), 2)


# --- 4. client-side enqueued token budget --------------------------------------------------


def _peak_enqueued(h: Harness, batches: list[Batch], model: str) -> tuple[int, int]:
    """(most estimated tokens, most batches) of ``model`` open on the server at once,
    each batch open from its creation to its end (half-open, whole seconds)."""
    spans: list[tuple[int, int, int]] = []
    for batch in batches:
        lines = h.file_lines(batch.input_file_id)
        if not lines or lines[0]["body"]["model"] != model:
            continue
        tokens = sum(estimate_tokens(line["body"]) for line in lines)
        spans.append((int(batch.created_at), ended_at(batch), tokens))
    peak_tokens = peak_batches = 0
    for start, _, _ in spans:
        live = [t for s, e, t in spans if s <= start < e or s == start]
        peak_tokens = max(peak_tokens, sum(live))
        peak_batches = max(peak_batches, len(live))
    return peak_tokens, peak_batches


LIMIT = 20  # the fake counts 2 tokens for each chat_requests line: 10 lines fit


@pytest.mark.parametrize(
    "estimator", [estimate_tokens, None], ids=["fake-estimator", "default-estimator"]
)
async def test_client_token_budget_avoids_token_limit_exceeded(
    make_harness: Callable[..., Harness], estimator: Any
) -> None:
    """A client budget equal to the server's limit means no token_limit_exceeded at all."""
    # Shards of 4 lines (8 fake tokens): two fit under the limit at once, three do not.
    h = make_harness(
        validation_seconds=1.0, lines_per_second=0.2, enqueued_token_limits={MODEL: LIMIT}
    )
    source = h.write_input(chat_requests(40))
    run_config = config(
        max_lines=4, enqueued_token_limits={MODEL: LIMIT}, token_estimator=estimator
    )
    report, results = await h.run(source, run_config)

    batches = await h.batches()
    assert all(b.status is BatchStatus.COMPLETED for b in batches), [b.errors for b in batches]
    assert report.recreated == 0
    assert report.state == "done"
    assert (report.succeeded, report.failed) == (40, 0)
    assert_exactly_once(results, h.output_lines(), ids("req", 40))
    peak_tokens, _ = _peak_enqueued(h, batches, MODEL)
    assert peak_tokens <= LIMIT


async def test_client_token_budget_still_runs_batches_side_by_side(
    make_harness: Callable[..., Harness],
) -> None:
    """The token budget runs as many batches at once as fit (two of 8 tokens under 20)."""
    h = make_harness(
        validation_seconds=1.0, lines_per_second=0.2, enqueued_token_limits={MODEL: LIMIT}
    )
    source = h.write_input(chat_requests(40))
    run_config = config(
        max_lines=4, enqueued_token_limits={MODEL: LIMIT}, token_estimator=estimate_tokens
    )
    report, _ = await h.run(source, run_config)
    assert report.state == "done"
    peak_tokens, peak_batches = _peak_enqueued(h, await h.batches(), MODEL)
    assert peak_batches == 2
    assert peak_tokens == 16


async def test_without_a_client_budget_the_same_run_hits_the_server_limit(
    make_harness: Callable[..., Harness],
) -> None:
    """Without a client budget the run hits token_limit_exceeded and re-creates to the end."""
    h = make_harness(
        validation_seconds=1.0, lines_per_second=0.2, enqueued_token_limits={MODEL: LIMIT}
    )
    source = h.write_input(chat_requests(40))
    report, results = await h.run(source, config(max_lines=4, token_limit_backoff=10.0))

    batches = await h.batches()
    failed = [b for b in batches if b.status is BatchStatus.FAILED]
    assert failed
    assert all(b.errors and b.errors.data[0].code == "token_limit_exceeded" for b in failed)
    assert (report.succeeded, report.failed) == (40, 0)
    assert (report.batches, report.recreated) == (len(batches), len(failed))
    assert_exactly_once(results, h.output_lines(), ids("req", 40))
    assert all(r.attempts == 0 for r in results)


async def test_shards_waiting_for_a_models_token_budget_do_not_hold_up_other_models(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """Shards waiting for room under one model's enqueued-token limit do not take the
    submission slots: a shard of another (unlimited) model is created at once, not after
    the limited model's batches end."""
    service = service_on(clock, lines_per_second=0.02)  # 2 lines: 100 s of processing
    limited = requests(8, "a", model="gpt-a")  # 4 shards of 2, one fits at a time
    other = requests(2, "b", model="gpt-b")  # 1 shard, no limit
    source = write_jsonl(tmp_path / "in.jsonl", limited + other)
    per_shard = sum(default_estimate_tokens(line["body"]) for line in limited[:2])
    settings = config(max_lines=2, max_submissions=2, enqueued_token_limits={"gpt-a": per_shard})
    async with client_for(clock, service.transport()) as client:
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=settings)
        async with clock.auto_advance():
            report = await run.run()
    assert report.state == "done"
    batches = [await service.get_batch(i) for i in service.batch_ids]
    by_model = {m: [b for b in batches if b.model == m] for m in ("gpt-a", "gpt-b")}
    first_a = min(by_model["gpt-a"], key=lambda b: b.created_at)
    (b_batch,) = by_model["gpt-b"]
    assert first_a.completed_at is not None
    assert b_batch.created_at < first_a.completed_at, (
        f"gpt-b created at +{b_batch.created_at - first_a.created_at}s, after gpt-a's first "
        f"batch ended at +{first_a.completed_at - first_a.created_at}s"
    )


# --- 5. faults on the control plane --------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_control_plane_faults_change_no_outcome(
    make_harness: Callable[..., Harness], seed: int
) -> None:
    """Faults on ~10% of control-plane calls change no outcome and make no second batch."""
    h = make_harness(seed=seed, validation_seconds=1.0, lines_per_second=2.0)
    faults = h.service.faults
    faults.add(Fault.drop(after=True, method="POST", path="/batches", times=1))
    faults.add(Fault.http(429, retry_after=2.0, times=None, probability=0.05))
    faults.add(Fault.http(503, times=None, probability=0.05))
    faults.add(Fault.drop(times=None, probability=0.01))
    faults.add(Fault.drop(after=True, times=None, probability=0.01))
    source = h.write_input(chat_requests(120))
    report, results = await h.run(
        source, config(max_lines=12), retry=RetryPolicy.for_testing(max_attempts=6)
    )

    fired = {f.fault.kind for f in faults.fired}
    assert {FaultKind.HTTP, FaultKind.DROP_AFTER} <= fired
    assert report.state == "done"
    assert (report.succeeded, report.failed, report.pending) == (120, 0, 0)
    assert all(r.ok and r.attempts == 0 for r in results)
    assert_exactly_once(results, h.output_lines(), ids("req", 120))
    batches = await h.batches()
    shards = [b.metadata["aiobatch_shard"] for b in batches if b.metadata]
    assert len(shards) == len(batches) == 10
    assert len(set(shards)) == 10
    assert all(b.status is BatchStatus.COMPLETED for b in batches)
    assert report.batches == 10


# --- 6. retry rounds -----------------------------------------------------------------------


async def test_retry_rounds_for_transient_permanent_and_persistent_line_errors(
    make_harness: Callable[..., Harness],
) -> None:
    """Transient errors retry to success, 4xx end at once, persistent 500s end after max_rounds."""
    seen: set[str] = set()

    def first_time(custom_id: str) -> bool:
        if not custom_id.startswith("flaky") or custom_id in seen:
            return False
        seen.add(custom_id)
        return True

    h = make_harness(
        validation_seconds=1.0,
        line_errors=[
            LineErrorRule(status=400, predicate=lambda c: c.startswith("perm"), code="bad_prompt"),
            LineErrorRule(status=500, custom_ids=frozenset({"always-0"})),
            LineErrorRule(status=503, predicate=first_time),
        ],
    )
    names = ids("ok", 4) + ids("flaky", 3) + ids("perm", 2) + ["always-0"]
    source = h.write_input(jsonl(chat_line(cid) for cid in names))
    report, results = await h.run(source, config(max_rounds=2))

    lines = h.output_lines()
    assert_exactly_once(results, lines, names)
    by_id = {r.custom_id: r for r in results}
    batches = await h.batches()
    sent = {cid: [b.id for b in batches if cid in h.input_ids(b)] for cid in names}
    for cid in ids("ok", 4):
        assert (by_id[cid].ok, by_id[cid].attempts, len(sent[cid])) == (True, 0, 1)
    for cid in ids("flaky", 3):
        assert (by_id[cid].ok, by_id[cid].attempts, len(sent[cid])) == (True, 1, 2)
        assert by_id[cid].batch_id == sent[cid][-1]
    for cid in ids("perm", 2):
        result = by_id[cid]
        assert (result.ok, result.attempts, len(sent[cid])) == (False, 0, 1)
        assert getattr(result.result, "status_code", None) == 400
    always = by_id["always-0"]
    assert (always.ok, always.attempts, len(sent["always-0"])) == (False, 2, 3)
    assert getattr(always.result, "status_code", None) == 500
    assert always.batch_id == sent["always-0"][-1]
    written = {line["custom_id"]: line for line in lines}
    assert written["always-0"]["response"]["status_code"] == 500
    assert written["perm-0"]["response"]["status_code"] == 400

    assert report.state == "done"
    assert (report.succeeded, report.failed) == (7, 3)
    assert report.rounds == 2
    assert report.retried == 4  # 3 flaky + always-0
    errors = dict(report.errors)
    assert errors.pop("bad_prompt") == 2
    assert len(errors) == 1
    ((code, count),) = errors.items()
    assert "500" in code
    assert count == 1
    assert report.batches == len(batches) == 3


# --- 7. exactly once, and order ------------------------------------------------------------


def _mixed_models() -> tuple[list[dict[str, Any]], dict[int, float]]:
    """20 chat lines of three models, interleaved; the fake runs the 12-line batch in
    300 s, the 5-line one in 150 s, the 3-line one in 10 s (later input finishes first)."""
    models = ["m-a"] * 12 + ["m-b"] * 5 + ["m-c"] * 3
    order = [models[(i * 7) % 20] for i in range(20)]  # a fixed interleaving
    lines = [chat_line(f"r{i:02d}", f"question {i}", model=m) for i, m in enumerate(order)]
    return lines, {12: 300.0, 5: 150.0, 3: 10.0}


@pytest.mark.parametrize("order", ["input", "completion"])
async def test_output_order_and_results_stream(
    make_harness: Callable[..., Harness], order: str
) -> None:
    """Output is in input order or batch-completion order; results() yields the same."""
    lines, seconds = _mixed_models()
    assert len({line["body"]["model"] for line in lines}) == 3
    h = make_harness(validation_seconds=1.0, processing_seconds=lambda _bid, n: seconds[n])
    source = h.write_input(jsonl(lines))
    report, results = await h.run(source, config(order=order))

    input_ids = [line["custom_id"] for line in lines]
    written = h.output_lines()
    written_ids = [line["custom_id"] for line in written]
    assert [r.custom_id for r in results] == written_ids
    assert sorted(written_ids) == sorted(input_ids)
    assert len(set(written_ids)) == len(written_ids)
    assert report.state == "done"
    if order == "input":
        assert written_ids == input_ids
        assert [r.index for r in results] == list(range(20))
        return
    batches = {b.id: b for b in await h.batches()}
    assert len(batches) == 3
    finished = [ended_at(batches[r.batch_id]) for r in results if r.batch_id]
    assert len(finished) == 20
    assert finished == sorted(finished)
    assert written_ids != input_ids
    assert sorted(r.index for r in results) == list(range(20))
    assert all(input_ids[r.index] == r.custom_id for r in results)


async def test_results_after_the_run_yield_every_result(
    make_harness: Callable[..., Harness], clock: VirtualClock
) -> None:
    """results() called after run() returned still yields every result, as in the file."""
    h = make_harness(validation_seconds=1.0)
    source = h.write_input(chat_requests(5))
    async with BatchClient(
        api_key=API_KEY,
        base_url=BASE_URL,
        transport=h.service.transport(),
        clock=clock,
        retry=RetryPolicy.for_testing(),
    ) as client:
        run = BatchRun(client, source, journal=h.journal, output=h.output, config=config())
        async with clock.auto_advance():
            report = await run.run()
            results = [r async for r in run.results()]
    assert report.state == "done"
    assert [r.custom_id for r in results] == [line["custom_id"] for line in h.output_lines()]


# --- 8. sharding end to end ----------------------------------------------------------------


@pytest.mark.parametrize(("count", "batches"), [(5, 1), (6, 2)])
async def test_max_lines_boundary(
    make_harness: Callable[..., Harness], count: int, batches: int
) -> None:
    """max_lines=5: five requests make one batch, six make two."""
    h = make_harness(validation_seconds=1.0)
    source = h.write_input(chat_requests(count))
    report, results = await h.run(source, config(max_lines=5))
    made = await h.batches()
    assert len(made) == batches
    sent = [cid for b in made for cid in h.input_ids(b)]
    assert sorted(sent) == sorted(ids("req", count))
    assert all(len(h.input_ids(b)) <= 5 for b in made)
    assert report.batches == batches
    assert_exactly_once(results, h.output_lines(), ids("req", count))


@pytest.mark.parametrize(("slack", "batches"), [(0, 1), (-1, 2)])
async def test_max_bytes_boundary(
    make_harness: Callable[..., Harness], slack: int, batches: int
) -> None:
    """max_bytes equal to the input file's size makes one batch; one byte less makes two."""
    data = chat_requests(8)
    h = make_harness(validation_seconds=1.0)
    source = h.write_input(data)
    report, results = await h.run(source, config(max_bytes=len(data) + slack))
    made = await h.batches()
    assert len(made) == batches
    sizes = [len(h.service.file_content(b.input_file_id)) for b in made]
    assert all(size <= len(data) + slack for size in sizes)
    assert sum(sizes) == len(data)
    if batches == 1:
        assert h.service.file_content(made[0].input_file_id) == data
    assert report.batches == batches
    assert_exactly_once(results, h.output_lines(), ids("req", 8))


async def test_one_batch_per_url_and_model(make_harness: Callable[..., Harness]) -> None:
    """Mixed endpoints and models: one batch per (url, model), each holding exactly the
    requests of its pair."""
    lines: list[Mapping[str, Any]] = []
    for i in range(12):
        kind = i % 4
        if kind == 0:
            lines.append(chat_line(f"c{i}", model="m-a"))
        elif kind == 1:
            lines.append(chat_line(f"c{i}", model="m-b"))
        elif kind == 2:
            lines.append(
                {
                    "custom_id": f"c{i}",
                    "method": "POST",
                    "url": "/v1/embeddings",
                    "body": {"model": "m-a", "input": f"text {i}"},
                }
            )
        else:
            lines.append(
                {
                    "custom_id": f"c{i}",
                    "method": "POST",
                    "url": "/v1/embeddings",
                    "body": {"model": "m-e", "input": f"text {i}"},
                }
            )
    h = make_harness(validation_seconds=1.0)
    source = h.write_input(jsonl(lines))
    report, results = await h.run(source)

    expected: dict[tuple[str, str], set[str]] = {}
    for line in lines:
        expected.setdefault((line["url"], line["body"]["model"]), set()).add(line["custom_id"])
    made = await h.batches()
    got: dict[tuple[str, str], set[str]] = {}
    for batch in made:
        sent = h.file_lines(batch.input_file_id)
        pairs = {(line["url"], line["body"]["model"]) for line in sent}
        assert len(pairs) == 1
        ((url, model),) = pairs
        assert batch.endpoint == url
        assert (url, model) not in got
        got[(url, model)] = {line["custom_id"] for line in sent}
    assert got == expected
    assert report.batches == len(made) == 4
    assert (report.succeeded, report.failed) == (12, 0)
    assert_exactly_once(results, h.output_lines(), [line["custom_id"] for line in lines])


async def test_embedding_shards_stay_under_the_input_limit(tmp_path: Path) -> None:
    """Embedding requests with input lists are sharded by their inputs, so no batch goes
    over the provider's embedding-input limit (the fake's too_many_tasks)."""
    clock = VirtualClock()
    service = FakeBatchService(clock=clock, config=FakeConfig(max_embedding_inputs=50_000))
    lines = [
        {
            "custom_id": f"e-{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {
                "model": "text-embedding-3-small",
                "input": [f"t{i}-{j}" for j in range(1000)],
            },
        }
        for i in range(120)
    ]
    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl(lines))
    async with BatchClient(
        api_key=API_KEY, base_url=BASE_URL, transport=service.transport(), clock=clock
    ) as client:
        run = BatchRun(client, source, journal=tmp_path / "j", output=tmp_path / "out.jsonl")
        async with clock.auto_advance():
            report = await run.run()
    assert report.succeeded == 120
    assert report.batches == 3  # 50 + 50 + 20 requests of 1,000 inputs each


@pytest.mark.parametrize("delete", [True, False])
async def test_delete_files_removes_each_batchs_files_once_collected(
    make_harness: Callable[..., Harness], delete: bool
) -> None:
    """With delete_files, every input, output and error file of the run's batches is gone
    from the server once the run is done (and the results are all there); without it,
    they stay."""
    h = make_harness(
        validation_seconds=1.0, line_errors=[LineErrorRule(status=400, custom_ids={"req-1"})]
    )
    source = h.write_input(chat_requests(6))
    report, results = await h.run(source, config(max_lines=3, delete_files=delete))
    assert report.succeeded == 5 and report.failed == 1
    made = await h.batches()
    files = {f for b in made for f in (b.input_file_id, b.output_file_id, b.error_file_id) if f}
    assert len(files) == 5  # two inputs, two outputs, one error file
    left = files & set(h.service.file_ids)
    assert left == (set() if delete else files)
    assert_exactly_once(results, h.output_lines(), ids("req", 6))


@pytest.mark.parametrize(("seed", "delete"), [(0, False), (1, False), (2, True)])
async def test_extra_input_copies_left_by_lost_upload_answers_are_deleted(
    make_harness: Callable[..., Harness],
    caplog: pytest.LogCaptureFixture,
    seed: int,
    delete: bool,
) -> None:
    """Upload answers lost after the upload took effect leave extra copies of a shard's
    input file on the server; the run deletes them (with or without delete_files), never
    the copy its batch uses, and reports how many it deleted."""
    h = make_harness(seed=seed, validation_seconds=1.0)
    lost = Fault.drop(after=True, method="POST", path="/files", times=None, probability=0.5)
    h.service.faults.add(lost)
    source = h.write_input(chat_requests(40))
    report, results = await h.run(
        source, config(max_lines=4, delete_files=delete), retry=RetryPolicy.for_testing()
    )
    h.service.faults.clear()
    assert report.state == "done"
    assert report.succeeded == 40
    assert_exactly_once(results, h.output_lines(), ids("req", 40))
    uploads = h.service.request_count("POST", "/files")  # each one stored a file
    dropped = sum(1 for f in h.service.faults.fired if f.fault is lost)
    assert dropped > 0
    assert uploads > 10  # ten shards, and copies
    listed = await FakeApi(h.service).ok("GET", "/files", params={"purpose": "batch"})
    inputs = Counter(f["filename"] for f in listed["data"] if f["filename"].startswith("aiobatch-"))
    batches = await h.batches()
    assert len(batches) == 10
    if delete:
        assert inputs == Counter()
    else:
        assert len(inputs) == 10
        assert set(inputs.values()) == {1}
        kept = {f["id"] for f in listed["data"] if f["filename"].startswith("aiobatch-")}
        assert kept == {b.input_file_id for b in batches}
    assert report.extra_uploads_deleted == uploads - 10
    assert f"{uploads - 10} extra cop" in format_report(report)
    warned = [r for r in caplog.records if "left by lost upload answers" in r.getMessage()]
    assert warned and all(r.levelno == logging.WARNING for r in warned)


async def test_extra_input_copies_that_cannot_be_deleted_do_not_fail_the_run(
    make_harness: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    """When the extra copies left by lost upload answers cannot be deleted (every delete
    refused), the run still completes; each copy is logged, and none is counted as
    deleted."""
    h = make_harness(validation_seconds=1.0)
    h.service.faults.add(Fault.drop(after=True, method="POST", path="/files", times=2))
    h.service.faults.add(Fault.http(500, method="DELETE", path="/files/*", times=None))
    source = h.write_input(chat_requests(8))
    report, results = await h.run(source, config(max_lines=4), retry=RetryPolicy.for_testing())
    assert report.state == "done"
    assert report.succeeded == 8
    assert report.extra_uploads_deleted == 0
    assert_exactly_once(results, h.output_lines(), ids("req", 8))
    assert h.service.request_count("POST", "/files") == 4  # two shards, two lost answers
    assert len(h.service.file_ids) == 4 + 2  # every input copy stays; two output files
    logged = [r for r in caplog.records if "could not delete" in r.getMessage()]
    assert len(logged) == 2


class _EditedResultFiles:
    """Plays a server whose result files are the fake's, passed through ``edit`` (their
    lines, without newlines)."""

    def __init__(self, inner: Any, edit: Callable[[list[bytes]], list[bytes]]) -> None:
        self.inner = inner
        self.edit = edit

    async def send(self, request: Any, *, stream: bool = False) -> Any:
        response = await self.inner.send(request, stream=stream)
        if not (request.method == "GET" and request.url.endswith("/content")):
            return response
        lines = self.edit((await response.read()).split(b"\n"))
        return Response(response.status, dict(response.headers), b"\n".join(lines))

    async def aclose(self) -> None:
        await self.inner.aclose()


def _corrupting(inner: Any, custom_id: str | None) -> _EditedResultFiles:
    """Plays a server whose result files hold one line that does not decode (the line
    for ``custom_id``, or every line when it is None: its ``status_code`` is a string)."""
    marker = json.dumps(custom_id).encode() if custom_id else b"custom_id"

    def corrupt(lines: list[bytes]) -> list[bytes]:
        for i, line in enumerate(lines):
            if line and marker in line:
                data = json.loads(line)
                data["response"]["status_code"] = "two hundred"
                lines[i] = json.dumps(data).encode()
        return lines

    return _EditedResultFiles(inner, corrupt)


@pytest.mark.parametrize("chunk", [1, 2000], ids=["a_line_per_chunk", "one_chunk"])
@pytest.mark.parametrize(
    "stranger_id", ["req-elsewhere", "req-\ud800"], ids=["an_id", "an_id_that_is_not_unicode"]
)
async def test_a_repeated_line_and_a_stranger_in_a_result_file_change_no_outcome(
    tmp_path: Path,
    clock: VirtualClock,
    caplog: pytest.LogCaptureFixture,
    chunk: int,
    stranger_id: str,
) -> None:
    """A result file that repeats a line (with other tokens) and names a request it was
    not sent gives each request its first line's result and tokens, and logs the
    stranger."""
    service = FakeBatchService(clock=clock, config=FakeConfig(validation_seconds=1.0))
    source = tmp_path / "in.jsonl"
    source.write_bytes(chat_requests(6))

    def repeat_and_add(lines: list[bytes]) -> list[bytes]:
        stranger = json.loads(lines[1])
        stranger["custom_id"] = stranger_id
        again = json.loads(lines[1])
        again["response"]["body"]["usage"]["prompt_tokens"] += 1000
        again["response"]["body"]["id"] = "a-second-answer"
        lines = [*lines[:3], json.dumps(again).encode(), json.dumps(stranger).encode(), *lines[3:]]
        return lines

    transport = _EditedResultFiles(service.transport(), repeat_and_add)
    async with BatchClient(
        api_key=API_KEY, base_url=BASE_URL, transport=transport, clock=clock
    ) as client:
        run = BatchRun(
            client,
            source,
            journal=tmp_path / "j",
            output=tmp_path / "out.jsonl",
            config=RunConfig(collect_chunk=chunk),
        )
        async with clock.auto_advance():
            report = await run.run()
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["custom_id"] for line in out] == ids("req", 6)
    assert "a-second-answer" not in (tmp_path / "out.jsonl").read_text()
    assert (report.succeeded, report.failed) == (6, 0)
    used = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in out)
    assert used < 1000
    assert report.input_tokens == used
    assert [row["input_tokens"] for row in shard_rows(tmp_path / "j")] == [used]
    strangers = [r for r in caplog.records if repr(stranger_id) in r.getMessage()]
    assert len(strangers) == 1


async def test_the_progress_counts_each_final_outcome_once(
    tmp_path: Path, clock: VirtualClock
) -> None:
    """The run's progress counts every final success and failure once as results come,
    those of a first round (never retried) and those of a retry round alike."""
    flaky = {"req-2"}

    def fails_once(custom_id: str) -> bool:
        if custom_id in flaky:
            flaky.discard(custom_id)
            return True
        return False

    line_errors = [
        LineErrorRule(status=400, custom_ids={"req-1", "req-4"}),
        LineErrorRule(status=500, predicate=fails_once),
    ]
    service = FakeBatchService(
        clock=clock, config=FakeConfig(validation_seconds=1.0, line_errors=line_errors)
    )
    source = tmp_path / "in.jsonl"
    source.write_bytes(chat_requests(6))
    seen: list[RunProgress] = []
    async with BatchClient(
        api_key=API_KEY, base_url=BASE_URL, transport=service.transport(), clock=clock
    ) as client:
        # A line a chunk: the final failures are chunks of their own, apart from the 500.
        single = RunConfig(collect_chunk=1)
        run = BatchRun(
            client, source, journal=tmp_path / "j", config=single, on_progress=seen.append
        )
        async with clock.auto_advance():
            report = await run.run()
    assert (report.succeeded, report.failed, report.retried) == (4, 2, 1)
    # The running figures are counted as results come (the last, the report's).
    running = [(p.succeeded, p.failed, p.retrying) for p in seen if p.state == "running"]
    assert running[-1] == (4, 2, 0)
    assert max(retrying for _ok, _failed, retrying in running) == 1


async def test_a_result_line_that_does_not_decode_ends_its_request_without_a_rerun(
    tmp_path: Path, clock: VirtualClock
) -> None:
    """A result line that does not decode but names its request ends that request with an
    undecodable_result error (it ran and was paid): it is not run a second time."""
    service = FakeBatchService(clock=clock, config=FakeConfig(validation_seconds=1.0))
    source = tmp_path / "in.jsonl"
    source.write_bytes(chat_requests(4))
    transport = _corrupting(service.transport(), "req-2")
    async with BatchClient(
        api_key=API_KEY, base_url=BASE_URL, transport=transport, clock=clock
    ) as client:
        run = BatchRun(client, source, journal=tmp_path / "j", output=tmp_path / "out.jsonl")
        async with clock.auto_advance():
            report = await run.run()
    assert len(service.batch_ids) == 1
    assert (report.succeeded, report.failed, report.retried) == (3, 1, 0)
    assert report.errors == {"undecodable_result": 1}
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["custom_id"] for line in out] == ["req-0", "req-1", "req-2", "req-3"]
    assert out[2]["error"]["code"] == "undecodable_result"


async def test_collection_reads_at_most_500_result_lines_between_turns_of_the_loop(
    tmp_path: Path, clock: VirtualClock
) -> None:
    """Result lines that arrive without a wait (a body already read) are read at most
    500 between two turns of the loop, even when a chunk holds more (one chunk of
    2,000 lines held the loop 20-40 ms on the real clock)."""
    count = 1200
    service = FakeBatchService(clock=clock, config=FakeConfig(validation_seconds=1.0))
    source = tmp_path / "in.jsonl"
    source.write_bytes(chat_requests(count))
    transport = _corrupting(service.transport(), None)
    ticker = await Ticker.start()
    read_at: list[int] = []

    class AtTick(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "does not decode" in record.getMessage():
                read_at.append(ticker.ticks)

    handler = AtTick()
    logger = logging.getLogger("aiobatch")
    logger.addHandler(handler)
    try:
        async with BatchClient(
            api_key=API_KEY, base_url=BASE_URL, transport=transport, clock=clock
        ) as client:
            chunked = RunConfig(collect_chunk=5000)
            run = BatchRun(client, source, journal=tmp_path / "j", config=chunked)
            async with clock.auto_advance():
                report = await run.run()
    finally:
        logger.removeHandler(handler)
        await ticker.stop()
    assert report.errors == {"undecodable_result": count}
    assert len(read_at) == count
    assert max(Counter(read_at).values()) <= 500


# --- 9. collection -------------------------------------------------------------------------


async def test_a_failed_retrieve_while_output_file_id_lags_keeps_the_batch_results(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A completed batch whose output_file_id lags, and whose next retrieve fails, still has
    its results collected: no second batch, every request answered by the first."""
    service = service_on(clock)
    completed_answers: Counter[str] = Counter()

    async def lagging(request: Request, handle: Handler) -> Response:
        path = path_of(request)
        response = await handle(request)
        if request.method != "GET" or not path.startswith("/batches/") or response.status != 200:
            return response
        body = json.loads(await response.read())
        headers = {k: v for k, v in response.headers.items() if k != "content-length"}
        if body.get("status") == "completed":
            seen = completed_answers[body["id"]]
            completed_answers[body["id"]] += 1
            if seen == 0:
                body["output_file_id"] = None  # OpenAI's lag: completed, file id not yet set
            elif seen <= 3:
                return error_response(503, "the server is overloaded")  # a short outage
        return Response(200, headers, json.dumps(body).encode())

    source = write_jsonl(tmp_path / "in.jsonl", requests(5))
    async with client_for(clock, in_front(service, lagging)) as client:
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=config())
        async with clock.auto_advance():
            report, results = await run_to_end(run)
    assert report.state == "done"
    assert len(service.batch_ids) == 1, "the batch's results were thrown away and re-run"
    assert all(r.ok for r in results), [r.result for r in results if not r.ok]
    assert {r.batch_id for r in results} == {service.batch_ids[0]}


async def test_a_result_file_that_is_gone_does_not_make_the_run_unfinishable(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A batch whose output file answers 404 for good (deleted, expired after 30 days)
    does not stop the run for ever: the run ends with one result per request."""
    service = service_on(clock)
    lost: set[str] = set()

    async def losing_the_first_output(request: Request, handle: Handler) -> Response:
        path = path_of(request)
        if request.method == "GET" and path.startswith("/files/") and path.endswith("/content"):
            file_id = path.split("/")[2]
            if not lost:
                first = await service.get_batch(service.batch_ids[0])
                if first.output_file_id is not None:
                    lost.add(first.output_file_id)
            if file_id in lost:
                return error_response(404, f"No such File object: {file_id}")
        return await handle(request)

    source = write_jsonl(tmp_path / "in.jsonl", requests(4))
    settings = config(step_backoff=1.0, max_step_failures=3)
    async with (
        client_for(clock, in_front(service, losing_the_first_output)) as client,
        clock.auto_advance(),
    ):
        outcomes: list[RunReport | AiobatchError] = []
        for _ in range(2):  # and a resume, as a user would try
            run = BatchRun(client, source, journal=tmp_path / "run.journal", config=settings)
            try:
                outcomes.append(await run.run())
                break
            except AiobatchError as exc:
                outcomes.append(exc)
    assert isinstance(outcomes[-1], RunReport), [repr(o)[:90] for o in outcomes]
    assert outcomes[-1].state == "done"
    assert outcomes[-1].pending == 0
    assert outcomes[-1].requests == 4


def _noting_downloads(started: asyncio.Event) -> Callable[[Request, Handler], Any]:
    """A middleware (for ``in_front``) that sets ``started`` at the first download of a
    result file."""

    async def noting(request: Request, handle: Handler) -> Response:
        if request.method == "GET" and path_of(request).endswith("/content"):
            started.set()
        return await handle(request)

    return noting


async def _output_done_values(
    journal: Path, started: asyncio.Event, shards: int
) -> dict[str, list[int]]:
    """Every value each shard's ``output_done`` takes (from 0), read from the journal at
    each turn of the loop from ``started`` until ``shards`` shards are collected."""
    seen: dict[str, list[int]] = {}
    await started.wait()
    while True:
        rows = shard_rows(journal)
        for row in rows:
            done = seen.setdefault(row["key"], [0])
            if int(row["output_done"]) != done[-1]:
                done.append(int(row["output_done"]))
        if len(rows) == shards and all(row["state"] == "collected" for row in rows):
            return seen
        await asyncio.sleep(0)


async def test_result_files_read_at_once_share_the_chunk_bounds(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """Two result files read at once each commit chunks of half ``collect_chunk`` (the
    collections together hold one chunk's worth, however many batches end at once);
    every request gets its result."""
    lines, chunk = 3000, 250
    service = service_on(clock, lines_per_second=1000.0)
    source = write_jsonl(tmp_path / "in.jsonl", requests(lines))
    journal = tmp_path / "run.journal"
    streaming = asyncio.Event()
    transport = in_front(service, _noting_downloads(streaming))
    async with client_for(clock, transport) as client, clock.auto_advance():
        settings = config(collect_chunk=chunk, max_lines=lines // 2, max_collections=2)
        run = BatchRun(client, source, journal=journal, config=settings)
        beat = asyncio.ensure_future(_output_done_values(journal, streaming, shards=2))
        report: RunReport = await run.run()
        seen = await beat
    assert report.succeeded == lines
    assert len(seen) == 2
    steps = [b - a for done in seen.values() for a, b in itertools.pairwise(done)]
    assert steps and min(steps) <= chunk // 2, seen
    assert all(done[-1] == lines // 2 for done in seen.values())


async def test_a_result_file_read_again_after_a_404_keeps_the_whole_chunk(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A result file that answered 404 once (its reading ended with the error) no
    longer counts as read: the file read again alone commits whole ``collect_chunk``
    chunks, not a share of them."""
    lines, chunk = 1500, 250
    service = service_on(clock, lines_per_second=1000.0)
    source = write_jsonl(tmp_path / "in.jsonl", requests(lines))
    journal = tmp_path / "run.journal"
    missed: list[str] = []
    streaming = asyncio.Event()

    async def a_404_first(request: Request, handle: Handler) -> Response:
        path = path_of(request)
        if request.method == "GET" and path.endswith("/content"):
            if not missed:
                missed.append(path)
                return error_response(404, "No such File object")
            streaming.set()
        return await handle(request)

    transport = in_front(service, a_404_first)
    async with client_for(clock, transport) as client, clock.auto_advance():
        settings = config(collect_chunk=chunk, step_backoff=1.0, max_step_failures=3)
        run = BatchRun(client, source, journal=journal, config=settings)
        beat = asyncio.ensure_future(_output_done_values(journal, streaming, shards=1))
        report: RunReport = await run.run()
        (done,) = (await beat).values()
    assert report.succeeded == lines
    assert missed
    steps = [b - a for a, b in itertools.pairwise(done)]
    assert steps and min(steps) == chunk, done


async def test_collecting_a_long_result_file_lets_other_tasks_run_between_chunks(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """While a long output file is collected in chunks, the event loop runs other tasks
    between the chunks (a heartbeat sees the collection part-way), so polls, signals and
    other collections are not held up for the whole file."""
    lines = 3000
    service = service_on(clock, lines_per_second=1000.0)
    streaming = asyncio.Event()
    source = write_jsonl(tmp_path / "in.jsonl", requests(lines))
    journal = tmp_path / "run.journal"
    transport = in_front(service, _noting_downloads(streaming))
    async with client_for(clock, transport) as client, clock.auto_advance():
        run = BatchRun(client, source, journal=journal, config=config(collect_chunk=250))
        beat = asyncio.ensure_future(_output_done_values(journal, streaming, shards=1))
        report: RunReport = await run.run()
        (seen,) = (await beat).values()
    assert report.succeeded == lines
    partway = sorted(n for n in seen if 0 < n < lines)
    assert partway, f"the heartbeat never ran during the collection (saw {sorted(seen)})"
