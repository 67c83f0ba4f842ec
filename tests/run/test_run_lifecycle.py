"""How a run ends and starts: stop() (and SIGTERM), results() closed early, a cancel
that meets a create whose answer was lost, a batch deadline, an output folder that does
not exist, an empty input, ``aiobatch cancel`` while the input is being checked, and a
fleet that stops under the run.

The in-process tests drive the in-memory fake service on a virtual clock; where the
fake has no switch for what a test needs (a create whose answer never comes, a cancel
at the moment an answer is lost) a small handler in front of the service plays it. The
SIGTERM and ``aiobatch cancel`` tests run the real command line in a child process, as
``test_run_crash`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    API_KEY,
    Handler,
    chat_line,
    client_for,
    config,
    executed,
    in_front,
    is_success,
    read_output,
    serve,
    service_on,
)
from test_run_crash import REQUESTS, WAIT, Child, _shards, _shards_in, wait_for
from test_run_crash_cancel import PROCESSING_SECONDS, Speed, slow_service

from aiobatch import (
    Batch,
    BatchRun,
    BatchStatus,
    FleetConfig,
    RetryPolicy,
    RunConfig,
    RunProgress,
    RunReport,
    RunResult,
    read_report,
    request_cancel,
)
from aiobatch._aio import first_of
from aiobatch._run import cancel_batches
from aiobatch._run._sqlite import JournalFile as Journal
from aiobatch.cli import main
from aiobatch.errors import AiobatchError, InputError, PreflightError, RunError, TransportError
from aiobatch.testing import FakeBatchService, FakeSetup, Fault, VirtualClock, make_app
from aiobatch.transport import Request, Response

MODEL = "gpt-4o-mini"
TERMINAL = {s for s in BatchStatus if s.is_terminal}


def path_of(request: Request) -> str:
    """The request path after the API root (``/batches/batch_1``)."""
    path = request.url.split("://", 1)[-1]
    path = path[path.index("/") :] if "/" in path else "/"
    return path[len("/v1") :] if path.startswith("/v1/") else path


def requests(n: int, prefix: str = "r") -> list[dict[str, Any]]:
    """``n`` chat requests with custom_ids ``{prefix}-0``... and distinct prompts."""
    return [chat_line(f"{prefix}-{i}", f"question {i}", model=MODEL) for i in range(n)]


def write_jsonl(path: Path, lines: Iterable[Mapping[str, Any]]) -> Path:
    """Write request objects as a JSONL file; returns the path."""
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def journal_meta(path: Path) -> dict[str, str]:
    """The journal's meta values (read-only, as ``aiobatch status`` reads them)."""
    with Journal(path, readonly=True) as journal:
        return journal.meta_values()


def journal_report(path: Path) -> RunReport:
    """The report read from a journal file."""
    with Journal(path, readonly=True) as journal:
        return read_report(journal)


def journal_files(journal: Path) -> list[str]:
    """The journal's files (database, WAL, shared memory, result lines, lock) that exist."""
    names = (f"{journal}{s}" for s in ("", "-wal", "-shm", "-data", ".lock"))
    return [name for name in names if Path(name).exists()]


async def batches_on_server(service: FakeBatchService) -> list[Batch]:
    """Every batch the service holds, as a client would see it now."""
    return [await service.get_batch(batch_id) for batch_id in service.batch_ids]


async def shards_of_batches(service: FakeBatchService) -> Counter[str]:
    """How many batches the service holds per ``aiobatch_shard``."""
    return Counter(
        (b.metadata or {}).get("aiobatch_shard", "?") for b in await batches_on_server(service)
    )


async def stopped_at_the_second_create(
    run: BatchRun, holder: list[BatchRun], service: FakeBatchService, journal: Path
) -> None:
    """``run`` (first in ``holder``, over a :func:`hanging_create` of the second create
    that stops it) stops with its first shard open and its second left 'creating',
    both batches made."""
    holder.append(run)
    assert (await run.run()).state == "stopped"
    states = {s["key"]: s["state"] for s in _shards(journal)}
    assert states == {"s000000": "open", "s000001": "creating"}, states
    assert len(service.batch_ids) == 2


