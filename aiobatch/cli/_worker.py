"""``aiobatch worker``: one worker of runs shared through a PostgreSQL journal.

It joins the run given by ``--run`` (or the URL's ``?run=``) and acts only on the
shards it leases (see :class:`aiobatch._run._worker.Worker`); start as many as you like,
on any machines that reach the database and the provider.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from .._client import BatchClient
from .._fleet import FleetConfig
from .._provider import require_key
from .._run import RunConfig, format_report
from .._run._pg_url import is_postgres_url, redact_url
from ..errors import AiobatchError, ConfigurationError
from ._args import count, duration, out, positive
from ._command import command
from ._provider_args import provider, provider_arguments

__all__: list[str] = []


def _worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--journal", required=True, help="the postgresql:// URL of the runs' database"
    )
    parser.add_argument(
        "--run", default=None, help="the run's id or name (default: the URL's ?run=)"
    )
    parser.add_argument(
        "--lease",
        type=duration,
        default=30.0,
        help="lease time: a dead worker's shards are adopted after this long (default 30s)",
    )
    parser.add_argument(
        "--requests-per-second",
        type=positive,
        default=None,
        help="the provider account's request budget, for every worker of the run together "
        "(give each worker the same): each takes its share, the budget over the live "
        "workers, and every request it sends (uploads, creates, polls, downloads, cancels) "
        "takes from it (default: no budget beyond the polls' own)",
    )
    parser.add_argument(
        "--burst",
        type=count,
        default=None,
        help="the most requests the workers together send at once (default 20)",
    )
    parser.add_argument("--max-lines", type=count, default=None, help="requests per batch")
    parser.add_argument(
        "--poll-max", type=duration, default=None, help="the longest pause between polls"
    )
    provider_arguments(parser, "the provider")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the report")


@command(
    "worker",
    "carry a run shared through a PostgreSQL journal, with other workers",
    _worker_arguments,
    description=(
        "Join a run recorded in a PostgreSQL journal (started by 'aiobatch run --journal "
        "postgresql://...'): claim shards no worker holds, carry each to its results, and "
        "adopt the shards of workers that stopped renewing their leases. Exits 0 when "
        "every request of the run has its result; SIGTERM stops this worker only."
    ),
)
def _worker(args: argparse.Namespace) -> int:
    if not is_postgres_url(args.journal):
        print("aiobatch worker: --journal must be a postgresql:// URL", file=sys.stderr)
        return 2
    try:
        require_key(provider(args))
    except ConfigurationError as exc:
        print(f"aiobatch worker: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_work(args))
    except AiobatchError as exc:
        print(f"aiobatch worker: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"aiobatch worker: stopped ({redact_url(args.journal)})", file=sys.stderr)
        return 130


async def _work(args: argparse.Namespace) -> int:
    from .._run._worker import Worker

    async with BatchClient(provider=provider(args), create_settle=args.create_settle) as client:
        fleet = None
        if args.poll_max is not None:
            fleet = FleetConfig(min_interval=min(1.0, args.poll_max), max_interval=args.poll_max)
        config = RunConfig(max_lines=args.max_lines, fleet=fleet)
        worker = Worker(
            client,
            journal=args.journal,
            run=args.run,
            config=config,
            lease_seconds=args.lease,
            requests_per_second=args.requests_per_second,
            burst=args.burst,
        )
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, worker.stop)
            loop.add_signal_handler(signal.SIGINT, worker.stop)
        report = await worker.run()
    if not args.quiet:
        out(format_report(report))
    return 0 if report.state in ("done", "running") else 1
