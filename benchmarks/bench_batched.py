"""The coalescing client against BatchRun: N concurrent awaited calls through the
in-memory fake, versus the same N requests run as a JSONL file by ``BatchRun``.

Both run on a virtual clock (auto-advancing), so the wall time is the client's own
work. Printed: wall time and CPU time of each, the ratio per request (the goal: within
1.5x of BatchRun), peak RSS of the process, and the memory each pending call holds
beyond its request body (tracemalloc, measured while every call is queued and none
flushed; the goal: under 2 KiB). With ``--repeat R`` the pair runs R times (in turn) and
the median and spread (min..max) of the ratios are printed: on a shared machine the CPU
time ratio is the steadier figure (the process does all its work in one thread).

Run: ``python benchmarks/bench_batched.py [--calls 100000] [--repeat 1]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from aiobatch import BatchedOpenAI, BatchRun, FleetConfig, RunConfig
from aiobatch.testing import FakeConfig, fake_client

FLEET = FleetConfig(min_interval=5.0, max_interval=30.0, jitter=0.0, seed=0)
FAKE = FakeConfig(
    validation_seconds=30.0, lines_per_second=2000.0, finalizing_seconds=10.0, request_log_size=0
)


def body(i: int) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"question {i}"}]}


async def batched(n: int, folder: str) -> tuple[float, float]:
    async with fake_client(config=FAKE) as fake, fake.clock.auto_advance():
        start = time.perf_counter()
        cpu = time.process_time()
        async with BatchedOpenAI(
            fake.client,
            journal=folder,
            config=RunConfig(fleet=FLEET),
            max_pending=n,
            sdk_types=False,
        ) as client:
            results = await asyncio.gather(
                *(client.chat.completions.create(**body(i)) for i in range(n))
            )
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
    assert len(results) == n
    return wall, cpu


async def batch_run(n: int, folder: str, *, keep: bool = False) -> tuple[float, float]:
    """BatchRun over the requests as a file; ``keep``: its results are kept in a list,
    as the awaited calls' results are (by gather)."""
    source = Path(folder) / "requests.jsonl"
    with source.open("w") as fh:
        for i in range(n):
            line = {"custom_id": f"r-{i}", "method": "POST", "url": "/v1/chat/completions"}
            fh.write(json.dumps({**line, "body": body(i)}) + "\n")
    async with fake_client(config=FAKE) as fake, fake.clock.auto_advance():
        start = time.perf_counter()
        cpu = time.process_time()
        run = BatchRun(
            fake.client,
            str(source),
            journal=Path(folder) / "run.journal",
            config=RunConfig(fleet=FLEET, order="completion"),
        )
        count = 0
        kept = []
        runner = asyncio.ensure_future(run.run())
        async for result in run.results():
            count += 1
            if keep:
                kept.append(result.result)
        await runner
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
    assert count == n
    return wall, cpu


async def pending_bytes(n: int) -> float:
    """Bytes each queued call holds beyond its request body (nothing flushed yet)."""
    async with fake_client(config=FAKE) as fake:
        client = BatchedOpenAI(fake.client, max_wait=1e9, max_pending=n + 1, sdk_types=False)
        await client.start()
        bodies = [body(i) for i in range(n)]
        body_bytes = sum(len(json.dumps(b, separators=(",", ":"))) + 80 for b in bodies)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        tasks = [asyncio.ensure_future(client.chat.completions.create(**b)) for b in bodies]
        await asyncio.sleep(0)
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert client.stats().queued == n
        await client.aclose(cancel=True)
        await asyncio.gather(*tasks, return_exceptions=True)
    return (held - body_bytes) / n


def spread(values: list[float]) -> str:
    """Median and min..max of ratios."""
    return f"{statistics.median(values):.2f}x (min {min(values):.2f}x, max {max(values):.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    n = args.calls
    walls: list[float] = []
    cpus: list[float] = []
    kept_cpus: list[float] = []
    for round_ in range(1, args.repeat + 1):
        with (
            tempfile.TemporaryDirectory() as a,
            tempfile.TemporaryDirectory() as b,
            tempfile.TemporaryDirectory() as c,
        ):
            run_wall, run_cpu = asyncio.run(batch_run(n, b))
            batched_wall, batched_cpu = asyncio.run(batched(n, a))
            kept_wall, kept_cpu = asyncio.run(batch_run(n, c, keep=True))
        walls.append(batched_wall / run_wall)
        cpus.append(batched_cpu / run_cpu)
        kept_cpus.append(batched_cpu / kept_cpu)
        print(f"round {round_}: {n:,} requests")
        for name, wall, cpu in (
            ("BatchRun (file)", run_wall, run_cpu),
            ("BatchedOpenAI (calls)", batched_wall, batched_cpu),
            ("BatchRun keeping results", kept_wall, kept_cpu),
        ):
            print(
                f"  {name:25s} {wall:6.2f} s wall {cpu:6.2f} s CPU "
                f"{cpu / n * 1e6:6.1f} us CPU/request"
            )
        print(
            f"  ratio: {walls[-1]:.2f}x wall, {cpus[-1]:.2f}x CPU "
            f"({kept_cpus[-1]:.2f}x CPU of BatchRun keeping its results)"
        )
    per_call = asyncio.run(pending_bytes(min(n, 20_000)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"ratio to BatchRun, wall: {spread(walls)} (goal <= 1.5x)")
    print(f"ratio to BatchRun, CPU:  {spread(cpus)} (goal <= 1.5x)")
    print(f"ratio to BatchRun keeping its results, CPU: {spread(kept_cpus)}")
    print(f"per pending call beyond its line: {per_call:,.0f} B (goal < 2048)")
    print(f"peak RSS of the process: {peak:,.0f} MiB")


if __name__ == "__main__":
    main()
