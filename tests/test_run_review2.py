"""A second reviewer's tests of the runner (BatchRun): interleavings, figures and limits
that the other runner tests do not play.

Every test drives the in-memory fake service on a virtual clock (the ``aiobatch cancel``
test serves the same fake over loopback HTTP, since the command builds its own client).
Where the fake has no switch for a server behaviour (a create committed a few seconds
after it arrived, a batch the server lost, a create endpoint that always refuses), a
small handler in front of the service plays it, as in ``test_run_review``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, Handler, client_for, config, in_front, service_on
from test_run_crash import serve
from test_run_review import (
    error_response,
    executed,
    path_of,
    requests,
    run_to_end,
    shards_of_batches,
    write_jsonl,
)

from aiobatch import BatchRun, BatchStatus, ProgressDisplay, RunReport, format_report
from aiobatch._aio import first_of
from aiobatch.cli import main
from aiobatch.errors import AiobatchError, RunError
from aiobatch.testing import FakeBatchService, LineErrorRule, VirtualClock, make_app
from aiobatch.transport import Request, Response

LIVE_STATUSES = {"validating", "in_progress", "finalizing", "cancelling"}


def shard_rows(journal: Path) -> list[dict[str, Any]]:
    """The journal's shard rows, read as ``aiobatch status`` would (read-only)."""
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in db.execute("SELECT * FROM shards ORDER BY key")]
    finally:
        db.close()


def late_committing_create(
    service: FakeBatchService, delay: float, when_sent: Callable[[], None]
) -> tuple[Any, list[asyncio.Future[Response]]]:
    """A transport whose first create reaches the server ``delay`` seconds after it was
    sent, and is committed then even if the client has gone (a real server keeps running
    a handler whose client hung up); ``when_sent`` is called once it is on its way. Also
    returns the server-side work of that create, to wait for."""
    creates = 0
    committed: list[asyncio.Future[Response]] = []

    async def handler(request: Request, handle: Handler) -> Response:
        nonlocal creates
        if request.method == "POST" and path_of(request) == "/batches":
            creates += 1
            if creates == 1:

                async def commit() -> Response:
                    await service.clock.sleep(delay)
                    return await handle(request)

                task = asyncio.ensure_future(commit())
                committed.append(task)
                when_sent()
                return await asyncio.shield(task)
        return await handle(request)

    return in_front(service, handler), committed


# --- 1. exactly once: a create still on its way ---------------------------------------------


@pytest.mark.parametrize("how", ["stop-and-restart", "cancel-timeout-and-resume"])
async def test_a_create_still_on_its_way_never_gets_a_second_batch(
    clock: VirtualClock, tmp_path: Path, how: str
) -> None:
    """A run that ends while its create is on its way (SIGTERM then an immediate restart, or a
    cancel whose cancel_timeout runs out) and is resumed makes no second batch for the shard
    when the server commits that create 5 s later (less than the client's create_settle)."""
    service = service_on(clock)
    holder: list[BatchRun] = []

    def end_the_run() -> None:
        if how == "stop-and-restart":
            holder[0].stop()
        else:
            holder[0].cancel()

    transport, committed = late_committing_create(service, 5.0, end_the_run)
    source = write_jsonl(tmp_path / "in.jsonl", requests(3))
    journal = tmp_path / "run.journal"
    first_config = config(cancel_timeout=2.0) if how != "stop-and-restart" else config()
    async with client_for(clock, transport) as client, clock.auto_advance():
        run = BatchRun(client, source, journal=journal, config=first_config)
        holder.append(run)
        first = await run.run()
        assert first.state in ("stopped", "cancelled")
        # At once, as a supervisor restarts a service (no wait on the clock).
        final = await BatchRun(client, source, journal=journal, config=config()).run()
        await asyncio.gather(*committed)
        await clock.sleep(600.0)  # every batch on the server ends
    shards = await shards_of_batches(service)
    assert final.state == "done"
    assert all(count == 1 for count in shards.values()), shards
    runs = await executed(service)
    assert max(runs.values()) == 1, runs


# --- 2. aiobatch cancel: a shard left 'creating' ----------------------------------------------


