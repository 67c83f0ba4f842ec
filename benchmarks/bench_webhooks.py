"""Webhooks as the fast path: detection delay and requests, against polling alone.

The scenario is ``bench_fleet_detection.py``'s: ``--batches`` batches (default 10,000,
10 lines each) created at time 0 on an in-memory fake on a virtual clock, each ending
30 s + a seeded random time in ``[0, 7140)`` s + 30 s later (completions spread over two
simulated hours), the server limiting ``GET /batches*`` to ``--rps`` (default 20)
requests per second, a batch's completion time known exactly.

* webhooks: the fake's :class:`~aiobatch.testing.WebhookSender` posts each signed
  ``batch.completed`` over loopback HTTP to a :class:`~aiobatch.webhooks.WebhookReceiver`
  (``run_webhook_server``) that notifies one :class:`~aiobatch.Fleet` with
  ``FleetConfig(webhook_interval=--safety-net)`` (default 600 s); ``--drop`` (10%) of
  the deliveries are dropped and ``--duplicate`` (5%) sent twice. The virtual clock
  moves only when no delivery is in flight on the socket, so an HTTP round trip takes
  no simulated time (the delays measured are the fleet's, not the loopback's).
* polling alone, default intervals (same run, fresh service): the same fleet without
  webhooks (the default ``FleetConfig``), as ``bench_fleet_detection.py`` runs it. Like
  with like: the same seeded batches and completion times, and the same ``FleetConfig``
  (budget, burst, seed, default intervals) but for ``webhook_interval``.
* polling alone, tuned to p99 <= 2 s (``--matched-baseline``): the fleet without
  webhooks polling every open batch every ``--matched-interval`` seconds (default 2:
  ``min_interval``, ``max_interval`` and every first pause set to it, no jitter, so all
  open batches fall due together and one list sweep of ``batches / 100`` pages serves
  them), on the same seeded batches and server limit. Its sweeps read ~100 pages of
  100 batches a second of wall time, so it runs at ``--matched-batches`` (default
  1,000: ~8 minutes), with a webhooks run of that size beside it for the ratio. At
  10,000 batches a sweep is 100 pages, 5 s at the 20 GET/s limit: there polling alone
  cannot reach a 2 s p99 under the limit at all.

Detection delay is the virtual time of the fleet's ``BatchDone`` minus the batch's
completion; it is shown apart for the batches whose event was delivered and for those
whose every delivery was dropped (caught by the safety-net polls). Requests are every
``GET /batches*`` the server received (its rate limiter's count); the webhooks run also
counts them by kind at the client: retrieves of a batch a webhook had named (the fast
path), other retrieves (safety-net polls), list pages (safety-net sweeps, and sweeps
of many notified batches at once) and anything else.

The floor: a ``BatchDone`` carries the batch (``output_file_id``, ``request_counts``),
and a webhook names only the batch, so each delivered event costs a request that
returns that batch: a retrieve, or a list page holding it. Here the events arrive
~1.25 a second at random places in a 10,000-batch list, so a page read within 2 s of an
event almost never holds a second one: about one request per delivered event is the
least a 2-second detection can cost, and ``polling requests / delivered events`` the
best ratio any fleet could reach in this scenario (printed as "bound").

Run: ``python benchmarks/bench_webhooks.py [--batches 10000] [--skip-baseline]
[--matched-baseline [--matched-batches 1000] [--matched-interval 2]]``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import time
from typing import Any

import _common
import bench_fleet_detection as detection

from aiobatch import BatchClient, BatchDone, Fleet, FleetConfig, FleetEvent, RetryPolicy
from aiobatch.testing import VirtualClock, WebhookFaults, WebhookSender
from aiobatch.testing._clock import _settle
from aiobatch.transport import Request, Response, Transport
from aiobatch.webhooks import WebhookReceiver, run_webhook_server

SECRET = "whsec_" + base64.b64encode(b"bench-webhooks-secret-0123456789").decode()


class Tally:
    """Plays the fleet for the receiver (records each batch a webhook named, then
    notifies the fleet) and wraps the client's transport to count requests by kind."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.fleet: Fleet | None = None
        self.named: set[str] = set()
        self.kinds: dict[str, int] = {}

    def notify(self, batch_id: str) -> bool:
        self.named.add(batch_id)
        assert self.fleet is not None
        return self.fleet.notify(batch_id)

    async def send(self, request: Request, *, stream: bool = False) -> Response:
        path = request.url.split("/v1", 1)[-1]
        if request.method == "GET" and path == "/batches":
            kind = "list pages"
        elif request.method == "GET" and path.startswith("/batches/"):
            named = path.removeprefix("/batches/") in self.named
            kind = "retrieves after a webhook" if named else "retrieves (safety net)"
        else:
            kind = f"{request.method} {path}"
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        return await self.inner.send(request, stream=stream)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def drive(clock: VirtualClock, sender: WebhookSender, stop: asyncio.Event) -> None:
    """Move the clock to the next wake-up once the loop is idle and no delivery is on the
    socket (a POST in flight looks idle to ``auto_advance``)."""
    while not stop.is_set():
        await _settle()
        nxt = clock.next_wakeup
        if sender.in_flight or nxt is None:
            await asyncio.sleep(0.0005)
            continue
        clock.advance_to(nxt)


