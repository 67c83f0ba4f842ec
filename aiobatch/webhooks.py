"""Webhooks: verified push events that tell a fleet a batch has ended.

OpenAI sends a signed webhook when a batch ends (``batch.completed``, ``batch.failed``,
``batch.expired``, ``batch.cancelled``). The event carries only the batch's id; a
:class:`WebhookReceiver` verifies it, drops repeats and calls
:meth:`Fleet.notify <aiobatch.Fleet.notify>`, which makes the batch due at once. The
fleet's polls stay as the safety net for deliveries that never arrive.

Signing is `Standard Webhooks <https://www.standardwebhooks.com/>`_ (what OpenAI's
SDKs check in ``webhooks.unwrap``/``verify_signature``): three headers,
``webhook-id``, ``webhook-timestamp`` (Unix seconds) and ``webhook-signature``, which
holds one or more space-separated ``v1,<base64>`` values; each is an HMAC-SHA256 over
``"{id}.{timestamp}.{body}"`` keyed with the secret (``whsec_`` then base64; a secret
without the prefix is used as its UTF-8 bytes, as the SDK does). A delivery passes when
any value matches any of the secrets (several secrets: a rotation), compared in
constant time, and its timestamp is within ``tolerance`` (300 s) of the clock's wall
time. OpenAI retries failed deliveries for up to 72 hours, so an event may arrive more
than once and out of order: the receiver remembers the ``webhook-id`` values it took.

Example (a service with its own aiohttp app)::

    receiver = WebhookReceiver(os.environ["OPENAI_WEBHOOK_SECRET"], fleet=fleet)
    app.router.add_post("/webhooks/openai", receiver.handle)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import inspect
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

import attrs
from aiohttp import web

from ._clock import Clock, SystemClock
from ._secret import Secret
from .errors import (
    ConfigurationError,
    WebhookError,
    WebhookHeaderError,
    WebhookPayloadError,
    WebhookSignatureError,
    WebhookTimestampError,
    describe,
)

__all__ = [
    "BATCH_EVENT_TYPES",
    "DEFAULT_TOLERANCE",
    "DEFAULT_WEBHOOK_INTERVAL",
    "Notifiable",
    "WEBHOOK_SECRET_ENV",
    "WebhookEvent",
    "WebhookReceiver",
    "WebhookStats",
    "WebhookVerifier",
    "make_webhook_app",
    "run_webhook_server",
    "sign",
    "unwrap",
]

logger = logging.getLogger("aiobatch")

#: The event types that say a batch has ended.
BATCH_EVENT_TYPES = frozenset(
    {"batch.completed", "batch.failed", "batch.expired", "batch.cancelled"}
)
#: The largest difference between a delivery's timestamp and now, in seconds.
DEFAULT_TOLERANCE = 300.0
#: The safety-net poll interval a :class:`~aiobatch.BatchRun` given a receiver uses
#: (``FleetConfig.webhook_interval``) unless its config sets one, in seconds.
DEFAULT_WEBHOOK_INTERVAL = 600.0
#: Where ``aiobatch run`` and ``aiobatch fake-server`` read the signing secret by default.
WEBHOOK_SECRET_ENV = "OPENAI_WEBHOOK_SECRET"

_ID, _TIMESTAMP, _SIGNATURE = "webhook-id", "webhook-timestamp", "webhook-signature"
_PREFIX = "whsec_"


@attrs.frozen(slots=True)
class WebhookEvent:
    """One verified event.

    Types aiobatch does not act on (``response.completed``, a type added later) are
    parsed all the same: ``type`` is the string sent.

    Attributes:
        id: the event's id (``evt_...``), the same in every delivery of it.
        type: the event type (``batch.completed``...).
        created_at: when the event happened (Unix seconds).
        data: the event's ``data`` object as sent (for a batch: ``{"id": batch_id}``).
        webhook_id: the delivery's ``webhook-id`` header (also the same in retries).
        timestamp: the delivery's ``webhook-timestamp`` (when it was signed).
    """

    id: str
    type: str
    created_at: int
    data: Mapping[str, Any]
    webhook_id: str
    timestamp: int

    @property
    def object_id(self) -> str | None:
        """The id of the object the event is about (``data.id``), if a string."""
        value = self.data.get("id")
        return value if isinstance(value, str) and value else None

    @property
    def batch_id(self) -> str | None:
        """The batch's id for a ``batch.*`` event, else None."""
        return self.object_id if self.type.startswith("batch.") else None

    @property
    def is_batch_end(self) -> bool:
        """Whether this is one of the four events that say a batch has ended."""
        return self.type in BATCH_EVENT_TYPES


