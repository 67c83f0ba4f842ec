"""A worker's own bound on its leases: until when it may still act on its shards.

A worker of a shared run (:mod:`._worker`) renews its leases at every heartbeat; the
database keeps a lease ``lease_seconds`` after its last renewal, and only then may
another worker adopt the shard. Journal writes are fenced in the database (each checks
the lease in its transaction), but a request to the provider is not: a worker whose
database link stalls (a partition, a hung server) would go on sending creates and
uploads for shards another worker may already have adopted.

:class:`LeaseFence` keeps "leases good until": the start of the last renewal that
succeeded plus *half* the lease time (the other half is the margin for a request on the
wire and for the database's clock). :class:`FencedTransport` sits under the worker's
client (below its share of the request budget, so a request that waited in the budget
is checked when it is about to go out, as is each retry attempt) and holds every
request past that time until a renewal succeeds (the database confirmed the leases; the
shards it no longer holds were dropped first, their requests cancelled) or the lease
time itself has passed since the last renewal: then the leases are gone, the worker
stops (:class:`~aiobatch.errors.LeaseExpiredError`) and the held requests are never
sent. A worker whose event loop or database is only slow for a moment thus carries on;
one cut off from its database sends nothing more.

The fence runs on the machine's monotonic clock, not the run's injected clock: the
leases expire on the database's real clock, and a virtual clock (in tests) races ahead
of it while real database IO is pending, which would trip the fence for nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ..errors import LeaseExpiredError
from ..transport._base import Request, Response, Transport

__all__ = ["FencedTransport", "LeaseFence"]


class LeaseFence:
    """Until when (``now()`` seconds) the worker ``worker`` may still act on its leases."""

    def __init__(self, worker: str, *, now: Callable[[], float] = time.monotonic) -> None:
        self.worker = worker
        self.now = now
        self.good_until = -float("inf")
        self.renewed_at = -float("inf")
        self.lease_seconds = 0.0
        #: set once the leases are gone for sure: every request then raises it
        self.expired: LeaseExpiredError | None = None
        self._changed = asyncio.Event()

    def renewed(self, started: float, lease_seconds: float) -> None:
        """A renewal started at ``started`` (``now()``) succeeded (or the worker starts
        and holds nothing yet): the held requests go."""
        if started + lease_seconds / 2 > self.good_until:
            self.renewed_at = started
            self.lease_seconds = lease_seconds
            self.good_until = started + lease_seconds / 2
        self._wake()

    @property
    def lapsed(self) -> bool:
        """True once the leases may have lapsed: requests wait for a renewal."""
        return self.now() >= self.good_until

    @property
    def gone(self) -> bool:
        """True once the lease time has passed since the last renewal: the leases are
        gone (another worker may have adopted the shards)."""
        return self.now() >= self.renewed_at + self.lease_seconds

    def expire(self) -> LeaseExpiredError:
        """The leases are gone: refuse every request from now on; returns the error."""
        if self.expired is None:
            self.expired = LeaseExpiredError(
                f"worker {self.worker} could not renew its leases within the lease time "
                f"({self.lease_seconds:g} s; the database out of reach or too slow); it "
                "sent nothing since half that time, and stops; another worker (or this one, "
                "started again) adopts its shards"
            )
        self._wake()
        return self.expired

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def admit(self) -> None:
        """Return once the worker may act on its leases (at once, unless lapsed).

        Raises:
            LeaseExpiredError: the leases are gone.
        """
        while True:
            if self.expired is not None:
                raise self.expired
            if not self.lapsed:
                return
            await self._changed.wait()


class FencedTransport:
    """A transport that sends each request only once ``fence`` admits it.

    It never closes the transport it wraps (that belongs to whoever made it).
    """

    def __init__(self, inner: Transport, fence: LeaseFence) -> None:
        self._inner = inner
        self._fence = fence

    async def send(self, request: Request, *, stream: bool = False) -> Response:
        await self._fence.admit()
        return await self._inner.send(request, stream=stream)

    async def aclose(self) -> None:
        """Nothing to release: the wrapped transport stays open."""

    def __repr__(self) -> str:
        return f"FencedTransport({self._inner!r})"
