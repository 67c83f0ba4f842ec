"""Three ``aiobatch worker`` processes on one run (PostgreSQL journal, the fake over
HTTP); one is SIGKILLed at a random moment; the others adopt its shards when its leases
lapse. Every trial ends with one batch per shard and one result per request.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import sys
from pathlib import Path

import pytest
from conftest import API_KEY, chat_line
from pg import pg_server, pg_url
from test_run_crash import serve

from aiobatch._run._ingest import ingest
from aiobatch._run._postgres import PostgresJournal
from aiobatch.testing import FakeBatchService, FakeConfig, VirtualClock, make_app

_MAIN = "import sys; from aiobatch.cli import main; sys.exit(main())"
REQUESTS = 2000
MAX_LINES = 100


async def _worker(url: str, base_url: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "OPENAI_API_KEY": API_KEY}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", _MAIN, "worker", "--journal", url, "--lease", "2s",
        "--max-lines", str(MAX_LINES), "--poll-max", "0.5", "--base-url", base_url,
        "--create-settle", "0.5", "-q",
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


@pytest.mark.timeout(300)
@pytest.mark.parametrize("trial", range(3))
async def test_a_killed_worker_loses_nothing_and_doubles_nothing(
    trial: int, tmp_path: Path
) -> None:
    """One of three workers SIGKILLed at a random moment of the run: one batch per shard, one
    result per request, every request answered."""
    service = FakeBatchService(
        config=FakeConfig(
            validation_seconds=0.2, lines_per_second=2000.0, finalizing_seconds=0.2,
            request_log_size=None,
        ),
        api_key=API_KEY,
    )  # fmt: skip
    url = pg_url(f"{tmp_path}-{trial}", run="shared")
    journal = await PostgresJournal.open(url)
    from aiobatch import RunConfig

    await ingest(
        journal,
        [chat_line(f"r-{i}", f"q {i}") for i in range(REQUESTS)],
        config=RunConfig(),
        clock=VirtualClock(),
        max_line_bytes=10_000_000,
    )
    rng = random.Random(trial)
    async with serve(make_app(service)) as base_url:
        workers = [await _worker(url, base_url) for _ in range(3)]
        # A random moment of the run: after a random number of its 20 batches were made
        # (a wall-clock delay could fall after the end of a fast run).
        made = rng.randint(1, REQUESTS // MAX_LINES - 5)
        for _ in range(6000):  # at most two minutes
            if len(service.batch_ids) >= made or workers[0].returncode is not None:
                break
            await asyncio.sleep(0.02)
        assert workers[0].returncode is None, "the run ended before the kill"
        workers[0].send_signal(signal.SIGKILL)
        codes = [await asyncio.wait_for(w.wait(), 240) for w in workers]
        errors = [(await w.stderr.read()).decode()[-2000:] for w in workers[1:]]  # type: ignore[union-attr]
        assert codes[0] == -signal.SIGKILL
        assert codes[1:] == [0, 0], errors
    rid = await journal.rid()
    schema = url.split("schema=")[1].split("&")[0]
    got = pg_server().psql(f"SELECT count(*), count(DISTINCT seq) FROM {schema}.aiobatch_results")
    assert got.strip() == f"{REQUESTS}|{REQUESTS}"
    shards = await journal.shards()
    assert all(s.state.value == "collected" for s in shards)
    batches = [await service.get_batch(b) for b in service.batch_ids]
    per_shard = collections.Counter((b.metadata or {}).get("aiobatch_shard") for b in batches)
    assert per_shard == collections.Counter(s.key for s in shards)
    assert rid > 0
    await journal.close()
