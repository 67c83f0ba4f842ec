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

``--repeat R`` (default 2) measures ``BatchRun`` and the naive peer R times each,
alternately (runner, naive, runner, naive...), each in a fresh process, and gives the
ratio of each pair and their median and spread: the machine may be shared, so only a
ratio to a baseline measured next to it means something. The output files of the
runner and of the naive peer are compared byte for byte, and else without the fake's
line ids (``id``, ``response.request_id``: derived from the batch's id, which the fake
gives in the order it makes files and batches; with many shards the runner and the
naive peer upload and create in different orders), and the runner's SHA-256 is shown
(to compare with another version of aiobatch: the same input gives the same file).

``--sizes 10000,1000000`` makes the run against the fake in another process (4.) at each
of these request counts: the runner's own peak memory growth by size (the journal holds
the requests; the runner should not).

``--lag`` measures how long the run holds the event loop: the run against the fake in
another process, while a :class:`~aiobatch.Fleet` on the same client polls 50 other
batches (open for the whole run) and a probe task sleeps 5 ms over and over; each
oversleep is a stall of the loop. The longest stalls are shown with what the run was
doing (its progress at the time).

``--profile`` runs ``BatchRun`` once more under ``cProfile`` and prints where the time
goes (cumulative time of the run's phases and the fake, then the top functions by own
time); its timings are inflated by the profiler.

Run: ``python benchmarks/bench_run_100k.py [--requests 100000] [--max-lines 50000]
[--repeat 2] [--sizes N,N...] [--lag] [--no-http] [--profile]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import hashlib
import io
import json
import os
import pstats
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

from aiobatch import (
    BatchClient,
    BatchRun,
    Fleet,
    RetryPolicy,
    RunConfig,
    RunProgress,
)
from aiobatch.testing import (
    FakeBatchService,
    FakeConfig,
    VirtualClock,
    chat_requests,
    run_fake_server,
)
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


#: Other batches a fleet polls during the ``--lag`` run.
OTHER_BATCHES = 50
#: The probe's sleep: each oversleep past it is a stall of the loop.
PROBE_SLEEP = 0.005


class LagProbe:
    """Sleeps :data:`PROBE_SLEEP` over and over; notes each oversleep (a stall of the
    loop) with what the run was doing (its last progress) at the time.

    On a shared machine a stall also counts the time the process waited for a core, so
    the CPU time the loop's thread spent between two wake-ups is noted too: the work
    done in that time (the loop was held by it, or ran other callbacks).
    """

    def __init__(self) -> None:
        self.stalls: list[tuple[float, float, str]] = []  # (seconds, at, doing)
        self.busy: list[float] = []  # CPU seconds of the loop's thread per sleep
        self.doing = "ingest (preflight into the journal)"
        self.t0 = time.perf_counter()

    def on_progress(self, progress: RunProgress) -> None:
        batches = ", ".join(f"{n} {name}" for name, n in sorted(progress.batches.items()))
        self.doing = f"{progress.state}; {progress.done}/{progress.total} done; {batches}"

    async def run(self) -> None:
        while True:
            start = time.perf_counter()
            cpu = time.thread_time()
            doing = self.doing
            await asyncio.sleep(PROBE_SLEEP)
            late = time.perf_counter() - start - PROBE_SLEEP
            self.stalls.append((late, start - self.t0, doing))
            self.busy.append(time.thread_time() - cpu)


