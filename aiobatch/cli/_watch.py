"""``aiobatch watch``: follow batches already in an account until every one has ended.

The batches named, or every open one (``--metadata`` narrows them), are tracked by one
:class:`~aiobatch.Fleet` on the provider that ``--provider``, ``--base-url`` and the key
variables name (as for ``aiobatch run``). While they run, a live display (a bar on a
terminal, a log line now and then elsewhere) shows their requests and statuses, and
each change of status is logged; at the end a table (or ``--json``) of the batches as
they ended, and the exit status says how they ended.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import time
from typing import Any

import attrs

from .._client import BatchClient
from .._convert import to_wire
from .._fleet import BatchDone, DoneReason, Fleet, FleetConfig, FleetEvent, StatusChanged
from .._lifecycle import BatchStatus
from .._models import Batch
from .._run import ProgressDisplay, RunProgress
from ._args import duration, duration_text, out, positive
from ._batches import _BATCH_HEADER, _connection, _selected, _with_client, batch_row, table
from ._command import command
from ._exit import ERROR, FAILURES, INTERRUPTED, OK, USAGE
from ._run import _pairs

__all__ = ["watch_code"]

logger = logging.getLogger("aiobatch.watch")


def _watch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "batch_ids",
        nargs="*",
        metavar="BATCH_ID",
        help="the batches to watch (default: every open batch in the account)",
    )
    parser.add_argument(
        "--metadata",
        type=_pairs,
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="only batches whose metadata has KEY=VALUE (repeatable: all must match)",
    )
    parser.add_argument(
        "--allow-failures",
        action="store_true",
        help="exit 0 when every batch ended, even if some did not complete or some "
        "of their requests failed",
    )
    parser.add_argument(
        "--poll-min",
        type=duration,
        default=None,
        help="the shortest pause between polls of a batch "
        f"(default: {duration_text(FleetConfig().min_interval)})",
    )
    parser.add_argument(
        "--poll-max",
        type=duration,
        default=None,
        help="the longest pause between polls of a batch "
        f"(default: {duration_text(FleetConfig().max_interval)})",
    )
    parser.add_argument(
        "--requests-per-second",
        type=positive,
        default=None,
        help=f"the request budget of the polls (default: {FleetConfig().requests_per_second:g})",
    )
    shown = parser.add_argument_group("display")
    shown.add_argument(
        "--json", action="store_true", help="print the ended batches as JSON instead of a table"
    )
    shown.add_argument("--no-progress", action="store_true", help="no live bar (log lines only)")
    shown.add_argument(
        "-q", "--quiet", action="store_true", help="print only the batches as they ended"
    )
    _connection(parser)


_WATCH_EXAMPLES = """\
examples:
  aiobatch watch                                   # every open batch in the account
  aiobatch watch batch_abc123 batch_def456
  aiobatch watch --metadata aiobatch_run=0123abcd --json
  aiobatch watch --provider compatible --base-url http://127.0.0.1:8000/v1 \\
      --poll-min 1s --poll-max 2s

