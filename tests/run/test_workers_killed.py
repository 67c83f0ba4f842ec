"""Three ``aiobatch worker`` processes on one run (PostgreSQL journal, the fake over
HTTP), sharing one request budget; one is SIGKILLed at a named point of its work (after
claiming, after an upload, mid-create, mid-collection: the test-only hook
``AIOBATCH_TEST_KILL_AT``); the others adopt its shards when its leases lapse. Every
trial ends with one batch per shard and round, one result per request, and the fake never
saw more requests than the budget allows.

One trial per kill point by default; ``AIOBATCH_KILL_TRIALS=N`` runs N per point.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import signal
import sys
from pathlib import Path

import pytest
from conftest import API_KEY, chat_line, serve
from pg import pg_server, pg_url

from aiobatch import RunConfig
from aiobatch._run._ingest import ingest
from aiobatch._run._kill_hook import KILL_POINTS
from aiobatch._run._postgres import PostgresJournal
from aiobatch.testing import FakeBatchService, FakeConfig, VirtualClock, make_app

_MAIN = "import sys; from aiobatch.cli import main; sys.exit(main())"
REQUESTS = 2000
MAX_LINES = 100
RATE, BURST = 30.0, 6
#: How much a request's arrival may lag its grant: the fake dates a request when its
#: handler starts, after an upload's body came in, on a loaded machine.
JITTER = 0.25
TRIALS = int(os.environ.get("AIOBATCH_KILL_TRIALS", "1"))


def over_budget(times: list[float], stall: float = 0.0) -> list[tuple[float, float, int]]:
    """The spans of arrivals (start, length, requests) holding more than BURST + RATE *
    (span + JITTER + ``stall``) requests (``stall``: see :class:`LoopStalls`)."""
    times = sorted(times)
    return [
        (times[i], times[j] - times[i], j - i + 1)
        for i in range(len(times))
        for j in range(i, len(times))
        if j - i + 1 > BURST + RATE * (times[j] - times[i] + JITTER + stall)
    ]


class LoopStalls:
    """The longest the event loop of the test (which serves the fake) went without a turn.

    A loaded machine can stop this process while the workers, other processes, go on
    sending as their budget allows; the fake dates their requests only once it runs
    again, all at once: their arrivals bunch by up to that stall, which says nothing of
    the budget the workers kept.
    """

    TICK = 0.005

    def __init__(self) -> None:
        self.worst = 0.0
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.TICK)
            self.worst = max(self.worst, loop.time() - before - self.TICK)

    async def stop(self) -> None:
        """Stop measuring."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _worker(url: str, base_url: str, kill_at: str | None) -> asyncio.subprocess.Process:
    env = {**os.environ, "OPENAI_API_KEY": API_KEY}
    env.pop("AIOBATCH_TEST_KILL_AT", None)
    if kill_at is not None:
        env["AIOBATCH_TEST_KILL_AT"] = kill_at
        env["AIOBATCH_TESTING"] = "1"
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", _MAIN, "worker", "--journal", url, "--lease", "2s",
        "--max-lines", str(MAX_LINES), "--poll-max", "0.5", "--base-url", base_url,
        "--create-settle", "0.5", "--requests-per-second", str(RATE), "--burst", str(BURST),
        "-q",
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _leased(schema: str) -> bool:
    """Whether a worker holds the lease of a shard in ``schema``."""
    query = f"SELECT count(lease_owner) FROM {schema}.aiobatch_shards"
    return (await asyncio.to_thread(pg_server().psql, query)).strip() not in ("", "0")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("trial", range(TRIALS))
@pytest.mark.parametrize("point", KILL_POINTS)
async def test_a_worker_killed_at_a_named_point_loses_nothing_and_doubles_nothing(
    point: str, trial: int, tmp_path: Path
) -> None:
    """One of three workers SIGKILLed at a named point: one batch per shard and round, one
    result per request, every request answered, the shared budget kept."""
    service = FakeBatchService(
        config=FakeConfig(
            validation_seconds=0.2, lines_per_second=2000.0, finalizing_seconds=0.2,
            request_log_size=None,
        ),
        api_key=API_KEY,
    )  # fmt: skip
    url = pg_url(f"{tmp_path}-{point}-{trial}", run="shared")
    journal = await PostgresJournal.open(url)
    await ingest(
        journal,
        [chat_line(f"r-{i}", f"q {i}") for i in range(REQUESTS)],
        config=RunConfig(),
        clock=VirtualClock(),
        max_line_bytes=10_000_000,
    )
    # The how-many-th time it gets there (a worker claims its share at once, then only
    # when shards come free).
    schema = url.split("schema=")[1].split("&")[0]
    nth = 1 if point == "after_claim" else random.Random(f"{point}-{trial}").randint(1, 3)
    stalls = LoopStalls()
    try:
        async with serve(make_app(service)) as base_url:
            # The doomed worker starts first and takes the shards it plans (alone, all of
            # them); the others join, and adopt them once its leases lapse.
            workers = [await _worker(url, base_url, f"{point}:{nth}")]
            for _ in range(3000):  # at most a minute
                if workers[0].returncode is not None or await _leased(schema):
                    break
                await asyncio.sleep(0.02)
            workers += [await _worker(url, base_url, None) for _ in range(2)]
            codes = [await asyncio.wait_for(w.wait(), 240) for w in workers]
            errors = [(await w.stderr.read()).decode()[-2000:] for w in workers]  # type: ignore[union-attr]
    finally:
        await stalls.stop()
    assert codes == [-signal.SIGKILL, 0, 0], errors
    got = pg_server().psql(f"SELECT count(*), count(DISTINCT seq) FROM {schema}.aiobatch_results")
    assert got.strip() == f"{REQUESTS}|{REQUESTS}"
    shards = await journal.shards()
    await journal.close()
    assert shards and all(s.state.value == "collected" for s in shards)
    batches = [await service.get_batch(b) for b in service.batch_ids]
    per_shard = collections.Counter((b.metadata or {}).get("aiobatch_shard") for b in batches)
    assert per_shard == collections.Counter(s.key for s in shards)
    start = service.requests[0].at
    assert over_budget([r.at - start for r in service.requests], stalls.worst)[:3] == []


def test_the_kill_point_is_ignored_unless_testing_is_declared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``AIOBATCH_TEST_KILL_AT`` alone arms nothing in a shipped worker; only together
    with ``AIOBATCH_TESTING=1`` (as the kill trials set) does it."""
    from aiobatch._run._kill_hook import KillSwitch

    monkeypatch.delenv("AIOBATCH_TESTING", raising=False)
    monkeypatch.setenv("AIOBATCH_TEST_KILL_AT", "mid_create")
    assert KillSwitch.from_env() is None
    monkeypatch.setenv("AIOBATCH_TESTING", "1")
    switch = KillSwitch.from_env()
    assert switch is not None and switch.point == "mid_create"
