"""Scale: 10,000 batches created, tracked to completion by one Fleet, and collected.

Everything runs in one process through the in-memory transport on a virtual clock
(time jumps whenever every task waits, so the wall time is CPU work only).

Part 1, end to end: ``--batches`` batches of ``--lines`` lines are created (upload +
``client.create_batch``) and handed to one :class:`~aiobatch.Fleet` as they are made;
they finish at seeded random times within a simulated hour; as each ``BatchDone``
arrives its output file is streamed with ``client.iter_results`` (8 collectors). We
print the wall time of each stage and the peak of traced memory (``tracemalloc``),
which includes the fake service's own state (every input and output file), so it is
an upper bound of what aiobatch needs. It runs untraced (wall time, max RSS); with
``--traced-peak`` it runs again under ``tracemalloc`` for the peak of traced memory
(about six times slower: ~8 minutes at 10,000 batches on 2 cores).

Part 2, memory per tracked batch, excluding the fake service: a fresh service holds
``--batches`` batches that stay ``in_progress`` for the whole measurement. A fleet is
given their snapshots (the caller then drops its references, so the fleet alone holds
what it keeps), and runs until it has observed every batch once (one list sweep) and
is asleep (no request for 10 virtual seconds). Then, under ``tracemalloc``, after
``gc.collect()``: ``full`` = traced memory now; the fleet is closed and deleted;
``freed`` = ``full`` minus traced memory after collecting again. ``freed`` is what the
fleet held with N batches tracked (the service is not touched in between: closing a
fleet sends nothing). The same is measured for a fleet with no batch, and
``(freed_N - freed_0) / N`` is the memory per tracked batch. The largest allocation
sites of the difference are listed. As a second figure, the memory per *finished*
batch: a fleet whose batches all ended keeps each outcome (a ``BatchDone`` with the last
snapshot), measured the same way at the end of the traced part 1 (``--traced-peak``).

Run: ``python benchmarks/bench_fleet_scale.py [--batches 10000] [--lines 10] [--traced-peak]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import time
import tracemalloc
from typing import Any

import _common

from aiobatch import BatchDone, Fleet, FleetConfig, FleetEvent, StatusChanged
from aiobatch.testing import FakeConfig

COLLECTORS = 8


async def traced() -> int:
    """Traced bytes in use, once the loop has run what was pending and gc has run."""
    for _ in range(5):  # callbacks of cancelled tasks still hold their frames until run
        await asyncio.sleep(0)
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def end_to_end(batches: int, lines: int, *, measure_outcomes: bool) -> dict[str, Any]:
    config = FakeConfig(
        validation_seconds=30,
        finalizing_seconds=30,
        processing_seconds=_common.Spread(0.0, 3540.0),
        request_log_size=1000,
    )
    clock, _service, client = _common.in_memory(config)
    fleet = Fleet(client, config=FleetConfig(seed=0))
    queue: asyncio.Queue[BatchDone | None] = asyncio.Queue()
    results = missing = 0

    async def collect() -> None:
        nonlocal results, missing
        while (done := await queue.get()) is not None:
            if done.batch is None or done.batch.output_file_id is None:
                missing += 1
                continue
            async for _ in client.iter_results(done.batch.output_file_id):
                results += 1

    row: dict[str, Any] = {}
    wall0 = time.perf_counter()
    async with clock.auto_advance():
        collectors = [asyncio.ensure_future(collect()) for _ in range(COLLECTORS)]
        for n in range(batches):
            (batch,) = await _common.create_batches(client, 1, lines=lines, start=n)
            fleet.add(batch)
        row["create"] = time.perf_counter() - wall0
        async for done in fleet.as_completed():
            queue.put_nowait(done)
        row["track"] = time.perf_counter() - wall0 - row["create"]
        for _ in collectors:
            queue.put_nowait(None)
        await asyncio.gather(*collectors)
    row["wall"] = time.perf_counter() - wall0
    row["collect_tail"] = row["wall"] - row["create"] - row["track"]
    row["results"] = results
    row["missing"] = missing
    row["requests"] = fleet.stats.requests
    row["virtual"] = clock.now() - _common.T0
    if measure_outcomes:
        del done
        full = await traced()
        await fleet.aclose()
        del fleet
        row["outcome_bytes"] = (full - await traced()) / batches
    else:
        await fleet.aclose()
    await client.aclose()
    return row


async def tracked_memory(batches: int) -> dict[str, Any]:
    config = FakeConfig(validation_seconds=5, lines_per_second=0.0001, request_log_size=1000)
    clock, service, client = _common.in_memory(config)

    async def held(given: list[Any]) -> tuple[int, list[tracemalloc.StatisticDiff]]:
        """Bytes a fleet tracking ``given`` holds once asleep (``given`` is emptied)."""
        count = len(given)
        seen: set[str] = set()

        def on_event(event: FleetEvent) -> None:
            if isinstance(event, StatusChanged):
                seen.add(event.batch_id)

        fleet = Fleet(client, config=FleetConfig(seed=0), on_event=on_event)
        fleet.add_many(given)
        given.clear()  # from now on the fleet alone holds what it keeps
        async with clock.auto_advance():
            quiet_since, last = clock.now(), service.request_count()
            while len(seen) < count or clock.now() - quiet_since < 10:
                await clock.sleep(1)
                if service.request_count() != last:
                    quiet_since, last = clock.now(), service.request_count()
        full = await traced()
        before = tracemalloc.take_snapshot()
        await fleet.aclose()
        del fleet
        freed = full - await traced()
        top = before.compare_to(tracemalloc.take_snapshot(), "lineno")[:6]
        return freed, top

    empty, _ = await held([])
    freed, top = await held(await _common.create_batches(client, batches, lines=10))
    await client.aclose()
    return {"empty": empty, "freed": freed, "per_batch": (freed - empty) / batches, "top": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10_000)
    parser.add_argument("--lines", type=int, default=10, help="requests per batch")
    parser.add_argument(
        "--traced-peak", action="store_true", help="re-run end to end under tracemalloc"
    )
    args = parser.parse_args()
    n = args.batches

    plain = asyncio.run(end_to_end(n, args.lines, measure_outcomes=False))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()
    memory = asyncio.run(tracked_memory(n))
    tracemalloc.stop()
    traced_run: dict[str, Any] | None = None
    if args.traced_peak:
        tracemalloc.start()
        traced_run = asyncio.run(end_to_end(n, args.lines, measure_outcomes=True))
        traced_run["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

    print(f"\n{n} batches x {args.lines} lines, in-memory fake, virtual clock")
    print(
        f"end to end: {plain['wall']:.1f}s wall = create {plain['create']:.1f}s "
        f"+ track/collect {plain['track']:.1f}s + collect tail {plain['collect_tail']:.1f}s; "
        f"{plain['virtual']:.0f} simulated s; max RSS {rss:.0f} MiB (fake service included)"
    )
    print(
        f"  fleet requests {plain['requests']}, result lines collected {plain['results']} "
        f"of {n * args.lines}, batches without output {plain['missing']}"
    )
    print(
        f"memory per tracked batch (fleet only): {memory['per_batch']:.0f} B "
        f"= ({memory['freed'] / 2**20:.2f} MiB with {n} tracked - {memory['empty']} B empty)"
        f" / {n}   (goal < 4096 B)"
    )
    if traced_run is not None:
        print(
            f"end to end under tracemalloc: {traced_run['wall']:.1f}s wall; peak traced memory "
            f"{traced_run['peak'] / 2**20:.1f} MiB (fake service included)"
        )
        print(f"memory per finished batch (outcome kept): {traced_run['outcome_bytes']:.0f} B")
    else:
        print("(--traced-peak: also the tracemalloc peak of the end-to-end run; ~6x slower)")
    print("largest allocation sites of what the fleet held (freed when it went):")
    for stat in memory["top"]:
        frame = stat.traceback[0]
        where = f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}"
        print(f"  {stat.size_diff / n:8.0f} B/batch  {where}:{frame.lineno}")


if __name__ == "__main__":
    main()
