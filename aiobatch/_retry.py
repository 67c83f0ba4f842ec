"""The retry policy: what is worth retrying, how long to wait, and the loop that waits.

Theory of operation
-------------------
A :class:`RetryPolicy` is frozen data plus pure functions:

* :func:`retry_reason` says whether one failure is worth another attempt: network
  failures (:class:`~aiobatch.errors.ConnectError`,
  :class:`~aiobatch.errors.TransportTimeoutError`, any other
  :class:`~aiobatch.errors.TransportError`) and the HTTP statuses 408, 409, 429 and
  5xx (:func:`is_transient_status`). A server's ``x-should-retry: true|false`` header
  overrides the status.
* :func:`is_transient` is the same rule for an error already raised: the client's wait,
  the fleet and the run layer ask it whether a failure passes by itself, and
  :func:`retry_after_of` what wait the server asked for with it. (A batch's result
  *lines* have a rule of their own: ``aiobatch._run._outcomes``.)
* :func:`parse_retry_after` reads the server's wish: ``retry-after-ms`` (float
  milliseconds, preferred), then ``retry-after`` (float seconds, or an HTTP date).
* :meth:`RetryPolicy.compute_delay` turns both into seconds: the server's wish when it
  is positive and at most :attr:`RetryPolicy.max_retry_after`; *no retry at all* when it
  is larger (the caller sees the error, e.g. a
  :class:`~aiobatch.errors.RateLimitError` with ``retry_after`` set, and can pause);
  otherwise capped exponential backoff with jitter, computed from ``backoff``'s wait
  generator (:func:`backoff.expo`) and jitter functions.

Beyond a call, a run and its fleet wait out a server's longer wish themselves, but never
longer than their ``max_retry_wait`` (:data:`DEFAULT_MAX_RETRY_WAIT`, 5 minutes): one
rule, :func:`cap_server_wait`, cuts the wait and logs a WARNING saying so, and the
caller then tries again (and meets a new ``retry-after`` if the server still wants one).

A logical call has a budget: :attr:`RetryPolicy.timeout` seconds from its first attempt,
waits *and* attempts included (and, for a caller with a deadline such as a wait for a
batch, no later than that deadline). No retry is made whose wait would reach the end of
the budget, and each attempt's timeout is cut to what is left of it
(:meth:`RetryState.bound`), so a hanging server cannot stretch a call past it.
:func:`is_ambiguous` says whether a failure may have taken effect and
:func:`may_commit_late` whether it may still take effect later; the client's create and
delete use both.

The loop itself (:class:`RetryState`, :meth:`RetryPolicy.send`) is ours, not
``backoff``'s decorators: those call :func:`asyncio.sleep` directly, and aiobatch sleeps
through an injected :class:`~aiobatch.Clock` so tests never wait on wall time. This is
the only module that imports ``backoff``.

Testing mode
------------
Two switches turn every wait into zero (the client's create settle included) while
keeping every *decision* (what is retried, how many attempts, when a too-long
``retry-after`` gives up) unchanged:

* per policy: ``RetryPolicy.for_testing(max_attempts=3)``;
* globally, stamina-style: ``set_retry_testing(True, max_attempts=None)`` switches at
  once and returns a context manager that restores the previous mode on exit, so it
  nests::

      with aiobatch.set_retry_testing(True, max_attempts=2):
          ...  # no waits, at most 2 attempts per call, in every client

Each retry is logged at INFO on the ``aiobatch`` logger with the method, the URL path,
the attempt number, the delay and the reason; never headers, queries or bodies.
"""

from __future__ import annotations

import datetime
import email.utils
import itertools
import logging
import math
import random
import threading
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import attrs
import backoff

from ._validators import at_least_one, non_negative, non_negative_or_none
from .errors import APIStatusError, ConnectError, TransportError

if TYPE_CHECKING:
    from ._clock import Clock
    from .transport._base import Request, Response, Transport

