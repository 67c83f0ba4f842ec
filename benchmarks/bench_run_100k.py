"""Scale: 100,000 requests through ``BatchRun`` and the in-memory fake; wall time, memory.

The issue's goal: "100,000 requests through the in-memory fake: wall time and peak
memory."

Everything runs in one process per measurement (a fresh child process each, so one
measurement's freed memory does not hide the next one's growth): a
:class:`~aiobatch.testing.FakeBatchService` on a :class:`~aiobatch.testing.VirtualClock`
with ``auto_advance`` (time jumps whenever every task waits, so the wall time is CPU work
and disk I/O only), reached through the in-memory transport.

1. ``BatchRun``: ``--requests`` chat requests from a JSONL file, sharded at
   ``--max-lines`` (default 50,000: two batches; ``--max-lines 1000`` makes 100), with
   a journal and an output file (every result in input order).
2. Baseline, the naive peer practice, on a fresh fake, from the same file: split it into
   the same shards, upload each, ``create_batch``, ``client.wait()``, read every output
   (and error) file whole with ``file_content``, match the lines to their ``custom_id``
   in a dict (``json.loads`` of each line, the raw line kept), and write the same output
   file in input order. No journal, no resume, no retry rounds.
3. The floor, on a fresh fake: the same shards uploaded, created and waited for, each
   result file streamed with ``iter_file_lines`` and dropped. Nothing is parsed, kept or
   written: what the fake and the least possible client cost together.

Shown for each: wall time, requests/s, HTTP requests sent, simulated time, and the peak
RSS growth: the peak RSS during the run (``VmHWM``, reset at the start through
``/proc/self/clear_refs``) minus the RSS at its start (the input file is written, the
fake and the client exist). The fake lives in the measured process, so every figure
includes it. Its share of the time is the wall time spent inside its request handler
(it computes the lines' results and builds the result files there, and waits on
nothing, since no fault delays are configured), shown beside the time outside it; its
share of the memory is best read off the floor (and the bytes of the files it holds at
the end are shown). The journal's size on disk is the run's SQLite file (with its WAL).

4. ``BatchRun`` alone: the same run against ``aiobatch fake-server`` in another process
   (HTTP over loopback, the real clock, batches of a second or two), so the peak RSS
   growth is the runner's own, without the fake's (``--no-http`` skips it).

``--profile`` runs ``BatchRun`` once more under ``cProfile`` and prints where the time
goes (cumulative time of the run's phases and the fake, then the top functions by own
time); its timings are inflated by the profiler.

Run: ``python benchmarks/bench_run_100k.py [--requests 100000] [--max-lines 50000]
[--profile]``
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

from aiobatch import BatchClient, BatchRun, FleetConfig, RetryPolicy, RunConfig
from aiobatch.testing import FakeBatchService, FakeConfig, VirtualClock, chat_requests
from aiobatch.transport import AiohttpTransport, InMemoryTransport, Request, Response

MB = 1_000_000
ENDPOINT = _common.ENDPOINT
FILES = ("requests.jsonl", "run.journal", "output.jsonl")


# --- the fake -------------------------------------------------------------------------------


class Timed:
    """The fake's request handler, counting requests and the wall time spent in it.

    The handler waits on nothing (no fault delays are configured), so no other task runs
    between its start and its end: that time is the fake's own work.
    """

    def __init__(self, service: FakeBatchService) -> None:
        self.service = service
        self.transport: InMemoryTransport | None = None
        self.count = 0
        self.seconds = 0.0

    async def __call__(self, request: Request) -> Response:
        self.count += 1
        t0 = time.perf_counter()
        try:
            return await self.service.handle(request)
        finally:
            self.seconds += time.perf_counter() - t0


def fake() -> tuple[VirtualClock, FakeBatchService, BatchClient, Timed]:
    """A fake on a virtual clock (a batch validates 30 s, runs 100 lines/s, finalizes
    30 s) and a client of it through the in-memory transport and :class:`Timed`."""
    config = FakeConfig(
        validation_seconds=30,
        lines_per_second=100,
        finalizing_seconds=30,
        request_log_size=1000,
    )
    clock = VirtualClock(start=_common.T0)
    service = FakeBatchService(clock=clock, config=config, seed=0)
    timed = Timed(service)
    timed.transport = InMemoryTransport(timed, clock=clock)
    client = BatchClient(
        api_key=_common.KEY,
        base_url="http://fake.invalid/v1",
        transport=timed.transport,
        clock=clock,
        retry=RetryPolicy(max_attempts=3),
    )
    return clock, service, client, timed


def held_bytes(service: FakeBatchService) -> int:
    """Bytes of the files the fake holds (input and result files)."""
    return sum(len(service.file_content(file_id)) for file_id in service.file_ids)


# --- the measured children ------------------------------------------------------------------


async def run_runner(folder: Path, max_lines: int) -> dict[str, Any]:
    source, journal, output = (folder / name for name in FILES)
    clock, service, client, timed = fake()
    run = BatchRun(
        client, source, journal=journal, output=output, config=RunConfig(max_lines=max_lines)
    )
    resettable = _common.reset_peak()
    rss0 = _common.rss()
    t0 = time.perf_counter()
    async with clock.auto_advance():
        report = await run.run()
    seconds = time.perf_counter() - t0
    growth = _common.peak() - rss0
    row = {
        "seconds": seconds,
        "growth": growth,
        "rss0": rss0,
        "resettable": resettable,
        "http": timed.count,
        "fake_seconds": timed.seconds,
        "fake_bytes": held_bytes(service),
        "simulated": clock.now() - _common.T0,
        "batches": report.batches,
        "succeeded": report.succeeded,
        "failed": report.failed,
        "requests": report.requests,
    }
    await client.aclose()
    assert timed.transport is not None
    await timed.transport.aclose()
    return row


async def run_direct(folder: Path, max_lines: int, *, keep: bool) -> dict[str, Any]:
    """The same shards without a runner: upload, create, wait, then the result files.

    ``keep``: the naive peer (each file read whole, every line matched to its
    ``custom_id`` in a dict, the output written in input order). Without it, the floor:
    each result file streamed and dropped, nothing kept or written.
    """
    source = folder / FILES[0]
    output = folder / "naive-output.jsonl"
    clock, service, client, timed = fake()
    resettable = _common.reset_peak()
    rss0 = _common.rss()
    t0 = time.perf_counter()
    lines = source.read_bytes().splitlines()
    order = [json.loads(line)["custom_id"] for line in lines] if keep else []
    shards = [lines[i : i + max_lines] for i in range(0, len(lines), max_lines)]
    del lines
    found: dict[str, bytes] = {}
    seen = 0

    async def one(n: int, shard: list[bytes]) -> None:
        nonlocal seen
        content = b"\n".join(shard) + b"\n"
        shard.clear()
        uploaded = await client.upload_file(content, filename=f"shard-{n}.jsonl")
        del content
        batch = await client.create_batch(uploaded.id, ENDPOINT)
        batch = await client.wait(batch, poll_interval=5.0, max_interval=60.0)
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id is None:
                continue
            if not keep:
                async for _ in client.iter_file_lines(file_id):
                    seen += 1
                continue
            for raw in (await client.file_content(file_id)).splitlines():
                if raw:
                    found[json.loads(raw)["custom_id"]] = raw

    async with clock.auto_advance():
        await asyncio.gather(*(one(n, shard) for n, shard in enumerate(shards)))
    if keep:
        with open(output, "wb") as fh:  # noqa: ASYNC230 - the peer writes its output
            for custom_id in order:
                fh.write(found[custom_id])
                fh.write(b"\n")
    seconds = time.perf_counter() - t0
    growth = _common.peak() - rss0
    ok = sum(b'"status_code":200' in line for line in found.values())
    row = {
        "seconds": seconds,
        "growth": growth,
        "rss0": rss0,
        "resettable": resettable,
        "http": timed.count,
        "fake_seconds": timed.seconds,
        "fake_bytes": held_bytes(service),
        "simulated": clock.now() - _common.T0,
        "batches": len(shards),
        "succeeded": ok,
        "failed": len(found) - ok,
        "requests": len(order),
        "lines": seen,
    }
    await client.aclose()
    assert timed.transport is not None
    await timed.transport.aclose()
    return row


async def run_over_http(folder: Path, max_lines: int, base: str) -> dict[str, Any]:
    """``BatchRun`` against the fake in another process: only the runner is measured."""
    source, journal, output = (folder / name for name in FILES)
    transport = AiohttpTransport()
    fleet = FleetConfig(
        min_interval=0.1,
        max_interval=0.5,
        validating_interval=0.2,
        in_progress_interval=0.5,
        finalizing_interval=0.2,
        seed=0,
    )
    async with BatchClient(
        api_key=_common.KEY,
        base_url=base,
        transport=transport,
        retry=RetryPolicy(max_attempts=5),
    ) as client:
        config = RunConfig(max_lines=max_lines, fleet=fleet)
        run = BatchRun(client, source, journal=journal, output=output, config=config)
        resettable = _common.reset_peak()
        rss0 = _common.rss()
        t0 = time.perf_counter()
        report = await run.run()
        seconds = time.perf_counter() - t0
        growth = _common.peak() - rss0
    await transport.aclose()
    return {
        "seconds": seconds,
        "growth": growth,
        "rss0": rss0,
        "resettable": resettable,
        "batches": report.batches,
        "succeeded": report.succeeded,
        "requests": report.requests,
    }


PHASES = (
    ("preflight into the journal (ingest)", "_ingest.py", "ingest"),
    ("plan shards (plan)", "_planning.py", "plan"),
    ("write + upload shard files (upload)", "_submit.py", "upload"),
    ("collect result files (_read_file)", "_collect.py", "_read_file"),
    ("settle lines without a result (settle)", "_settle.py", "settle"),
    ("write the output file (_write_output)", "_batch_run.py", "_write_output"),
    ("the fake's request handler (FakeBatchService.handle)", "_service.py", "handle"),
)


def profile_summary(stats: pstats.Stats) -> str:
    """Cumulative time of the run's phases, then the top functions by own time."""
    total = max(stats.total_tt, 1e-9)  # type: ignore[attr-defined]
    out = [f"cProfile: {total:.1f}s in all (inflated by the profiler)"]
    table = stats.stats  # type: ignore[attr-defined]
    for label, filename, function in PHASES:
        cum = sum(
            row[3]
            for (path, _line, name), row in table.items()
            if path.endswith(filename) and name == function
        )
        out.append(f"  {label:56s} {cum:6.2f}s {100 * cum / total:5.1f}%")
    buffer = io.StringIO()
    stats.stream = buffer  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(15)
    body = buffer.getvalue()
    start = body.find("   ncalls")
    out.append(body[start:].rstrip() if start >= 0 else body)
    return "\n".join(out)


