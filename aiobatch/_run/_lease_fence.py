"""A worker's own bound on its leases: until when it may still act on its shards.

A worker of a shared run (:mod:`._worker`) renews its leases at every heartbeat; the
database keeps a lease ``lease_seconds`` after its last renewal, and only then may
another worker adopt the shard. Journal writes are fenced in the database (each checks
the lease in its transaction), but a request to the provider is not: a worker whose
database link stalls (a partition, a hung server) would go on sending creates and
uploads for shards another worker may already have adopted.

:class:`LeaseFence` keeps "leases good until": the start of the last renewal that
succeeded plus *half* the lease time (the other half is the margin for a slow answer
and for the database's clock). :class:`FencedTransport` sits under the worker's client
(below its share of the request budget, so a request that waited in the budget is
checked when it is about to go out, as is each retry attempt) and refuses every request
once that time has passed (:class:`~aiobatch.errors.LeaseExpiredError`): the worker
sends nothing more and stops.

The fence runs on the machine's monotonic clock, not the run's injected clock: the
leases expire on the database's real clock, and a virtual clock (in tests) races ahead
of it while real database IO is pending, which would trip the fence for nothing.
"""

from __future__ import annotations

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

    def renewed(self, started: float, lease_seconds: float) -> None:
        """A renewal started at ``started`` (``now()``) succeeded (or the worker starts
        and holds nothing yet)."""
        self.good_until = max(self.good_until, started + lease_seconds / 2)

    @property
    def lapsed(self) -> bool:
        """True once the leases may have lapsed (another worker may adopt the shards)."""
        return self.now() >= self.good_until

    def check(self) -> None:
        """Raise unless the worker may still act on its leases.

        Raises:
            LeaseExpiredError: the last renewal is more than half the lease time ago.
        """
        if self.lapsed:
            raise LeaseExpiredError(
                f"worker {self.worker} could not renew its leases for half the lease time "
                "(the database out of reach or too slow); it sends nothing more and stops, "
                "and another worker (or this one, started again) adopts its shards"
            )


class FencedTransport:
    """A transport that checks ``fence`` before each request it sends.

    It never closes the transport it wraps (that belongs to whoever made it).
    """

    def __init__(self, inner: Transport, fence: LeaseFence) -> None:
        self._inner = inner
        self._fence = fence

    async def send(self, request: Request, *, stream: bool = False) -> Response:
        self._fence.check()
        return await self._inner.send(request, stream=stream)

    async def aclose(self) -> None:
        """Nothing to release: the wrapped transport stays open."""

    def __repr__(self) -> str:
        return f"FencedTransport({self._inner!r})"
