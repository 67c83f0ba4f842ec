"""One request budget for the workers sharing a run: the provider's rate limit is per
account, so N workers must not send N times the allowed rate.

It is a *per-worker split*, agreed through the database the workers already share: each
worker's :class:`~aiobatch.RequestBudget` grants ``rate / n`` requests per second and
``max(1, burst // n)`` at once, where ``n`` is the number of live workers of the run (the
rows of ``aiobatch_workers`` renewed within the lease time, this one included), counted
again at every heartbeat (a third of the lease time). After counting, a worker takes its
share and records ``n`` in its row (``share_of``). A worker that joins sends nothing until
every other live worker has recorded a share at least as small as its own (so it has
lowered its rate): at most a heartbeat period or two; it then starts with an empty
bucket, unless it is alone (the others may have just spent theirs at their old share),
and one whose share shrinks keeps at most its new burst. A worker counted out by the
others (its row lapsed: its heartbeat was late) and back waits the same way to be
cleared again. (Of two workers joining at once, at
least one counts the other: each commits its row before counting; and one that counted
before a newcomer's row holds the newcomer back until it counts again.) A worker that
dies keeps its row until its lease lapses, so the others only raise their shares once it
has stopped sending.

The budget sits under the client's transport (:class:`BudgetedTransport`), so every
request a worker sends to the provider takes from it: uploads, creates, retrieves, lists,
downloads and cancels, and each retry attempt of them. A 429 pauses this worker's share
for the ``retry-after`` the server asked (else a second), so that none of its requests
hits a server that asked it to wait; the other workers learn of it only from their own
429s (each pauses its own share), not through the database. Over any span of ``t`` seconds the
workers together send at most ``burst + rate * t`` requests (with ``burst >= n``; with
more workers than ``burst`` each still gets one).
"""

from __future__ import annotations

import asyncio

from .._budget import RequestBudget
from .._client import BatchClient
from .._clock import Clock
from .._retry import DEFAULT_MAX_RETRY_WAIT, parse_retry_after
from ..transport._base import Request, Response, Transport
from ._postgres_leases import PgLeases

__all__ = ["PAUSE_ON_429", "BudgetedTransport", "SharedBudget"]

#: Seconds a 429 without a ``retry-after`` pauses this worker's share of the budget.
PAUSE_ON_429 = 1.0


class BudgetedTransport:
    """A transport that takes one request from ``budget`` before each request it sends
    (once ``gate`` is set), and pauses the budget when the server answers 429: for its
    ``retry-after`` (at most :data:`~aiobatch._retry.DEFAULT_MAX_RETRY_WAIT`), else
    :data:`PAUSE_ON_429` seconds.

    It never closes the transport it wraps (that belongs to whoever made it).
    """

    def __init__(
        self, inner: Transport, budget: RequestBudget, gate: asyncio.Event, clock: Clock
    ) -> None:
        self._inner = inner
        self._budget = budget
        self._gate = gate
        self._clock = clock

    async def send(self, request: Request, *, stream: bool = False) -> Response:
        await self._gate.wait()
        await self._budget.acquire()
        response = await self._inner.send(request, stream=stream)
        if response.status == 429:
            asked = parse_retry_after(response.headers, now=self._clock.now())
            wait = asked if asked is not None and asked > 0 else PAUSE_ON_429
            self._budget.pause(min(wait, DEFAULT_MAX_RETRY_WAIT))
        return response

    async def aclose(self) -> None:
        """Nothing to release: the wrapped transport stays open."""

    def __repr__(self) -> str:
        return f"BudgetedTransport({self._inner!r}, {self._budget!r})"


class SharedBudget:
    """This worker's share of the run's account budget (see the module notes).

    Args:
        rate: the account's requests per second, for every worker together.
        burst: the most requests the workers together send at once.
        client: the worker's client; :attr:`client` is the same client over a
            :class:`BudgetedTransport` (closed with it).
    """

    def __init__(self, rate: float, burst: int, client: BatchClient) -> None:
        self.rate = rate
        self.total_burst = burst
        self.workers = 1
        self.budget = RequestBudget(rate, burst, clock=client.clock)
        #: set once this worker may send (every other live worker took its new share)
        self.cleared = asyncio.Event()
        self.client = client.with_options(
            wrap_transport=lambda inner: BudgetedTransport(
                inner, self.budget, self.cleared, client.clock
            )
        )

    async def split(self, journal: PgLeases, workers: int) -> None:
        """Take this worker's share among ``workers`` live ones and record it (at each
        heartbeat); may send once every other live worker took a share this small.

        Raises:
            JournalError: the database cannot be reached.
        """
        self.workers = max(1, workers)
        self.budget.set_rate(self.rate / self.workers, max(1, self.total_burst // self.workers))
        smallest = await journal.take_share(self.workers)
        if smallest is None or smallest >= self.workers:
            if not self.cleared.is_set() and smallest is not None:
                # The others may have spent their whole bucket just before lowering
                # their share: this worker earns its own from now on.
                self.budget.empty()
            self.cleared.set()
        else:
            self.cleared.clear()  # (again) one worker more than another counted