exit status: 0 every batch completed and every request in it succeeded, 1 a batch
ended otherwise (failed, expired, cancelled) or some requests failed (0 with
--allow-failures), 2 usage error, 4 the provider answered with an error or lost a
batch, 130 interrupted (the batches keep running)"""


@command(
    "watch",
    "follow batches already in an account, live, until every one has ended",
    _watch_arguments,
    description=(
        "Track the batches named, or every open batch in the account (narrowed with "
        "--metadata), with one fleet (one request budget, list sweeps when they are "
        "cheaper) on the provider that --provider, --base-url and the provider's key "
        "variables name (as for 'aiobatch run'). A live display shows their requests "
        "and statuses; when every one has ended, a table (or --json) says how. Watching "
        "changes nothing: Ctrl-C stops watching, the batches keep running."
    ),
    epilog=_WATCH_EXAMPLES,
)
def _watch(args: argparse.Namespace) -> int:
    try:
        config = _fleet_config(args)
    except ValueError as exc:
        text = str(exc).replace("FleetConfig.min_interval", "--poll-min")
        print(f"aiobatch watch: {text.replace('max_interval', '--poll-max')}", file=sys.stderr)
        return USAGE
    if not args.quiet:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logger.setLevel(logging.INFO)
    try:
        return _with_client("watch", args, lambda client, a: _watch_async(client, a, config))
    except KeyboardInterrupt:
        print("aiobatch watch: interrupted; the batches keep running", file=sys.stderr)
        return INTERRUPTED


def _fleet_config(args: argparse.Namespace) -> FleetConfig:
    changes: dict[str, Any] = {}
    if args.poll_min is not None:
        changes["min_interval"] = args.poll_min
    if args.poll_max is not None:
        changes["max_interval"] = args.poll_max
    if args.requests_per_second is not None:
        changes["requests_per_second"] = args.requests_per_second
    return attrs.evolve(FleetConfig(), **changes)


async def _watch_async(client: BatchClient, args: argparse.Namespace, config: FleetConfig) -> int:
    if args.batch_ids:
        batches = [await client.retrieve_batch(batch_id) for batch_id in args.batch_ids]
    else:
        args.status = ["open"]
        batches = await _selected(client, args, sys.maxsize)
    if not batches:
        out("no open batch to watch")
        return OK
    latest: dict[str, Batch] = {b.id: b for b in batches}
    started = time.monotonic()
    display = None
    if not args.quiet:
        interactive = False if args.no_progress else None
        display = ProgressDisplay(sys.stderr, interactive=interactive, logger=logger)

    def snapshot(state: str) -> RunProgress:
        return _progress(latest.values(), time.monotonic() - started, state)

    def on_event(event: FleetEvent) -> None:
        batch = getattr(event, "batch", None)
        if isinstance(batch, Batch):
            latest[batch.id] = batch
        if isinstance(event, StatusChanged) and not args.quiet:
            previous = event.previous.value if event.previous is not None else "-"
            status = event.batch.raw_status or event.batch.status.value
            logger.info("%s: %s -> %s", event.batch_id, previous, status)
        if display is not None:
            display.update(snapshot("running"))

    try:
        async with Fleet(client, config=config, on_event=on_event) as fleet:
            if display is not None:
                display.update(snapshot("running"))
            for batch in batches:
                fleet.add(batch)
            outcomes = await fleet.wait_all()
    finally:
        if display is not None:
            display.close(snapshot("done"))
    ended = [outcomes[b.id] for b in batches]
    if args.json:
        out(json.dumps([_json(done, latest[done.batch_id]) for done in ended], indent=2))
    else:
        out(table(_BATCH_HEADER, [batch_row(latest[done.batch_id]) for done in ended]))
    return watch_code(ended, allow_failures=args.allow_failures)


def _progress(batches: Any, elapsed: float, state: str) -> RunProgress:
    """The watched batches as one :class:`RunProgress`: their requests summed, the
    batches counted by status."""
    total = succeeded = failed = 0
    statuses: collections.Counter[str] = collections.Counter()
    for batch in batches:
        statuses[batch.raw_status or batch.status.value] += 1
        counts = batch.request_counts
        if counts is not None:
            total += counts.total
            succeeded += counts.completed
            failed += counts.failed
    return RunProgress(
        total=total,
        succeeded=succeeded,
        failed=failed,
        retrying=0,
        batches=dict(statuses),
        round=0,
        elapsed=elapsed,
        state=state,
    )


def _json(done: BatchDone, batch: Batch) -> dict[str, Any]:
    return {"id": done.batch_id, "reason": done.reason.value, "batch": to_wire(batch)}


def watch_code(ended: list[BatchDone], *, allow_failures: bool = False) -> int:
    """The exit status of a watch whose batches all ended.

    :data:`~._exit.ERROR` when the provider lost a batch; :data:`~._exit.FAILURES`
    when a batch ended other than ``completed`` or has failed requests (unless
    ``allow_failures``); :data:`~._exit.OK` otherwise.
    """
    if any(done.reason is DoneReason.NOT_FOUND for done in ended):
        return ERROR
    for done in ended:
        batch = done.batch
        counts = batch.request_counts if batch is not None else None
        completed = batch is not None and batch.status is BatchStatus.COMPLETED
        if (not completed or (counts is not None and counts.failed)) and not allow_failures:
            return FAILURES
    return OK
