"""Scale-out: one run carried by 1, 2 and 4 ``aiobatch worker`` processes on a PostgreSQL
journal, against ``aiobatch fake-server`` in another process; and the same run by
``aiobatch run`` on the SQLite journal, for comparison.

The issue's goal: 1,000,000 requests (20 shards of 50,000) with 1, 2 and 4 workers: wall
time, requests per second, CPU per worker, database size.

For each worker count, a fresh database on a throwaway PostgreSQL server
(:class:`~aiobatch.testing.TempPostgres`, Unix socket, fsync off) gets the run's requests
(ingested by this process, timed apart), then N worker processes start at once and carry
the run until every request has its result; the wall time is from their start to the last
one's exit, and each worker's CPU (user + system) comes from its rusage. The database size
is ``pg_database_size`` at the end. The SQLite run is ``aiobatch run`` from the same
JSONL file (it ingests, runs and writes the output file, all in its wall time); its size
is the journal file's. The server's own CPU (PostgreSQL's, the fake's) is shown apart.

Run: ``python benchmarks/bench_run_postgres.py [--requests 1000000] [--shards 20]
[--workers 1,2,4] [--no-sqlite]``

Measured on the 2-core machine, shared with other work while it ran (so +-20%), at
200,000 requests in 20 shards of 10,000 (``--requests 200000``: the full 1,000,000 would
have taken some 25 minutes, more than was left; not run)::

    run                    ingest s   wall s    req/s CPU s per worker           db MB
    sqlite, aiobatch run        0.0     57.7    3,465 13.7                         224
    postgres, 1 worker          7.5     84.8    2,360 6.9                          409
    postgres, 2 workers        10.3     53.8    3,720 3.0, 4.9                     388
    postgres, 4 workers         7.4     75.2    2,658 2.8, 2.9, 0.9, 2.7           407

(the SQLite wall time includes its ingest and writing the output file; the workers write
no output file). What limits scaling here: the two cores carry the workers, the
PostgreSQL server and the fake server (which builds every result file) at once; a worker
itself spends 3-7 s of CPU per 200,000 requests and waits the rest of the time on the
database and the fake. Two workers overlap one's waits with the other's work; four only
add processes contending for the same two cores, plus their heartbeats and polls (one
worker got few shards: it joined after the others took their shares, and shards are let
go only at a heartbeat, every third of the 10 s lease). On separate machines, with the
database on its own, the workers' CPU divides among them, and the run should scale with
the workers until the database's writes (about 2 kB of rows per request: ~400 MB here)
or the provider's rate limit bind.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import KEY, fake_server

from aiobatch import RunConfig
from aiobatch._run._ingest import ingest
from aiobatch._run._postgres import PostgresJournal
from aiobatch.testing import VirtualClock, chat_requests
from aiobatch.testing._postgres import TempPostgres

_MAIN = "import sys; from aiobatch.cli import main; sys.exit(main())"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _wait_all(procs: list[subprocess.Popen[bytes]]) -> list[tuple[int, float]]:
    """Wait for every process; each one's exit code and CPU seconds (user + system)."""
    done: dict[int, tuple[int, float]] = {}
    while len(done) < len(procs):
        pid, status, usage = os.wait4(-1, 0)
        if any(p.pid == pid for p in procs):
            done[pid] = (os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime)
    for proc in procs:
        proc.returncode = done[proc.pid][0]
    return [done[p.pid] for p in procs]


async def _ingest(url: str, source: Path) -> float:
    start = time.perf_counter()
    journal = await PostgresJournal.open(url)
    try:
        await ingest(
            journal, str(source), config=RunConfig(), clock=VirtualClock(), max_line_bytes=10**8
        )
    finally:
        await journal.close()
    return time.perf_counter() - start


def _env() -> dict[str, str]:
    return {**os.environ, "OPENAI_API_KEY": KEY}


