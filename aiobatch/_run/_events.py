"""What a run tells about its batches: one event when a batch is made, one when it ends.

:class:`BatchCreated` comes when a shard's batch is open on the server (made by this run,
or adopted from the journal on a resume: ``adopted``); :class:`BatchEnded` when the
fleet stops tracking it (its terminal status and counts, or why it was given up).
"""

from __future__ import annotations

from typing import TypeAlias

import attrs

from .._models import RequestCounts

__all__ = ["BatchCreated", "BatchEnded", "BatchEvent"]


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