async def test_cancel_command_cancels_the_batch_of_a_shard_left_creating(
    clock: VirtualClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``aiobatch cancel JOURNAL`` of a stopped run whose only shard was left 'creating' (the
    batch exists, its id never reached the journal) finds that batch and cancels it, as
    cancel_batches() does, instead of saying there is nothing to cancel."""
    service = service_on(clock, lines_per_second=0.01)
    holder: list[BatchRun] = []
    made = asyncio.Event()

    async def hanging(request: Request, handle: Handler) -> Response:
        if request.method == "POST" and path_of(request) == "/batches":
            await handle(request)  # the batch is made; its answer never leaves
            made.set()
            holder[0].stop()
            await asyncio.Event().wait()
        return await handle(request)

    source = write_jsonl(tmp_path / "in.jsonl", requests(3))
    journal = tmp_path / "run.journal"
    async with client_for(clock, in_front(service, hanging)) as client, clock.auto_advance():
        run = BatchRun(client, source, journal=journal, config=config())
        holder.append(run)
        assert (await run.run()).state == "stopped"
    assert made.is_set()
    assert [row["state"] for row in shard_rows(journal)] == ["creating"]
    (batch_id,) = service.batch_ids

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    async with serve(make_app(service)) as base_url:
        code = await asyncio.to_thread(
            main, ["cancel", str(journal), "--provider", "openai", "--base-url", base_url]
        )
    assert code == 0
    assert service.request_count("POST", f"/batches/{batch_id}/cancel") == 1
    status = (await service.get_batch(batch_id)).status
    assert status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED), status


# --- 3. a create that always fails ------------------------------------------------------------


@pytest.mark.parametrize("status", [404, 500])
async def test_a_create_refused_every_time_stops_the_run_after_max_step_failures(
    clock: VirtualClock, tmp_path: Path, status: int
) -> None:
    """A server that answers every create with a 404 or a 500 (making no batch) stops the
    run with RunError after max_step_failures failed creates, instead of uploading or
    looking up and creating again for ever."""
    service = service_on(clock)
    creates = 0

    async def refusing(request: Request, handle: Handler) -> Response:
        nonlocal creates
        if request.method == "POST" and path_of(request) == "/batches":
            creates += 1
            return error_response(status, "the create endpoint refuses")
        return await handle(request)

    source = write_jsonl(tmp_path / "in.jsonl", requests(2))
    settings = config(step_backoff=60.0, max_step_failures=3)
    async with client_for(clock, in_front(service, refusing)) as client, clock.auto_advance():
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=settings)
        runner = asyncio.ensure_future(run.run())
        with contextlib.suppress(AiobatchError):
            await first_of(
                asyncio.ensure_future(asyncio.shield(runner)),
                asyncio.ensure_future(clock.sleep(6 * 3600.0)),
            )
        ended = runner.done()
        if not ended:
            run.stop()
        with contextlib.suppress(BaseException):
            await runner
    uploads = service.request_count("POST", "/files")
    assert ended, f"still running after 6 hours: {uploads} uploads, {creates} create attempts"
    assert isinstance(runner.exception(), RunError), repr(runner.exception())
    assert uploads <= 3, uploads


# --- 4. report figures --------------------------------------------------------------------------


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

    logger = logging.getLogger("test_run_review2.progress")
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


# --- 5. the event loop --------------------------------------------------------------------------


async def test_collecting_a_long_result_file_lets_other_tasks_run_between_chunks(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """While a long output file is collected in chunks, the event loop runs other tasks
    between the chunks (a heartbeat sees the collection part-way), so polls, signals and
    other collections are not held up for the whole file."""
    lines = 3000
    service = service_on(clock, lines_per_second=1000.0)
    streaming = asyncio.Event()

    async def noting_downloads(request: Request, handle: Handler) -> Response:
        if request.method == "GET" and path_of(request).endswith("/content"):
            streaming.set()
        return await handle(request)

    source = write_jsonl(tmp_path / "in.jsonl", requests(lines))
    journal = tmp_path / "run.journal"
    seen: set[int] = set()

    async def heartbeat() -> None:
        await streaming.wait()
        while True:
            (row,) = shard_rows(journal)
            seen.add(int(row["output_done"]))
            if row["state"] == "collected":
                return
            await asyncio.sleep(0)

    transport = in_front(service, noting_downloads)
    async with client_for(clock, transport) as client, clock.auto_advance():
        run = BatchRun(client, source, journal=journal, config=config(collect_chunk=250))
        beat = asyncio.ensure_future(heartbeat())
        report: RunReport = await run.run()
        await beat
    assert report.succeeded == lines
    partway = sorted(n for n in seen if 0 < n < lines)
    assert partway, f"the heartbeat never ran during the collection (saw {sorted(seen)})"