def postgres_run(
    pg: TempPostgres, base: str, source: Path, n: int, workers: int, max_lines: int
) -> dict[str, object]:
    url = pg.create_database(f"bench_{workers}") + "&run=bench"
    ingest_s = asyncio.run(_ingest(url, source))
    start = time.perf_counter()
    command = [
        sys.executable, "-c", _MAIN, "worker", "--journal", url, "--lease", "10s",
        "--max-lines", str(max_lines), "--poll-max", "1", "--base-url", base,
        "--create-settle", "0.2", "-q",
    ]  # fmt: skip
    procs = [
        subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL) for _ in range(workers)
    ]
    results = _wait_all(procs)
    wall = time.perf_counter() - start
    size = int(pg.psql(f"SELECT pg_database_size('bench_{workers}')").strip())
    results_n = int(pg.psql("SELECT count(*) FROM aiobatch_results", f"bench_{workers}").strip())
    return {
        "what": f"postgres, {workers} worker{'s' if workers > 1 else ''}",
        "ingest": ingest_s,
        "wall": wall,
        "rate": n / wall,
        "cpu": [cpu for _, cpu in results],
        "codes": [code for code, _ in results],
        "size": size,
        "results": results_n,
    }


def sqlite_run(base: str, source: Path, n: int, max_lines: int, folder: Path) -> dict[str, object]:
    journal, out = folder / "run.journal", folder / "out.jsonl"
    start = time.perf_counter()
    command = [
        sys.executable, "-c", _MAIN, "run", str(source), "-o", str(out), "--journal",
        str(journal), "--max-lines", str(max_lines), "--poll-min", "0.5", "--poll-max", "1",
        "--base-url", base, "--create-settle", "0.2", "--no-progress", "-q",
    ]  # fmt: skip
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL)
    [(code, cpu)] = _wait_all([proc])
    wall = time.perf_counter() - start
    size = sum(p.stat().st_size for p in folder.glob("run.journal*"))
    with out.open("rb") as fh:
        lines = sum(1 for _ in fh)
    return {
        "what": "sqlite, aiobatch run",
        "ingest": 0.0,
        "wall": wall,
        "rate": n / wall,
        "cpu": [cpu],
        "codes": [code],
        "size": size,
        "results": lines,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--no-sqlite", action="store_true")
    args = parser.parse_args()
    n, max_lines = args.requests, -(-args.requests // args.shards)
    print(f"{n:,} requests, {args.shards} shards of {max_lines:,}, {os.cpu_count()} cores")
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = folder / "requests.jsonl"
        source.write_bytes(chat_requests(n, prefix="r"))
        timings = ("--validation-seconds", "0.5", "--finalizing-seconds", "0.5")
        with fake_server(*timings, "--lines-per-second", "200000") as base:
            if not args.no_sqlite:
                rows.append(sqlite_run(base, source, n, max_lines, folder))
                print(rows[-1], flush=True)
            pg = TempPostgres().start()
            try:
                for workers in (int(w) for w in args.workers.split(",")):
                    rows.append(postgres_run(pg, base, source, n, workers, max_lines))
                    print(rows[-1], flush=True)
            finally:
                pg.stop()
    print()
    print(f"{'run':<22} {'ingest s':>8} {'wall s':>8} {'req/s':>8} {'CPU s per worker':<24} "
          f"{'db MB':>7} results")  # fmt: skip
    for row in rows:
        cpu = ", ".join(f"{c:.1f}" for c in row["cpu"])  # type: ignore[attr-defined]
        print(
            f"{row['what']:<22} {row['ingest']:>8.1f} {row['wall']:>8.1f} {row['rate']:>8,.0f} "
            f"{cpu:<24} {int(row['size']) / 1e6:>7.0f} {row['results']:,}"  # type: ignore[call-overload]
        )
    print(f"(the children's CPU in all, servers included: {_children_cpu():.0f} s)")


if __name__ == "__main__":
    main()
