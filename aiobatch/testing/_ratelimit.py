"""Server-side rate limiting for the fake batch service: a token bucket on its clock.

A :class:`RateLimit` in :attr:`FakeConfig.rate_limit
<aiobatch.testing.FakeConfig.rate_limit>` makes the service refuse requests beyond
``requests_per_second`` (after an initial ``burst``) the way OpenAI does: ``429`` with
an error body of type ``requests`` and code ``rate_limit_exceeded``, ``retry-after-ms``
and ``retry-after`` saying when the next token arrives, and the
``x-ratelimit-limit-requests`` / ``-remaining-requests`` / ``-reset-requests`` headers
on every answer the limit covers. A refused request has no effect; every request that
arrives (refused or not, and also one an injected fault then breaks) is checked, and an
admitted one uses a token.

The bucket is a GCRA ("virtual scheduling") bucket: it keeps one number, the time at
which it was (or will be) empty, so admitting or refusing costs a few float operations
and the state never drifts. Times are taken relative to the first request, so float
rounding of large Unix times stays out of the arithmetic; an arrival within a small
tolerance (a ten-thousandth of a token interval, at least a microsecond) of its due time
counts as on time, so a client that waits exactly the advertised ``retry-after-ms`` is
always admitted.

Example::

    config = FakeConfig(rate_limit=RateLimit(requests_per_second=20, burst=20))
    service = FakeBatchService(clock=clock, config=config)
    ...
    service.rate_limiter.refused  # how many requests were answered 429
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

import attrs

from .._validators import at_least_one, positive_finite
from ._faults import _normalise_path, _upper
from ._wire import error_envelope

__all__ = ["Admission", "RateLimit", "RateLimiter", "go_duration"]


def _default_burst(limit: RateLimit) -> int:
    rate = limit.requests_per_second
    # Validators run after defaults: leave a bad rate to its validator's message.
    return max(1, math.ceil(rate)) if math.isfinite(rate) else 1


@attrs.frozen
class RateLimit:
    """A request rate limit for :class:`~aiobatch.testing.FakeBatchService`.

    The service holds a bucket of ``burst`` tokens that refills at
    ``requests_per_second`` on its clock; every request the limit covers takes one
    token, and one that finds the bucket empty is answered ``429``. Over any window of
    ``T`` seconds that starts with a full bucket, at most ``burst + floor(T *
    requests_per_second)`` requests get through.

    Attributes:
        requests_per_second: the refill rate (tokens per second of the service clock).
        burst: the bucket's size: how many requests may arrive at once after a quiet
            spell. Defaults to ``requests_per_second`` rounded up (at least 1). It is
            also the ``x-ratelimit-limit-requests`` header.
        method: only requests with this method are limited (``"POST"``); None = any.
        path: only requests whose path after ``/v1`` matches this shell-style pattern
            are limited (``"/batches*"``; ``*`` also matches ``/``, a leading ``/v1``
            is ignored), as for :class:`~aiobatch.testing.Fault`. Requests outside
            the pattern are neither counted nor refused, and carry no rate-limit
            headers.
    """

    requests_per_second: float = attrs.field(validator=positive_finite)
    burst: int = attrs.field(
        default=attrs.Factory(_default_burst, takes_self=True), validator=at_least_one
    )
    method: str | None = attrs.field(default=None, converter=_upper)
    path: str = attrs.field(default="*", converter=_normalise_path)

    def matches(self, method: str, path: str) -> bool:
        """Whether a request with this method and path (after ``/v1``) is limited.

        Args:
            method: the request method.
            path: the request path after ``/v1``.

        Returns:
            True when the limit covers the request.
        """
        if self.method is not None and self.method != method.upper():
            return False
        return fnmatchcase(path, self.path)


@attrs.frozen
class Admission:
    """The rate limiter's verdict on one request it covers.

    Attributes:
        allowed: True when the request took a token and goes on.
        headers: the ``x-ratelimit-*`` headers for the answer (and, when refused,
            ``retry-after-ms`` and ``retry-after``).
        retry_after: seconds until the next token arrives (0 when allowed).
        body: the ``429`` error body (OpenAI's envelope) when refused, else None.
    """

    allowed: bool
    headers: Mapping[str, str]
    retry_after: float = 0.0
    body: dict[str, Any] | None = None


def go_duration(seconds: float) -> str:
    """A duration the way Go prints it, to the millisecond, rounded up.

    ``0s``, ``50ms``, ``1s``, ``1.5s``, ``1m0s``, ``6m0.25s``, ``1h2m3s``: the format of
    OpenAI's ``x-ratelimit-reset-*`` headers.

    Args:
        seconds: the duration (negative counts as zero).

    Returns:
        The text.
    """
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, fraction = divmod(rest, 1000)
    secs = f"{whole}.{fraction:03d}".rstrip("0") if fraction else str(whole)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class RateLimiter:
    """The rate limit of one fake service: its bucket and how many requests it refused.

    :class:`~aiobatch.testing.FakeBatchService` makes one from ``config.rate_limit``
    (as :attr:`FakeBatchService.rate_limiter
    <aiobatch.testing.FakeBatchService.rate_limiter>`) and asks :meth:`admit` about
    every request on arrival, before fault injection. With no limit it admits
    everything and adds no headers.

    Args:
        limit: the limit, or None for unlimited.
        organization: the organization named in the ``429`` message.

    Attributes:
        limit: the limit in force (None: unlimited).
        refused: how many requests were answered ``429``.
        admitted: how many requests the limit covered and let through.
    """

    def __init__(self, limit: RateLimit | None, *, organization: str = "org-fake") -> None:
        self.limit = limit
        self.refused = 0
        self.admitted = 0
        self._organization = organization
        self._origin: float | None = None
        # The time (relative to the origin) at which the bucket is empty; the bucket
        # holds min(burst, (t - empty_at) * rate) tokens at time t.
        self._empty_at = -math.inf
        self._last = -math.inf
        if limit is not None:
            self._interval = 1.0 / limit.requests_per_second
            self._window = limit.burst * self._interval
            self._slack = max(1e-6, self._interval * 1e-4)

    def __repr__(self) -> str:
        return f"RateLimiter({self.limit!r}, admitted={self.admitted}, refused={self.refused})"

    def _time(self, now: float) -> float:
        """``now`` relative to the first request (exact), never moving backwards."""
        if self._origin is None:
            self._origin = now
        t = now - self._origin
        if t < self._last:
            t = self._last
        self._last = t
        return t

    def tokens(self, now: float) -> float:
        """The tokens in the bucket at ``now`` (``math.inf`` when unlimited).

        Args:
            now: the service clock's time.

        Returns:
            A number between 0 and ``burst``.
        """
        limit = self.limit
        if limit is None:
            return math.inf
        if self._origin is None:
            return float(limit.burst)
        t = max(now - self._origin, self._last)
        return max(0.0, min(float(limit.burst), (t - self._empty_at) / self._interval))

    def admit(self, method: str, path: str, now: float) -> Admission | None:
        """Take a token for a request arriving at ``now``, or refuse it.

        Args:
            method: the request method.
            path: the request path after ``/v1``.
            now: the service clock's time at arrival.

        Returns:
            None when no limit covers the request; otherwise the verdict, with the
            headers for the answer.
        """
        limit = self.limit
        if limit is None or not limit.matches(method, path):
            return None
        t = self._time(now)
        # A bucket that has been full for a while is just full: clamp its empty time.
        base = max(self._empty_at, t - self._window)
        due = base + self._interval
        if t >= due - self._slack:
            self._empty_at = due
            self.admitted += 1
            return Admission(True, self._headers(t))
        self.refused += 1
        wait = due - t
        # Whole milliseconds, rounded up, so a retry after them is admitted.
        ms = max(1, math.ceil((wait - self._slack / 2) * 1000))
        headers = self._headers(t)
        headers["retry-after-ms"] = str(ms)
        headers["retry-after"] = str(math.ceil(ms / 1000))
        message = (
            f"Rate limit reached for requests in organization {self._organization} on "
            f"requests per second (RPS): Limit {limit.requests_per_second:g}, Used "
            f"{limit.burst}, Requested 1. Please try again in {go_duration(wait)}. Visit "
            "https://platform.openai.com/account/rate-limits to learn more."
        )
        body = error_envelope(message, type="requests", code="rate_limit_exceeded")
        return Admission(False, headers, wait, body)

    def _headers(self, t: float) -> dict[str, str]:
        limit = self.limit
        assert limit is not None
        held = (t - self._empty_at) / self._interval
        remaining = max(0, min(limit.burst, math.floor(held + 1e-4)))
        full_in = max(0.0, self._empty_at + self._window - t)
        return {
            "x-ratelimit-limit-requests": str(limit.burst),
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": go_duration(full_in),
        }
