"""A request budget: a token bucket on the injected clock, shared by many callers.

:class:`RequestBudget` grants at most ``burst`` requests at once and ``rate`` per second
on average, in FIFO order, and can be *paused*: when a server answers 429 or sends a
``retry-after``, one call to :meth:`RequestBudget.pause` stops every holder of the
budget for that long (and drains the bucket, so nobody bursts into the server the
moment the pause ends). It sleeps through a :class:`~aiobatch.Clock`, so tests drive it
on a virtual clock. No IO.
"""

from __future__ import annotations

import asyncio
import math

from ._clock import Clock

__all__ = ["RequestBudget"]

#: Float slack when comparing token counts (a refill of exactly one token may land at
#: 0.9999999999).
_EPSILON = 1e-9

#: Waits shorter than this count as none: at Unix-epoch magnitudes a float clock cannot
#: move by less (a sleep of 1e-12 s would wake at the same instant, forever).
_TIME_EPSILON = 1e-6


class RequestBudget:
    """At most ``burst`` requests at once and ``rate`` requests per second on average.

    Over any span of ``t`` seconds the budget grants at most ``burst + rate * t``
    requests (``t`` measured to the microsecond: a wait shorter than that is none).
    Waiters are served first come, first served.

    Args:
        rate: requests per second (> 0).
        burst: the largest number of requests granted at once (>= 1); the bucket
            starts full.
        clock: the time source and sleeper.
    """

    def __init__(self, rate: float, burst: int, *, clock: Clock) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number of requests per second, got {rate!r}")
        if not (isinstance(burst, int) and burst >= 1):
            raise ValueError(f"burst must be an int >= 1, got {burst!r}")
        self._rate = float(rate)
        self._burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock.monotonic()
        self._paused_until = -math.inf
        self._lock = asyncio.Lock()
        self._granted = 0
        self._pauses = 0

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self._rate

    @property
    def burst(self) -> int:
        """The largest number of requests granted at once."""
        return self._burst

    @property
    def granted(self) -> int:
        """How many requests the budget has granted so far."""
        return self._granted

    @property
    def pauses(self) -> int:
        """How many times :meth:`pause` was called."""
        return self._pauses

    @property
    def paused_until(self) -> float | None:
        """The ``clock.monotonic()`` time a pause ends, or None when not paused."""
        if self._paused_until > self._clock.monotonic():
            return self._paused_until
        return None

    def set_rate(self, rate: float, burst: int | None = None) -> None:
        """Change the rate (and the burst) from now on: what was earned so far at the old
        rate is kept (at most the new burst), a waiter's wait is counted at the new one.

        Workers sharing one account's budget each set their share this way (see
        :mod:`aiobatch._run._shared_budget`).
        """
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number of requests per second, got {rate!r}")
        if burst is not None and not (isinstance(burst, int) and burst >= 1):
            raise ValueError(f"burst must be an int >= 1, got {burst!r}")
        self._refill(self._clock.monotonic())
        self._rate = float(rate)
        if burst is not None:
            self._burst = burst
            self._tokens = min(self._tokens, float(burst))

    def empty(self) -> None:
        """Drop what was earned so far: the next grant waits a full ``1 / rate``.

        A worker that starts (or starts again) to take its share of an account's budget
        shared with others does so, since they may still be spending at their old share
        (see :mod:`aiobatch._run._shared_budget`).
        """
        self._refill(self._clock.monotonic())
        self._tokens = min(self._tokens, 0.0)

    def _refill(self, now: float) -> None:
        start = max(self._updated, self._paused_until)
        if now > start:
            self._tokens = min(float(self._burst), self._tokens + (now - start) * self._rate)
            self._updated = now

    def _wait_time(self, now: float) -> float:
        """Seconds until a request may be granted (0 when one may be now)."""
        if self._paused_until - now > _TIME_EPSILON:
            return self._paused_until - now
        self._refill(now)
        if self._tokens >= 1.0 - _EPSILON:
            return 0.0
        wait = (1.0 - self._tokens) / self._rate
        return wait if wait > _TIME_EPSILON else 0.0

    async def acquire(self) -> None:
        """Wait until one request may be sent, and take it from the budget."""
        async with self._lock:
            clock = self._clock
            while True:
                now = clock.monotonic()
                wait = self._wait_time(now)
                if wait <= 0.0:
                    # A grant a hair early (within the epsilons) leaves a small deficit,
                    # carried into the next wait: rounding never adds up over many grants.
                    self._tokens -= 1.0
                    self._granted += 1
                    return
                # Sleep at most a second at a time: a rate lowered meanwhile (set_rate)
                # is seen before the next grant.
                await clock.sleep(min(wait, 1.0))

    def pause(self, seconds: float) -> None:
        """Grant nothing for ``seconds`` from now (a longer pause already set is kept).

        The bucket is drained: after the pause, requests flow at ``rate`` again, not in
        a burst.
        """
        if not seconds > 0:
            return
        now = self._clock.monotonic()
        self._refill(now)
        self._paused_until = max(self._paused_until, now + seconds)
        self._tokens = 0.0
        self._updated = self._paused_until
        self._pauses += 1

    def __repr__(self) -> str:
        return f"RequestBudget(rate={self._rate:g}, burst={self._burst})"
