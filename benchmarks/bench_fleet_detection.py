"""Detection under a budget: how soon a Fleet sees completions when the server rate limits.

The fake service runs in memory on a virtual clock. ``--batches`` batches (default
10,000, 10 lines each) are created at time 0; each spends 30 s validating, a seeded
random time uniform in ``[0, 7140)`` s in progress (``FakeConfig.processing_seconds``)
and 30 s finalizing, so completions are spread over two simulated hours. The service
limits ``GET /batches*`` (the retrieves and list pages that tracking is made of; the
20,000 uploads and creates at time 0 are not limited) to ``--rps`` requests per second
(default 20, bucket of the same size) and answers ``429`` with ``retry-after-ms`` beyond
it (``FakeConfig.rate_limit``).

A batch's completion time is exact: its creation time plus 30 s, plus its processing
time (the same seeded hook, computed by the benchmark), plus 30 s. Its *detection
delay* is the virtual time at which the tracker learns it is ``completed`` minus that.

* fleet: one :class:`~aiobatch.Fleet` with ``FleetConfig(requests_per_second=rps,
  burst=--fleet-burst)``; detection is its ``BatchDone`` event (``on_event``).
* baseline (same run, fresh service): what peers do, one loop per batch that
  calls ``client.retrieve_batch`` every ``--interval`` seconds (default 60), the loops'
  first polls spread at random over the first interval (as if the batches had been
  created one after another), each call with the client's retries (3 attempts in all,
  honouring ``retry-after-ms``, like the official SDK's 2 retries); a poll that still
  fails is skipped until the next tick. Ten thousand loops against a limit they
  exceed eight times over make ~2.4 million requests (15+ minutes), so by default
  the baseline runs the same scenario at 1/``--baseline-scale`` (1,000 batches against
  a limit of 2 requests/s: the same demand per unit of limit, the same intervals) and
  its request and 429 counts are shown both as measured and multiplied back by the
  scale; ``--baseline-scale 1`` runs it at full size.

Requests and 429s are counted by the service's rate limiter (every ``GET /batches*``
that arrived); the fleet's own count of 429s is ``fleet.stats.rate_limited``.

Run: ``python benchmarks/bench_fleet_detection.py [--batches 10000] [--rps 20]``
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

import _common

from aiobatch import BatchDone, Fleet, FleetConfig, FleetEvent
from aiobatch.errors import AiobatchError
from aiobatch.testing import FakeConfig, RateLimit

VALIDATION, FINALIZING, HORIZON, LINES = 30.0, 30.0, 7200.0, 10


def fake_config(rps: float, seed: int) -> FakeConfig:
    return FakeConfig(
        validation_seconds=VALIDATION,
        finalizing_seconds=FINALIZING,
        processing_seconds=_common.Spread(0.0, HORIZON - VALIDATION - FINALIZING, seed),
        rate_limit=RateLimit(rps, burst=max(1, round(rps)), method="GET", path="/batches*"),
        request_log_size=1000,  # counts come from the rate limiter; keep no big log
    )


async def setup(
    batches: int, rps: float, seed: int
) -> tuple[Any, Any, list[Any], dict[str, float]]:
    """A rate-limited fake with the batches created; their exact completion times."""
    config = fake_config(rps, seed)
    clock, service, client = _common.in_memory(config, seed=seed)
    batches = await _common.create_batches(client, batches, lines=LINES)
    await client.aclose()
    spread = config.processing_seconds
    assert spread is not None
    created = clock.now()  # no virtual time passes while creating
    done_at = {b.id: created + VALIDATION + spread(b.id, LINES) + FINALIZING for b in batches}
    return clock, service, batches, done_at


async def run_fleet(args: argparse.Namespace, config: FleetConfig | None = None) -> dict[str, Any]:
    """The fleet's run; ``config`` replaces the one the flags make (same server)."""
    clock, service, batches, done_at = await setup(args.batches, args.rps, args.seed)
    client = _common.client_for(service, clock)
    delays: list[float] = []
    late_status: list[str] = []

    def on_event(event: FleetEvent) -> None:
        if isinstance(event, BatchDone):
            if event.batch is None or event.batch.status.value != "completed":
                late_status.append(f"{event.batch_id}: {event.reason.value}")
                return
            delays.append(clock.now() - done_at[event.batch_id])

    config = config or FleetConfig(
        requests_per_second=args.rps,
        burst=args.fleet_burst,
        max_interval=args.max_interval,
        seed=args.seed,
    )
    wall0 = time.perf_counter()
    async with clock.auto_advance(), Fleet(client, config=config, on_event=on_event) as fleet:
        fleet.add_many(batches)
        await fleet.wait_all()
        stats = fleet.stats
    await client.aclose()
    limiter = service.rate_limiter
    return {
        "delays": delays,
        "requests": limiter.admitted + limiter.refused,
        "refused": limiter.refused,
        "client_429": stats.rate_limited,
        "detail": (
            f"list pages {stats.list_pages}, retrieves {stats.retrieves}, sweeps "
            f"{stats.sweeps}, failures {stats.failures}, budget pauses {fleet.budget.pauses}"
        ),
        "not_completed": late_status,
        "virtual": clock.now() - _common.T0,
        "wall": time.perf_counter() - wall0,
    }