def child(args: argparse.Namespace) -> None:
    folder = Path(args.dir)
    if args.kind == "http":
        row = asyncio.run(run_over_http(folder, args.max_lines, args.base))
    elif args.kind in ("naive", "floor"):
        row = asyncio.run(run_direct(folder, args.max_lines, keep=args.kind == "naive"))
    elif args.kind == "runner":
        row = asyncio.run(run_runner(folder, args.max_lines))
        journal = folder / FILES[1]
        row["journal_bytes"] = sum(
            os.path.getsize(f"{journal}{suffix}")
            for suffix in ("", "-wal")
            if os.path.exists(f"{journal}{suffix}")
        )
        row["output_bytes"] = (folder / FILES[2]).stat().st_size
    else:  # profile
        profiler = cProfile.Profile()
        profiler.enable()
        asyncio.run(run_runner(folder, args.max_lines))
        profiler.disable()
        row = {"profile": profile_summary(pstats.Stats(profiler))}
    print(json.dumps(row), flush=True)


def spawn(folder: str, kind: str, max_lines: int, *extra: str) -> dict[str, Any]:
    """Run one measurement in a fresh process; its figures."""
    cmd = [sys.executable, __file__, "child", kind, "--dir", folder, "--max-lines", str(max_lines)]
    cmd.extend(extra)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    row: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return row


