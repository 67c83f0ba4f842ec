"""``BatchRun`` (``aiobatch run``) on a PostgreSQL journal and ``aiobatch worker``
processes on the same run: they share the shards by leases, never act on the same one,
and a cancel flagged in the database reaches every one of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from conftest import chat_line, config, service_on
from pg import pg_url

from aiobatch import BatchRun, RetryPolicy, RunConfig
from aiobatch._run._ingest import ingest
from aiobatch._run._postgres import PostgresJournal
from aiobatch._run._worker import Worker
from aiobatch.testing import FakeBatchService, VirtualClock, fake_client


def _requests(n: int) -> list[dict[str, object]]:
    return [chat_line(f"r-{i}", f"question {i}") for i in range(n)]


async def _batches_per_shard(service: FakeBatchService) -> Counter[str]:
    batches = [await service.get_batch(b) for b in service.batch_ids]
    return Counter((b.metadata or {}).get("aiobatch_shard", "") for b in batches)


async def _ingested(url: str, n: int) -> PostgresJournal:
    """The run's journal with its requests recorded and nothing planned."""
    journal = await PostgresJournal.open(url)
    await ingest(
        journal, _requests(n), config=RunConfig(), clock=VirtualClock(), max_line_bytes=10**7
    )
    return journal


async def _planned(journal: PostgresJournal) -> None:
    """Wait until a worker planned the run's shards."""
    for _ in range(10_000):
        if await journal.shard_count():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no worker planned the run")


async def test_a_run_and_two_workers_share_its_shards(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A BatchRun on PostgreSQL joining a run that two workers carry: they act side by
    side, every shard gets one batch, every request one result in the output."""
    caplog.set_level(logging.INFO, logger="aiobatch.run")
    url = pg_url(str(tmp_path), run="shared")
    journal = await _ingested(url, 60)
    clock = VirtualClock()
    service = service_on(clock)
    out = tmp_path / "out.jsonl"
    async with (
        fake_client(service=service, clock=clock, retry=RetryPolicy.for_testing()) as fake,
        clock.auto_advance(),
    ):
        workers = [
            Worker(
                fake.client, journal=url, config=config(max_lines=5), worker_id=f"w{i}",
                claim_limit=4,
            )
            for i in range(2)
        ]  # fmt: skip
        tasks = [asyncio.ensure_future(w.run()) for w in workers]
        await _planned(journal)
        run = BatchRun(
            fake.client, _requests(60), journal=url, output=out, config=config(max_lines=5)
        )
        reports = await asyncio.gather(run.run(), *tasks)
    await journal.close()
    assert reports[0].state == "done"
    per_shard = await _batches_per_shard(service)
    assert len(per_shard) == 12 and set(per_shard.values()) == {1}
    ids = Counter(json.loads(line)["custom_id"] for line in out.read_text().splitlines())
    assert ids == Counter(f"r-{i}" for i in range(60))
    # No process tripped over another's step (each such trip logs a warning).
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    took = [r.getMessage() for r in caplog.records if " took shard " in r.getMessage()]
    assert any("worker w" in message for message in took)  # the workers did act
