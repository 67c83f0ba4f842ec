"""A whole batch lifecycle, end to end, against the built-in fake service.

``aiobatch demo`` writes request files, uploads them, creates the batches, polls every
one of them until it finishes, and streams back every result, all concurrently and
all through the real client. The fake runs in memory on a virtual clock, so a
simulated hour takes a moment; no API key and no network are involved. Some control-
plane requests are rate limited or fail with 5xx, and some lines fail, so the retry
policy and the error paths do real work.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import sys
import tempfile
import time
from pathlib import Path

import attrs

from .._lifecycle import BatchStatus
from .._models import ResultError, ResultHTTPError, ResultSuccess
from .._retry import RetryPolicy
from ..testing import FakeConfig, Fault, LineErrorRule, chat_requests, fake_client
from ._args import out, rate
from ._command import command

__all__ = ["DemoReport", "all_accounted", "format_report", "run_demo"]

ENDPOINT = "/v1/chat/completions"


@attrs.frozen
class DemoReport:
    """What the demo did."""

    batches: int
    requests: int
    statuses: dict[str, int]
    succeeded: int
    failed: int
    http_requests: int
    faults_injected: int
    simulated_seconds: float
    wall_seconds: float
    warnings: int = 0


def _write_requests(folder: Path, batch_no: int, lines: int) -> Path:
    path = folder / f"requests-{batch_no:04d}.jsonl"
    path.write_bytes(chat_requests(lines, prefix=f"b{batch_no}", endpoint=ENDPOINT))
    return path


async def run_demo(
    *,
    batches: int = 50,
    lines: int = 20,
    fault_rate: float = 0.05,
    line_error_rate: float = 0.02,
    seed: int = 0,
) -> DemoReport:
    """Run ``batches`` batches of ``lines`` requests each through the fake service.

    Args:
        batches: how many batches to run at once.
        lines: requests per batch.
        fault_rate: share of control-plane requests answered 429 or 503.
        line_error_rate: share of requests that fail inside their batch.
        seed: makes the run repeatable.

    Returns:
        Counts of what happened.
    """
    started = time.perf_counter()
    config = FakeConfig(
        validation_seconds=20.0,
        lines_per_second=2.0,
        finalizing_seconds=15.0,
        line_errors=[LineErrorRule(status=500, ratio=line_error_rate)] if line_error_rate else [],
    )
    faults: list[Fault] = []
    if fault_rate:
        half = fault_rate / 2
        faults.append(Fault.http(429, retry_after=2.0, times=None, probability=half))
        faults.append(Fault.http(503, times=None, probability=half))
    statuses: collections.Counter[str] = collections.Counter()
    outcome: collections.Counter[str] = collections.Counter()
    counter = _WarningCounter()
    logger = logging.getLogger("aiobatch")
    logger.addHandler(counter)
    propagate, logger.propagate = logger.propagate, False

    async with fake_client(
        config=config, seed=seed, faults=faults, retry=RetryPolicy(max_attempts=10)
    ) as fake:
        client, clock, service = fake.client, fake.clock, fake.service
        start_time = clock.now()

        async def one(batch_no: int, path: Path) -> None:
            uploaded = await client.upload_file(path)
            batch = await client.create_batch(uploaded.id, ENDPOINT)
            batch = await client.wait(batch, poll_interval=10.0, max_interval=60.0)
            statuses[batch.status.value] += 1
            for file_id in (batch.output_file_id, batch.error_file_id):
                if file_id is None:
                    continue
                async for result in client.iter_results(file_id):
                    if isinstance(result, ResultSuccess):
                        outcome["succeeded"] += 1
                    elif isinstance(result, ResultHTTPError | ResultError):
                        outcome["failed"] += 1

        try:
            with tempfile.TemporaryDirectory(prefix="aiobatch-demo-") as tmp:
                paths = [_write_requests(Path(tmp), n, lines) for n in range(batches)]
                async with clock.auto_advance():
                    await asyncio.gather(*(one(n, p) for n, p in enumerate(paths)))
        finally:
            logger.removeHandler(counter)
            logger.propagate = propagate

    return DemoReport(
        batches=batches,
        requests=batches * lines,
        statuses=dict(statuses),
        succeeded=outcome["succeeded"],
        failed=outcome["failed"],
        http_requests=len(service.requests),
        faults_injected=len(service.faults.fired),
        simulated_seconds=clock.now() - start_time,
        wall_seconds=time.perf_counter() - started,
        warnings=counter.count,
    )


class _WarningCounter(logging.Handler):
    """Counts the library's warnings (an upload retried after a lost answer, say)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def format_report(report: DemoReport) -> str:
    """The report as a few human lines."""
    done = ", ".join(f"{n} {s}" for s, n in sorted(report.statuses.items()))
    lines = [
        f"batches:   {report.batches} created, polled and collected ({done})",
        f"requests:  {report.requests} sent, {report.succeeded} succeeded, "
        f"{report.failed} failed inside their batch",
        f"HTTP:      {report.http_requests} control-plane requests, "
        f"{report.faults_injected} answered with an injected 429/503 and retried",
        f"time:      {report.simulated_seconds / 60:.1f} simulated minutes "
        f"in {report.wall_seconds:.2f} s of wall time",
    ]
    if report.warnings:
        lines.append(
            f"warnings:  {report.warnings} (e.g. an upload retried after an answer that may "
            "have been lost can leave an extra file copy)"
        )
    missing = report.requests - report.succeeded - report.failed
    lines.append("all results accounted for" if missing == 0 else f"MISSING {missing} results")
    return "\n".join(lines)


def all_accounted(report: DemoReport) -> bool:
    """Whether every batch completed and every request has exactly one result."""
    return (
        report.statuses.get(BatchStatus.COMPLETED.value, 0) == report.batches
        and report.succeeded + report.failed == report.requests
    )


# -- the command -----------------------------------------------------------------------


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int, default=50, help="batches to run at once")
    parser.add_argument("--lines", type=int, default=20, help="requests per batch")
    parser.add_argument(
        "--fault-rate", type=rate, default=0.05, help="share of API calls answered 429/503"
    )
    parser.add_argument(
        "--line-error-rate", type=rate, default=0.02, help="share of requests that fail"
    )
    parser.add_argument("--seed", type=int, default=0, help="makes the run repeatable")


@command(
    "demo",
    "run many batches end to end against the built-in fake (no key, no network)",
    _demo_arguments,
    description=(
        "Write request files, upload them, create the batches, poll each until it "
        "finishes and stream back every result, concurrently, through the real client, "
        "against the in-memory fake service on a virtual clock."
    ),
    epilog="""\
examples:
  aiobatch demo                                         # 50 batches of 20 requests
  aiobatch demo --batches 500 --lines 100 --fault-rate 0.2
  aiobatch demo --line-error-rate 0 --seed 7            # no failing requests; another run""",
)
def _demo(args: argparse.Namespace) -> int:
    if args.batches < 1 or args.lines < 1:
        print("aiobatch demo: --batches and --lines must be at least 1", file=sys.stderr)
        return 2
    report = asyncio.run(
        run_demo(
            batches=args.batches,
            lines=args.lines,
            fault_rate=args.fault_rate,
            line_error_rate=args.line_error_rate,
            seed=args.seed,
        )
    )
    out(format_report(report))
    return 0 if all_accounted(report) else 1
