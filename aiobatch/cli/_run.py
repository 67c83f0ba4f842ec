"""``aiobatch run``, ``aiobatch status`` and ``aiobatch cancel``: the main job from a shell.

``run`` drives a JSONL file of requests through a provider (or, with ``--fake``, through
the built-in fake service in memory, on a virtual clock: no key, no network) and writes
one result line per request. ``status`` prints a run's report from its journal at any
time, from any shell; ``cancel`` asks the run that holds a journal to cancel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import attrs

from .._client import BatchClient
from .._fleet import FleetConfig
from .._provider import require_key
from .._retry import RetryPolicy
from .._run import (
    BatchRun,
    ProgressDisplay,
    RunConfig,
    cancel_batches,
    format_report,
    read_report,
    request_cancel,
    run_is_live,
)
from .._run import JournalFile as Journal
from .._run._open import open_journal, pg_run_name
from .._run._pg_url import is_postgres_url, redact_url
from .._run._records import token_pairs
from .._run._report import build_report
from .._run._states import ShardState
from ..errors import AiobatchError, ConfigurationError, JournalError, PreflightError
from ..testing import (
    FakeBatchService,
    FakeConfig,
    Fault,
    LineErrorRule,
    VirtualClock,
    fake_client,
    unit_hash,
)
from ..webhooks import WEBHOOK_SECRET_ENV, WebhookReceiver, run_webhook_server
from ._args import (
    count,
    duration,
    duration_text,
    host_port,
    out,
    positive,
    rate,
    webhook_secret,
)
from ._command import command
from ._cost import cost_lines, prices_file
from ._exit import (
    ERROR,
    EXIT_CODES_HELP,
    INTERRUPTED,
    STOPPED,
    USAGE,
    error_code,
    finished_code,
)
from ._provider_args import provider as _provider
from ._provider_args import provider_arguments as _provider_arguments

__all__ = ["EXAMPLE_REQUESTS", "fake_environment"]

#: The example request file bundled with the package (README's first command).
EXAMPLE_REQUESTS = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "examples", "requests.jsonl"
)

logger = logging.getLogger("aiobatch.run")


def _pairs(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _token_limit(text: str) -> tuple[str, int]:
    model, value = _pairs(text)
    try:
        limit = int(value.replace(",", "").replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MODEL=TOKENS, got {text!r}") from None
    if limit <= 0:
        raise argparse.ArgumentTypeError(f"the token limit must be positive, got {text!r}")
    return model, limit


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="the JSONL file of requests (one batch request per line)")
    parser.add_argument(
        "-o", "--output", required=True, help="the JSONL file to write every result to"
    )
    parser.add_argument(
        "--journal",
        default=None,
        help="the run's journal: a SQLite file, or a postgresql:// URL (with "
        "aiobatch[postgres]; ?run=NAME names the run, else the output path does, "
        "?schema=NAME keeps its tables apart); run the same command again to resume "
        "(default: OUTPUT.journal)",
    )
    where = parser.add_argument_group("where to send it")
    where.add_argument(
        "--fake",
        action="store_true",
        help="use the built-in fake service, in memory, on a virtual clock "
        "(no API key, no network; batches take their simulated minutes in a second)",
    )
    _provider_arguments(where, "the provider")
    how = parser.add_argument_group("how to run it")
    how.add_argument("--max-lines", type=count, default=None, help="requests per batch")
    how.add_argument("--max-bytes", type=count, default=None, help="bytes per batch file")
    how.add_argument(
        "--max-rounds", type=int, default=3, help="retry rounds for retryable failures"
    )
    how.add_argument(
        "--order",
        choices=("input", "completion"),
        default="input",
        help="the order of the output file",
    )
    how.add_argument(
        "--allow-failures",
        action="store_true",
        help="exit 0 when the run finishes even if some requests failed (not when the "
        "provider refused the batches: that exits 3)",
    )
    how.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip (and report) input lines that fail the checks, instead of stopping",
    )
    how.add_argument(
        "--token-limit",
        type=_token_limit,
        action="append",
        default=[],
        metavar="MODEL=TOKENS",
        help="keep at most TOKENS estimated prompt tokens of MODEL enqueued at once",
    )
    how.add_argument(
        "--metadata",
        type=_pairs,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="metadata for every batch",
    )
    how.add_argument(
        "--batch-timeout",
        type=duration,
        default=None,
        help="cancel a batch still open this long after its creation and keep what it "
        "finished (e.g. 20h)",
    )
    how.add_argument(
        "--poll-min",
        type=duration,
        default=None,
        help="the shortest pause between polls, e.g. 1s or 1m "
        f"(default: {duration_text(FleetConfig().min_interval)})",
    )
    how.add_argument(
        "--poll-max",
        type=duration,
        default=None,
        help="the longest pause between polls, e.g. 30s or 5m "
        f"(default: {duration_text(FleetConfig().max_interval)})",
    )
    how.add_argument(
        "--requests-per-second",
        type=positive,
        default=None,
        help="the provider account's request budget: paces the polls; on a PostgreSQL "
        "journal also every other request (uploads, creates, downloads), shared with the "
        "run's workers (give them the same --requests-per-second)",
    )
    how.add_argument(
        "--give-up-after",
        type=duration,
        default=RunConfig().give_up_after,
        metavar="SECONDS",
        help="stop the run (resumable) when one step (an upload, a create, a collection) "
        "has kept failing this long, e.g. 10m; each failed try is logged with the time left",
    )
    how.add_argument(
        "--delete-files",
        action="store_true",
        help="delete each batch's input, output and error files once its results are "
        "in the journal",
    )
    how.add_argument(
        "--collect-chunk",
        type=count,
        default=RunConfig().collect_chunk,
        help="result lines committed to the journal per transaction",
    )
    show = parser.add_argument_group("display")
    show.add_argument(
        "--no-progress", action="store_true", help="no live progress (log lines only)"
    )
    _prices_argument(show)
    show.add_argument("-q", "--quiet", action="store_true", help="print only the report")
    show.add_argument(
        "-v", "--verbose", action="store_true", help="also log every retry of a request"
    )
    hooks = parser.add_argument_group("webhooks (learn each batch's end in seconds)")
    hooks.add_argument(
        "--webhook-listen",
        type=host_port,
        default=None,
        metavar="HOST:PORT",
        help="receive OpenAI's signed batch webhooks on HOST:PORT (register its printed "
        "URL with OpenAI); polls become a safety net every 10 minutes",
    )
    hooks.add_argument("--webhook-path", default="/webhooks", help="the URL path to receive on")
    hooks.add_argument(
        "--webhook-secret-env",
        default=WEBHOOK_SECRET_ENV,
        metavar="VAR",
        help=f"the environment variable holding the signing secret (default {WEBHOOK_SECRET_ENV})",
    )
    fake = parser.add_argument_group("the fake service (with --fake)")
    fake.add_argument(
        "--fake-faults",
        type=rate,
        default=0.05,
        help="share of control-plane requests answered 429 or 503",
    )
    fake.add_argument(
        "--fake-transient-errors",
        type=rate,
        default=0.05,
        help="share of requests that fail with a 500 the first time they run",
    )
    fake.add_argument(
        "--fake-permanent-errors",
        type=rate,
        default=0.01,
        help="share of requests that always fail with a 400",
    )
    fake.add_argument("--fake-seed", type=int, default=0, help="makes a fake run repeatable")


def fake_environment(
    *,
    faults: float = 0.05,
    transient_errors: float = 0.05,
    permanent_errors: float = 0.01,
    seed: int = 0,
) -> tuple[FakeBatchService, VirtualClock]:
    """The fake service ``aiobatch run --fake`` drives, on a virtual clock.

    Lines fail with a 500 the first time they run (``transient_errors``: a retry round
    answers them) or with a 400 every time (``permanent_errors``); control-plane requests
    are answered 429 or 503 (``faults``) and retried by the client.
    """
    clock = VirtualClock()
    failed_once: set[str] = set()

    def transient(custom_id: str) -> bool:
        if custom_id in failed_once:
            return False
        if _unit(seed, custom_id) < transient_errors:
            failed_once.add(custom_id)
            return True
        return False

    rules = [
        LineErrorRule(status=400, ratio=permanent_errors, code="invalid_value"),
        LineErrorRule(status=500, predicate=transient),
    ]
    config = FakeConfig(
        validation_seconds=30.0,
        lines_per_second=5.0,
        finalizing_seconds=20.0,
        line_errors=[rule for rule in rules if rule.ratio or rule.predicate],
    )
    service = FakeBatchService(clock=clock, config=config, seed=seed)
    if faults:
        service.faults.add(Fault.http(429, retry_after=2.0, times=None, probability=faults / 2))
        service.faults.add(Fault.http(503, times=None, probability=faults / 2))
    return service, clock


def _unit(seed: int, text: str) -> float:
    return unit_hash(seed + 1, text)


@contextlib.asynccontextmanager
async def _client_for(args: argparse.Namespace) -> AsyncIterator[tuple[BatchClient, Any]]:
    if args.fake:
        service, clock = fake_environment(
            faults=args.fake_faults,
            transient_errors=args.fake_transient_errors,
            permanent_errors=args.fake_permanent_errors,
            seed=args.fake_seed,
        )
        async with (
            fake_client(
                service=service,
                clock=clock,
                retry=RetryPolicy(max_attempts=10),
                create_settle=args.create_settle,
            ) as fake,
            clock.auto_advance(),
        ):
            yield fake.client, clock
        return
    provider = _provider(args)
    async with BatchClient(provider=provider, create_settle=args.create_settle) as client:
        yield client, None


def _config(args: argparse.Namespace) -> RunConfig:
    fleet: FleetConfig | None = None
    changes: dict[str, Any] = {}
    if args.poll_min is not None:
        changes["min_interval"] = args.poll_min
    if args.poll_max is not None:
        changes["max_interval"] = args.poll_max
    if args.requests_per_second is not None:
        changes["requests_per_second"] = args.requests_per_second
    if changes:
        fleet = attrs.evolve(FleetConfig(), **changes)
    return RunConfig(
        max_lines=args.max_lines,
        max_bytes=args.max_bytes,
        max_rounds=args.max_rounds,
        order=args.order,
        skip_invalid=args.skip_invalid,
        metadata=dict(args.metadata),
        enqueued_token_limits=dict(args.token_limit),
        batch_timeout=args.batch_timeout,
        collect_chunk=args.collect_chunk,
        give_up_after=args.give_up_after,
        delete_files=args.delete_files,
        fleet=fleet,
        requests_per_second=args.requests_per_second,
    )


async def _tokens_by_model(journal: str, args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """The run's tokens per model, read through the journal's own backend."""
    name = pg_run_name(journal, output=args.output, source=args.input, required=False)
    done = await open_journal(journal, create=False, name=name)
    try:
        return token_pairs(await done.tokens_by_model())
    finally:
        await done.close()


def _webhook_summary(receiver: WebhookReceiver) -> str:
    """What the run's webhook receiver did, in one line (a run that got none, or only
    refused ones, points at the registration or the secret)."""
    s = receiver.stats
    return (
        f"webhooks: {s.received} received, {s.notified} named this run's batches, "
        f"{s.duplicates} duplicates, {s.unknown_batches} for other batches, {s.refused} "
        f"refused (signature {s.refused_signatures}, timestamp {s.refused_timestamps}, "
        f"unsigned {s.refused_headers}, body {s.refused_bodies})"
    )


async def _run_async(args: argparse.Namespace, journal: str) -> int:
    shown = redact_url(journal)
    config = _config(args)
    interactive = None if not args.no_progress else False
    display = None if args.quiet else ProgressDisplay(sys.stderr, interactive=interactive)
    async with contextlib.AsyncExitStack() as stack:
        client, _clock = await stack.enter_async_context(_client_for(args))
        receiver = None
        if args.webhook_listen is not None:
            host, port = args.webhook_listen
            receiver = listening = WebhookReceiver(webhook_secret(args.webhook_secret_env))
            url = await stack.enter_async_context(
                run_webhook_server(receiver, host=host, port=port, path=args.webhook_path)
            )
            print(f"aiobatch: receiving webhooks on {url}", file=sys.stderr)
            # Printed however the run ends: a failed or interrupted run is when "0
            # received" or "refused (signature ...)" points at the registration or secret.
            stack.callback(
                lambda: print(f"aiobatch: {_webhook_summary(listening)}", file=sys.stderr)
            )
        run = BatchRun(
            client,
            args.input,
            journal=journal,
            output=args.output,
            config=config,
            on_progress=display.update if display is not None else None,
            webhooks=receiver,
        )
        loop = asyncio.get_running_loop()
        interrupts = 0

        def interrupted() -> None:
            nonlocal interrupts
            interrupts += 1
            if interrupts == 1:
                print(
                    "\naiobatch: cancelling: the open batches are being cancelled and "
                    "their finished lines collected (Ctrl-C again to stop at once; the "
                    "journal stays resumable)",
                    file=sys.stderr,
                )
                run.cancel()
            else:
                main.cancel()

        def terminated() -> None:
            print(
                "\naiobatch: stopping; the batches keep running, and the same command "
                "collects them later",
                file=sys.stderr,
            )
            run.stop()

        main = asyncio.ensure_future(run.run())
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, interrupted)
            loop.add_signal_handler(signal.SIGTERM, terminated)
        try:
            report = await main
        except asyncio.CancelledError:
            if display is not None:
                display.close()
            print(f"aiobatch: stopped; resume with the same command ({shown})", file=sys.stderr)
            return INTERRUPTED
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGINT)
                loop.remove_signal_handler(signal.SIGTERM)
        if display is not None:
            display.close(run.progress())
    tokens = await _tokens_by_model(journal, args)
    out("\n".join([format_report(report), *cost_lines(tokens, args.prices)]))
    if report.state == "cancelled":
        print(f"cancelled; resume with the same command ({shown})", file=sys.stderr)
        return INTERRUPTED
    if report.state == "stopped":
        print(f"stopped; resume with the same command ({shown})", file=sys.stderr)
        return STOPPED
    if report.state != "done":
        return ERROR
    return finished_code(
        failed=report.failed,
        skipped=report.skipped,
        errors=report.errors,
        allow_failures=args.allow_failures,
    )


_RUN_EXAMPLES = """\
examples:
  aiobatch run requests.jsonl -o results.jsonl --fake        # try it: no key, no network
  OPENAI_API_KEY=sk-... aiobatch run requests.jsonl -o results.jsonl
  aiobatch run requests.jsonl -o results.jsonl --provider compatible \\
      --base-url http://127.0.0.1:8000/v1 --poll-min 1s --poll-max 2s --create-settle 0
  aiobatch status results.jsonl.journal                      # from another shell
  aiobatch failures results.jsonl.journal --retry-file retry.jsonl"""


@command(
    "run",
    "run a JSONL file of requests end to end (resumable; every request answered once)",
    _run_arguments,
    description=(
        "Check every line, shard the file into batches, upload them, create the batches, "
        "track them, collect every result line, re-submit the retryable failures, and "
        "write one result per request to OUTPUT. Everything is journaled first: run the "
        "same command again after a crash, a Ctrl-C or 'aiobatch cancel' to continue. "
        "Ctrl-C cancels the open batches and keeps what they finished (exit 130); SIGTERM "
        "stops without cancelling them (exit 143)."
    ),
    epilog=_RUN_EXAMPLES + "\n\n" + EXIT_CODES_HELP,
)
def _run(args: argparse.Namespace) -> int:
    journal = args.journal or f"{args.output}.journal"
    try:
        _config(args)
    except ValueError as exc:
        print(
            f"aiobatch run: {str(exc).replace('RunConfig.', '--').replace('_', '-')}",
            file=sys.stderr,
        )
        return USAGE
    if args.webhook_listen is not None:
        if args.fake:
            print(
                "aiobatch run: --webhook-listen needs a real server (the --fake service runs "
                "on a virtual clock); serve one with 'aiobatch fake-server --webhook-url URL'",
                file=sys.stderr,
            )
            return USAGE
        try:
            webhook_secret(args.webhook_secret_env)
        except ConfigurationError as exc:
            print(f"aiobatch run: {exc}", file=sys.stderr)
            return USAGE
    if not args.fake:
        # A missing key (or endpoint) is said now, before the input is read.
        try:
            require_key(_provider(args))
        except ConfigurationError as exc:
            print(f"aiobatch run: {exc}", file=sys.stderr)
            return USAGE
    if not args.quiet:
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
        )
        logging.getLogger("aiobatch.run").setLevel(logging.INFO)
    if args.fake and not is_postgres_url(journal) and os.path.exists(journal):
        try:
            with Journal(journal) as existing:
                state = existing.get_meta("state")
        except JournalError as exc:
            print(f"aiobatch run: {exc}", file=sys.stderr)
            return ERROR
        if state not in (None, "done"):
            print(
                f"aiobatch run: {journal} holds an unfinished run, and a --fake run cannot "
                "resume it (the fake service lived in the memory of the process that "
                "stopped); delete the journal to start again",
                file=sys.stderr,
            )
            return USAGE
    try:
        return asyncio.run(_run_async(args, journal))
    except PreflightError as exc:
        print(f"aiobatch run: {exc}", file=sys.stderr)
        # An input file that fails the checks is the user's to fix; nothing was sent.
        return USAGE
    except (AiobatchError, OSError) as exc:
        print(f"aiobatch run: {exc}", file=sys.stderr)
        return error_code(exc)
    except KeyboardInterrupt:
        print(
            f"aiobatch: stopped; resume with the same command ({redact_url(journal)})",
            file=sys.stderr,
        )
        return INTERRUPTED


def _journal_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "journal",
        help="the run's journal file, or the postgresql:// URL of its database (with "
        "?run=ID or --run)",
    )
    parser.add_argument(
        "--run",
        default=None,
        help="with a postgresql:// URL: the run's id or name (default: the URL's ?run=)",
    )


async def _pg_run(args: argparse.Namespace) -> Any:
    """The PostgreSQL journal of the run ``args`` name.

    Raises:
        JournalError: no run is named, or the database holds no such run.
    """
    from .._run._postgres import PostgresJournal

    journal = await PostgresJournal.open(args.journal, name=args.run)
    if await journal.meta() is None:
        await journal.close()
        raise JournalError(f"no run in the journal {journal.location}")
    return journal


async def _pg_status(args: argparse.Namespace) -> tuple[Any, dict[str, tuple[int, int]]]:
    journal = await _pg_run(args)
    try:
        live = bool(await journal.live_workers())
        report = build_report(await journal.meta(), await journal.counts(), live=live)
        return report, token_pairs(await journal.tokens_by_model())
    finally:
        await journal.close()


async def _pg_cancel(args: argparse.Namespace) -> str:
    """Flag the run's cancel in the database: every worker sees it at its next heartbeat.

    Raises:
        JournalError: no such run, or it is done already.
    """
    journal = await _pg_run(args)
    try:
        meta = await journal.meta()
        if meta.state == "done":
            raise JournalError("the run is already done")
        await journal.request_cancel(time.time())
        workers = await journal.live_workers()
    finally:
        await journal.close()
    if workers:
        return (
            f"cancel requested; the {len(workers)} worker(s) of run {meta.run_id} stop within "
            "a third of their lease time, cancelling their open batches"
        )
    return (
        f"cancel requested; no worker of run {meta.run_id} is alive now: the next worker "
        "that joins it cancels its open batches"
    )


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    _journal_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    _prices_argument(parser)


def _prices_argument(parser: argparse._ActionsContainer) -> None:
    parser.add_argument(
        "--prices",
        type=prices_file,
        default=None,
        metavar="FILE",
        help="a price table (JSON, or TOML on Python 3.11+: {model: {input, output}} in "
        "dollars per million tokens at batch prices) to show the cost per model",
    )


_STATUS_EXAMPLES = """\
examples:
  aiobatch status results.jsonl.journal                 # while it runs, or after
  aiobatch status results.jsonl.journal --json          # for a script
  aiobatch status results.jsonl.journal --prices prices.json

