"""What a run reports while it goes and when it ends: the figures of its RunReport and of
its progress snapshots count only what happened (batches made, lines re-submitted,
batches still open), and its progress lines keep coming while a batch runs.

Every test drives the in-memory fake service on a virtual clock. Where the fake has no
switch for a server behaviour (a batch the server lost, a create endpoint that refuses),
a small handler in front of the service plays it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from conftest import (
    Handler,
    chat_line,
    client_for,
    config,
    error_response,
    in_front,
    path_of,
    requests,
    run_to_end,
    service_on,
    shard_rows,
    write_jsonl,
)

from aiobatch import BatchRun, Price, ProgressDisplay, ResultSuccess, format_report, read_results
from aiobatch.testing import LineErrorRule, VirtualClock
from aiobatch.transport import Request, Response

LIVE_STATUSES = {"validating", "in_progress", "finalizing", "cancelling"}


# --- report figures -----------------------------------------------------------------------------


async def test_a_recreate_still_waiting_for_its_backoff_is_not_reported_as_made(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A run cancelled while a token_limit_exceeded shard waits for its re-create reports the
    one batch made and no re-created batch (recreated counts batches re-created)."""
    service = service_on(clock)
    service.fail_next_batches("token_limit_exceeded")
    source = write_jsonl(tmp_path / "in.jsonl", requests(3))
    journal = tmp_path / "run.journal"
    settings = config(token_limit_backoff=3600.0)
    async with client_for(clock, service.transport()) as client, clock.auto_advance():
        run = BatchRun(client, source, journal=journal, config=settings)
        runner = asyncio.ensure_future(run.run())
        while not journal.exists() or not any(row["creates"] for row in shard_rows(journal)):
            await clock.sleep(5.0)
        run.cancel()
        report = await runner
    assert report.state == "cancelled"
    assert len(service.batch_ids) == 1
    assert report.batches == 1
    assert report.recreated == 0, (report.batches, report.recreated)


