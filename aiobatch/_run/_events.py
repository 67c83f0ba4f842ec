"""What a run tells about its batches: one event when a batch is made, one when it ends.

:class:`BatchCreated` comes when a shard's batch is open on the server (made by this run,
or adopted from the journal on a resume: ``adopted``); :class:`BatchEnded` when the
fleet stops tracking it (its terminal status and counts, or why it was given up).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

import attrs

from .._models import RequestCounts

if TYPE_CHECKING:
    from .._fleet import BatchDone
    from ._records import Shard

__all__ = ["BatchAnnouncer", "BatchCreated", "BatchEnded", "BatchEvent"]

logger = logging.getLogger("aiobatch.run")


@attrs.frozen(slots=True)
class BatchCreated:
    """A batch is open on the server for one shard.

    Attributes:
        batch_id: the batch.
        shard: the shard's key in its run.
        endpoint: the url its requests call (``/v1/chat/completions``).
        model: the model of its requests (None when the shard mixes them).
        requests: how many requests it holds.
        adopted: made by an earlier run of the same journal, picked up on resume.
    """

    batch_id: str
    shard: str
    endpoint: str
    model: str | None
    requests: int
    adopted: bool = False


@attrs.frozen(slots=True)
class BatchEnded:
    """The run stopped tracking a batch; its lines are collected next.

    Attributes:
        batch_id: the batch.
        shard: the shard's key in its run.
        endpoint, model: as in :class:`BatchCreated`.
        status: its last status (``completed``, ``expired``, ``cancelled``, ``failed``,
            ...; None when it was never seen).
        reason: why tracking ended (a :class:`~aiobatch.DoneReason` value: ``finished``,
            ``deadline``, ``not_found``, ``unknown_status``).
        counts: its last ``request_counts`` (None when it was never seen).
    """

    batch_id: str
    shard: str
    endpoint: str
    model: str | None
    status: str | None
    reason: str
    counts: RequestCounts | None


BatchEvent: TypeAlias = BatchCreated | BatchEnded


class BatchAnnouncer:
    """Sends a run's batch events to its callback (``BatchRun(on_batch=...)``): a batch
    made or adopted, then the same batch ended, with its shard's endpoint and model. A
    failing callback is logged, never passed on."""

    def __init__(self, callback: Callable[[BatchEvent], None] | None) -> None:
        self._callback = callback
        self._announced: dict[str, tuple[str, str, str | None]] = {}

    def created(self, shard: Shard, *, adopted: bool) -> None:
        """A shard's batch is open (made by the run, or ``adopted`` on a resume)."""
        if self._callback is None or shard.batch_id is None:
            return
        self._announced[shard.batch_id] = (shard.key, shard.url, shard.model)
        self._emit(
            BatchCreated(shard.batch_id, shard.key, shard.url, shard.model, shard.lines, adopted)
        )

    def ended(self, key: str, done: BatchDone) -> None:
        """The fleet stopped tracking a shard's batch."""
        if self._callback is None:
            return
        _, url, model = self._announced.get(done.batch_id, (key, "", None))
        batch = done.batch
        self._emit(
            BatchEnded(
                done.batch_id,
                key,
                url,
                model,
                status=batch.status.value if batch is not None else None,
                reason=done.reason.value,
                counts=batch.request_counts if batch is not None else None,
            )
        )

    def _emit(self, event: BatchEvent) -> None:
        assert self._callback is not None
        try:
            self._callback(event)
        except Exception:  # an observer must never break the run
            logger.exception("batch event callback failed")