def _key(secret: str | Secret) -> bytes:
    """The HMAC key of a secret: base64 after ``whsec_``, else the UTF-8 bytes."""
    text = (secret.reveal() if isinstance(secret, Secret) else secret).strip()
    if text.startswith(_PREFIX):
        try:
            key = base64.b64decode(text[len(_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError(
                "a webhook secret starts with 'whsec_' but what follows is not base64 "
                "(the secret is not shown)"
            ) from None
    else:
        key = text.encode()
    if not key:
        raise ConfigurationError("a webhook secret is empty")
    return key


def _signature(key: bytes, webhook_id: str, timestamp: str, body: bytes) -> str:
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def sign(body: bytes, *, secret: str | Secret, webhook_id: str, timestamp: float) -> dict[str, str]:
    """The three Standard Webhooks headers for a delivery of ``body``.

    What a sender does (the fake service's webhook sender uses it); handy to test a
    receiver.

    Args:
        body: the exact bytes to send.
        secret: the signing secret (``whsec_...``).
        webhook_id: the delivery's id (keep it for retries of the same event).
        timestamp: the signing time, Unix seconds (whole seconds are sent).

    Returns:
        ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` (``v1,<base64>``).

    Raises:
        ConfigurationError: the secret is empty or not base64 after ``whsec_``.
    """
    stamp = str(math.floor(timestamp))
    return {
        _ID: webhook_id,
        _TIMESTAMP: stamp,
        _SIGNATURE: "v1," + _signature(_key(secret), webhook_id, stamp, body),
    }


def _header(headers: Mapping[str, str], name: str, webhook_id: str | None) -> str:
    value = headers.get(name)
    if value is None:
        # A plain dict may spell the name in any case (aiohttp's headers need not).
        lowered = {k.lower(): v for k, v in headers.items()}
        value = lowered.get(name)
    if value is None or not value.strip():
        raise WebhookHeaderError(
            f"the webhook delivery has no {name} header: it is not signed",
            webhook_id=webhook_id,
        )
    return value.strip()


class WebhookVerifier:
    """Checks Standard Webhooks signatures against one or more secrets.

    Args:
        secrets: the signing secret, or several (all accepted: while a secret is
            rotated, pass the old and the new one).
        clock: the time the timestamps are checked against (its ``now()``, wall
            time); the system clock by default.
        tolerance: the largest difference, in seconds, between a delivery's timestamp
            and now, either way (an old delivery replayed, one dated in the future).

    Raises:
        ConfigurationError: no secret, an empty one, or one not base64 after ``whsec_``.
        ValueError: a negative tolerance.
    """

    __slots__ = ("_clock", "_keys", "_tolerance")

    def __init__(
        self,
        secrets: str | Secret | Iterable[str | Secret],
        *,
        clock: Clock | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> None:
        listed = [secrets] if isinstance(secrets, str | Secret) else list(secrets)
        if not listed:
            raise ConfigurationError("a webhook verifier needs at least one secret")
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0 seconds, got {tolerance!r}")
        self._keys = tuple(_key(s) for s in listed)
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._tolerance = float(tolerance)

    def __repr__(self) -> str:
        return f"WebhookVerifier(secrets=<{len(self._keys)} hidden>, tolerance={self._tolerance:g})"

    @property
    def tolerance(self) -> float:
        """The timestamp tolerance, in seconds."""
        return self._tolerance

    def verify(self, headers: Mapping[str, str], body: bytes) -> tuple[str, int]:
        """Check a delivery's headers and signature (not its body's shape).

        Args:
            headers: the request headers (any mapping; names in any case).
            body: the raw request body, exactly as received.

        Returns:
            The delivery's ``webhook-id`` and timestamp.

        Raises:
            WebhookHeaderError: a header is missing, empty, or the timestamp is not an
                integer.
            WebhookTimestampError: the timestamp is outside the tolerance.
            WebhookSignatureError: no signature matches any secret.
        """
        webhook_id = _header(headers, _ID, None)
        stamp = _header(headers, _TIMESTAMP, webhook_id)
        given = _header(headers, _SIGNATURE, webhook_id)
        try:
            timestamp = int(stamp)
        except ValueError:
            raise WebhookHeaderError(
                f"the webhook-timestamp header is not whole Unix seconds: {stamp[:40]!r}",
                webhook_id=webhook_id,
            ) from None
        now = self._clock.now()
        if abs(now - timestamp) > self._tolerance:
            when = "old" if timestamp < now else "far in the future"
            raise WebhookTimestampError(
                f"the webhook delivery {webhook_id!r} is too {when}: signed at {timestamp}, "
                f"now is {now:.0f} (tolerance {self._tolerance:g}s); a replay is refused",
                webhook_id=webhook_id,
                timestamp=timestamp,
                now=now,
                tolerance=self._tolerance,
            )
        offered = [part[3:] for part in given.split() if part.startswith("v1,")]
        matched = False
        for key in self._keys:
            expected = _signature(key, webhook_id, stamp, body).encode()
            for candidate in offered:
                # Every pair is compared, so the time taken says nothing of which matched.
                matched |= hmac.compare_digest(expected, candidate.encode())
        if not matched:
            raise WebhookSignatureError(
                f"the webhook delivery {webhook_id!r} carries no signature that matches "
                f"the secret{'s' if len(self._keys) > 1 else ''} ({len(offered)} v1 "
                "signatures offered): forged, changed on the way, or signed with another "
                "secret",
                webhook_id=webhook_id,
            )
        return webhook_id, timestamp

    def unwrap(self, headers: Mapping[str, str], body: bytes) -> WebhookEvent:
        """Verify a delivery, then parse its body as an event.

        Args:
            headers: the request headers.
            body: the raw request body.

        Returns:
            The event (of any type).

        Raises:
            WebhookHeaderError, WebhookTimestampError, WebhookSignatureError: as
                :meth:`verify`.
            WebhookPayloadError: the signed body is not an event.
        """
        webhook_id, timestamp = self.verify(headers, body)
        return _parse(body, webhook_id, timestamp)


def _parse(body: bytes, webhook_id: str, timestamp: int) -> WebhookEvent:
    def bad(why: str) -> WebhookPayloadError:
        return WebhookPayloadError(
            f"the webhook delivery {webhook_id!r} is signed but is not an event: {why}",
            webhook_id=webhook_id,
        )

    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"not JSON ({describe(exc)})") from None
    if not isinstance(data, dict):
        raise bad(f"a JSON {type(data).__name__}, not an object")
    event_id, kind, created, payload = (
        data.get("id"),
        data.get("type"),
        data.get("created_at"),
        data.get("data"),
    )
    if not isinstance(event_id, str) or not event_id:
        raise bad("no string 'id'")
    if not isinstance(kind, str) or not kind:
        raise bad("no string 'type'")
    if not isinstance(created, int) or isinstance(created, bool):
        raise bad("no integer 'created_at'")
    if not isinstance(payload, dict):
        raise bad("no object 'data'")
    if kind.startswith("batch.") and not (isinstance(payload.get("id"), str) and payload["id"]):
        raise bad(f"a {kind} event without a string 'data.id'")
    return WebhookEvent(event_id, kind, created, payload, webhook_id, timestamp)


def unwrap(
    body: bytes,
    headers: Mapping[str, str],
    *,
    secret: str | Secret | Iterable[str | Secret],
    clock: Clock | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> WebhookEvent:
    """Verify one delivery and parse its event (a one-off :class:`WebhookVerifier`).

    Raises:
        WebhookHeaderError, WebhookTimestampError, WebhookSignatureError,
        WebhookPayloadError: see :meth:`WebhookVerifier.unwrap`.
    """
    verifier = WebhookVerifier(secret, clock=clock, tolerance=tolerance)
    return verifier.unwrap(headers, body)


class Notifiable(Protocol):
    """What a receiver hands batch events to (a :class:`~aiobatch.Fleet`)."""

    def notify(self, batch_id: str) -> bool:
        """Make a tracked batch due at once; False when it is not tracked."""
        ...


@attrs.define(slots=True)
class WebhookStats:
    """What a receiver did with the deliveries it got (read them; it updates them).

    Attributes:
        received: deliveries received (every POST).
        accepted: verified events taken (duplicates not counted).
        duplicates: verified deliveries of a ``webhook-id`` already taken (answered 200,
            not acted on again).
        notified: batch events handed to a fleet that tracks the batch.
        unknown_batches: batch events for a batch no fleet tracks (changed nothing).
        other_types: verified events of a type aiobatch does not act on.
        refused_headers: unsigned deliveries (a header missing or unreadable).
        refused_timestamps: deliveries with a timestamp outside the tolerance.
        refused_signatures: deliveries whose signature matched no secret.
        refused_bodies: signed deliveries whose body is not an event, or too large.
    """

    received: int = 0
    accepted: int = 0
    duplicates: int = 0
    notified: int = 0
    unknown_batches: int = 0
    other_types: int = 0
    refused_headers: int = 0
    refused_timestamps: int = 0
    refused_signatures: int = 0
    refused_bodies: int = 0

    @property
    def refused(self) -> int:
        """Every refused delivery."""
        return (
            self.refused_headers
            + self.refused_timestamps
            + self.refused_signatures
            + self.refused_bodies
        )


EventCallback = Callable[[WebhookEvent], "Awaitable[None] | None"]


class WebhookReceiver:
    """Verifies webhook deliveries and hands batch events to fleets.

    :meth:`handle` is an aiohttp request handler; :meth:`receive` is its core, for
    another web framework. A delivery is answered at once (the fleet retrieves the batch
    later, on its own scheduler): 200 for an event taken, a repeat, or an event for a
    batch no fleet tracks; 401 for a missing header, a stale or future timestamp, or a
    bad signature; 400 for a signed body that is not an event; 413 for a body larger
    than ``max_body``. A refused delivery is counted and logged, never acted on, and
    costs no API request.

    Args:
        secrets: the signing secret(s) (see :class:`WebhookVerifier`).
        fleet: a fleet to notify (more with :meth:`attach`).
        on_event: called with every verified event taken (any type, repeats dropped);
            may be a coroutine function (run as a task, so the answer does not wait for
            it). What it raises is logged, never propagated.
        clock: the clock the timestamps are checked against (the fleet's, in tests).
        tolerance: the timestamp tolerance, in seconds.
        remember: how many ``webhook-id`` values are kept to drop repeats (the oldest
            are forgotten first).
        max_body: the largest body read, in bytes.
    """

    def __init__(
        self,
        secrets: str | Secret | Iterable[str | Secret],
        *,
        fleet: Notifiable | None = None,
        on_event: EventCallback | None = None,
        clock: Clock | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
        remember: int = 100_000,
        max_body: int = 1 << 20,
    ) -> None:
        if remember < 1:
            raise ValueError(f"remember must be at least 1, got {remember!r}")
        self._verifier = WebhookVerifier(secrets, clock=clock, tolerance=tolerance)
        self._fleets: list[Notifiable] = [] if fleet is None else [fleet]
        self._on_event = on_event
        self._seen: dict[str, None] = {}
        self._remember = remember
        self._max_body = max_body
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned: set[type[WebhookError]] = set()
        self.stats = WebhookStats()

    def __repr__(self) -> str:
        return f"<WebhookReceiver fleets={len(self._fleets)} stats={self.stats!r}>"

    def attach(self, fleet: Notifiable) -> None:
        """Hand batch events to ``fleet`` too (a fleet already attached is kept once)."""
        if not any(f is fleet for f in self._fleets):
            self._fleets.append(fleet)

    def detach(self, fleet: Notifiable) -> None:
        """Stop handing events to ``fleet``."""
        self._fleets = [f for f in self._fleets if f is not fleet]

    def receive(self, headers: Mapping[str, str], body: bytes) -> int:
        """Take one delivery: verify, drop a repeat, notify; return the HTTP status to
        answer (200, 400, 401). Never raises for a bad delivery."""
        stats = self.stats
        stats.received += 1
        try:
            event = self._verifier.unwrap(headers, body)
        except WebhookError as exc:
            return self._refused(exc)
        seen = self._seen
        if event.webhook_id in seen:
            stats.duplicates += 1
            return 200
        seen[event.webhook_id] = None
        if len(seen) > self._remember:
            del seen[next(iter(seen))]
        stats.accepted += 1
        batch_id = event.batch_id
        if event.is_batch_end and batch_id is not None:
            tracked = False
            for fleet in self._fleets:
                tracked = fleet.notify(batch_id) or tracked
            if tracked:
                stats.notified += 1
            else:
                stats.unknown_batches += 1
        else:
            stats.other_types += 1
        self._call_back(event)
        return 200

    def _refused(self, error: WebhookError) -> int:
        stats = self.stats
        if isinstance(error, WebhookPayloadError):
            stats.refused_bodies += 1
        elif isinstance(error, WebhookSignatureError):
            stats.refused_signatures += 1
        elif isinstance(error, WebhookTimestampError):
            stats.refused_timestamps += 1
        else:
            stats.refused_headers += 1
        # Said once per kind at WARNING: a flood of bad deliveries must not flood the log.
        kind = type(error)
        level = logging.DEBUG if kind in self._warned else logging.WARNING
        self._warned.add(kind)
        logger.log(level, "webhook delivery refused: %s", describe(error))
        return 400 if isinstance(error, WebhookPayloadError) else 401

    def _call_back(self, event: WebhookEvent) -> None:
        callback = self._on_event
        if callback is None:
            return
        try:
            result = callback(event)
        except Exception:
            logger.exception("a webhook event callback raised on %s", event.type)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(_guard(result, event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def handle(self, request: web.Request) -> web.Response:
        """The aiohttp handler: read the body, :meth:`receive` it, answer at once."""
        length = request.content_length
        if length is not None and length > self._max_body:
            return self._too_large()
        body = await request.content.read(self._max_body + 1)
        if len(body) > self._max_body:
            return self._too_large()
        status = self.receive(request.headers, body)
        return web.Response(status=status)

    def _too_large(self) -> web.Response:
        self.stats.received += 1
        self.stats.refused_bodies += 1
        logger.debug("webhook delivery refused: its body is over %d bytes", self._max_body)
        return web.Response(status=413)

    async def aclose(self) -> None:
        """Wait for the ``on_event`` coroutines still running."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


async def _guard(result: Awaitable[None], event: WebhookEvent) -> None:
    try:
        await result
    except Exception:
        logger.exception("a webhook event callback raised on %s", event.type)


def make_webhook_app(receiver: WebhookReceiver, *, path: str = "/webhooks") -> web.Application:
    """An aiohttp application that answers ``POST path`` with ``receiver``."""
    app = web.Application()
    app.router.add_post(path, receiver.handle)
    return app


@contextlib.asynccontextmanager
async def run_webhook_server(
    receiver: WebhookReceiver,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    path: str = "/webhooks",
) -> AsyncIterator[str]:
    """Serve ``receiver`` over HTTP while the block runs; yields the URL to register.

    Raises:
        OSError: the address cannot be listened on.
    """
    runner = web.AppRunner(
        make_webhook_app(receiver, path=path), access_log=None, handle_signals=False
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = port
        for address in runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                bound = int(address[1])
                break
        shown = f"[{host}]" if ":" in host else host
        yield f"http://{shown}:{bound}{path}"
    finally:
        await runner.cleanup()
        await receiver.aclose()
