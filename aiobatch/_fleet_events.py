"""What a fleet tells its users: events, counters, and how events reach them.

Every change the fleet sees is an event: :class:`StatusChanged`, :class:`ProgressChanged`,
:class:`TrackingError` (something went wrong; tracking goes on), :class:`DeadlinePassed`
and, once per batch, :class:`BatchDone` with its :class:`DoneReason`. An
:class:`EventHub` hands each event to every :class:`Subscription` (``Fleet.events()``,
``Fleet.as_completed()``), which queues it until read, and to the ``on_event``
callback, whose exceptions are logged, never propagated (a coroutine callback runs as
its own task). :class:`FleetStats` counts the calls the fleet has made.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TypeAlias

import attrs

from ._aio import cancel_and_wait
from ._lifecycle import BatchStatus
from ._models import Batch, RequestCounts
from .errors import AiobatchError

__all__ = [
    "BatchDone",
    "Callback",
    "DeadlinePassed",
    "DoneReason",
    "EventHub",
    "FleetEvent",
    "FleetStats",
    "ProgressChanged",
    "StatusChanged",
    "Subscription",
    "TrackingError",
]

logger = logging.getLogger("aiobatch")


class DoneReason(str, enum.Enum):
    """Why the fleet stopped tracking a batch."""

    #: The batch reached a terminal status (completed, failed, expired, cancelled, or
    #: one of Portkey's): ``batch.status`` says which.
    FINISHED = "finished"
    #: Its deadline passed while it was still open (``batch`` is the last snapshot).
    DEADLINE = "deadline"
    #: The server kept answering 404 for it.
    NOT_FOUND = "not_found"
    #: It reports a status aiobatch does not know (``batch.raw_status``; not in the
    #: fleet's ``status_aliases``) yet cannot be running any more: it carries an output
    #: or error file id, or its ``expires_at`` is ``unknown_status_grace`` seconds past.
    #: Its files hold what it finished; ``error`` is the
    #: :class:`~aiobatch.errors.UnknownStatusError`.
    UNKNOWN_STATUS = "unknown_status"


@attrs.frozen(slots=True)
class StatusChanged:
    """A batch moved to a new status (``previous`` is None on its first observation
    when it was added by id)."""

    batch: Batch
    previous: BatchStatus | None

    @property
    def batch_id(self) -> str:
        """The batch's id."""
        return self.batch.id


@attrs.frozen(slots=True)
class ProgressChanged:
    """A batch's ``request_counts`` changed."""

    batch: Batch
    previous: RequestCounts | None

    @property
    def batch_id(self) -> str:
        """The batch's id."""
        return self.batch.id


@attrs.frozen(slots=True)
class TrackingError:
    """Something went wrong while tracking; tracking goes on.

    ``batch_id`` is None for a failure that concerns no single batch (a list page).
    ``error`` is the exception: an :class:`~aiobatch.errors.UnexpectedTransitionError`
    or :class:`~aiobatch.errors.UnknownStatusError` when the server reported something
    impossible or unknown (the server's fault), an API or transport error otherwise.
    """

    batch_id: str | None
    error: AiobatchError
    batch: Batch | None = None


@attrs.frozen(slots=True)
class DeadlinePassed:
    """A batch was still open at its deadline; ``cancelling`` says whether the fleet is
    cancelling it (it then stays tracked until it ends)."""

    batch_id: str
    batch: Batch | None
    cancelling: bool


@attrs.frozen(slots=True)
class BatchDone:
    """The fleet stopped tracking a batch: its outcome.

    Attributes:
        batch_id: the batch.
        batch: the last snapshot (None if the batch was never seen).
        reason: why tracking ended.
        error: the last error, for :attr:`DoneReason.NOT_FOUND`; the
            :class:`~aiobatch.errors.UnknownStatusError`, for
            :attr:`DoneReason.UNKNOWN_STATUS`.
    """

    batch_id: str
    batch: Batch | None
    reason: DoneReason
    error: AiobatchError | None = None

    @property
    def finished(self) -> bool:
        """Whether the batch reached a terminal status."""
        return self.reason is DoneReason.FINISHED