async def run_over_http(
    folder: Path, max_lines: int, base: str, *, lag: bool = False
) -> dict[str, Any]:
    """``BatchRun`` against the fake in another process: only the runner is measured.

    ``lag``: a fleet polls other batches meanwhile and a probe measures the stalls.
    """
    source, journal, output = (folder / name for name in FILES)
    transport = AiohttpTransport()
    fleet = _common.quick_fleet()
    probe = LagProbe() if lag else None
    tasks: list[asyncio.Task[None]] = []
    async with BatchClient(
        api_key=_common.KEY,
        base_url=base,
        transport=transport,
        retry=RetryPolicy(max_attempts=5),
    ) as client:
        others: Fleet | None = None
        if probe is not None:
            batches = await _common.create_batches(client, OTHER_BATCHES, prefix="other")
            others = Fleet(client, config=fleet)
            others.add_many(batches)

            async def drain(fleet: Fleet) -> None:
                async for _ in fleet.events():
                    pass

            tasks = [asyncio.ensure_future(drain(others)), asyncio.ensure_future(probe.run())]
        config = RunConfig(max_lines=max_lines, fleet=fleet)
        run = BatchRun(
            client,
            source,
            journal=journal,
            output=output,
            config=config,
            on_progress=probe.on_progress if probe is not None else None,
        )
        resettable = _common.reset_peak()
        rss0 = _common.rss()
        t0 = time.perf_counter()
        if probe is not None:
            probe.t0 = t0
        report = await run.run()
        seconds = time.perf_counter() - t0
        growth = _common.peak() - rss0
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        if others is not None:
            polls = len(others.open_ids)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(others.aclose(), 10)
    await transport.aclose()
    row: dict[str, Any] = {
        "seconds": seconds,
        "growth": growth,
        "rss0": rss0,
        "resettable": resettable,
        "batches": report.batches,
        "succeeded": report.succeeded,
        "requests": report.requests,
    }
    if probe is not None:
        stalls = sorted(probe.stalls, reverse=True)
        lags = [late for late, _at, _doing in probe.stalls]
        row["lag"] = {
            "probes": len(lags),
            "max": max(lags, default=0.0),
            "p99": _common.percentile(lags, 99),
            "over_50ms": sum(late > 0.05 for late in lags),
            "busy_max": max(probe.busy, default=0.0),
            "busy_p99": _common.percentile(probe.busy, 99),
            "busy_over_50ms": sum(cpu > 0.05 for cpu in probe.busy),
            "top": stalls[:8],
            "others_open": polls,
        }
    return row


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


