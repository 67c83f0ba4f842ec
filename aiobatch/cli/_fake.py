"""``aiobatch fake-server``: the fake batch service over real HTTP, in real time."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

import attrs

from .._clock import SystemClock
from ..testing import (
    DIALECT_NAMES,
    FakeBatchService,
    FakeConfig,
    FakeDialect,
    Fault,
    LineErrorRule,
    RateLimit,
    WebhookFaults,
    WebhookSender,
    run_fake_server,
)
from ._args import (
    count,
    duration,
    non_negative,
    out,
    port,
    positive,
    rate,
    statuses,
    webhook_secret,
)
from ._command import command

__all__ = [
    "KEY_HEADERS",
    "QUIRKS",
    "build_fake_service",
    "describe",
    "dialect",
    "fake_base_url",
    "fault_rules",
    "quirk_names",
    "rate_limit",
    "serve",
]


# -- fake-server -----------------------------------------------------------------------


def _fake_server_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = FakeConfig()
    hooks = parser.add_argument_group("webhooks (signed batch.* events, as OpenAI sends)")
    hooks.add_argument(
        "--webhook-url",
        action="append",
        default=[],
        metavar="URL",
        help="POST a signed event to URL whenever a batch ends (repeat for more URLs)",
    )
    hooks.add_argument(
        "--webhook-secret-env",
        default="OPENAI_WEBHOOK_SECRET",
        metavar="VAR",
        help="the environment variable holding the signing secret (whsec_...)",
    )
    for fault, what in (
        ("drop", "never delivered"),
        ("duplicate", "delivered twice"),
        ("delay", "held back up to a minute"),
        ("reorder", "sent after the next event"),
    ):
        hooks.add_argument(
            f"--webhook-{fault}",
            type=rate,
            default=0.0,
            metavar="P",
            help=f"share of deliveries {what} (0 to 1)",
        )
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on")
    net.add_argument("--port", type=port, default=8000, help="port to listen on (0: any free)")
    net.add_argument(
        "--access-log", action="store_true", help="print one line per request to stderr"
    )
    net.add_argument(
        "--api-key",
        default=None,
        help=(
            "accept only KEY, in the dialect's header (openai: "
            "'Authorization: Bearer KEY'; portkey: x-portkey-api-key; azure: api-key); "
            "default: any key, but every request needs one"
        ),
    )
    net.add_argument(
        "--dialect",
        choices=DIALECT_NAMES,
        default="openai",
        help=(
            "the provider to play: its auth headers, paths and error shapes, and its quirks "
            "(portkey: /batches/{id}/output; azure: /openai/... paths with api-version or "
            "/openai/v1/..., uploads pending for 2 s, no expiry, empty error files)"
        ),
    )
    net.add_argument(
        "--quirks",
        type=quirk_names,
        default=(),
        metavar="LIST",
        help=f"comma-separated body quirks: {', '.join(QUIRKS)}",
    )

    timing = parser.add_argument_group("timings (durations: 30, 1.5s, 250ms, 10m, 24h)")
    timing.add_argument(
        "--validation-seconds",
        type=duration,
        default=defaults.validation_seconds,
        help="time a batch spends in 'validating'",
    )
    timing.add_argument(
        "--lines-per-second",
        type=non_negative,
        default=defaults.lines_per_second,
        help="processing speed in 'in_progress' (0: lines never finish)",
    )
    timing.add_argument(
        "--finalizing-seconds",
        type=duration,
        default=defaults.finalizing_seconds,
        help="time a batch spends in 'finalizing'",
    )
    timing.add_argument(
        "--cancel-seconds",
        type=duration,
        default=defaults.cancel_seconds,
        help="time a batch spends in 'cancelling'",
    )
    timing.add_argument(
        "--completion-window",
        type=duration,
        default=defaults.completion_window_seconds,
        help="time from creation until an unfinished batch expires",
    )

    faults = parser.add_argument_group(
        "faults (each request draws from a generator seeded with --seed)"
    )
    faults.add_argument(
        "--fault-rate",
        type=rate,
        default=0.0,
        help="share of requests answered with an HTTP error from --fault-statuses",
    )
    faults.add_argument(
        "--fault-statuses",
        type=statuses,
        default=(429, 500, 503),
        help="comma-separated error statuses for --fault-rate, equally likely",
    )
    faults.add_argument(
        "--retry-after",
        type=non_negative,
        default=None,
        help="seconds sent in 'retry-after' with injected 429 and 503 answers",
    )
    faults.add_argument(
        "--drop-rate",
        type=rate,
        default=0.0,
        help="share of requests whose connection is dropped without an answer",
    )
    faults.add_argument(
        "--drop-after",
        action="store_true",
        help="drop connections after the request took effect (default: before)",
    )
    faults.add_argument(
        "--slow",
        type=duration,
        default=0.0,
        metavar="SECONDS",
        help="delay answers by this long (see --slow-rate)",
    )
    faults.add_argument(
        "--slow-rate", type=rate, default=1.0, help="share of requests delayed by --slow"
    )
    faults.add_argument(
        "--malformed-rate",
        type=rate,
        default=0.0,
        help="share of requests answered 200 with a truncated JSON body",
    )
    faults.add_argument(
        "--line-error-rate",
        type=rate,
        default=0.0,
        help="share of batch lines that fail with HTTP 500 in the error file",
    )
    faults.add_argument(
        "--fault-path",
        default="*",
        help="only break requests whose path after /v1 matches this pattern (e.g. /batches*)",
    )
    limits = parser.add_argument_group("rate limit (429 beyond it, with retry-after headers)")
    limits.add_argument(
        "--rate-limit",
        type=positive,
        default=None,
        metavar="RPS",
        help="refuse requests beyond this many per second with 429 (unset: unlimited)",
    )
    limits.add_argument(
        "--burst",
        type=count,
        default=None,
        metavar="N",
        help="requests allowed at once after a quiet spell (unset: RPS rounded up)",
    )
    limits.add_argument(
        "--rate-limit-path",
        default="*",
        metavar="PATTERN",
        help="only limit requests whose path after /v1 matches this pattern (e.g. /batches*)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for ids, faults and results")


def build_fake_service(args: argparse.Namespace) -> FakeBatchService:
    """The fake service the ``fake-server`` arguments describe, on the real clock.

    Args:
        args: the parsed ``fake-server`` arguments.

    Returns:
        The service, its fault rules armed.
    """

    line_errors = (
        (LineErrorRule(status=500, ratio=args.line_error_rate),) if args.line_error_rate else ()
    )
    config = FakeConfig(
        validation_seconds=args.validation_seconds,
        lines_per_second=args.lines_per_second,
        finalizing_seconds=args.finalizing_seconds,
        cancel_seconds=args.cancel_seconds,
        completion_window_seconds=args.completion_window,
        line_errors=line_errors,
        rate_limit=rate_limit(args),
    )
    service = FakeBatchService(
        clock=SystemClock(),
        config=config,
        api_key=args.api_key,
        seed=args.seed,
        dialect=dialect(args),
    )
    for fault in fault_rules(args):
        service.faults.add(fault)
    return service


def rate_limit(args: argparse.Namespace) -> RateLimit | None:
    """The rate limit the ``fake-server`` flags ask for.

    Args:
        args: the parsed ``fake-server`` arguments.

    Returns:
        The limit, or None without ``--rate-limit``.

    Raises:
        ValueError: ``--burst`` or ``--rate-limit-path`` without ``--rate-limit``.
    """
    if args.rate_limit is None:
        if args.burst is not None or args.rate_limit_path != "*":
            raise ValueError("--burst and --rate-limit-path need --rate-limit")
        return None
    if args.burst is None:
        return RateLimit(args.rate_limit, path=args.rate_limit_path)
    return RateLimit(args.rate_limit, burst=args.burst, path=args.rate_limit_path)


#: ``--quirks`` names -> the FakeDialect switch each turns on.
QUIRKS: dict[str, str] = {
    "ms-timestamps": "ms_timestamps",
    "iso-timestamps": "iso_timestamps",
    "capitalised-statuses": "capitalised_statuses",
    "null-request-counts": "null_request_counts",
}


def quirk_names(text: str) -> tuple[str, ...]:
    """A comma-separated list of ``--quirks`` names."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in QUIRKS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown quirk {unknown[0]!r}: expected some of {', '.join(QUIRKS)}"
        )
    return names