FleetEvent: TypeAlias = StatusChanged | ProgressChanged | TrackingError | DeadlinePassed | BatchDone


@attrs.define(slots=True)
class FleetStats:
    """Counters of what a fleet has done (read them; the fleet updates them).

    Attributes:
        requests: calls sent (each one took a request from the budget).
        retrieves: ``GET /batches/{id}`` calls.
        list_pages: ``GET /batches`` pages.
        cancels: ``POST /batches/{id}/cancel`` calls.
        sweeps: list sweeps started.
        observations: batch snapshots examined.
        rate_limited: answers with status 429.
        failures: calls that failed (any reason).
        notifications: :meth:`Fleet.notify` calls for a tracked batch.
        unknown_notifications: :meth:`Fleet.notify` calls for a batch not tracked
            (ignored).
    """

    requests: int = 0
    retrieves: int = 0
    list_pages: int = 0
    cancels: int = 0
    sweeps: int = 0
    observations: int = 0
    rate_limited: int = 0
    failures: int = 0
    notifications: int = 0
    unknown_notifications: int = 0


Callback: TypeAlias = Callable[[FleetEvent], "Awaitable[None] | None"]


class EventHub:
    """Hands every event to each open subscription and to the ``on_event`` callback.

    Args:
        on_event: called with every event; may be a coroutine function. An exception
            it raises is logged, never propagated.
    """

    def __init__(self, on_event: Callback | None) -> None:
        self._on_event = on_event
        #: the queue of each open subscription; None in a queue ends it.
        self.queues: set[asyncio.Queue[FleetEvent | None]] = set()
        self._callback_tasks: set[asyncio.Task[None]] = set()

    def subscribe(self) -> Subscription:
        """A new subscription: every event from now on, until :meth:`end`."""
        return Subscription(self)

    def emit(self, event: FleetEvent) -> None:
        for queue in self.queues:
            queue.put_nowait(event)
        callback = self._on_event
        if callback is None:
            return
        try:
            result = callback(event)
        except Exception:
            logger.exception("a fleet event callback raised on %r", type(event).__name__)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(self._await_callback(result, event))
            self._callback_tasks.add(task)
            task.add_done_callback(self._callback_tasks.discard)

    @staticmethod
    async def _await_callback(result: Awaitable[None], event: FleetEvent) -> None:
        try:
            await result
        except Exception:
            logger.exception("a fleet event callback raised on %r", type(event).__name__)

    def end(self) -> None:
        """End every subscription (each sees the events queued before, then stops)."""
        for queue in list(self.queues):
            queue.put_nowait(None)
        self.queues.clear()

    async def aclose(self) -> None:
        """Cancel the coroutine callbacks still running (but the one calling this, when
        a callback closes the fleet: it runs on to its end), then :meth:`end`."""
        me = asyncio.current_task()
        await cancel_and_wait([task for task in self._callback_tasks if task is not me])
        self._callback_tasks.clear()
        self.end()


class Subscription:
    """An async iterator over a fleet's events from the moment it was made."""

    def __init__(self, hub: EventHub) -> None:
        self._hub = hub
        self.queue: asyncio.Queue[FleetEvent | None] = asyncio.Queue()
        hub.queues.add(self.queue)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> FleetEvent:
        if self.queue not in self._hub.queues and self.queue.empty():
            raise StopAsyncIteration
        item = await self.queue.get()
        if item is None:
            self._hub.queues.discard(self.queue)
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        """Stop receiving events; a task waiting on this iterator sees it end."""
        queues, queue = self._hub.queues, self.queue
        if queue in queues:
            queues.discard(queue)
            while not queue.empty():  # drop what was never read
                queue.get_nowait()
            queue.put_nowait(None)
