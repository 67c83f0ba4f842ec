"""Side by side over loopback HTTP: one Fleet vs the openai SDK with a loop per batch.

A fake batch server (``python benchmarks/_common.py serve``, an aiobatch
``FakeBatchService`` behind ``run_fake_server``) runs in a separate process on
loopback, on the real clock, with short timings: every batch spends
``--validation-seconds`` validating, a seeded random time uniform in ``--spread LOW
HIGH`` seconds in progress, and ``--finalizing-seconds`` finalizing. Both clients run
the same workload, ``--batches`` batches of 10 lines each, all at once: upload the
file, create the batch, track it until it ends, download its output file.

* fleet: aiobatch's ``BatchClient`` over its default aiohttp transport, creates under
  ``asyncio.gather``, one :class:`~aiobatch.Fleet` tracking every batch, with the
  default ``FleetConfig`` intervals multiplied by ``--scale`` (default 1/12: the
  batches here take seconds where real ones take minutes to hours); its budget is
  ``--fleet-rps``.
* peers (the usual practice, see ``peers.md``): the official ``openai`` SDK's
  ``AsyncOpenAI``, one coroutine per batch that creates it and then calls
  ``client.batches.retrieve`` every ``--poll`` seconds until it ends,
  ``asyncio.gather`` over all of them.

Each client gets a fresh server (after a warm-up run of 5 batches each). We report the
requests the server received (its own count, printed when it stops), the client
process's CPU time (``time.process_time``; the server's is not included), the wall
time, and the time to detect completion: the wall time at which the client learns a
batch is ``completed`` minus the time it completed. The completion time is computed:
the create's answer time (the midpoint of sending it and getting the answer, so within
half a loopback round trip of the server's own creation time) plus the validation, the
batch's processing time (the same seeded hook the server uses) and the finalizing time.

Run: ``python benchmarks/bench_fleet_http.py [--batches 1000] [--poll 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import _common
import aiohttp
import openai

from aiobatch import BatchClient, BatchDone, Fleet, FleetConfig, FleetEvent
from aiobatch.testing import chat_requests

LINES = 10


def scaled_config(scale: float, rps: float) -> FleetConfig:
    d = FleetConfig()
    return FleetConfig(
        requests_per_second=rps,
        burst=max(1, round(rps)),
        min_interval=d.min_interval * scale,
        max_interval=d.max_interval * scale,
        validating_interval=d.validating_interval * scale,
        finalizing_interval=d.finalizing_interval * scale,
        cancelling_interval=d.cancelling_interval * scale,
        in_progress_interval=d.in_progress_interval * scale,
        coalesce=d.coalesce * scale,
        error_backoff=d.error_backoff * scale,
        rate_limit_pause=d.rate_limit_pause * scale,
        seed=0,
    )


class Workload:
    """Completion times of the batches of one run, and when the client saw them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.spread = _common.Spread(args.spread[0], args.spread[1], args.seed)
        self.done_at: dict[str, float] = {}
        self.delays: list[float] = []
        self.not_completed = 0

    def created(self, batch_id: str, sent: float) -> None:
        answered = time.time()
        created = (sent + answered) / 2
        args = self.args
        self.done_at[batch_id] = (
            created
            + args.validation_seconds
            + self.spread(batch_id, LINES)
            + args.finalizing_seconds
        )

    def detected(self, batch_id: str, status: str) -> None:
        if status != "completed":
            self.not_completed += 1
            return
        self.delays.append(time.time() - self.done_at[batch_id])


async def run_fleet(base: str, work: Workload) -> None:
    args = work.args
    config = scaled_config(args.scale, args.fleet_rps)
    async with BatchClient(api_key=_common.KEY, base_url=base) as client:
        downloads: list[asyncio.Task[bytes]] = []

        def on_event(event: FleetEvent) -> None:
            if isinstance(event, BatchDone) and event.batch is not None:
                work.detected(event.batch_id, event.batch.status.value)
                if event.batch.output_file_id is not None:
                    download = client.file_content(event.batch.output_file_id)
                    downloads.append(asyncio.ensure_future(download))

        async with Fleet(client, config=config, on_event=on_event) as fleet:

            async def create(n: int) -> None:
                uploaded = await client.upload_file(
                    chat_requests(LINES, prefix=f"b{n}"), filename=f"b{n}.jsonl"
                )
                sent = time.time()
                batch = await client.create_batch(uploaded.id, _common.ENDPOINT)
                work.created(batch.id, sent)
                fleet.add(batch)

            await asyncio.gather(*(create(n) for n in range(args.batches)))
            await fleet.wait_all()
            await asyncio.gather(*downloads)