def clean(folder: Path) -> None:
    """Remove a run's journal and outputs (keep the input)."""
    for path in folder.iterdir():
        if path.name != FILES[0]:
            if path.is_dir():
                for inner in path.iterdir():
                    inner.unlink()
                path.rmdir()
            else:
                path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    child_cmd = sub.add_parser("child", help="(internal) one measurement")
    child_cmd.add_argument("kind", choices=("runner", "naive", "floor", "http", "profile"))
    child_cmd.add_argument("--base", help="the fake server's URL (http)")
    child_cmd.add_argument("--dir", required=True)
    child_cmd.add_argument("--max-lines", type=int, required=True)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--max-lines", type=int, default=50_000, help="requests per batch")
    parser.add_argument("--profile", action="store_true", help="also a BatchRun under cProfile")
    parser.add_argument(
        "--no-http", action="store_true", help="skip the run against a fake in another process"
    )
    parser.add_argument("--work-dir", default=None, help="where the files go (default: a temp dir)")
    args = parser.parse_args()
    if args.command == "child":
        child(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench-100k-", dir=args.work_dir) as name:
        folder = Path(name)
        (folder / FILES[0]).write_bytes(chat_requests(args.requests, prefix="r"))
        input_mb = (folder / FILES[0]).stat().st_size / MB
        runner = spawn(name, "runner", args.max_lines)
        naive = spawn(name, "naive", args.max_lines)
        floor = spawn(name, "floor", args.max_lines)
        http = None
        if not args.no_http:
            clean(folder)
            timings = ("--validation-seconds", "0.5", "--finalizing-seconds", "0.5")
            with _common.fake_server(*timings, "--lines-per-second", "100000") as base:
                http = spawn(name, "http", args.max_lines, "--base", base)
        profile = None
        if args.profile:
            clean(folder)
            profile = spawn(name, "profile", args.max_lines)["profile"]

    n = args.requests
    print()
    print(
        f"{n} chat requests ({input_mb:.1f} MB of input), shards of {args.max_lines} lines, "
        "in-memory fake on a virtual clock, each measurement in a fresh process"
    )
    if not runner["resettable"]:
        print("(clear_refs refused: peaks are since the process started)")
    print(
        f"{'':30s} {'wall s':>7s} {'req/s':>8s} {'peak growth MB':>15s} {'batches':>8s} "
        f"{'HTTP':>5s} {'sim. s':>7s} {'in fake s':>10s} {'outside s':>10s}"
    )
    rows = (
        ("BatchRun", runner),
        ("naive peer (baseline)", naive),
        ("floor: fake + streamed reads", floor),
    )
    for label, row in rows:
        print(
            f"{label:30s} {row['seconds']:7.2f} {n / row['seconds']:8.0f} "
            f"{row['growth']:15.1f} {row['batches']:8d} {row['http']:5d} "
            f"{row['simulated']:7.0f} {row['fake_seconds']:10.2f} "
            f"{row['seconds'] - row['fake_seconds']:10.2f}"
        )

    def outside(row: dict[str, Any]) -> float:
        return max(float(row["seconds"] - row["fake_seconds"]), 1e-9)

    print(
        f"ratio BatchRun / naive: wall {runner['seconds'] / naive['seconds']:.2f}x, "
        f"outside the fake {outside(runner) / outside(naive):.2f}x, "
        f"peak growth {runner['growth'] / max(naive['growth'], 1e-9):.2f}x"
    )
    print(
        f"above the floor: BatchRun +{runner['seconds'] - floor['seconds']:.2f}s "
        f"+{runner['growth'] - floor['growth']:.1f} MB, naive "
        f"+{naive['seconds'] - floor['seconds']:.2f}s +{naive['growth'] - floor['growth']:.1f} MB"
    )
    print(
        f"the fake holds {runner['fake_bytes'] / MB:.1f} MB of files at the end; RSS at the "
        f"start {runner['rss0']:.1f} MB"
    )
    if http is not None:
        print(
            f"BatchRun alone (the fake in another process, HTTP, real clock): peak growth "
            f"{http['growth']:.1f} MB over an RSS of {http['rss0']:.1f} MB; "
            f"{http['seconds']:.2f}s wall ({http['succeeded']} of {http['requests']} "
            f"succeeded; the wall time includes the server's work)"
        )
    print(
        f"BatchRun: {runner['succeeded']} succeeded, {runner['failed']} failed of "
        f"{runner['requests']}; journal on disk {runner['journal_bytes'] / MB:.1f} MB; "
        f"output file {runner['output_bytes'] / MB:.1f} MB"
    )
    print(
        f"naive: {naive['succeeded']} succeeded, {naive['failed']} failed; floor: "
        f"{floor['lines']} result lines streamed"
    )
    if profile is not None:
        print()
        print(profile)


if __name__ == "__main__":
    main()
