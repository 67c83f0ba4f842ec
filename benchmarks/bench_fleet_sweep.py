"""Requests per sweep: what a Fleet spends to observe every open batch once.

The fake service runs in memory on a virtual clock. ``--batches`` batches (default
10,000) are created and handed to a :class:`~aiobatch.Fleet` as the snapshots the
creates returned (status ``validating``). Every batch leaves ``validating`` 10 virtual
seconds after its creation, before the fleet's first poll of any of them (the first
pause while validating is 13.5 to 15 s), so the first observation the fleet makes of a
batch shows a new status and emits a ``StatusChanged`` event. A *sweep* is the work
from the start until every batch has had that event; we count the requests the service
received in between (server side) and the wall time it took.

The baseline, measured in the same run on a fresh service, is one
``GET /batches/{id}`` per batch: the same fleet with ``list_when_cheaper=False``, and a
plain ``client.retrieve_batch`` loop for its wall time. Scenarios with batches the
fleet does not track (another user's) in the same list show what they cost: one foreign
batch interleaved after each tracked one, and ``--batches`` foreign batches created
after all the tracked ones (every page of them must be walked first).

Run: ``python benchmarks/bench_fleet_sweep.py [--batches 10000] [--no-foreign]``
"""

from __future__ import annotations

import argparse
import asyncio
import time

import _common

from aiobatch import Batch, Fleet, FleetConfig, FleetEvent, StatusChanged
from aiobatch.testing import FakeBatchService, FakeConfig, VirtualClock

CONFIG = FakeConfig(
    validation_seconds=10,
    lines_per_second=0.001,  # nobody finishes during the measurement
    request_log_size=None,
)


async def setup(tracked: int, foreign: str) -> tuple[VirtualClock, FakeBatchService, list[Batch]]:
    """A fake with ``tracked`` batches to track and maybe foreign ones; the tracked."""
    clock, service, client = _common.in_memory(CONFIG)
    ours: list[Batch] = []
    if foreign == "interleaved":
        for n in range(tracked):
            ours += await _common.create_batches(client, 1, start=n)
            await _common.create_batches(client, 1, prefix="other", start=n)
    else:
        ours = await _common.create_batches(client, tracked)
        if foreign == "newer":
            await _common.create_batches(client, tracked, prefix="other")
    await client.aclose()
    return clock, service, ours


async def fleet_sweep(tracked: int, foreign: str, *, list_when_cheaper: bool) -> dict[str, float]:
    clock, service, batches = await setup(tracked, foreign)
    client = _common.client_for(service, clock)
    before = service.request_count()
    changed: set[str] = set()
    all_seen = asyncio.Event()
    row: dict[str, float] = {}

    def on_event(event: FleetEvent) -> None:
        if isinstance(event, StatusChanged):
            changed.add(event.batch_id)
            if len(changed) == tracked and not all_seen.is_set():
                # Counted the moment the last batch is seen, before anything else runs.
                row["requests"] = service.request_count() - before
                row["list_pages"] = fleet.stats.list_pages
                row["retrieves"] = fleet.stats.retrieves
                all_seen.set()

    config = FleetConfig(list_when_cheaper=list_when_cheaper, seed=1)
    start_virtual = clock.now()
    async with clock.auto_advance(), Fleet(client, config=config, on_event=on_event) as fleet:
        fleet.add_many(batches)
        wall0 = time.perf_counter()
        await all_seen.wait()
        row["wall"] = time.perf_counter() - wall0
        row["virtual"] = clock.now() - start_virtual
    await client.aclose()
    return row


async def retrieve_loop(tracked: int) -> float:
    """Wall seconds for one ``retrieve_batch`` per batch, one after another."""
    clock, service, batches = await setup(tracked, "none")
    client = _common.client_for(service, clock)
    clock.advance(20)
    wall0 = time.perf_counter()
    for batch in batches:
        await client.retrieve_batch(batch.id)
    wall = time.perf_counter() - wall0
    await client.aclose()
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10_000, help="tracked batches")
    parser.add_argument("--no-foreign", action="store_true", help="skip the foreign scenarios")
    args = parser.parse_args()
    n = args.batches

    base = asyncio.run(fleet_sweep(n, "none", list_when_cheaper=False))
    loop_wall = asyncio.run(retrieve_loop(n))
    rows = [("retrieve per batch (baseline)", base)]
    scenarios = [("fleet", "none")]
    if not args.no_foreign:
        scenarios += [
            ("fleet, 1 foreign per tracked, interleaved", "interleaved"),
            (f"fleet, {n} foreign newer than all", "newer"),
        ]
    for name, foreign in scenarios:
        rows.append((name, asyncio.run(fleet_sweep(n, foreign, list_when_cheaper=True))))

    print(f"\n{n} tracked batches open in the in-memory fake; one sweep = every batch observed")
    print(f"plain retrieve_batch loop: {n} requests, wall {loop_wall:.2f}s")
    head = f"{'':44s} {'requests':>9s} {'pages':>6s} {'retrieves':>9s} {'wall':>7s}"
    print(f"{head} {'virtual':>8s} {'fewer':>7s}")
    for name, row in rows:
        fewer = base["requests"] / row["requests"]
        print(
            f"{name:44s} {row['requests']:9.0f} {row['list_pages']:6.0f} "
            f"{row['retrieves']:9.0f} {row['wall']:6.2f}s {row['virtual']:7.1f}s {fewer:6.1f}x"
        )
    print("(fewer: baseline requests / requests; goal >= 50x; wall: real seconds of the sweep)")


if __name__ == "__main__":
    main()