__all__ = [
    "DEFAULT_MAX_RETRY_WAIT",
    "RETRYABLE_STATUSES",
    "RetryPolicy",
    "RetryState",
    "cap_server_wait",
    "is_ambiguous",
    "is_retry_testing",
    "is_transient",
    "is_transient_status",
    "may_commit_late",
    "parse_http_date",
    "parse_retry_after",
    "poll_intervals",
    "retry_after_of",
    "retry_reason",
    "set_retry_testing",
]

logger = logging.getLogger("aiobatch")

#: HTTP statuses of an API call that pass by themselves (plus every 5xx): a call
#: answered with one is retried unless ``x-should-retry: false`` says otherwise.
RETRYABLE_STATUSES: frozenset[int] = frozenset({408, 409, 429})

#: Exponents beyond this are never needed (the delay is capped long before).
_MAX_EXPONENT = 64

Jitter = Callable[[float], float]


# --- what is retryable -------------------------------------------------------------------


def is_transient_status(status: int) -> bool:
    """Whether an API call answered with HTTP ``status`` may succeed when made again:
    408, 409, 429 (:data:`RETRYABLE_STATUSES`) and every 5xx."""
    return status in RETRYABLE_STATUSES or status >= 500


def is_transient(exc: BaseException) -> bool:
    """Whether a failed API call may succeed when made again: a network failure (any
    :class:`~aiobatch.errors.TransportError`) or an answer whose status passes by
    itself (:func:`is_transient_status`: 408, 409, 429, 5xx).

    Anything else (a 4xx refusal, a body that does not decode, a closed client, a bug)
    stays as it is however often the call is made.
    """
    if isinstance(exc, APIStatusError):
        return is_transient_status(exc.status_code)
    return isinstance(exc, TransportError)


def retry_after_of(exc: BaseException) -> float | None:
    """The seconds the server asked to wait with a failed call's answer
    (``retry-after-ms`` / ``retry-after``, read when the error was made), or None."""
    return exc.retry_after if isinstance(exc, APIStatusError) else None