async def run_webhooks(args: argparse.Namespace) -> dict[str, Any]:
    clock, service, batches, done_at = await detection.setup(args.batches, args.rps, args.seed)
    tally = Tally(service.transport())
    client = BatchClient(
        api_key=_common.KEY,
        base_url="http://fake.invalid/v1",
        transport=tally,
        clock=clock,
        retry=RetryPolicy(max_attempts=3),
    )
    delays: dict[str, float] = {}

    def on_event(event: FleetEvent) -> None:
        if isinstance(event, BatchDone) and event.finished:
            delays[event.batch_id] = clock.now() - done_at[event.batch_id]

    config = FleetConfig(
        requests_per_second=args.rps,
        burst=args.fleet_burst,
        webhook_interval=args.safety_net,
        seed=args.seed,
    )
    faults = WebhookFaults(drop=args.drop, duplicate=args.duplicate)
    wall0 = time.perf_counter()
    stop = asyncio.Event()
    async with Fleet(client, config=config, on_event=on_event) as fleet:
        tally.fleet = fleet
        receiver = WebhookReceiver(SECRET, fleet=tally, clock=clock)
        async with run_webhook_server(receiver) as url:
            sender = WebhookSender(service, [url], SECRET, faults=faults, seed=args.seed)
            async with sender:
                driver = asyncio.ensure_future(drive(clock, sender, stop))
                fleet.add_many(batches)
                await fleet.wait_all()
                stop.set()
                await driver
        stats = fleet.stats
    await client.aclose()
    delivered = {d.batch_id for d in sender.deliveries if d.status == 200}
    limiter = service.rate_limiter
    return {
        "delivered": [v for k, v in delays.items() if k in delivered],
        "dropped": [v for k, v in delays.items() if k not in delivered],
        "requests": limiter.admitted + limiter.refused,
        "refused": limiter.refused,
        "detail": (
            f"retrieves {stats.retrieves}, list pages {stats.list_pages}, sweeps "
            f"{stats.sweeps}; notify {stats.notifications} (unknown "
            f"{stats.unknown_notifications})"
        ),
        "kinds": ", ".join(f"{kind} {n}" for kind, n in sorted(tally.kinds.items())),
        "receiver": receiver.stats,
        "sender": sender.stats,
        "virtual": clock.now() - _common.T0,
        "wall": time.perf_counter() - wall0,
    }


def matched_config(args: argparse.Namespace) -> FleetConfig:
    """Polling alone tuned to detect within ``--matched-interval`` seconds: every open
    batch polled that often whatever its status, without jitter (so all of them fall due
    at once and one list sweep serves them); the budget, burst and seed as the others'."""
    every = args.matched_interval
    return FleetConfig(
        requests_per_second=args.rps,
        burst=args.fleet_burst,
        min_interval=every,
        max_interval=every,
        validating_interval=every,
        finalizing_interval=every,
        in_progress_interval=every,
        jitter=0.0,
        seed=args.seed,
    )