async def run_baseline(args: argparse.Namespace) -> dict[str, Any]:
    scale = args.baseline_scale
    clock, service, batches, done_at = await setup(
        args.batches // scale, args.rps / scale, args.seed
    )
    client = _common.client_for(service, clock)  # 3 attempts per call, retry-after honoured
    rng = random.Random(args.seed)
    delays: list[float] = []
    gave_up = 0

    async def poll(batch_id: str, offset: float) -> None:
        nonlocal gave_up
        await clock.sleep(offset)
        while True:
            try:
                batch = await client.retrieve_batch(batch_id)
            except AiobatchError:
                gave_up += 1
            else:
                if batch.is_terminal:
                    delays.append(clock.now() - done_at[batch_id])
                    return
            await clock.sleep(args.interval)

    wall0 = time.perf_counter()
    async with clock.auto_advance():
        await asyncio.gather(*(poll(b.id, rng.uniform(0, args.interval)) for b in batches))
    await client.aclose()
    limiter = service.rate_limiter
    return {
        "delays": delays,
        "requests": limiter.admitted + limiter.refused,
        "refused": limiter.refused,
        "client_429": None,
        "detail": f"polls that failed after their retries: {gave_up}",
        "scale": scale,
        "not_completed": [],
        "virtual": clock.now() - _common.T0,
        "wall": time.perf_counter() - wall0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10_000)
    parser.add_argument("--rps", type=float, default=20.0, help="server limit and fleet budget")
    parser.add_argument("--fleet-burst", type=int, default=20, help="the fleet budget's burst")
    parser.add_argument(
        "--max-interval", type=float, default=FleetConfig().max_interval, help="fleet's"
    )
    parser.add_argument("--interval", type=float, default=60.0, help="baseline poll interval")
    parser.add_argument("--baseline-scale", type=int, default=10, help="baseline runs at 1/N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()

    runs = {"fleet": asyncio.run(run_fleet(args))}
    if not args.skip_baseline:
        runs[f"per-batch loops every {args.interval:g}s"] = asyncio.run(run_baseline(args))

    print(
        f"\n{args.batches} batches completing over {HORIZON / 3600:g} simulated hours; "
        f"server limit {args.rps:g} GET/s (429 beyond); fleet budget {args.rps:g}/s "
        f"burst {args.fleet_burst}, max_interval {args.max_interval:g}s"
    )
    for name, row in runs.items():
        scale = row.get("scale", 1)
        at = "" if scale == 1 else f" (at 1/{scale} scale; counts x{scale} in brackets)"
        print(f"{name}{at}:")
        print(f"  detection delay   {_common.delays_line(row['delays'])}")
        client_429 = "" if row["client_429"] is None else f" (fleet counted {row['client_429']})"
        line = f"  requests {row['requests']:9d}   429s {row['refused']:9d}{client_429}"
        if scale != 1:
            line += f"   [requests {row['requests'] * scale}, 429s {row['refused'] * scale}]"
        print(line)
        print(f"  {row['detail']}")
        print(f"  simulated {row['virtual']:.0f}s in {row['wall']:.1f}s wall")
        if row["not_completed"]:
            print(f"  NOT completed: {len(row['not_completed'])}: {row['not_completed'][:5]}")
    if len(runs) == 2:
        fleet, base = runs.values()
        p99 = [_common.percentile(r["delays"], 99) for r in (fleet, base)]
        p50 = [_common.percentile(r["delays"], 50) for r in (fleet, base)]
        ratio = base["requests"] * base["scale"] / fleet["requests"]
        print(
            f"baseline / fleet: requests {ratio:.1f}x, "
            f"p50 delay {p50[1] / p50[0]:.1f}x, p99 delay {p99[1] / p99[0]:.1f}x, "
            f"429s {base['refused'] * base['scale']} vs {fleet['refused']}"
        )
    print("(goal: fleet p99 < 60 simulated seconds, no more than a handful of 429s)")


if __name__ == "__main__":
    main()