async def cancelled_once_each(service: FakeBatchService, journal: Path, why: str) -> None:
    """The service holds two batches, each a journal shard's, each asked to cancel once
    and now cancelling or ended (``why``: what a third batch would mean)."""
    on_server = await batches_on_server(service)
    assert len(on_server) == 2, why
    assert all(b.status in TERMINAL or b.status is BatchStatus.CANCELLING for b in on_server), {
        b.id: b.status.value for b in on_server
    }
    for batch in on_server:
        assert service.request_count("POST", f"/batches/{batch.id}/cancel") == 1, batch.id
    assert {s["batch_id"] for s in _shards(journal)} == {b.id for b in on_server}


async def next_run_completes(
    run: BatchRun, service: FakeBatchService, items: list[dict[str, Any]], output: Path
) -> None:
    """``run`` (on the journal again) completes every request once, in input order,
    without a retry, and no shard got a second batch."""
    final = await run.run()
    shards = await shards_of_batches(service)
    assert final.state == "done"
    assert final.succeeded == len(items)
    assert (final.retried, final.rounds) == (0, 0)
    assert [line["custom_id"] for line in read_output(output)] == [i["custom_id"] for i in items]
    assert all(count == 1 for count in shards.values()), shards


async def ran_lines(service: FakeBatchService) -> dict[str, list[tuple[str, str]]]:
    """custom_id -> (batch id, result line id) of every time a batch ran it (its line
    came back with a response, success or HTTP error)."""
    ran: dict[str, list[tuple[str, str]]] = {}
    for batch in await batches_on_server(service):
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id is None:
                continue
            for raw in service.file_content(file_id).splitlines():
                line = json.loads(raw)
                if line.get("response") is not None:
                    ran.setdefault(line["custom_id"], []).append((batch.id, line["id"]))
    return ran


async def wait_until_running(
    clock: VirtualClock, service: FakeBatchService, batches: int, lines: int
) -> None:
    """Wait (on the clock) until ``batches`` batches exist, each still running with at
    least ``lines`` lines finished."""
    while True:
        await clock.sleep(1.0)
        found = await batches_on_server(service)
        assert all(b.status not in TERMINAL for b in found), "a batch ended too soon"
        done = [b.request_counts.completed if b.request_counts else 0 for b in found]
        if len(found) == batches and min(done) >= lines:
            return


def hanging_create(service: FakeBatchService, nth: int, when_hung: Callable[[], None]) -> Any:
    """A transport whose ``nth`` create is made by the service but never answered (the
    connection hangs); ``when_hung`` is called once the batch exists."""
    creates = 0

    async def handler(request: Request, handle: Handler) -> Response:
        nonlocal creates
        if request.method == "POST" and path_of(request) == "/batches":
            creates += 1
            if creates == nth:
                await handle(request)  # the batch is made; its answer never leaves
                when_hung()
                await asyncio.Event().wait()
        return await handle(request)

    return in_front(service, handler)


# --- 1. stop() ---------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["batches-open", "mid-create"])
async def test_stop_leaves_batches_running_and_a_new_run_collects_them(
    clock: VirtualClock, tmp_path: Path, when: str
) -> None:
    """stop() ends run() at once with a "stopped" report and cancels no batch; a new run on
    the journal collects the batches that kept running: one result per request, no second
    batch for any shard."""
    items = requests(20)
    source = write_jsonl(tmp_path / "in.jsonl", items)
    journal = tmp_path / "run.journal"
    output = tmp_path / "out.jsonl"
    settings = config(max_lines=10, max_submissions=1)
    service = service_on(clock, lines_per_second=0.1)  # 10 lines: about 110 s
    holder: list[BatchRun] = []
    stopped_at: list[float] = []

    def stop() -> None:
        stopped_at.append(clock.now())
        holder[0].stop()

    # mid-create: the second create reaches the service, which makes the batch; the
    # stop comes while its answer is still awaited.
    transport = hanging_create(service, 2, stop) if when == "mid-create" else service.transport()
    async with client_for(clock, transport) as client, clock.auto_advance():
        run = BatchRun(client, source, journal=journal, output=output, config=settings)
        holder.append(run)
        runner = asyncio.ensure_future(run.run())
        if when == "batches-open":
            await wait_until_running(clock, service, batches=2, lines=2)
            stop()
        report = await runner
        if when == "mid-create":
            rows = {s["key"]: s for s in _shards(journal)}
            assert rows["s000001"]["state"] == "creating", rows  # the window the test cuts
            assert rows["s000001"]["batch_id"] is None, rows

        assert report.state == "stopped"
        assert journal_meta(journal)["state"] == "stopped"
        assert [clock.now()] == stopped_at, "stop() waited for something"
        assert service.request_count("POST", "/batches/*/cancel") == 0
        originals = await batches_on_server(service)
        assert len(originals) == 2
        running = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
        assert all(b.status in running for b in originals), [b.status for b in originals]
        assert report.succeeded == 0 and report.pending == 20
        assert not output.exists()

        resumed = BatchRun(client, source, journal=journal, output=output, config=settings)
        final = await resumed.run()
        shards = await shards_of_batches(service)
        ran = await ran_lines(service)
        assert service.request_count("POST", "/batches/*/cancel") == 0
    assert final.state == "done"
    assert (final.succeeded, final.failed, final.pending) == (20, 0, 0)
    lines = read_output(output)
    assert [line["custom_id"] for line in lines] == [item["custom_id"] for item in items]
    assert all(is_success(line) for line in lines)
    assert service.batch_ids == [b.id for b in originals], "a shard got a second batch"
    assert all(count == 1 for count in shards.values()), shards
    # Every request ran once, in the batch that was running when the run stopped.
    assert {cid: len(runs) for cid, runs in ran.items()} == {item["custom_id"]: 1 for item in items}
    assert {line["id"] for line in lines} == {runs[0][1] for runs in ran.values()}


