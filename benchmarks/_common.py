"""Helpers shared by the benchmarks (not a benchmark itself).

* :func:`fake_server`: ``aiobatch fake-server`` in a subprocess on loopback.
* :func:`serving`: this module run as a script (``python benchmarks/_common.py serve``),
  a fake server whose batches take seeded random processing times (:class:`Spread`)
  and which prints its own request counts as one JSON line when it is terminated.
* :class:`CountingTransport`, :func:`in_memory`, :func:`create_batches`,
  :func:`percentile`, :func:`delays_line`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from aiobatch import Batch, BatchClient, FleetConfig, RetryPolicy
from aiobatch.testing import (
    FakeBatchService,
    FakeConfig,
    RateLimit,
    VirtualClock,
    chat_requests,
    run_fake_server,
)
from aiobatch.transport import Request, Response, Transport

ENDPOINT = "/v1/chat/completions"
KEY = "sk-bench"
#: Where every virtual clock of the benchmarks starts (Unix seconds).
T0 = 1_750_000_000.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _process(cmd: list[str], port: int, **popen: Any) -> Iterator[subprocess.Popen[Any]]:
    """Run ``cmd`` (a server listening on ``port``) until the block ends."""
    proc = subprocess.Popen(cmd, **popen)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("fake server did not start") from None
                time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def fake_server(*args: str) -> Iterator[str]:
    """Start ``aiobatch fake-server [args]`` in a subprocess; yield its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "aiobatch", "fake-server", "--port", str(port), *args]
    with _process(cmd, port, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
        yield f"http://127.0.0.1:{port}/v1"


class Served:
    """A :func:`serving` server: its base URL, then (after the block) its counts."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.counts: dict[str, int] = {}


@contextlib.contextmanager
def serving(*args: str) -> Iterator[Served]:
    """Start this module's ``serve`` command in a subprocess (args: its flags).

    After the block, ``counts`` holds the requests the server received, by kind.
    """
    port = free_port()
    cmd = [sys.executable, __file__, "serve", "--port", str(port), *args]
    served = Served(f"http://127.0.0.1:{port}/v1")
    with _process(cmd, port, stdout=subprocess.PIPE, text=True) as proc:
        yield served
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    served.counts = json.loads(lines[-1]) if lines else {}


class Spread:
    """Seeded random processing seconds per batch, the same in every process.

    A :attr:`FakeConfig.processing_seconds <aiobatch.testing.FakeConfig.processing_seconds>`
    hook: ``Spread(60, 7200)(batch_id, lines)`` is uniform in ``[60, 7200)``.
    """

    def __init__(self, low: float, high: float, seed: int = 0) -> None:
        self.low, self.high, self.seed = low, high, seed

    def __call__(self, batch_id: str, lines: int) -> float:
        return random.Random(f"{self.seed}/{batch_id}").uniform(self.low, self.high)


class CountingTransport:
    """Wraps a transport and counts the requests sent through it."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.count = 0

    async def send(self, request: Request, *, stream: bool = False) -> Response:
        self.count += 1
        return await self.inner.send(request, stream=stream)

    async def aclose(self) -> None:
        await self.inner.aclose()


def in_memory(
    config: FakeConfig, *, retry: RetryPolicy | None = None, seed: int = 0
) -> tuple[VirtualClock, FakeBatchService, BatchClient]:
    """A fake service on a virtual clock and a client talking to it without sockets."""
    clock = VirtualClock(start=T0)
    service = FakeBatchService(clock=clock, config=config, seed=seed)
    return clock, service, client_for(service, clock, retry=retry)


def client_for(
    service: FakeBatchService, clock: VirtualClock, *, retry: RetryPolicy | None = None
) -> BatchClient:
    """A new client of an in-memory fake service (default retry: 3 attempts)."""
    return BatchClient(
        api_key=KEY,
        base_url="http://fake.invalid/v1",
        transport=service.transport(),
        clock=clock,
        retry=retry if retry is not None else RetryPolicy(max_attempts=3),
    )


async def create_batches(
    client: BatchClient, count: int, *, lines: int = 1, prefix: str = "b", start: int = 0
) -> list[Batch]:
    """Upload a ``lines``-line file and create a batch from it, ``count`` times, in order."""
    batches = []
    for n in range(start, start + count):
        uploaded = await client.upload_file(
            chat_requests(lines, prefix=f"{prefix}{n}"), filename=f"{prefix}{n}.jsonl"
        )
        batches.append(await client.create_batch(uploaded.id, ENDPOINT))
    return batches


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        found = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.MULTILINE)
    assert found is not None, field
    return int(found.group(1)) * 1024 / 1_000_000


def rss() -> float:
    """Resident set size now, MB (10**6 bytes)."""
    return _status_mb("VmRSS")


def peak() -> float:
    """Peak resident set size since the last :func:`reset_peak` (or the start), MB."""
    return _status_mb("VmHWM")


def reset_peak() -> bool:
    """Reset the peak RSS to the RSS now (Linux ``clear_refs``); False when refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, nearest rank; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def quick_fleet() -> FleetConfig:
    """Polling for quick fake batches (seconds on the real clock)."""
    return FleetConfig(
        min_interval=0.1,
        max_interval=0.5,
        validating_interval=0.2,
        in_progress_interval=0.5,
        finalizing_interval=0.2,
        seed=0,
    )


def ratio_spread(values: Sequence[float]) -> str:
    """``median (min-max)`` of ratios."""
    if not values:
        return "n/a"
    return f"{statistics.median(values):.2f}x ({min(values):.2f}x-{max(values):.2f}x)"


def delays_line(delays: Sequence[float]) -> str:
    """``p50 .. p99 .. max ..`` of detection delays, in seconds."""
    if not delays:
        return "no batch detected"
    p50, p99 = percentile(delays, 50), percentile(delays, 99)
    return f"p50 {p50:7.2f}s  p99 {p99:7.2f}s  max {max(delays):7.2f}s  (n={len(delays)})"


# --- the `serve` command -------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    limit = None if args.rate_limit is None else RateLimit(args.rate_limit)
    config = FakeConfig(
        validation_seconds=args.validation_seconds,
        finalizing_seconds=args.finalizing_seconds,
        processing_seconds=Spread(args.spread[0], args.spread[1], args.seed),
        request_log_size=None,
        rate_limit=limit,
        shuffle_output=False,
    )
    service = FakeBatchService(config=config, seed=args.seed)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with run_fake_server(service, port=args.port):
        await stop.wait()
    counts = {
        "total": service.request_count(),
        "POST /files": service.request_count("POST", "/files"),
        "POST /batches": service.request_count("POST", "/batches"),
        "GET /batches": service.request_count("GET", "/batches"),
        "GET /batches/{id}": service.request_count("GET", "/batches/*"),
        "GET /files/{id}/content": service.request_count("GET", "/files/*/content"),
        "429": sum(1 for r in service.requests if r.status == 429),
    }
    print(json.dumps(counts), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="a fake batch server for the benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a fake with seeded random processing times")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--validation-seconds", type=float, default=1.0)
    serve.add_argument("--finalizing-seconds", type=float, default=1.0)
    serve.add_argument(
        "--spread", type=float, nargs=2, default=(5.0, 30.0), metavar=("LOW", "HIGH")
    )
    serve.add_argument("--rate-limit", type=float, default=None)
    serve.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
