"""A run seen from outside its process: cancel it, tell whether it is alive, stop its
batches when it is not.

``aiobatch cancel`` flags a live run in its journal (:func:`request_cancel`; the run
sees it within ``cancel_poll_interval`` seconds and before each create); for a run no
process holds (it crashed or was stopped) it sends the cancels itself
(:func:`cancel_batches`).
"""

from __future__ import annotations

import logging
import os
import time

from .._client import BatchClient
from ..errors import APIStatusError, InvalidTransitionError
from ._sqlite import JournalFile
from ._sqlite_db import FileLock, run_is_live
from ._states import ShardState
from ._submit import find_shard_batch

__all__ = ["cancel_batches", "request_cancel", "run_is_live"]

logger = logging.getLogger("aiobatch.run")


def request_cancel(journal_path: str | os.PathLike[str], *, busy_timeout: float = 10.0) -> None:
    """Ask the run that holds a journal to cancel (what ``aiobatch cancel`` does); the run
    sees it within ``cancel_poll_interval`` seconds.

    Raises:
        JournalError: no journal there, or it stayed busy for ``busy_timeout`` seconds
            (a run checking its input holds it).
    """
    with JournalFile(journal_path, busy_timeout=busy_timeout) as journal:
        journal.set_meta(cancel_requested=repr(time.time()))


async def cancel_batches(journal_path: str | os.PathLike[str], client: BatchClient) -> list[str]:
    """Cancel the open batches of a run that is not running (its process died or was
    stopped), so they stop spending; what they finished is collected when the run is
    started again. The cancels count as the run's own: their cancelled lines do not
    spend retry rounds.

    Returns:
        The ids of the batches a cancel was sent for.

    Raises:
        JournalError: a process runs the journal (use :func:`request_cancel`), or there
            is no journal.
    """
    path = os.fspath(journal_path)
    lock = FileLock(path)
    lock.acquire()
    sent: list[str] = []
    try:
        with JournalFile(path) as journal:
            for shard in journal.shards(ShardState.CREATING):
                started = shard.create_started_at or shard.planned_at
                await client.clock.sleep(
                    max(0.0, started + client.create_settle - client.clock.now())
                )
                found = await find_shard_batch(client, shard)
                if found is not None:
                    journal.move(
                        shard.key, ShardState.OPEN, batch_id=found.id, status=found.status.value
                    )
            for shard in journal.open_batches():
                assert shard.batch_id is not None
                journal.update(shard.key, cancel_reason="run")
                try:
                    await client.cancel_batch(shard.batch_id)
                except (APIStatusError, InvalidTransitionError) as exc:
                    # Already finished (409) or gone (404): nothing to stop.
                    logger.info("batch %s was not cancelled: %s", shard.batch_id, exc)
                    continue
                sent.append(shard.batch_id)
    finally:
        lock.release()
    return sent