def print_matched(args: argparse.Namespace, hooks: dict[str, Any], matched: dict[str, Any]) -> None:
    """The tuned polling fleet's figures and its ratio to webhooks at its size."""
    n, every = args.matched_batches, args.matched_interval
    print(
        f"polling alone, tuned to p99 <= {every:g} s (every open batch polled every "
        f"{every:g}s, no jitter; {n} batches, server limit {args.rps:g} GET/s):"
    )
    print(f"  detection delay   {_common.delays_line(matched['delays'])}")
    print(f"  requests {matched['requests']:9d}   429s {matched['refused']}")
    print(f"  {matched['detail']}")
    print(f"  simulated {matched['virtual']:.0f}s in {matched['wall']:.1f}s wall")
    if n != args.batches:
        print(f"webhooks at the same {n} batches (same settings as above):")
        print(f"  delivered events  {_common.delays_line(hooks['delivered'])}")
        print(f"  dropped events    {_common.delays_line(hooks['dropped'])}")
        print(f"  requests {hooks['requests']:9d}   429s {hooks['refused']}")
        pages = math.ceil(args.batches / 100)
        note = f"run at {n} batches, not {args.batches}, to keep its simulation short"
        if pages / args.rps > every:
            note += (
                f"; at {args.batches} batches one sweep is {pages} list pages, "
                f"{pages / args.rps:g}s at {args.rps:g} GET/s: there polling alone "
                f"cannot reach a {every:g}s p99 under this limit at all"
            )
        print(f"  ({note})")
    delays = hooks["delivered"] + hooks["dropped"]
    print(
        f"polling alone, tuned to p99 <= {every:g} s / webhooks ({n} batches): requests "
        f"{matched['requests']} / {hooks['requests']} = "
        f"{matched['requests'] / hooks['requests']:.1f}x, p50 delay "
        f"{_common.percentile(matched['delays'], 50):.2f}s vs "
        f"{_common.percentile(delays, 50):.2f}s, p99 "
        f"{_common.percentile(matched['delays'], 99):.2f}s vs "
        f"{_common.percentile(delays, 99):.2f}s (delivered "
        f"{_common.percentile(hooks['delivered'], 99):.2f}s, dropped "
        f"{_common.percentile(hooks['dropped'], 99):.2f}s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10_000)
    parser.add_argument("--rps", type=float, default=20.0, help="server limit and fleet budget")
    parser.add_argument("--fleet-burst", type=int, default=20)
    parser.add_argument("--safety-net", type=float, default=600.0, help="webhook_interval")
    parser.add_argument("--drop", type=float, default=0.10)
    parser.add_argument("--duplicate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--matched-baseline",
        action="store_true",
        help="also run polling alone tuned to the webhooks' detection delay",
    )
    parser.add_argument("--matched-interval", type=float, default=2.0, help="its poll interval (s)")
    parser.add_argument(
        "--matched-batches", type=int, default=1000, help="its batches (slow: ~8 min at 1000)"
    )
    args = parser.parse_args()
    args.max_interval = FleetConfig().max_interval  # the polling fleet's (its default)

    hooks = asyncio.run(run_webhooks(args))
    base = None if args.skip_baseline else asyncio.run(detection.run_fleet(args))
    matched = hooks_at_matched = None
    if args.matched_baseline:
        margs = argparse.Namespace(**{**vars(args), "batches": args.matched_batches})
        matched = asyncio.run(detection.run_fleet(margs, matched_config(margs)))
        same = args.matched_batches == args.batches
        hooks_at_matched = hooks if same else asyncio.run(run_webhooks(margs))

    print(
        f"\n{args.batches} batches completing over {detection.HORIZON / 3600:g} simulated "
        f"hours; server limit {args.rps:g} GET/s; fleet budget {args.rps:g}/s"
    )
    print(
        f"webhooks over loopback HTTP ({args.drop:.0%} dropped, {args.duplicate:.0%} "
        f"duplicated), safety-net polls every {args.safety_net:g}s:"
    )
    print(f"  delivered events  {_common.delays_line(hooks['delivered'])}")
    print(f"  dropped events    {_common.delays_line(hooks['dropped'])}")
    print(f"  requests {hooks['requests']:9d}   429s {hooks['refused']}")
    print(f"  {hooks['detail']}")
    print(f"  by kind: {hooks['kinds']}")
    s, r = hooks["sender"], hooks["receiver"]
    print(
        f"  sender: events {s.events}, POSTs {s.attempts}, dropped {s.dropped}, "
        f"duplicated {s.duplicated}; receiver: accepted {r.accepted}, duplicates "
        f"{r.duplicates}, refused {r.refused}"
    )
    print(f"  simulated {hooks['virtual']:.0f}s in {hooks['wall']:.1f}s wall")
    if base is not None:
        print(
            "polling alone, default intervals (FleetConfig defaults, max_interval "
            f"{args.max_interval:g}s):"
        )
        print(f"  detection delay   {_common.delays_line(base['delays'])}")
        print(f"  requests {base['requests']:9d}   429s {base['refused']}")
        print(f"  {base['detail']}")
        print(f"  simulated {base['virtual']:.0f}s in {base['wall']:.1f}s wall")
        delays = hooks["delivered"] + hooks["dropped"]
        print(
            "polling alone, default intervals / webhooks: requests "
            f"{base['requests']} / {hooks['requests']} = "
            f"{base['requests'] / hooks['requests']:.1f}x, "
            f"p50 delay {_common.percentile(base['delays'], 50):.2f}s vs "
            f"{_common.percentile(delays, 50):.2f}s, p99 "
            f"{_common.percentile(base['delays'], 99):.2f}s vs "
            f"{_common.percentile(delays, 99):.2f}s (delivered "
            f"{_common.percentile(hooks['delivered'], 99):.2f}s, dropped "
            f"{_common.percentile(hooks['dropped'], 99):.2f}s)"
        )
        print(
            f"bound: polling requests / delivered events = {base['requests']} / "
            f"{len(hooks['delivered'])} = {base['requests'] / len(hooks['delivered']):.1f}x "
            "(one request per delivered event, the floor of a 2 s detection here)"
        )
    if matched is not None and hooks_at_matched is not None:
        print_matched(args, hooks_at_matched, matched)
    print(
        "(goals: p99 < 2 simulated seconds for delivered events; every dropped one within "
        "the safety net; 10x fewer requests than polling alone)"
    )


if __name__ == "__main__":
    main()
