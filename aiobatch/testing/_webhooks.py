"""The fake service's webhook sender: signed ``batch.*`` events, retried, with faults.

A :class:`WebhookSender` watches a :class:`~aiobatch.testing.FakeBatchService`. The
service's simulation is lazy (it moves when a request arrives), so the sender also
moves it: it sleeps on the service's clock until the next batch event is due and
advances the simulation then. Each batch that reaches a terminal status becomes one
event (``batch.completed``, ``batch.failed`` (Portkey's two failures too),
``batch.expired`` or ``batch.cancelled``), delivered to every URL as OpenAI does: a
``POST`` with the event as JSON and the Standard Webhooks headers, signed with the
secret at each attempt (same ``webhook-id``, fresh timestamp). An answer other than 2xx
(or no answer) is retried with doubling waits (``retry_initial`` up to ``retry_max``)
for up to ``retry_for`` seconds (72 hours, as OpenAI). :class:`WebhookFaults` drops,
delays, duplicates and reorders deliveries, seeded.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence

import aiohttp
import attrs

from .._aio import cancel_and_wait, sleep_or_set
from .._lifecycle import BatchStatus
from .._secret import Secret
from .._validators import non_negative
from ..webhooks import sign
from ._engine import BatchRecord
from ._service import FakeBatchService
from ._wire import stable_hex

__all__ = ["WebhookDelivery", "WebhookFaults", "WebhookSender", "WebhookSenderStats"]

#: Sends one delivery: (url, headers, body) -> the HTTP status, or None for no answer.
Post = Callable[[str, Mapping[str, str], bytes], Awaitable[int | None]]

_EVENT_TYPES: dict[BatchStatus, str] = {
    BatchStatus.COMPLETED: "batch.completed",
    BatchStatus.FAILED: "batch.failed",
    BatchStatus.FILE_UPLOAD_FAILED: "batch.failed",
    BatchStatus.BATCH_START_FAILED: "batch.failed",
    BatchStatus.EXPIRED: "batch.expired",
    BatchStatus.CANCELLED: "batch.cancelled",
}


def _share(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"WebhookFaults.{attribute.name} must be within [0, 1], got {value!r}")


@attrs.frozen(kw_only=True)
class WebhookFaults:
    """What goes wrong with deliveries; each share is a probability per event and URL.

    Attributes:
        drop: never delivered at all (polls must catch it).
        duplicate: delivered twice with the same ``webhook-id`` (a 2xx answer lost).
        delay: held back for a random time up to ``max_delay`` before the first attempt.
        reorder: held back until the next event to the same URL has been sent (or
            ``max_delay`` passed), so it arrives after a later one.
        max_delay: the longest hold of ``delay`` and ``reorder``, in seconds.
    """

    drop: float = attrs.field(default=0.0, validator=_share)
    duplicate: float = attrs.field(default=0.0, validator=_share)
    delay: float = attrs.field(default=0.0, validator=_share)
    reorder: float = attrs.field(default=0.0, validator=_share)
    max_delay: float = attrs.field(default=60.0, validator=non_negative)


@attrs.frozen
class WebhookDelivery:
    """One attempt to deliver an event (in :attr:`WebhookSender.deliveries`).

    Attributes:
        url: where it was sent.
        event_id: the event (``evt_...``).
        webhook_id: the ``webhook-id`` sent.
        batch_id: the batch the event is about.
        type: the event type.
        attempt: 1 for the first try of this copy, 2 for its first retry...
        status: the HTTP status answered, or None when nothing answered.
        at: the clock's time when it was sent.
    """

    url: str
    event_id: str
    webhook_id: str
    batch_id: str
    type: str
    attempt: int
    status: int | None
    at: float


@attrs.define
class WebhookSenderStats:
    """Counters of a sender (read them; it updates them).

    Attributes:
        events: batch ends seen (one event each).
        attempts: POSTs sent.
        delivered: copies answered 2xx.
        retries: attempts after a failed one.
        gave_up: copies still failing after ``retry_for``.
        dropped, duplicated, delayed, reordered: deliveries hit by each fault.
    """

    events: int = 0
    attempts: int = 0
    delivered: int = 0
    retries: int = 0
    gave_up: int = 0
    dropped: int = 0
    duplicated: int = 0
    delayed: int = 0
    reordered: int = 0


class WebhookSender:
    """Sends signed webhooks for the batches of a fake service as they end.

    Use it as an async context manager (or :meth:`start` / :meth:`aclose`)::

        async with WebhookSender(service, ["http://127.0.0.1:8080/webhooks"], secret):
            ...  # batches that end now are announced

    Args:
        service: the fake service to watch.
        urls: where every event is sent.
        secret: the signing secret (``whsec_...``).
        faults: dropped, delayed, duplicated and reordered deliveries.
        seed: seeds the faults.
        retry_initial: the first wait after a failed attempt, in seconds.
        retry_max: the longest wait between attempts.
        retry_for: how long a delivery is retried before it is given up.
        timeout: seconds each POST may take (real time).
        post: how a delivery is sent (default: aiohttp, one session).

    Attributes:
        stats: what was sent.
        deliveries: every attempt, oldest first (at most ``log_size``).
    """

    def __init__(
        self,
        service: FakeBatchService,
        urls: Sequence[str],
        secret: str | Secret,
        *,
        faults: WebhookFaults | None = None,
        seed: int = 0,
        retry_initial: float = 5.0,
        retry_max: float = 3600.0,
        retry_for: float = 72 * 3600.0,
        timeout: float = 10.0,
        post: Post | None = None,
        log_size: int = 100_000,
    ) -> None:
        self._service = service
        self._engine = service._engine
        self._clock = service.clock
        self._urls = tuple(urls)
        sign(b"", secret=secret, webhook_id="check", timestamp=0)  # a bad secret fails now
        self._secret = secret if isinstance(secret, Secret) else Secret(secret)
        self._faults = faults if faults is not None else WebhookFaults()
        self._rng = random.Random(f"{seed}/webhooks")
        self._retry = (retry_initial, retry_max, retry_for)
        self._timeout = timeout
        self._post = post
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        #: per URL: set (and replaced) each time a delivery to it is sent (reordering).
        self._sent: dict[str, asyncio.Event] = {url: asyncio.Event() for url in self._urls}
        self._log_size = log_size
        self.in_flight = 0
        self.stats = WebhookSenderStats()
        self.deliveries: list[WebhookDelivery] = []

    def __repr__(self) -> str:
        return f"<WebhookSender urls={len(self._urls)} stats={self.stats!r}>"

    @property
    def pending(self) -> int:
        """Deliveries not finished yet (waiting, held back, or being sent)."""
        return len(self._tasks)

    async def __aenter__(self) -> WebhookSender:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start watching the service (batches that end from now on are announced)."""
        if self._watcher is not None:
            return
        engine = self._engine
        if engine.on_end is not None:
            raise RuntimeError("this fake service already has a webhook sender")
        if self._post is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout)
            )
        engine.on_end = self._ended
        engine.on_schedule = self._wake.set
        self._watcher = asyncio.ensure_future(self._watch())

    async def aclose(self) -> None:
        """Stop: deliveries not finished are abandoned."""
        engine = self._engine
        if engine.on_end == self._ended:
            engine.on_end = None
            engine.on_schedule = None
        tasks = list(self._tasks)
        if self._watcher is not None:
            tasks.append(self._watcher)
            self._watcher = None
        await cancel_and_wait(tasks)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _watch(self) -> None:
        """Move the lazy simulation to each batch event as it falls due."""
        engine, clock = self._engine, self._clock
        while True:
            self._wake.clear()
            async with engine.lock:
                now = engine.now()
                await engine.advance(now)
                due = engine.next_event_at()
            wait = None if due is None else max(0.0, due - clock.now())
            await sleep_or_set(clock, wait, self._wake)

    def _ended(self, record: BatchRecord, when: float) -> None:
        kind = _EVENT_TYPES.get(record.status)
        if kind is None:
            return
        self.stats.events += 1
        event_id = f"evt_{stable_hex(record.id, 'event', size=12)}"
        body = json.dumps(
            {
                "id": event_id,
                "object": "event",
                "type": kind,
                "created_at": math.floor(when),
                "data": {"id": record.id},
            },
            separators=(",", ":"),
        ).encode()
        meta = (event_id, f"msg_{stable_hex(record.id, 'webhook', size=12)}", record.id, kind)
        for url in self._urls:
            task = asyncio.ensure_future(self._deliver(url, body, meta))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, body: bytes, meta: tuple[str, str, str, str]) -> None:
        faults, rng, stats = self._faults, self._rng, self.stats
        if faults.drop and rng.random() < faults.drop:
            stats.dropped += 1
            return
        copies = 1
        if faults.duplicate and rng.random() < faults.duplicate:
            stats.duplicated += 1
            copies = 2
        if faults.delay and rng.random() < faults.delay:
            stats.delayed += 1
            await self._clock.sleep(rng.uniform(0.0, faults.max_delay))
        if faults.reorder and rng.random() < faults.reorder:
            stats.reordered += 1
            await sleep_or_set(self._clock, faults.max_delay, self._sent[url])
        for _ in range(copies):
            await self._send_until_answered(url, body, meta)

    async def _send_until_answered(
        self, url: str, body: bytes, meta: tuple[str, str, str, str]
    ) -> None:
        clock, stats = self._clock, self.stats
        event_id, webhook_id, batch_id, kind = meta
        initial, longest, limit = self._retry
        first = clock.now()
        attempt = 0
        while True:
            attempt += 1
            at = clock.now()
            headers = sign(body, secret=self._secret, webhook_id=webhook_id, timestamp=at)
            headers["content-type"] = "application/json"
            stats.attempts += 1
            if attempt > 1:
                stats.retries += 1
            self._notify_sent(url)
            self.in_flight += 1
            try:
                status = await self._send(url, headers, body)
            finally:
                self.in_flight -= 1
            self._log(
                WebhookDelivery(url, event_id, webhook_id, batch_id, kind, attempt, status, at)
            )
            if status is not None and 200 <= status < 300:
                stats.delivered += 1
                return
            wait = min(longest, initial * 2 ** (attempt - 1))
            if clock.now() + wait - first > limit:
                stats.gave_up += 1
                return
            await clock.sleep(wait)

    def _notify_sent(self, url: str) -> None:
        event = self._sent[url]
        self._sent[url] = asyncio.Event()
        event.set()

    async def _send(self, url: str, headers: Mapping[str, str], body: bytes) -> int | None:
        if self._post is not None:
            return await self._post(url, headers, body)
        assert self._session is not None
        try:
            async with self._session.post(url, data=body, headers=dict(headers)) as response:
                await response.read()
                return response.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return None

    def _log(self, delivery: WebhookDelivery) -> None:
        log = self.deliveries
        log.append(delivery)
        if len(log) > self._log_size:
            del log[: len(log) - self._log_size]