async def serve(port: int) -> None:
    """A fake server whose one-line batches stay in progress for an hour (the other
    batches of ``--lag``) while the run's batches take a second or two."""

    def seconds(_batch_id: str, lines: int) -> float:
        return 3600.0 if lines == 1 else max(0.5, lines / 100_000)

    config = FakeConfig(
        validation_seconds=0.5,
        finalizing_seconds=0.5,
        processing_seconds=seconds,
        request_log_size=1000,
    )
    service = FakeBatchService(config=config, seed=0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with run_fake_server(service, port=port):
        await stop.wait()


@contextlib.contextmanager
def lag_server() -> Any:
    port = _common.free_port()
    cmd = [sys.executable, __file__, "serve", "--port", str(port)]
    with _common._process(cmd, port):
        yield f"http://127.0.0.1:{port}/v1"


#: The fake's ids of a result line, derived from its batch's id (and the batch ids from
#: the order in which the fake made its files and batches, which differs between the
#: runner and the naive peer once there are many shards).
_LINE_IDS = re.compile(rb'"(id|request_id)":"(batch_req|req)_[0-9a-f]+"')


def digests(path: Path) -> tuple[str, str]:
    """SHA-256 of a file, and of its content without the fake's line ids."""
    whole, content = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            block += fh.readline()
            whole.update(block)
            content.update(_LINE_IDS.sub(rb'"\1":""', block))
    return whole.hexdigest(), content.hexdigest()


def child(args: argparse.Namespace) -> None:
    folder = Path(args.dir)
    if args.kind in ("http", "lag"):
        row = asyncio.run(run_over_http(folder, args.max_lines, args.base, lag=args.kind == "lag"))
    elif args.kind in ("naive", "floor"):
        row = asyncio.run(run_direct(folder, args.max_lines, keep=args.kind == "naive"))
        if args.kind == "naive":
            naive = folder / "naive-output.jsonl"
            row["output_sha256"], row["content_sha256"] = digests(naive)
    elif args.kind == "runner":
        row = asyncio.run(run_runner(folder, args.max_lines))
        journal = folder / FILES[1]
        row["journal_bytes"] = sum(
            os.path.getsize(f"{journal}{suffix}")
            for suffix in ("", "-wal", "-data")
            if os.path.exists(f"{journal}{suffix}")
        )
        row["output_bytes"] = (folder / FILES[2]).stat().st_size
        row["output_sha256"], row["content_sha256"] = digests(folder / FILES[2])
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
    child_cmd.add_argument("kind", choices=("runner", "naive", "floor", "http", "lag", "profile"))
    child_cmd.add_argument("--base", help="the fake server's URL (http)")
    child_cmd.add_argument("--dir", required=True)
    child_cmd.add_argument("--max-lines", type=int, required=True)
    serve_cmd = sub.add_parser("serve", help="(internal) the fake server of --lag")
    serve_cmd.add_argument("--port", type=int, required=True)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--max-lines", type=int, default=50_000, help="requests per batch")
    parser.add_argument("--repeat", type=int, default=2, help="runner/naive pairs to measure")
    parser.add_argument("--profile", action="store_true", help="also a BatchRun under cProfile")
    parser.add_argument(
        "--no-http", action="store_true", help="skip the run against a fake in another process"
    )
    parser.add_argument(
        "--sizes", default=None, help="request counts of the runs over HTTP (default: --requests)"
    )
    parser.add_argument("--lag", action="store_true", help="also measure stalls of the loop")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor")
    parser.add_argument("--work-dir", default=None, help="where the files go (default: a temp dir)")
    args = parser.parse_args()
    if args.command == "child":
        child(args)
        return
    if args.command == "serve":
        asyncio.run(serve(args.port))
        return

    n = args.requests
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else [n]
    with tempfile.TemporaryDirectory(prefix="bench-100k-", dir=args.work_dir) as name:
        folder = Path(name)
        (folder / FILES[0]).write_bytes(chat_requests(n, prefix="r"))
        input_mb = (folder / FILES[0]).stat().st_size / MB
        runners: list[dict[str, Any]] = []
        naives: list[dict[str, Any]] = []
        for _ in range(args.repeat):
            clean(folder)
            runners.append(spawn(name, "runner", args.max_lines))
            naives.append(spawn(name, "naive", args.max_lines))
        floor = None
        if args.repeat and not args.no_floor:
            floor = spawn(name, "floor", args.max_lines)
        http: list[tuple[int, dict[str, Any]]] = []
        if not args.no_http:
            timings = ("--validation-seconds", "0.5", "--finalizing-seconds", "0.5")
            for size in sizes:
                sized = folder / f"http-{size}"
                sized.mkdir()
                (sized / FILES[0]).write_bytes(chat_requests(size, prefix="r"))
                with _common.fake_server(*timings, "--lines-per-second", "100000") as base:
                    http.append((size, spawn(str(sized), "http", args.max_lines, "--base", base)))
                for path in sized.iterdir():
                    path.unlink()
                sized.rmdir()
        lag = None
        if args.lag:
            clean(folder)
            with lag_server() as base:
                lag = spawn(name, "lag", args.max_lines, "--base", base)
        profile = None
        if args.profile:
            clean(folder)
            profile = spawn(name, "profile", args.max_lines)["profile"]

    print()
    if runners:
        in_memory(args, input_mb, runners, naives, floor)
    for size, row in http:
        print(
            f"BatchRun alone at {size} requests (the fake in another process, HTTP, real "
            f"clock): peak growth {row['growth']:.1f} MB over an RSS of {row['rss0']:.1f} MB; "
            f"{row['seconds']:.2f}s wall ({row['succeeded']} of {row['requests']} succeeded; "
            "the wall time includes the server's work)"
        )
    if len(http) > 1:
        growths = [row["growth"] for _size, row in http]
        print(
            f"runner's own peak growth from {http[0][0]} to {http[-1][0]} requests: "
            f"{max(growths) - min(growths):.1f} MB apart (goal: within 10 MB)"
        )
    if lag is not None:
        info = lag["lag"]
        print(
            f"loop stalls during the run over HTTP ({lag['seconds']:.1f}s; a fleet polled "
            f"{OTHER_BATCHES} other batches, {info['others_open']} still open at the end): "
            f"longest {info['max'] * 1000:.0f} ms, p99 {info['p99'] * 1000:.1f} ms, "
            f"{info['over_50ms']} over 50 ms (of {info['probes']} probes of "
            f"{PROBE_SLEEP * 1000:.0f} ms); CPU time of the loop's thread between two "
            f"wake-ups: longest {info['busy_max'] * 1000:.0f} ms, p99 "
            f"{info['busy_p99'] * 1000:.1f} ms, {info['busy_over_50ms']} over 50 ms; the "
            "longest stalls:"
        )
        for late, at, doing in info["top"]:
            print(f"  {late * 1000:7.0f} ms at {at:6.2f}s: {doing}")
    if profile is not None:
        print()
        print(profile)


def in_memory(
    args: argparse.Namespace,
    input_mb: float,
    runners: list[dict[str, Any]],
    naives: list[dict[str, Any]],
    floor: dict[str, Any] | None,
) -> None:
    """The table of the in-memory runs."""
    n = args.requests
    print(
        f"{n} chat requests ({input_mb:.1f} MB of input), shards of {args.max_lines} lines, "
        "in-memory fake on a virtual clock, each measurement in a fresh process"
    )
    runner = runners[0]
    if not runner["resettable"]:
        print("(clear_refs refused: peaks are since the process started)")
    print(
        f"{'':30s} {'wall s':>7s} {'req/s':>8s} {'peak growth MB':>15s} {'batches':>8s} "
        f"{'HTTP':>5s} {'sim. s':>7s} {'in fake s':>10s} {'outside s':>10s}"
    )
    rows: list[tuple[str, dict[str, Any]]] = []
    for number, (one, other) in enumerate(zip(runners, naives, strict=True), start=1):
        rows.append((f"BatchRun #{number}", one))
        rows.append((f"naive peer (baseline) #{number}", other))
    if floor is not None:
        rows.append(("floor: fake + streamed reads", floor))
    for label, row in rows:
        print(
            f"{label:30s} {row['seconds']:7.2f} {n / row['seconds']:8.0f} "
            f"{row['growth']:15.1f} {row['batches']:8d} {row['http']:5d} "
            f"{row['simulated']:7.0f} {row['fake_seconds']:10.2f} "
            f"{row['seconds'] - row['fake_seconds']:10.2f}"
        )

    def outside(row: dict[str, Any]) -> float:
        return max(float(row["seconds"] - row["fake_seconds"]), 1e-9)

    pairs = list(zip(runners, naives, strict=True))
    walls = [one["seconds"] / other["seconds"] for one, other in pairs]
    outs = [outside(one) / outside(other) for one, other in pairs]
    walls_text, outs_text = _common.ratio_spread(walls), _common.ratio_spread(outs)
    print(
        f"ratio BatchRun / naive, median (min-max) of {len(pairs)} pairs: wall {walls_text}, "
        f"outside the fake {outs_text}; goal: wall within 1.2x"
    )
    if floor is not None:
        print(
            f"above the floor: BatchRun +{runner['seconds'] - floor['seconds']:.2f}s "
            f"+{runner['growth'] - floor['growth']:.1f} MB, naive "
            f"+{naives[0]['seconds'] - floor['seconds']:.2f}s "
            f"+{naives[0]['growth'] - floor['growth']:.1f} MB"
        )
    print(
        f"the fake holds {runner['fake_bytes'] / MB:.1f} MB of files at the end; RSS at the "
        f"start {runner['rss0']:.1f} MB"
    )
    same = {row["output_sha256"] for row in (*runners, *naives)}
    content = {row["content_sha256"] for row in (*runners, *naives)}
    if len(same) == 1:
        verdict = "byte-identical to the naive peer's (every run)"
    elif len(content) == 1:
        verdict = (
            "the same lines as the naive peer's but for the fake's line ids (id, "
            "request_id: the fake derives them from batch ids, given in the order it made "
            "files and batches, which the runner and the naive peer do differently)"
        )
    else:
        verdict = "DIFFERS from the naive peer's (more than the fake's line ids)"
    print(f"output file: sha256 {runner['output_sha256'][:16]}..., {verdict}")
    print(
        f"BatchRun: {runner['succeeded']} succeeded, {runner['failed']} failed of "
        f"{runner['requests']}; journal on disk (with its log and result lines) "
        f"{runner['journal_bytes'] / MB:.1f} MB; "
        f"output file {runner['output_bytes'] / MB:.1f} MB"
    )
    print(f"naive: {naives[0]['succeeded']} succeeded, {naives[0]['failed']} failed", end="")
    print(f"; floor: {floor['lines']} result lines streamed" if floor is not None else "")


if __name__ == "__main__":
    main()