# --- 2. SIGTERM ----------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
async def test_sigterm_stops_the_command_without_cancelling_and_resume_collects(
    tmp_path: Path,
) -> None:
    """``aiobatch run`` on SIGTERM exits 143 with its batches still running (none
    cancelled); the same command again collects them, one result per request, no new
    batch."""
    speed = Speed()
    service, clock = slow_service(speed)
    async with serve(make_app(service)) as base_url:
        child = Child(tmp_path, base_url)
        try:
            proc = await child.start()
            shards = -(-REQUESTS // 10)
            await wait_for(
                lambda: (
                    proc.returncode is not None or _shards_in(child.journal, ("open",)) == shards
                ),
                "every shard is open",
            )
            assert proc.returncode is None, child.stderr(1)
            originals = service.batch_ids
            assert len(originals) == shards
            clock.advance(4.5)  # every batch finishes 4 lines, then the signal comes

            proc.send_signal(signal.SIGTERM)
            rc = await child.finish(proc)
            assert rc == 143, child.stderr(1)
            assert "stopping" in child.stderr(1)
            assert journal_meta(child.journal)["state"] == "stopped"
            assert service.request_count("POST", "/batches/*/cancel") == 0
            statuses = [(await service.get_batch(b)).status for b in originals]
            assert statuses == [BatchStatus.IN_PROGRESS] * shards, statuses
            assert not child.output.exists()

            clock.advance(PROCESSING_SECONDS)  # the batches ran on: they complete
            speed.fast()  # (a wrongly re-submitted line would not hang the test)
            rc = await child.finish(await child.start())
            assert rc == 0, child.stderr(2)
        finally:
            await child.close()
    results = read_output(child.output)
    assert sorted(r["custom_id"] for r in results) == sorted(child.ids)
    assert len(results) == len(child.ids)
    assert all(is_success(r) for r in results)
    assert service.batch_ids == originals, "the resumed run made new batches"
    assert service.request_count("POST", "/batches/*/cancel") == 0
    ran = await ran_lines(service)
    assert all(len(runs) == 1 for runs in ran.values()), ran
    assert {r["id"] for r in results} == {runs[0][1] for runs in ran.values()}
    report = journal_report(child.journal)
    assert (report.state, report.succeeded, report.pending) == ("done", REQUESTS, 0)


# --- 3. results() closed early -------------------------------------------------------------


async def test_results_closed_early_stops_the_run_it_started(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """results() iterated alone and closed after its first result stops the run it started
    ("stopped", nothing left running in the process, no batch cancelled); a later run on
    the journal completes."""
    items = requests(10)
    source = write_jsonl(tmp_path / "in.jsonl", items)
    journal = tmp_path / "run.journal"
    output = tmp_path / "out.jsonl"
    first_id: list[str] = []

    def speeds(batch_id: str, lines: int) -> float:
        if not first_id:
            first_id.append(batch_id)
        return 5.0 if batch_id == first_id[0] else 500.0

    service = service_on(clock, processing_seconds=speeds)
    settings = config(max_lines=5, max_submissions=1)
    async with client_for(clock, service.transport()) as client, clock.auto_advance():
        before = asyncio.all_tasks()
        run = BatchRun(client, source, journal=journal, output=output, config=settings)
        got: list[RunResult] = []
        results = run.results()
        async with contextlib.aclosing(results):
            async for result in results:
                got.append(result)
                break
        left = {t for t in asyncio.all_tasks() - before if not t.done()}
        if left:  # (only when the test fails: end the run, so that the test ends)
            run.stop()
            await asyncio.gather(*left, return_exceptions=True)
        assert left == set(), left
        assert [r.custom_id for r in got] == ["r-0"]
        assert journal_meta(journal)["state"] == "stopped"
        assert service.request_count("POST", "/batches/*/cancel") == 0
        slow = await service.get_batch(service.batch_ids[-1])
        assert slow.status is BatchStatus.IN_PROGRESS  # still running on the server
        assert not output.exists()

        final = await BatchRun(
            client, source, journal=journal, output=output, config=settings
        ).run()
        shards = await shards_of_batches(service)
    assert final.state == "done"
    assert final.succeeded == 10
    assert [line["custom_id"] for line in read_output(output)] == [i["custom_id"] for i in items]
    assert len(service.batch_ids) == 2
    assert all(count == 1 for count in shards.values()), shards


# --- 4. a cancel meets a create whose answer was lost --------------------------------------


@pytest.mark.parametrize("found", ["while-settling", "after-the-create-gave-up"])
async def test_cancel_also_cancels_the_batch_of_a_create_whose_answer_was_lost(
    clock: VirtualClock, tmp_path: Path, found: str
) -> None:
    """A cancel that comes while a create's answer is lost (the server made the batch)
    finds that batch and cancels it too: no batch is left running; a new run completes
    with one result per request, no second batch for any shard, no retry round spent."""
    items = requests(10)
    source = write_jsonl(tmp_path / "in.jsonl", items)
    journal = tmp_path / "run.journal"
    output = tmp_path / "out.jsonl"
    # The fleet only retrieves: the list answers below are the create lookups'.
    fleet = FleetConfig(
        min_interval=1.0,
        max_interval=10.0,
        validating_interval=1.0,
        cancelling_interval=1.0,
        in_progress_interval=5.0,
        jitter=0.0,
        seed=0,
        list_when_cheaper=False,
    )
    settings = RunConfig(max_lines=5, max_submissions=1, fleet=fleet)
    service = service_on(clock, lines_per_second=0.05)  # 5 lines: about 100 s
    holder: list[BatchRun] = []
    creates = 0

    async def losing_the_second_create(request: Request, handle: Handler) -> Response:
        nonlocal creates
        if request.method == "POST" and path_of(request) == "/batches":
            creates += 1
            if creates == 2:
                # The service makes the batch, the answer is lost, and the run is
                # cancelled at that moment.
                service.faults.add(Fault.drop(after=True, method="POST", path="/batches"))
                if found == "after-the-create-gave-up":
                    # The create's own lookups fail: it ends ambiguous, the shard stays
                    # 'creating' and only the cancel's lookup can find the batch.
                    service.faults.add(Fault.http(500, method="GET", path="/batches", times=3))
                try:
                    return await handle(request)
                except TransportError:
                    holder[0].cancel()
                    raise
        return await handle(request)

    # Real (virtual-clock) waits: the create settles before it looks its key up.
    retry = RetryPolicy(max_attempts=3) if found == "while-settling" else None
    transport = in_front(service, losing_the_second_create)
    async with client_for(clock, transport, retry=retry) as client, clock.auto_advance():
        run = BatchRun(client, source, journal=journal, output=output, config=settings)
        holder.append(run)
        report = await run.run()
        assert creates == 2
        fired = Counter((f.method, f.path, f.fault.kind.value) for f in service.faults.fired)
        assert fired[("POST", "/batches", "drop_after")] == 1
        if found == "after-the-create-gave-up":
            assert fired[("GET", "/batches", "http")] == 3

        assert report.state == "cancelled"
        await cancelled_once_each(service, journal, "the lost create made no batch")

        again = BatchRun(client, source, journal=journal, output=output, config=settings)
        await next_run_completes(again, service, items, output)


async def test_cancel_of_a_resumed_run_cancels_the_batch_of_a_shard_left_creating(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A run resumed with a shard left 'creating' (its create was never answered) and
    cancelled as it starts finds that shard's batch and cancels it too: no batch is left
    running; the next run completes with no second batch for any shard."""
    items = requests(10)
    source = write_jsonl(tmp_path / "in.jsonl", items)
    journal = tmp_path / "run.journal"
    output = tmp_path / "out.jsonl"
    settings = config(max_lines=5, max_submissions=1)
    service = service_on(clock, lines_per_second=0.05)  # 5 lines: about 100 s
    holder: list[BatchRun] = []
    transport = hanging_create(service, 2, lambda: holder[0].stop())
    async with client_for(clock, transport) as client, clock.auto_advance():
        first = BatchRun(client, source, journal=journal, output=output, config=settings)
        await stopped_at_the_second_create(first, holder, service, journal)

        def cancel_at_start(_: RunProgress) -> None:
            if len(holder) == 1:
                holder.append(second)
                second.cancel()

        second = BatchRun(
            client,
            source,
            journal=journal,
            output=output,
            config=settings,
            on_progress=cancel_at_start,
        )
        report = await second.run()
        assert report.state == "cancelled"
        await cancelled_once_each(service, journal, "the cancelled run created a batch")

        again = BatchRun(client, source, journal=journal, output=output, config=settings)
        await next_run_completes(again, service, items, output)


async def test_cancel_batches_finds_and_cancels_the_batch_of_a_shard_in_creating(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """cancel_batches() on a stopped run's journal also cancels the batch a shard left
    'creating' had made (its id never reached the journal); the next run completes with
    no second batch for any shard."""
    items = requests(10)
    source = write_jsonl(tmp_path / "in.jsonl", items)
    journal = tmp_path / "run.journal"
    output = tmp_path / "out.jsonl"
    settings = config(max_lines=5, max_submissions=1)
    service = service_on(clock, lines_per_second=0.05)
    holder: list[BatchRun] = []
    transport = hanging_create(service, 2, lambda: holder[0].stop())
    async with client_for(clock, transport) as client, clock.auto_advance():
        run = BatchRun(client, source, journal=journal, output=output, config=settings)
        await stopped_at_the_second_create(run, holder, service, journal)

        sent = await cancel_batches(journal, client)
        assert sorted(sent) == sorted(service.batch_ids)
        for batch_id in service.batch_ids:
            assert service.request_count("POST", f"/batches/{batch_id}/cancel") == 1
            status = (await service.get_batch(batch_id)).status
            assert status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED), status
        rows = {s["key"]: s for s in _shards(journal)}
        assert rows["s000001"]["batch_id"] in service.batch_ids

        again = BatchRun(client, source, journal=journal, output=output, config=settings)
        await next_run_completes(again, service, items, output)


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
    assert [row["state"] for row in _shards(journal)] == ["creating"]
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


# --- 5. output folder ----------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["run", "results"])
async def test_output_in_a_missing_folder_is_refused_before_anything_is_done(
    aiobatch_fake: FakeSetup, tmp_path: Path, entry: str
) -> None:
    """An output path whose folder does not exist raises InputError at once: the input
    is not read, nothing is sent, no journal is left."""
    read: list[int] = []

    def source() -> Iterable[dict[str, Any]]:
        for i, item in enumerate(requests(3)):
            read.append(i)
            yield item

    journal = tmp_path / "run.journal"
    output = tmp_path / "missing" / "out.jsonl"
    service, client = aiobatch_fake.service, aiobatch_fake.client
    run = BatchRun(client, source(), journal=journal, output=output, config=config())
    with pytest.raises(InputError, match="missing"):
        await (run.run() if entry == "run" else _drain(run))
    assert read == []
    assert service.requests == ()
    assert journal_files(journal) == []
    assert not output.parent.exists()


@pytest.mark.parametrize("entry", ["run", "results"])
async def test_output_path_that_is_a_directory_is_refused_before_anything_is_sent(
    aiobatch_fake: FakeSetup, tmp_path: Path, entry: str
) -> None:
    """An output path that is an existing directory raises InputError naming it at once,
    instead of after every batch has run: nothing is sent, no journal is left."""
    source = write_jsonl(tmp_path / "in.jsonl", requests(3))
    journal = tmp_path / "run.journal"
    output = tmp_path / "results"
    output.mkdir()
    service, client = aiobatch_fake.service, aiobatch_fake.client
    run = BatchRun(client, source, journal=journal, output=output, config=config())
    with pytest.raises(InputError, match="is a directory") as caught:
        await (run.run() if entry == "run" else _drain(run))
    assert str(output) in str(caught.value)
    assert service.requests == ()
    assert journal_files(journal) == []
    assert list(output.iterdir()) == []


async def _drain(run: BatchRun) -> list[Any]:
    return [result async for result in run.results()]


# --- 6. empty input ------------------------------------------------------------------------


async def _nothing() -> AsyncIterator[dict[str, Any]]:
    empty: tuple[dict[str, Any], ...] = ()
    for item in empty:
        yield item


@pytest.mark.parametrize("kind", ["empty-list", "empty-async"])
async def test_empty_input_completes_with_an_empty_output(
    aiobatch_fake: FakeSetup, tmp_path: Path, kind: str
) -> None:
    """An empty iterable source completes: a "done" report with 0 requests, an empty
    output file, nothing sent to the server."""
    sources: dict[str, Callable[[], Any]] = {
        "empty-list": list,
        "empty-async": _nothing,
    }
    output = tmp_path / "out.jsonl"
    service, client = aiobatch_fake.service, aiobatch_fake.client
    run = BatchRun(
        client,
        sources[kind](),
        journal=tmp_path / "run.journal",
        output=output,
        config=config(),
    )
    report = await run.run()
    assert report.state == "done"
    assert (report.requests, report.succeeded, report.failed, report.pending) == (0, 0, 0, 0)
    assert output.exists()
    assert output.read_bytes() == b""
    assert service.batch_ids == []
    assert service.file_ids == []


@pytest.mark.parametrize("content", [b"", b"\n  \n\t\r\n\n"], ids=["empty", "blank-lines"])
async def test_an_input_file_without_requests_is_refused_before_anything_is_sent(
    aiobatch_fake: FakeSetup, tmp_path: Path, content: bytes
) -> None:
    """An input file that is empty or holds only blank lines raises PreflightError (code
    ``empty_input``) naming the file: nothing is sent, no journal or output is left."""
    source = tmp_path / "in.jsonl"
    source.write_bytes(content)
    journal = tmp_path / "run.journal"
    output = tmp_path / "out.jsonl"
    service, client = aiobatch_fake.service, aiobatch_fake.client
    run = BatchRun(client, source, journal=journal, output=output, config=config())
    with pytest.raises(PreflightError, match="no requests") as caught:
        await run.run()
    assert str(source) in str(caught.value)
    assert caught.value.source == str(source)
    assert [problem.code for problem in caught.value.problems] == ["empty_input"]
    assert service.requests == ()
    assert journal_files(journal) == []
    assert not output.exists()


# --- 7. aiobatch cancel early --------------------------------------------------------------


async def test_cancel_command_while_the_input_is_checked_says_the_journal_is_busy(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """``aiobatch cancel`` while the run is still checking its input (its ingest holds the
    journal's write lock) exits 1 with a clear "busy" message, not a traceback."""
    inside = asyncio.Event()
    release = asyncio.Event()

    async def slow_source() -> AsyncIterator[dict[str, Any]]:
        yield chat_line("a", model=MODEL)
        inside.set()
        await release.wait()  # a big input still being checked
        yield chat_line("b", model=MODEL)

    journal = tmp_path / "run.journal"
    service = service_on(clock)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    async with client_for(clock, service.transport()) as client:
        run = BatchRun(client, slow_source(), journal=journal, config=config())
        runner = asyncio.ensure_future(run.run())
        try:
            await asyncio.wait_for(inside.wait(), WAIT)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "aiobatch",
                "cancel",
                str(journal),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=tmp_path,
            )
            try:
                out, err = await asyncio.wait_for(proc.communicate(), WAIT)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise
        finally:
            release.set()
            async with clock.auto_advance():
                with contextlib.suppress(Exception):
                    await runner
    text = err.decode(errors="replace")
    assert "Traceback" not in text, text
    assert proc.returncode == 1, (proc.returncode, out, text)
    assert "busy" in text, text


@pytest.mark.parametrize("start", ["fresh", "resumed"])
async def test_cancel_flag_set_before_the_supervisor_runs_is_honoured(
    clock: VirtualClock, tmp_path: Path, start: str
) -> None:
    """A cancel flag set in the journal as the run starts (at its first progress report,
    right after its input is checked or its journal is picked up) cancels the run within
    cancel_poll_interval; a later run completes."""
    items = requests(10)
    source = write_jsonl(tmp_path / "in.jsonl", items)
    journal = tmp_path / "run.journal"
    output = tmp_path / "out.jsonl"
    interval = 7.0
    settings = config(max_lines=5, cancel_poll_interval=interval)
    service = service_on(clock, lines_per_second=0.05)
    flagged_at: list[float] = []
    cancelling_at: list[float] = []

    def on_progress(progress: RunProgress) -> None:
        if not flagged_at:
            flagged_at.append(clock.now())
            request_cancel(journal)
        if progress.state == "cancelling" and not cancelling_at:
            cancelling_at.append(clock.now())

    async with client_for(clock, service.transport()) as client, clock.auto_advance():
        if start == "resumed":
            first = BatchRun(client, source, journal=journal, output=output, config=settings)
            runner = asyncio.ensure_future(first.run())
            await wait_until_running(clock, service, batches=2, lines=1)
            first.stop()
            assert (await runner).state == "stopped"
        run = BatchRun(
            client, source, journal=journal, output=output, config=settings, on_progress=on_progress
        )
        report = await run.run()
        assert report.state == "cancelled"
        assert journal_meta(journal)["state"] == "cancelled"
        assert flagged_at and cancelling_at, (flagged_at, cancelling_at)
        assert flagged_at[0] <= cancelling_at[0] <= flagged_at[0] + interval
        assert all(b.status in TERMINAL for b in await batches_on_server(service))

        final = await BatchRun(
            client, source, journal=journal, output=output, config=settings
        ).run()
    assert final.state == "done"
    assert final.succeeded == 10
    assert [line["custom_id"] for line in read_output(output)] == [i["custom_id"] for i in items]


async def test_cancel_flag_set_just_before_a_create_creates_no_batch(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A cancel flag set in the journal while a shard's file uploads (after the run last
    looked at the flag) is seen before the create: no batch is made, the run ends
    cancelled, and a later run completes."""
    items = requests(4)
    source = write_jsonl(tmp_path / "in.jsonl", items)
    journal = tmp_path / "run.journal"
    output = tmp_path / "out.jsonl"
    service = service_on(clock)

    async def flag_on_upload(request: Request, handle: Handler) -> Response:
        if request.method == "POST" and path_of(request) == "/files":
            request_cancel(journal)
        return await handle(request)

    async with client_for(clock, in_front(service, flag_on_upload)) as client:
        async with clock.auto_advance():
            run = BatchRun(client, source, journal=journal, output=output, config=config())
            report = await run.run()
        assert report.state == "cancelled"
        assert service.batch_ids == []
        assert service.request_count("POST", "/batches") == 0
        assert report.pending == 4
    async with client_for(clock, service.transport()) as client, clock.auto_advance():
        final = await BatchRun(
            client, source, journal=journal, output=output, config=config()
        ).run()
    assert final.state == "done"
    assert final.succeeded == 4
    assert len(service.batch_ids) == 1


# --- 8. batch deadline ---------------------------------------------------------------------


@pytest.mark.parametrize("deadline", ["fleet-timeout", "batch-timeout"])
async def test_a_batch_open_at_its_deadline_is_cancelled_and_only_its_unfinished_lines_rerun(
    clock: VirtualClock, tmp_path: Path, deadline: str
) -> None:
    """A batch still running at its deadline (FleetConfig.timeout or batch_timeout) is
    cancelled, not re-run elsewhere while it runs: the lines it finished are kept, the rest
    run once in a later batch; no line runs twice."""
    n = 10
    items = requests(n)
    source = write_jsonl(tmp_path / "in.jsonl", items)
    first_id: list[str] = []

    def speeds(batch_id: str, lines: int) -> float:
        if not first_id:
            first_id.append(batch_id)
        return 100.0 if batch_id == first_id[0] else 5.0  # the first: one line per 10 s

    service = service_on(clock, processing_seconds=speeds)
    limit = 50.0  # the first batch is about 4 lines in by then
    if deadline == "fleet-timeout":
        fleet = FleetConfig(
            min_interval=1.0,
            max_interval=10.0,
            validating_interval=1.0,
            cancelling_interval=1.0,
            in_progress_interval=5.0,
            jitter=0.0,
            seed=0,
            timeout=limit,
        )
        settings = RunConfig(fleet=fleet, retry_coalesce=5.0)
    else:
        settings = config(batch_timeout=limit, retry_coalesce=5.0)
    output = tmp_path / "out.jsonl"
    async with client_for(clock, service.transport()) as client, clock.auto_advance():
        run = BatchRun(
            client, source, journal=tmp_path / "run.journal", output=output, config=settings
        )
        report = await run.run()
        batches = await batches_on_server(service)
        ran = await ran_lines(service)
        first = batches[0]
        kept = (
            {
                json.loads(raw)["custom_id"]: json.loads(raw)["id"]
                for raw in service.file_content(first.output_file_id).splitlines()
            }
            if first.output_file_id is not None
            else {}
        )
    assert first.status is BatchStatus.CANCELLED, first.status
    assert service.request_count("POST", f"/batches/{first.id}/cancel") == 1
    assert 0 < len(kept) < n, kept
    rerun = n - len(kept)
    later = batches[1:]
    assert later, "the unfinished lines were not run again"
    assert first.cancelled_at is not None
    assert all(b.created_at >= first.cancelled_at for b in later), "re-run while it still ran"

    assert report.state == "done"
    assert (report.succeeded, report.failed, report.pending) == (n, 0, 0)
    lines = read_output(output)
    assert [line["custom_id"] for line in lines] == [item["custom_id"] for item in items]
    assert all(is_success(line) for line in lines)
    by_id = {line["custom_id"]: line for line in lines}
    assert all(by_id[cid]["id"] == line_id for cid, line_id in kept.items())  # kept, not re-run
    # Each request ran exactly once on the server; the batches held it plus the re-runs.
    assert {cid: len(runs) for cid, runs in ran.items()} == {item["custom_id"]: 1 for item in items}
    submitted = sum(b.request_counts.total for b in batches if b.request_counts)
    assert submitted == n + rerun
    assert sum(b.request_counts.total for b in later if b.request_counts) == rerun
    assert (report.retried, report.rounds) == (rerun, 1)


async def test_a_fleet_deadline_does_not_run_the_lines_of_a_running_batch_twice(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """With a deadline in RunConfig.fleet (FleetConfig.timeout), a batch still running at
    its deadline is not abandoned while it runs on: no request is executed twice."""
    service = service_on(clock, lines_per_second=0.1)  # 5 lines: about 55 s of processing
    source = write_jsonl(tmp_path / "in.jsonl", requests(5))
    fleet = FleetConfig(
        min_interval=1.0,
        max_interval=10.0,
        validating_interval=1.0,
        in_progress_interval=5.0,
        jitter=0.0,
        seed=0,
        timeout=30.0,
    )
    async with client_for(clock, service.transport()) as client:
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=config(fleet=fleet))
        async with clock.auto_advance():
            with contextlib.suppress(AiobatchError):
                await run.run()
            await clock.sleep(3600.0)  # whatever is still running on the server ends
    assert all(
        b.status.is_terminal for b in [await service.get_batch(i) for i in service.batch_ids]
    )
    runs = await executed(service)
    assert max(runs.values()) == 1, runs


# --- 9. a fleet that stops -----------------------------------------------------------------


async def test_a_run_whose_fleet_stops_fails_instead_of_waiting_for_ever(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """When the fleet stops tracking for good (here: the client is closed under the run),
    run() ends with an error instead of waiting for ever for batches nobody tracks."""
    service = service_on(clock, lines_per_second=0.01)
    source = write_jsonl(tmp_path / "in.jsonl", requests(3))
    async with client_for(clock, service.transport()) as client:
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=config())
        async with clock.auto_advance():
            runner = asyncio.ensure_future(run.run())
            while not service.batch_ids:
                await clock.sleep(1.0)
            await client.aclose()
            with contextlib.suppress(RunError):
                await first_of(
                    asyncio.ensure_future(asyncio.shield(runner)),
                    asyncio.ensure_future(clock.sleep(3600.0)),
                )
            ended = runner.done()
            if not ended:
                runner.cancel()
            with contextlib.suppress(BaseException):
                await runner
    assert ended, "run() still waiting an hour after its fleet stopped"
    assert isinstance(runner.exception(), RunError)