def dialect(args: argparse.Namespace) -> FakeDialect:
    """The dialect the ``--dialect`` and ``--quirks`` flags ask for.

    Args:
        args: the parsed ``fake-server`` arguments.

    Returns:
        The dialect, with that provider's default quirks plus the ones named.
    """
    base = FakeDialect.of(args.dialect)
    switches: dict[str, Any] = {QUIRKS[name]: True for name in args.quirks}
    return attrs.evolve(base, **switches) if switches else base


def fault_rules(args: argparse.Namespace) -> list[Fault]:
    """The fault rules for the ``fake-server`` fault flags, in the order they are checked.

    Args:
        args: the parsed ``fake-server`` arguments.

    Returns:
        The rules; empty when no fault flag is set.
    """
    path = args.fault_path
    rules: list[Fault] = []
    if args.drop_rate:
        rules.append(
            Fault.drop(after=args.drop_after, path=path, times=None, probability=args.drop_rate)
        )
    if args.fault_rate:
        # First match wins, so rule i fires with the conditional probability that makes
        # every status equally likely and their total exactly --fault-rate.
        share = args.fault_rate / len(args.fault_statuses)
        for i, status in enumerate(args.fault_statuses):
            retry_after = args.retry_after if status in (429, 503) else None
            rules.append(
                Fault.http(
                    status,
                    retry_after=retry_after,
                    path=path,
                    times=None,
                    probability=min(1.0, share / (1.0 - i * share)),
                )
            )
    if args.malformed_rate:
        rules.append(Fault.malformed(path=path, times=None, probability=args.malformed_rate))
    if args.slow:
        rules.append(Fault.slow(args.slow, path=path, times=None, probability=args.slow_rate))
    return rules


