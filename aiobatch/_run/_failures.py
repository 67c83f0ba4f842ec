"""A failing step: how long to wait before its next try, and when the run gives up.

A rate limit (429) is the server pacing the run, not a failing step: it never stops the
run, and its ``retry-after`` is waited out (at most ``max_retry_wait``, then the run asks
again). Other failures stop the run once the step has failed for ``give_up_after``
seconds, or ``max_step_failures`` times in a row; the last wait is cut so that the last
try is made at that time. Before the server has answered the run once, a connection
failure is a wrong address rather than an outage: ``unreachable_after`` applies, and
the run's calls make only a few attempts each.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import attrs

from .._retry import cap_server_wait, retry_after_of
from ..errors import (
    AiobatchError,
    APIStatusError,
    ConnectError,
    DecodeError,
    RateLimitError,
    StepFailedError,
    UnreachableError,
    describe,
)
from ._report import format_duration

if TYPE_CHECKING:
    from ._context import RunContext

__all__ = ["QUICK_ATTEMPTS", "Streak", "heard_from_server", "step_failed", "tracking_failed"]

logger = logging.getLogger("aiobatch.run")

#: Attempts per call (the client's own retries) until the server has answered the run
#: once: a wrong address is told within ``unreachable_after``, by the run's own tries.
QUICK_ATTEMPTS = 3


@attrs.define
class Streak:
    """The failures in a row of one step: how many, and since when."""

    count: int = 0
    #: ``clock.monotonic()`` at the start of the first failed attempt (None: no failure).
    since: float | None = None
    #: ``clock.monotonic()`` at the start of the attempt being made.
    started: float = 0.0

    def reset(self) -> None:
        self.count = 0
        self.since = None


def _unreachable_host(error: ConnectError, base_url: str) -> str:
    """The host (and port, when given) a connection failed to, without user info."""
    netloc = urlsplit(error.url or base_url).netloc
    return netloc.rpartition("@")[2] or error.url or base_url


def heard_from_server(ctx: RunContext) -> None:
    """The server answered the run: from now on a connection failure is an outage
    (``give_up_after``), and calls make the client's full retries."""
    if not ctx.answered:
        ctx.answered = True
        ctx.client = ctx.given_client


def step_failed(ctx: RunContext, what: str, streak: Streak, exc: AiobatchError) -> float:
    """Count a failed attempt of a step, log it, and say how long to wait before the
    next one (see the module notes).

    Returns:
        The wait.

    Raises:
        StepFailedError: the run gives up (UnreachableError: the server could not be
            reached at all).
    """
    config = ctx.config
    if isinstance(exc, APIStatusError | DecodeError):
        heard_from_server(ctx)  # the server is there, whatever it said
    asked = retry_after_of(exc)
    if asked is not None and asked > 0:
        asked = cap_server_wait(
            asked, config.max_retry_wait, what=f"run {ctx.run_id}: {what}", log=logger
        )
    else:
        asked = 0.0
    if isinstance(exc, RateLimitError):
        delay = max(ctx.step_waits.backoff_delay(max(streak.count - 1, 0)), asked)
        logger.warning(
            "run %s: %s: rate limited: %s; next try in %s (a 429 never stops the run)",
            ctx.run_id,
            what,
            describe(exc),
            format_duration(delay),
        )
        return delay
    streak.count += 1
    if streak.since is None:
        streak.since = streak.started
    elapsed = ctx.clock.monotonic() - streak.since
    unreachable = isinstance(exc, ConnectError) and not ctx.answered
    budget, setting = config.give_up_after, "give_up_after"
    if unreachable and (budget is None or config.unreachable_after < budget):
        budget, setting = config.unreachable_after, "unreachable_after"
    limit = config.max_step_failures
    # (A hair of slack: a last try made exactly at the deadline is past it.)
    timed_out = budget is not None and elapsed >= budget - 1e-6
    if timed_out or (limit is not None and streak.count >= limit):
        reason = (
            f"{setting} {format_duration(budget)}"
            if budget is not None and timed_out
            else f"max_step_failures {limit}"
        )
        raise _gave_up(ctx, what, streak.count, elapsed, reason, exc) from exc
    delay = max(ctx.step_waits.backoff_delay(streak.count - 1), asked)
    if budget is None:
        left = "no time limit (give_up_after None)"
    else:
        delay = min(delay, budget - elapsed)
        left = (
            f"giving up in {format_duration(budget - elapsed)} "
            f"({setting} {format_duration(budget)})"
        )
    logger.warning(
        "run %s: %s: attempt %d failed: %s; next try in %s, %s",
        ctx.run_id,
        what,
        streak.count,
        describe(exc),
        format_duration(delay),
        left,
    )
    return delay


def tracking_failed(ctx: RunContext, error: AiobatchError) -> None:
    """A resumed run's first calls may be the fleet's polls: while the server has never
    answered, polls that cannot connect stop the run after ``unreachable_after`` (the
    fleet reports every few failures in a row).

    Raises:
        UnreachableError: the server could not be reached for that long.
    """
    fleet = ctx.fleet
    if isinstance(error, APIStatusError) or fleet.stats.observations:
        heard_from_server(ctx)
    if ctx.answered or not isinstance(error, ConnectError):
        return
    elapsed = ctx.clock.monotonic() - ctx.network_since
    budget = ctx.config.unreachable_after
    if elapsed >= budget:
        reason = f"unreachable_after {format_duration(budget)}"
        raise _gave_up(
            ctx, "tracking the open batches", fleet.stats.failures, elapsed, reason, error
        ) from error


def _gave_up(
    ctx: RunContext, what: str, attempts: int, elapsed: float, reason: str, exc: AiobatchError
) -> StepFailedError:
    """The error a run stops with when a step kept failing."""
    tried = f"{attempts} attempt{'s' if attempts != 1 else ''} in {format_duration(elapsed)}"
    if isinstance(exc, ConnectError) and not ctx.answered:
        host = _unreachable_host(exc, ctx.client.provider.base_url)
        why = exc.reason or "cannot connect"
        return UnreachableError(
            f"run {ctx.run_id}: cannot reach {host}: {why} ({what}: {tried}, no answer "
            f"from the server yet; {reason}). Check the base URL and the network; the "
            "journal is intact: run again to continue",
            host=host,
            reason=why,
            step=what,
            attempts=attempts,
            elapsed=elapsed,
            cause=exc,
        )
    return StepFailedError(
        f"run {ctx.run_id}: {what} kept failing ({tried}; {reason}): {describe(exc)}; "
        "the journal is intact: run again to continue",
        step=what,
        attempts=attempts,
        elapsed=elapsed,
        cause=exc,
    )