exit status: 0 the report was printed, 1 the journal cannot be read"""


@command(
    "status",
    "print a run's report from its journal (also while it runs)",
    _status_arguments,
    epilog=_STATUS_EXAMPLES,
)
def _status(args: argparse.Namespace) -> int:
    try:
        if is_postgres_url(args.journal):
            report, tokens = asyncio.run(_pg_status(args))
        else:
            report, tokens = _file_status(args)
    except JournalError as exc:
        print(f"aiobatch status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        data = attrs.asdict(report)
        data["total_tokens"] = report.total_tokens
        data["tokens_by_model"] = {
            model: {"input": i, "output": o} for model, (i, o) in tokens.items()
        }
        if args.prices is not None:
            data["cost_by_model"] = {
                m: (i * args.prices[m][0] + o * args.prices[m][1]) / 1_000_000
                for m, (i, o) in tokens.items()
                if m in args.prices
            }
        out(json.dumps(data, indent=2, default=_plain))
    else:
        out("\n".join([format_report(report), *cost_lines(tokens, args.prices)]))
    return 0


def _file_status(args: argparse.Namespace) -> tuple[Any, dict[str, tuple[int, int]]]:
    with Journal(args.journal, readonly=True) as journal:
        try:
            live: bool | None = run_is_live(args.journal)
        except OSError:  # no lock file can be made beside it: cannot tell
            live = None
        return read_report(journal, live=live), token_pairs(journal.tokens_by_model())


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(type(value).__name__)


def _cancel_arguments(parser: argparse.ArgumentParser) -> None:
    _journal_argument(parser)
    _provider_arguments(
        parser, "when no process runs the journal: the provider to send the cancels to"
    )


@command(
    "cancel",
    "cancel a run: its open batches stop, what they finished is kept",
    _cancel_arguments,
    description=(
        "When a process runs the journal, flag it: that run cancels its open batches "
        "within seconds, collects their finished lines and stops, resumable. When none "
        "does (it crashed or was stopped), send the cancels for the batches the journal "
        "records as open, with the provider settings given. Either way, run the same "
        "'aiobatch run' command again to continue: it collects what the batches "
        "finished and re-submits the rest."
    ),
    epilog="""\