#: Where each dialect of the fake takes the key (``FakeDialect.check``), for the banner.
KEY_HEADERS: dict[str, str] = {
    "openai": "'Authorization: Bearer KEY' (or 'api-key: KEY')",
    "azure": "'api-key: KEY' (or 'Authorization: Bearer KEY')",
    "portkey": (
        "'x-portkey-api-key: KEY', with 'x-portkey-provider: @SLUG' or 'x-portkey-config' "
        "(a plain provider name there also needs 'Authorization: Bearer KEY')"
    ),
    "anthropic": (
        "'x-api-key: KEY' (or 'Authorization: Bearer KEY'), with 'anthropic-version: DATE'"
    ),
}


def fake_base_url(server_url: str, dialect: FakeDialect) -> str:
    """The base URL a client of ``dialect`` uses, from the server's ``.../v1`` URL:
    Azure's requests go under ``/openai/v1`` (its v1 API; the azure dialect answers 404
    elsewhere); Anthropic's clients take the server's root (they add ``/v1``
    themselves); the others' go under ``/v1``."""
    if dialect.name == "azure":
        return server_url.removesuffix("/v1") + "/openai/v1"
    if dialect.name == "anthropic":
        return server_url.removesuffix("/v1")
    return server_url


def describe(service: FakeBatchService, *, key_required: bool) -> str:
    """One line on how ``service`` behaves, for the start-up banner.

    Args:
        service: the fake service.
        key_required: the service accepts only its own key (``--api-key``), not any.
    """
    c = service.config
    faults = len(service.faults)
    limit = c.rate_limit
    if limit is None:
        limited = "no rate limit"
    else:
        where = "" if limit.path == "*" else f" on {limit.path}"
        limited = f"rate limit {limit.requests_per_second:g} req/s, burst {limit.burst}{where}"
    return (
        f"{service.dialect.name} dialect; "
        f"validating {c.validation_seconds:g}s, {c.lines_per_second:g} lines/s, "
        f"finalizing {c.finalizing_seconds:g}s, cancelling {c.cancel_seconds:g}s, "
        f"window {c.completion_window_seconds:g}s; "
        f"{faults} fault rule{'' if faults == 1 else 's'}; {limited}; "
        f"{_key_note(service.dialect, key_required=key_required)}"
    )