def retry_reason(
    *,
    error: BaseException | None = None,
    status: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> str | None:
    """Say why a failure is worth another attempt, or None when it is not.

    Args:
        error: an exception raised by a transport.
        status: the HTTP status of a response (only statuses >= 400 are failures).
        headers: the response headers, lower-cased; ``x-should-retry`` overrides.

    Returns:
        A short reason for the log (``"HTTP 429"``, ``"ConnectError"``), or None.
    """
    if error is not None:
        if isinstance(error, TransportError):
            return type(error).__name__
        return None
    if status is None or status < 400:
        return None
    if headers:
        hint = headers.get("x-should-retry")
        if hint is not None:
            hint = hint.strip().lower()
            if hint == "true":
                return f"HTTP {status} (x-should-retry)"
            if hint == "false":
                return None
    if is_transient_status(status):
        return f"HTTP {status}"
    return None


def is_ambiguous(error: BaseException | None = None, status: int | None = None) -> bool:
    """Whether a failure may have reached the server and taken effect.

    A :class:`~aiobatch.errors.ConnectError` was never sent, and a 4xx (429 included)
    was refused; a timeout, any other transport failure and a 5xx may have been applied.
    """
    if error is not None:
        return isinstance(error, TransportError) and not isinstance(error, ConnectError)
    return status is not None and status >= 500


#: Gateway statuses: a proxy gave up waiting for a server that may still finish the work.
_GATEWAY_STATUSES: frozenset[int] = frozenset({502, 504})


def may_commit_late(error: BaseException | None = None, status: int | None = None) -> bool:
    """Whether the server may still be working on a failed request, and act on it later.

    True for a timeout or a connection lost after sending (a server keeps running its
    handler after the client has gone) and for a gateway error (502, 504: the proxy gave
    up, the server behind it may not have). Looking such a request's effect up at once
    can miss it: wait a while first.
    """
    if error is not None:
        return is_ambiguous(error)
    return status in _GATEWAY_STATUSES


# --- how long to wait --------------------------------------------------------------------


def _finite(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_retry_after(headers: Mapping[str, str] | None, *, now: float) -> float | None:
    """Read how long the server asks us to wait, in seconds.

    ``retry-after-ms`` (float milliseconds) wins; then ``retry-after`` as float seconds;
    then ``retry-after`` as an HTTP date, measured from ``now``. A value that does not
    parse, or is not finite, is ignored.

    Args:
        headers: response headers with lower-cased names.
        now: the current Unix time (for HTTP dates).

    Returns:
        Seconds (may be zero or negative for a date in the past), or None.
    """
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        value = _finite(ms.strip())
        if value is not None:
            return value / 1000.0
    text = headers.get("retry-after")
    if text is None:
        return None
    text = text.strip()
    value = _finite(text)
    if value is not None:
        return value
    when = parse_http_date(text)
    return None if when is None else when - now


#: The longest a run or a fleet waits on one server-requested delay (``retry-after``)
#: before it tries again (``RunConfig.max_retry_wait``, ``FleetConfig.max_retry_wait``).
DEFAULT_MAX_RETRY_WAIT = 300.0


def cap_server_wait(
    asked: float,
    cap: float,
    *,
    what: str,
    setting: str = "max_retry_wait",
    log: logging.Logger | None = logger,
) -> float:
    """The wait to make for a server that asked for ``asked`` seconds: at most ``cap``.

    A server may ask for a day (``retry-after: 99999``); waiting that out would put a
    run to sleep for a day on one header. The wait is cut to ``cap``, after which the
    caller tries again, and a WARNING says so::

        <what>: server asked to wait 99999 s; waiting 300 s (max_retry_wait) then trying again

    Args:
        asked: the seconds the server asked for.
        cap: the longest wait.
        what: who waits, for the log (``"run 1f2e..."``, ``"fleet"``).
        setting: the name of the setting that holds ``cap``, for the log.
        log: where to log the WARNING; None logs nothing (a repeat of the same wish).
    """
    if asked <= cap:
        return asked
    if log is not None:
        log.warning(
            "%s: server asked to wait %.0f s; waiting %.0f s (%s) then trying again",
            what,
            asked,
            cap,
            setting,
        )
    return cap


def parse_http_date(text: str | None) -> float | None:
    """Read an HTTP date (``Wed, 21 Oct 2015 07:28:00 GMT``) as Unix seconds.

    Args:
        text: the header value, or None.

    Returns:
        The time, or None when there is no value or it does not parse.
    """
    if not text:
        return None
    try:
        when = email.utils.parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": the zone is unknown; HTTP dates are always GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    try:
        value = when.timestamp()
    except (OverflowError, OSError, ValueError):  # pragma: no cover - absurd years
        return None
    return value if math.isfinite(value) else None


_UNSET: Jitter = lambda value: value  # noqa: E731 - sentinel meaning "the policy's jitter"


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """When to try a request again, and how long to wait first.

    The defaults follow the official SDK's rules but are more patient, as suits a batch
    control plane: 6 attempts, exponential backoff from 1 s doubling up to 30 s with
    full jitter, server hints honoured up to 120 s, at most 5 minutes per logical call.

    Args:
        max_attempts: attempts per logical call, the first included (1 = never retry).
        timeout: seconds one logical call may take, waits and attempts included; None
            = no limit. A retry whose wait would end past it is not made, and each
            attempt's timeout is cut to what is left (a request that leaves its timeout
            to the transport's default, such as an upload, keeps that default).
        initial_delay: the first backoff delay, before jitter.
        max_delay: the cap on any backoff delay (also after jitter).
        exp_base: the growth factor of the backoff.
        jitter: a function spreading a delay (``backoff.full_jitter``, the default,
            draws uniformly from ``[0, delay]``; ``backoff.random_jitter`` adds up to
            1 s), or None for no jitter.
        max_retry_after: the longest server-requested wait (``retry-after-ms`` /
            ``retry-after``) we honour within a call; a longer request is not retried
            in the call: the error (with its ``retry_after``) goes to the caller. A run
            then waits it out itself, for at most its ``max_retry_wait`` (see
            :func:`cap_server_wait`).
        testing: zero every wait (decisions are unchanged); see :meth:`for_testing`.
    """

    max_attempts: int = attrs.field(default=6, validator=at_least_one)
    timeout: float | None = attrs.field(default=300.0, validator=non_negative_or_none)
    initial_delay: float = attrs.field(default=1.0, validator=non_negative)
    max_delay: float = attrs.field(default=30.0, validator=non_negative)
    exp_base: float = attrs.field(default=2.0, validator=non_negative)
    jitter: Jitter | None = backoff.full_jitter
    max_retry_after: float = attrs.field(default=120.0, validator=non_negative)
    testing: bool = False

    @classmethod
    def for_testing(cls, *, max_attempts: int = 3, **kwargs: object) -> RetryPolicy:
        """A policy with the same decisions and zero waits, for tests.

        Args:
            max_attempts: attempts per logical call.
            **kwargs: any other field of :class:`RetryPolicy`.
        """
        return cls(max_attempts=max_attempts, testing=True, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def never(cls) -> RetryPolicy:
        """A policy that makes every call exactly once."""
        return cls(max_attempts=1)

    def backoff_delay(self, retries_taken: int, *, jitter: Jitter | None = _UNSET) -> float:
        """The backoff delay before retry number ``retries_taken + 1``.

        ``min(initial_delay * exp_base ** retries_taken, max_delay)`` (the values of
        :func:`backoff.expo`), spread by the jitter and clamped to ``[0, max_delay]``.

        Args:
            retries_taken: retries already made for this call (0 before the first).
            jitter: overrides the policy's jitter (None = no jitter); for tests.
        """
        waits = backoff.expo(
            base=self.exp_base, factor=self.initial_delay, max_value=self.max_delay
        )
        next(waits)  # prime the generator, as backoff's own loop does
        n = min(max(retries_taken, 0), _MAX_EXPONENT)
        value = float(next(itertools.islice(waits, n, None)))
        spread = self.jitter if jitter is _UNSET else jitter
        if spread is not None:
            value = spread(value)
        return min(max(value, 0.0), self.max_delay)

    def compute_delay(
        self,
        retries_taken: int,
        headers: Mapping[str, str] | None = None,
        *,
        now: float = 0.0,
        jitter: Jitter | None = _UNSET,
    ) -> float | None:
        """Seconds to wait before the next attempt, or None when we must not retry.

        A positive server hint no larger than :attr:`max_retry_after` is used as is; a
        larger one means "do not retry"; a missing, zero, negative or unreadable one
        falls back to :meth:`backoff_delay`.

        Args:
            retries_taken: retries already made for this call.
            headers: the failed response's headers (None for a network failure).
            now: the current Unix time (for HTTP-date hints).
            jitter: overrides the policy's jitter; for tests.
        """
        asked = parse_retry_after(headers, now=now)
        if asked is not None and asked > 0:
            if asked > self.max_retry_after:
                return None
            return asked
        return self.backoff_delay(retries_taken, jitter=jitter)

    async def send(
        self,
        transport: Transport,
        request: Request,
        *,
        clock: Clock,
        stream: bool = False,
        deadline: float | None = None,
        state: RetryState | None = None,
    ) -> Response:
        """Send ``request``, retrying what this policy retries.

        Each attempt's timeout is cut to what is left of :attr:`timeout` (and of
        ``deadline``), so the call ends within its budget, waits and attempts included.

        Args:
            transport: sends each attempt.
            request: the request.
            clock: measures the budget and sleeps.
            stream: ask the transport for a streamed body.
            deadline: a ``clock.monotonic()`` time that no attempt or wait may pass, on
                top of :attr:`timeout` (e.g. the end of a wait for a batch).
            state: the book-keeping to use, for a caller that wants to inspect it
                afterwards (:attr:`RetryState.ambiguous`); default a new one.

        Returns:
            The first response that is a success or not worth retrying, or the last
            one when attempts ran out (the caller maps error statuses to errors).

        Raises:
            TransportError: the last network failure, when it was not retried.
        """
        if state is None:
            state = RetryState(self, clock, request.method, request.url, deadline=deadline)
        while True:
            try:
                response = await transport.send(state.bound(request), stream=stream)
            except TransportError as exc:
                if not await state.backoff(error=exc):
                    raise
                continue
            if response.status < 400:
                return response
            if not await state.backoff(response=response):
                return response
            await response.aclose()


# --- testing mode ------------------------------------------------------------------------


@attrs.frozen
class _TestingMode:
    max_attempts: int | None


_LOCK = threading.Lock()
_TESTING: _TestingMode | None = None


class _RestoreTesting:
    """Returned by :func:`set_retry_testing`; restores the previous mode on exit."""

    def __init__(self, previous: _TestingMode | None) -> None:
        self._previous = previous

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        global _TESTING
        with _LOCK:
            _TESTING = self._previous

    def __repr__(self) -> str:
        return f"<retry testing mode; restores {self._previous!r} on exit>"


def set_retry_testing(testing: bool = True, *, max_attempts: int | None = None) -> _RestoreTesting:
    """Turn the global retry testing mode on or off, at once and for every policy.

    While it is on, every retry wait is zero, and with ``max_attempts`` every call
    makes at most that many attempts; what is retried does not change. The return value
    is a context manager that restores the previous mode on exit, so calls nest::

        with set_retry_testing(True, max_attempts=1):
            ...

    Args:
        testing: on or off.
        max_attempts: caps the attempts of every policy while on (None = no cap).
    """
    global _TESTING
    if max_attempts is not None and max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts!r}")
    with _LOCK:
        previous = _TESTING
        _TESTING = _TestingMode(max_attempts) if testing else None
    return _RestoreTesting(previous)


def is_retry_testing() -> bool:
    """Whether the global retry testing mode is on."""
    return _TESTING is not None


# --- the loop ----------------------------------------------------------------------------


class RetryState:
    """The book-keeping of one logical call: attempts made, time spent, time left.

    Callers that need their own loop (the client's create, which must look before it
    re-sends) drive this directly; everyone else uses :meth:`RetryPolicy.send`.

    The call's budget ends at :attr:`deadline`: the policy's :attr:`~RetryPolicy.timeout`
    after ``started``, or the explicit ``deadline`` when that comes first. No retry is
    made whose wait would reach it, and :meth:`bound` cuts each attempt's timeout to
    what is left.

    Args:
        policy: the rules.
        clock: measures the time budget and sleeps.
        method: the HTTP method, for the log.
        url: the URL, for the log (only its path is logged).
        started: ``clock.monotonic()`` when the first attempt began (default: now).
        deadline: a ``clock.monotonic()`` time the call must not pass, on top of the
            policy's timeout; None for none.
    """

    __slots__ = (
        "_budget_end",
        "_hard_end",
        "_url",
        "ambiguous",
        "attempts",
        "clock",
        "deadline",
        "method",
        "policy",
        "started",
    )

    def __init__(
        self,
        policy: RetryPolicy,
        clock: Clock,
        method: str,
        url: str,
        *,
        started: float | None = None,
        deadline: float | None = None,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.method = method
        self._url = url
        self.started = clock.monotonic() if started is None else started
        self._budget_end = None if policy.timeout is None else self.started + policy.timeout
        self._hard_end = deadline
        ends = [end for end in (self._budget_end, deadline) if end is not None]
        #: The ``clock.monotonic()`` time the call's budget ends, or None for no limit.
        self.deadline: float | None = min(ends) if ends else None
        #: Attempts that have failed so far.
        self.attempts = 0
        #: Whether a failed attempt may have reached the server and taken effect
        #: (see :func:`is_ambiguous`).
        self.ambiguous = False

    @property
    def max_attempts(self) -> int:
        """The attempt limit in force (the global testing mode may lower it)."""
        mode = _TESTING
        if mode is not None and mode.max_attempts is not None:
            return min(self.policy.max_attempts, mode.max_attempts)
        return self.policy.max_attempts

    @property
    def testing(self) -> bool:
        """Whether waits are zeroed (the policy's or the global testing mode)."""
        return self.policy.testing or _TESTING is not None

    def remaining(self) -> float | None:
        """Seconds left before :attr:`deadline` (may be negative), or None for no limit."""
        if self.deadline is None:
            return None
        return self.deadline - self.clock.monotonic()

    def bound(self, request: Request) -> Request:
        """``request`` with its timeout cut to what is left of the budget.

        A request without a timeout of its own (it leaves the time to the transport's
        default, as uploads do: their length depends on the file) is cut only by an
        explicit ``deadline``, not by the policy's timeout.
        """
        timeout = request.timeout
        now: float | None = None
        if timeout is not None and self._budget_end is not None:
            now = self.clock.monotonic()
            timeout = min(timeout, self._budget_end - now)
        if self._hard_end is not None:
            now = self.clock.monotonic() if now is None else now
            left = self._hard_end - now
            timeout = left if timeout is None else min(timeout, left)
        if timeout == request.timeout:
            return request
        assert timeout is not None
        return attrs.evolve(request, timeout=max(timeout, 0.0))

    def next_delay(
        self, *, error: BaseException | None = None, response: Response | None = None
    ) -> tuple[float, str] | None:
        """Record one failed attempt and decide on the next.

        Returns:
            ``(delay, reason)`` when another attempt should follow, else None.
        """
        self.attempts += 1
        headers = response.headers if response is not None else None
        if error is not None:
            reason = retry_reason(error=error)
            self.ambiguous = self.ambiguous or is_ambiguous(error)
        elif response is not None:
            reason = retry_reason(status=response.status, headers=headers)
            self.ambiguous = self.ambiguous or is_ambiguous(status=response.status)
        else:
            reason = None
        if reason is None or self.attempts >= self.max_attempts:
            return None
        policy = self.policy
        delay = policy.compute_delay(self.attempts - 1, headers, now=self.clock.now())
        if delay is None:
            return None
        if self.testing:
            delay = 0.0
        if self.deadline is not None and self.clock.monotonic() + delay >= self.deadline:
            return None
        return delay, reason

    async def wait(self, delay: float, reason: str) -> None:
        """Log the coming retry and sleep ``delay`` seconds on the clock."""
        if logger.isEnabledFor(logging.INFO):
            path = urlsplit(self._url).path
            logger.info(
                "retrying %s %s (attempt %d of %d failed: %s) in %.3fs",
                self.method,
                path,
                self.attempts,
                self.max_attempts,
                reason,
                delay,
                extra={
                    "http_method": self.method,
                    "path": path,
                    "attempt": self.attempts,
                    "delay": delay,
                    "reason": reason,
                },
            )
        await self.clock.sleep(delay)

    async def backoff(
        self, *, error: BaseException | None = None, response: Response | None = None
    ) -> bool:
        """Record one failed attempt; when another should follow, log and wait.

        Returns:
            Whether the caller should try again.
        """
        decision = self.next_delay(error=error, response=response)
        if decision is None:
            return False
        await self.wait(*decision)
        return True

    def __repr__(self) -> str:
        return f"<RetryState {self.method} attempts={self.attempts}>"


# --- polling schedules -------------------------------------------------------------------


def poll_intervals(
    initial: float,
    maximum: float,
    *,
    factor: float = 1.5,
    jitter: float = 0.0,
    rng: random.Random | None = None,
) -> Callable[[], float]:
    """A schedule of poll intervals: ``initial``, growing by ``factor`` up to ``maximum``.

    With ``jitter``, each interval is shortened by a random factor drawn uniformly from
    ``[1 - jitter, 1]`` (so ``maximum`` stays the longest), and pollers started together
    drift apart instead of polling in lockstep.

    Args:
        initial: the first interval, in seconds.
        maximum: the longest interval.
        factor: the growth per poll.
        jitter: the relative spread, from 0 (none) to 1.
        rng: the random source (seed one for a reproducible schedule).

    Returns:
        A function returning the next interval on each call.
    """
    if initial <= 0 or maximum <= 0:
        raise ValueError("poll intervals must be positive")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be within [0, 1], got {jitter!r}")
    top = max(initial, maximum)
    waits = backoff.expo(base=factor, factor=initial, max_value=top)
    next(waits)
    if not jitter:

        def next_interval() -> float:
            return float(next(waits))

        return next_interval

    draw = (rng or random.Random()).uniform
    low = 1.0 - jitter

    def next_jittered() -> float:
        return float(next(waits)) * draw(low, 1.0)

    return next_jittered
