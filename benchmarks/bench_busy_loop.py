"""A run beside a busy event loop: ``BatchRun`` on the real clock while another task
keeps the loop busy, against the same run on a calm loop.

On the real clock the SQLite journal does its work in a worker thread. Python's
``sqlite3`` lets the GIL go around each step of a statement (each row read or written),
and ``os.pread``/``os.pwritev``/``os.fdatasync`` let it go too; each time, the worker
thread must take it back. Beside a loop that never waits long (a task that does some
Python work and then ``await asyncio.sleep(0)``, as an eval harness that scores in the
loop may), the loop's thread takes the GIL back first nearly every time, and the worker
thread can wait a long time for each step. So a journal call that goes row by row takes
a wait per row.

Each measurement runs in a fresh process (this script's ``child`` command): a run of
``--requests`` requests in shards of ``--max-lines`` against the in-memory fake
(``FakeBatchService.transport()``, no sockets) on the real clock, with quick batches
(0.1 s validating, 0.5 s in progress, 0.1 s finalizing) and quick polling. The busy
task repeats: a loop of 2,000 additions in Python (about 50 µs), then ``await
asyncio.sleep(0)``. The calm run is the baseline, measured in the same invocation; the
figures are the wall time of ``BatchRun.run()`` and the time spent in its phases
(ingest with preflight, planning, writing the output file, the final report), taken by
wrapping those methods.

Usage: ``python benchmarks/bench_busy_loop.py [--requests 2000] [--repeat 2]``
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

from aiobatch import BatchClient, BatchRun, RetryPolicy, RunConfig
from aiobatch.testing import FakeBatchService, FakeConfig

ENDPOINT = "/v1/chat/completions"
#: BatchRun's phases timed (private methods: this measures where the time goes).
PHASES = ("_open", "_plan", "_write_output", "_final_report")
NAMES = {
    "_open": "ingest",
    "_plan": "planning",
    "_write_output": "output",
    "_final_report": "report",
}


def request_line(n: int) -> bytes:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Hi {n}."}]}
    line = {"custom_id": f"r{n:07d}", "method": "POST", "url": ENDPOINT, "body": body}
    return json.dumps(line, separators=(",", ":")).encode()


def timed_phases() -> dict[str, float]:
    """Wrap BatchRun's phases; the seconds spent in each, filled as the run goes."""
    spent: dict[str, float] = dict.fromkeys(PHASES, 0.0)
    for name in PHASES:
        method = getattr(BatchRun, name)

        @functools.wraps(method)
        async def wrapper(*args: Any, __method: Any = method, __name: str = name) -> Any:
            t0 = time.perf_counter()
            try:
                return await __method(*args)
            finally:
                spent[__name] += time.perf_counter() - t0

        setattr(BatchRun, name, wrapper)
    return spent


async def child_run(folder: Path, requests: int, max_lines: int, busy: bool) -> dict[str, Any]:
    source = folder / "requests.jsonl"
    with open(source, "wb") as fh:  # noqa: ASYNC230 - before the measurement
        for n in range(requests):
            fh.write(request_line(n) + b"\n")
    spent = timed_phases()
    service = FakeBatchService(
        config=FakeConfig(
            validation_seconds=0.1,
            processing_seconds=lambda _batch, _lines: 0.5,
            finalizing_seconds=0.1,
        )
    )
    client = BatchClient(
        api_key=_common.KEY,
        base_url="http://fake.invalid/v1",
        transport=service.transport(),
        retry=RetryPolicy(max_attempts=3),
    )
    fleet = _common.quick_fleet()
    stop = False
    turns = 0

    async def spin() -> None:
        nonlocal turns
        while not stop:
            total = 0
            for i in range(2000):
                total += i
            turns += 1
            await asyncio.sleep(0)

    spinner = asyncio.ensure_future(spin()) if busy else None
    run = BatchRun(
        client,
        source,
        journal=folder / "run.journal",
        output=folder / "output.jsonl",
        config=RunConfig(max_lines=max_lines, fleet=fleet),
    )
    t0 = time.perf_counter()
    report = await run.run()
    seconds = time.perf_counter() - t0
    stop = True
    if spinner is not None:
        await spinner
    await client.aclose()
    return {
        "seconds": seconds,
        "phases": {NAMES[name]: spent[name] for name in PHASES},
        "succeeded": report.succeeded,
        "requests": report.requests,
        "turns": turns,
    }


def spawn(folder: str, kind: str, requests: int, max_lines: int) -> dict[str, Any]:
    """One measurement in a fresh process; its figures."""
    cmd = [sys.executable, __file__, "child", kind, "--dir", folder]
    cmd += ["--requests", str(requests), "--max-lines", str(max_lines)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    row: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=("child",), help=argparse.SUPPRESS)
    parser.add_argument("kind", nargs="?", choices=("calm", "busy"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--max-lines", type=int, default=1000, help="requests per batch")
    parser.add_argument("--repeat", type=int, default=2, help="calm/busy pairs to measure")
    args = parser.parse_args()
    if args.command == "child":
        row = asyncio.run(
            child_run(Path(args.dir), args.requests, args.max_lines, args.kind == "busy")
        )
        print(json.dumps(row), flush=True)
        return
    rows: dict[str, list[dict[str, Any]]] = {"calm": [], "busy": []}
    with tempfile.TemporaryDirectory(prefix="bench-busy-") as temp:
        for number in range(args.repeat):
            for kind in ("calm", "busy"):  # alternately
                folder = Path(temp) / f"{kind}{number}"
                folder.mkdir()
                rows[kind].append(spawn(str(folder), kind, args.requests, args.max_lines))
    print(
        f"\n{args.requests} requests in batches of {args.max_lines}, in-memory fake on the "
        "real clock; each run in a fresh process"
    )
    header = f"{'loop':6s} {'wall s':>8s}" + "".join(f" {n:>9s}" for n in NAMES.values())
    print(header + f" {'ok':>7s} {'busy turns':>11s}")
    for kind in ("calm", "busy"):
        for row in rows[kind]:
            phases = "".join(f" {row['phases'][n]:9.2f}" for n in NAMES.values())
            print(
                f"{kind:6s} {row['seconds']:8.2f}{phases} {row['succeeded']:7d} {row['turns']:11d}"
            )
    ratios = [b["seconds"] / c["seconds"] for c, b in zip(rows["calm"], rows["busy"], strict=True)]
    print(f"wall time busy / calm, median (min-max) of {len(ratios)} pairs: ", end="")
    print(_common.ratio_spread(ratios))


if __name__ == "__main__":
    main()