async def test_lines_waiting_for_a_retry_round_are_not_reported_as_re_submitted(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A run cancelled while a failed line waits for its retry round (nothing was
    re-submitted yet) reports 0 rounds and 0 requests re-submitted."""
    failing = LineErrorRule(status=500, predicate=lambda custom_id: custom_id == "a-0")
    service = service_on(clock, line_errors=[failing])
    items = requests(1, "a", model="gpt-a") + requests(20, "b", model="gpt-b")
    source = write_jsonl(tmp_path / "in.jsonl", items)
    journal = tmp_path / "run.journal"
    settings = config(retry_coalesce=3600.0)
    async with client_for(clock, service.transport()) as client, clock.auto_advance():
        run = BatchRun(client, source, journal=journal, config=settings)
        runner = asyncio.ensure_future(run.run())
        while not journal.exists() or not any(
            row["model"] == "gpt-a" and row["state"] == "collected" for row in shard_rows(journal)
        ):
            await clock.sleep(1.0)
        run.cancel()
        report = await runner
    assert report.state == "cancelled"
    assert len(service.batch_ids) == 2, "a retry batch was made"
    assert (report.rounds, report.retried) == (0, 0), format_report(report)


# --- open batches at the end ------------------------------------------------------------------


async def test_a_done_run_reports_no_batch_as_still_running_after_one_was_lost(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """When the server loses a batch (404 for good), the done run's report and last progress
    snapshot show no batch as still validating or in progress."""
    service = service_on(clock)
    hidden: set[str] = set()

    async def losing_the_first_batch(request: Request, handle: Handler) -> Response:
        path = path_of(request)
        if request.method == "POST" and path == "/batches" and not hidden:
            response = await handle(request)
            hidden.update(service.batch_ids)
            return response
        if (
            request.method == "GET"
            and path.startswith("/batches/")
            and path.split("/")[2] in hidden
        ):
            return error_response(404, "No batch found")
        if request.method == "GET" and path == "/batches":
            return error_response(500, "listing is down")  # tracked one by one
        return await handle(request)

    source = write_jsonl(tmp_path / "in.jsonl", requests(2))
    async with (
        client_for(clock, in_front(service, losing_the_first_batch)) as client,
        clock.auto_advance(),
    ):
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=config())
        report, results = await run_to_end(run)
    assert report.state == "done"
    assert len(results) == 2
    assert not (set(report.statuses) & LIVE_STATUSES), dict(report.statuses)
    assert run.progress().open_batches == 0, dict(run.progress().batches)


async def test_a_done_run_with_a_rejected_shard_has_no_open_batch_in_its_progress(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A shard whose create was refused (400: its lines end with batch_create_rejected) does
    not count as an open batch in the done run's last progress snapshot."""
    service = service_on(clock)

    async def rejecting(request: Request, handle: Handler) -> Response:
        if request.method == "POST" and path_of(request) == "/batches":
            return error_response(400, "the metadata is not allowed")
        return await handle(request)

    source = write_jsonl(tmp_path / "in.jsonl", requests(2))
    snapshots: list[Any] = []
    async with client_for(clock, in_front(service, rejecting)) as client, clock.auto_advance():
        run = BatchRun(
            client,
            source,
            journal=tmp_path / "run.journal",
            config=config(),
            on_progress=snapshots.append,
        )
        report = await run.run()
    assert report.state == "done"
    assert report.errors.get("batch_create_rejected") == 2
    assert snapshots[-1].state == "done"
    assert snapshots[-1].open_batches == 0, dict(snapshots[-1].batches)


# --- progress lines -----------------------------------------------------------------------------


async def test_progress_lines_keep_coming_while_a_batch_runs_for_minutes(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """Off a terminal, a run's ProgressDisplay logs a progress line about every
    log_interval (30 s) while a batch runs for ten minutes, as the README promises, not
    only when a batch changes status."""
    service = service_on(clock, lines_per_second=0.01)  # 6 lines: 600 s in progress
    source = write_jsonl(tmp_path / "in.jsonl", requests(6))
    lines: list[float] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(clock.monotonic())

    logger = logging.getLogger("test_run_report.progress")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = Collect()
    logger.addHandler(handler)
    display = ProgressDisplay(
        interactive=False, log_interval=30.0, monotonic=clock.monotonic, logger=logger
    )
    try:
        async with client_for(clock, service.transport()) as client, clock.auto_advance():
            run = BatchRun(
                client,
                source,
                journal=tmp_path / "run.journal",
                config=config(),
                on_progress=display.update,
            )
            start = clock.monotonic()
            report = await run.run()
            end = clock.monotonic()
    finally:
        logger.removeHandler(handler)
    assert report.succeeded == 6
    assert end - start >= 600.0
    gaps = [b - a for a, b in zip([start, *lines], [*lines, end], strict=True)]
    assert max(gaps) <= 90.0, f"{len(lines)} progress lines in {end - start:.0f} s: {gaps}"


# --- tokens and cost ------------------------------------------------------------------------------


async def test_the_report_has_tokens_and_cost_per_model(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """With RunConfig.prices, the report a run returns has each model's tokens (from its
    final results, each request once) and the cost of those at its price; a model
    without a price has tokens and no cost."""
    service = service_on(clock)
    lines = [chat_line(f"c{i}", f"question {i}") for i in range(3)]
    lines += [chat_line(f"m{i}", f"other {i}", model="gpt-4o") for i in range(2)]
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    output = tmp_path / "out.jsonl"
    prices = {"gpt-4o-mini": Price(input=0.15, output=0.6)}
    async with client_for(clock, service.transport()) as client, clock.auto_advance():
        run = BatchRun(
            client,
            source,
            journal=tmp_path / "run.journal",
            output=output,
            config=config(prices=prices),
        )
        report = await run.run()
    used: dict[str, list[int]] = {}
    for result in read_results(output):
        assert isinstance(result, ResultSuccess)
        usage = result.body["usage"]
        tokens = used.setdefault(result.body["model"], [0, 0])
        tokens[0] += usage["prompt_tokens"]
        tokens[1] += usage["completion_tokens"]
    assert {m: list(t) for m, t in report.tokens_by_model.items()} == used
    mini_in, mini_out = used["gpt-4o-mini"]
    assert report.cost_by_model == {"gpt-4o-mini": (mini_in * 0.15 + mini_out * 0.6) / 1e6}
    assert report.cost == report.cost_by_model["gpt-4o-mini"]
    assert config(prices={"gpt-4o": (2.5, 10.0)}).prices == {"gpt-4o": Price(2.5, 10.0)}