async def run_openai(base: str, work: Workload) -> None:
    args = work.args
    async with openai.AsyncOpenAI(api_key=_common.KEY, base_url=base) as client:

        async def one(n: int) -> None:
            uploaded = await client.files.create(
                file=(f"b{n}.jsonl", chat_requests(LINES, prefix=f"b{n}")), purpose="batch"
            )
            sent = time.time()
            batch = await client.batches.create(
                input_file_id=uploaded.id, endpoint=_common.ENDPOINT, completion_window="24h"
            )
            work.created(batch.id, sent)
            while batch.status not in ("completed", "failed", "expired", "cancelled"):
                await asyncio.sleep(args.poll)
                batch = await client.batches.retrieve(batch.id)
            work.detected(batch.id, batch.status)
            if batch.output_file_id is not None:
                content = await client.files.content(batch.output_file_id)
                content.read()

        await asyncio.gather(*(one(n) for n in range(args.batches)))


def measure(runner: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One run of ``runner`` against a fresh server."""
    server_args = [
        "--validation-seconds", str(args.validation_seconds),
        "--finalizing-seconds", str(args.finalizing_seconds),
        "--spread", str(args.spread[0]), str(args.spread[1]),
        "--seed", str(args.seed),
    ]  # fmt: skip
    work = Workload(args)
    with _common.serving(*server_args) as served:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        asyncio.run(runner(served.base, work))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"cpu": cpu, "wall": wall, "work": work, "counts": served.counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--poll", type=float, default=5.0, help="peers' seconds between polls")
    parser.add_argument("--scale", type=float, default=1 / 12, help="fleet interval scale")
    parser.add_argument("--fleet-rps", type=float, default=50.0, help="fleet request budget")
    parser.add_argument("--validation-seconds", type=float, default=2.0)
    parser.add_argument("--finalizing-seconds", type=float, default=2.0)
    parser.add_argument("--spread", type=float, nargs=2, default=(5.0, 40.0))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # Warm up imports, lazily built models and pools, on a throwaway server.
    warm = argparse.Namespace(**{**vars(args), "batches": 5, "spread": (0.1, 0.2)})
    for runner in (run_openai, run_fleet):
        measure(runner, warm)
    rows = {
        f"openai SDK, loop per batch, {args.poll:g}s": measure(run_openai, args),
        "aiobatch Fleet": measure(run_fleet, args),
    }
    print(
        f"\n{args.batches} batches x {LINES} lines over loopback HTTP; validating "
        f"{args.validation_seconds:g}s, in progress {args.spread[0]:g}-{args.spread[1]:g}s, "
        f"finalizing {args.finalizing_seconds:g}s"
    )
    versions = f"aiohttp {aiohttp.__version__}, openai {openai.__version__}"
    print(f"python {sys.version.split()[0]}, {versions}; fleet intervals x{args.scale:.3g}")
    for name, row in rows.items():
        counts, work = row["counts"], row["work"]
        tracking = counts.get("GET /batches", 0) + counts.get("GET /batches/{id}", 0)
        print(f"{name}:")
        print(
            f"  requests {counts.get('total')} (tracking {tracking}: list pages "
            f"{counts.get('GET /batches')}, retrieves {counts.get('GET /batches/{id}')}; "
            f"429s {counts.get('429')})"
        )
        print(f"  client CPU {row['cpu']:.2f}s, wall {row['wall']:.1f}s")
        print(f"  detection delay  {_common.delays_line(work.delays)}")
        if work.not_completed:
            print(f"  batches that did not complete: {work.not_completed}")
    peers, fleet = rows.values()

    def tracking(row: dict[str, Any]) -> int:
        return int(row["counts"].get("GET /batches", 0) + row["counts"].get("GET /batches/{id}", 0))

    delays = [(r["work"].delays) for r in (peers, fleet)]
    p50 = [_common.percentile(d, 50) for d in delays]
    p99 = [_common.percentile(d, 99) for d in delays]
    print(
        f"peers / fleet: requests {peers['counts']['total'] / fleet['counts']['total']:.1f}x "
        f"(tracking only {tracking(peers) / max(1, tracking(fleet)):.1f}x), "
        f"client CPU {peers['cpu'] / fleet['cpu']:.1f}x, "
        f"detection p50 {p50[0] / p50[1]:.2f}x, p99 {p99[0] / p99[1]:.2f}x"
    )


if __name__ == "__main__":
    main()