def _key_note(dialect: FakeDialect, *, key_required: bool) -> str:
    if not dialect.key_required:
        return "no api key needed"
    which = "only the --api-key key" if key_required else "any key"
    return f"api key required ({which}) in {KEY_HEADERS[dialect.name]}"


@command(
    "fake-server",
    "serve a fake OpenAI-compatible Batch API over HTTP",
    _fake_server_arguments,
    description=(
        "Serve the aiobatch fake batch service over HTTP in real time, with the endpoints "
        "of OpenAI's Files and Batch APIs under /v1 (azure: /openai/v1). Point any "
        "OpenAI-compatible client at the printed base URL, with the key headers printed "
        "under it. Stop with Ctrl-C or SIGTERM."
    ),
    epilog="""\
examples:
  aiobatch fake-server --port 8000                      # a small batch completes in ~2 s
  OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=sk-local \\
      aiobatch run requests.jsonl -o results.jsonl --poll-min 1s --poll-max 2s --create-settle 0
  aiobatch fake-server --port 8000 --fault-rate 0.1 --retry-after 1 --drop-rate 0.02
  aiobatch fake-server --port 8000 --validation-seconds 5 --lines-per-second 20 \\
      --line-error-rate 0.05
  aiobatch fake-server --port 8000 --rate-limit 20 --burst 20 --api-key sk-local
  aiobatch fake-server --port 0 --dialect azure         # any free port; Azure's paths""",
)
def fake_server(args: argparse.Namespace) -> int:
    """Run ``aiobatch fake-server``: serve until Ctrl-C or SIGTERM."""
    try:
        service = build_fake_service(args)
        webhooks = _webhook_settings(args)
    except ValueError as exc:
        print(f"aiobatch fake-server: error: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(
            serve(
                service,
                host=args.host,
                port=args.port,
                access_log=args.access_log,
                banner=describe(service, key_required=args.api_key is not None),
                webhooks=webhooks,
            )
        )
    except KeyboardInterrupt:  # a second Ctrl-C, or no signal handlers on this platform
        out("stopped")
        return 0


def _webhook_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """The WebhookSender arguments the ``--webhook-*`` flags ask for (None: no URL).

    Raises:
        ConfigurationError: a URL is given but the secret's variable is empty.
        ValueError: a fault share outside [0, 1].
    """
    if not args.webhook_url:
        return None
    faults = WebhookFaults(
        drop=args.webhook_drop,
        duplicate=args.webhook_duplicate,
        delay=args.webhook_delay,
        reorder=args.webhook_reorder,
    )
    secret = webhook_secret(args.webhook_secret_env)
    return {"urls": list(args.webhook_url), "secret": secret, "faults": faults}


async def serve(
    service: FakeBatchService,
    *,
    host: str,
    port: int,
    access_log: bool = False,
    banner: str | None = None,
    webhooks: dict[str, Any] | None = None,
) -> int:
    """Serve ``service`` until SIGINT or SIGTERM; print the base URL once listening.

    Args:
        service: the fake service.
        host: the address to listen on.
        port: the port (0 picks a free one).
        access_log: log one line per request to stderr.
        banner: a line printed under the URL.

    Returns:
        The exit status: 0 after a clean stop, 1 when the server could not start.
    """
    logger = None
    if access_log:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        logger = logging.getLogger("aiohttp.access")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Not on Windows' proactor loop; there Ctrl-C raises KeyboardInterrupt instead.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                base_url = await stack.enter_async_context(
                    run_fake_server(service, host=host, port=port, access_log=logger)
                )
            except OSError as exc:
                print(
                    f"aiobatch fake-server: cannot listen on {host}:{port}: {exc}", file=sys.stderr
                )
                return 1
            base_url = fake_base_url(base_url, service.dialect)
            out(f"aiobatch fake server listening on {base_url}")
            if banner:
                out(f"  {banner}")
            if webhooks is not None:
                await stack.enter_async_context(WebhookSender(service, **webhooks))
                out(f"  sending signed webhooks to {', '.join(webhooks['urls'])}")
            out("Press Ctrl-C to stop.")
            await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    out("stopped")
    return 0
