"""Ingest: a new run's input file checked by preflight into a SQLite journal; CPU and wall time.

The first phase of every run (``aiobatch._run._ingest.ingest``): each line of
``--requests`` chat requests (``aiobatch.testing.chat_requests``, the input of
``bench_run_100k.py``) is read, hashed, decoded and checked, its prompt tokens
estimated, and the accepted requests cut into shards of 50,000 lines (OpenAI's limits)
and written, queued in them, to a fresh journal in one transaction (duplicate
``custom_id`` found by the journal's unique index).

Beside it, the floor of the naive peer in ``bench_run_100k.py``: the same file read
whole, split into lines and ``json.loads`` of each for its ``custom_id``.

Each is measured ``--repeat`` times (default 5), alternately, in this process, each
ingest into a new journal file; the wall time and the process CPU time are shown (the
machine may be shared: CPU time moves less than wall time when other processes run),
with their medians and the ratio of the medians. ``--profile`` runs one more ingest
under ``cProfile`` and prints the functions by own time (inflated by the profiler).

Run: ``python benchmarks/bench_ingest.py [--requests 100000] [--repeat 5] [--profile]``
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import json
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from aiobatch import RunConfig
from aiobatch._run._ingest import ingest
from aiobatch._run._planning import ShardLimits
from aiobatch._run._preflight import DEFAULT_MAX_LINE_BYTES
from aiobatch._run._sqlite_journal import SQLiteJournal
from aiobatch.testing import VirtualClock, chat_requests


async def _ingest(source: Path, journal: Path) -> None:
    store = SQLiteJournal(journal, create=True)
    try:
        await ingest(
            store,
            str(source),
            config=RunConfig(),
            clock=VirtualClock(),
            max_line_bytes=DEFAULT_MAX_LINE_BYTES,
            plan=ShardLimits(max_lines=50_000, max_bytes=DEFAULT_MAX_LINE_BYTES),
        )
    finally:
        await store.close()


def _naive(source: Path) -> None:
    ids = [json.loads(line)["custom_id"] for line in source.read_bytes().splitlines()]
    assert ids


def _timed(work: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = folder / "requests.jsonl"
        source.write_bytes(chat_requests(args.requests, prefix="r"))
        mb = source.stat().st_size / 1e6
        print(f"{args.requests} chat requests ({mb:.1f} MB), {args.repeat} measurements each")
        rows: dict[str, list[tuple[float, float]]] = {"ingest": [], "naive json.loads": []}
        for n in range(args.repeat):
            run = functools.partial(asyncio.run, _ingest(source, folder / f"run-{n}.journal"))
            rows["ingest"].append(_timed(run))
            rows["naive json.loads"].append(_timed(functools.partial(_naive, source)))
        print(f"{'':18}{'wall s median (min-max)':>28}{'CPU s median (min-max)':>28}")
        medians = {}
        for name, found in rows.items():
            walls, cpus = [w for w, _ in found], [c for _, c in found]
            medians[name] = (statistics.median(walls), statistics.median(cpus))
            print(
                f"{name:18}{medians[name][0]:>14.3f} ({min(walls):.3f}-{max(walls):.3f})"
                f"{medians[name][1]:>14.3f} ({min(cpus):.3f}-{max(cpus):.3f})"
            )
        ingest_cpu, naive_cpu = medians["ingest"][1], medians["naive json.loads"][1]
        print(
            f"ingest: {args.requests / medians['ingest'][0]:,.0f} lines/s (wall); "
            f"CPU {ingest_cpu / naive_cpu:.1f}x the naive floor's"
        )
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            asyncio.run(_ingest(source, folder / "profiled.journal"))
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