examples:
  aiobatch cancel results.jsonl.journal                 # the run holding it stops within seconds
  aiobatch cancel results.jsonl.journal --provider azure  # no process runs it: cancel directly
  aiobatch run requests.jsonl -o results.jsonl          # then: collect what they finished

exit status: 0 cancelled (or nothing to cancel), 1 the run is done or the journal or the
provider cannot be used""",
)
def _cancel(args: argparse.Namespace) -> int:
    if is_postgres_url(args.journal):
        try:
            out(asyncio.run(_pg_cancel(args)))
        except JournalError as exc:
            print(f"aiobatch cancel: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        with Journal(args.journal) as journal:
            state = journal.get_meta("state")
            open_batches = journal.open_batches()
            creating = journal.shards(ShardState.CREATING)
    except JournalError as exc:
        print(f"aiobatch cancel: {exc}", file=sys.stderr)
        return 1
    if state == "done":
        print("aiobatch cancel: the run is already done", file=sys.stderr)
        return 1
    if run_is_live(args.journal):
        try:
            request_cancel(args.journal, busy_timeout=3.0)
        except JournalError as exc:
            print(f"aiobatch cancel: {exc}", file=sys.stderr)
            return 1
        out(f"cancel requested; the run holding {args.journal} stops within seconds")
        return 0
    if not open_batches and not creating:
        out(f"no process runs {args.journal} and it records no open batch: nothing to cancel")
        return 0
    try:
        sent = asyncio.run(_cancel_directly(args))
    except (AiobatchError, OSError) as exc:
        print(f"aiobatch cancel: {exc}", file=sys.stderr)
        return 1
    if not sent:
        out(f"no process runs {args.journal} and none of its batches is open: nothing to cancel")
        return 0
    out(
        f"no process runs {args.journal}: sent cancels for {len(sent)} batch(es); run "
        "'aiobatch run' again to collect what they finished"
    )
    return 0


async def _cancel_directly(args: argparse.Namespace) -> list[str]:
    provider = _provider(args)
    async with BatchClient(provider=provider, create_settle=args.create_settle) as client:
        return await cancel_batches(args.journal, client)
