"""The threads of a run: the SQLite journal's work off the loop runs in one thread of its
own, which ends with the run; on a virtual clock, time waits for it."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from conftest import API_KEY, BASE_URL, make_requests

from aiobatch import BatchClient, BatchRun, FleetConfig, RetryPolicy, RunConfig, RunProgress
from aiobatch._aio import cancel_and_wait
from aiobatch._run._sqlite import JournalFile
from aiobatch.testing import FakeBatchService, FakeConfig, VirtualClock


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


async def test_a_real_clock_run_uses_one_journal_thread_that_ends_with_it(
    tmp_path: Path,
) -> None:
    """A run on the real clock does its journal work (ingest, planning, collection, the
    output) in one thread of its own, starts no thread of the loop's default executor,
    and leaves no thread behind when it returns."""
    service = FakeBatchService(
        config=FakeConfig(
            validation_seconds=0.0,
            lines_per_second=100_000.0,
            finalizing_seconds=0.0,
            request_log_size=None,
        )
    )
    before = _threads()
    seen: set[threading.Thread] = set()

    def on_progress(progress: RunProgress) -> None:
        seen.update(_threads() - before)

    fleet = FleetConfig(
        min_interval=0.01,
        max_interval=0.05,
        validating_interval=0.01,
        finalizing_interval=0.01,
        cancelling_interval=0.01,
        in_progress_interval=0.01,
        jitter=0.0,
        seed=0,
    )
    source = make_requests(tmp_path / "in.jsonl", 300)
    async with BatchClient(
        api_key=API_KEY,
        base_url=BASE_URL,
        transport=service.transport(),
        retry=RetryPolicy.for_testing(max_attempts=3),
    ) as client:
        run = BatchRun(
            client,
            source,
            journal=tmp_path / "j",
            output=tmp_path / "out.jsonl",
            config=RunConfig(fleet=fleet, max_lines=100),
            on_progress=on_progress,
        )
        report = await run.run()
        left = {thread.name for thread in _threads() - before}
    assert (report.succeeded, report.batches) == (300, 3)
    names = [thread.name for thread in seen]
    assert len([name for name in names if name.startswith("aiobatch journal")]) == 1, names
    assert not [name for name in [*names, *left] if name.startswith("asyncio_")], names
    assert not [name for name in left if name.startswith("aiobatch journal")], left


async def test_a_virtual_clock_run_uses_the_journal_thread_and_time_waits_for_it(
    tmp_path: Path,
) -> None:
    """A VirtualClock run works in its journal thread, and no virtual time passes meanwhile."""
    clock = VirtualClock(start=1_000.0)
    service = FakeBatchService(clock=clock)
    source = make_requests(tmp_path / "in.jsonl", 3_000)
    before = _threads()
    seen: set[threading.Thread] = set()

    def on_progress(progress: RunProgress) -> None:
        seen.update(_threads() - before)

    async def tick() -> None:  # another task sleeping a second at a time
        while True:
            await clock.sleep(1.0)

    async with (
        clock.auto_advance(),
        BatchClient(
            api_key=API_KEY,
            base_url=BASE_URL,
            transport=service.transport(),
            clock=clock,
            retry=RetryPolicy.for_testing(max_attempts=3),
        ) as client,
    ):
        ticker = asyncio.ensure_future(tick())
        try:
            run = BatchRun(client, source, journal=tmp_path / "j", on_progress=on_progress)
            report = await run.run()
        finally:
            await cancel_and_wait([ticker])
    assert report.succeeded == 3_000
    assert [t.name for t in seen if t.name.startswith("aiobatch journal")], seen
    with JournalFile(tmp_path / "j", readonly=True) as journal:
        meta = journal.meta()
    assert meta is not None and meta.started_at == 1_000.0  # the ingest took no virtual time
