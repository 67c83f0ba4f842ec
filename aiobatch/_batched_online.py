"""The realtime fallback of :class:`~aiobatch.BatchedOpenAI`: a call whose deadline passed
(or whose batches ended) is sent to the online endpoint, its answer journaled in the
online-answers file of the journal folder (:data:`ONLINE_ANSWERS`), and a result its batch
brings as well is counted as a duplicate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from typing import TYPE_CHECKING, Any

from ._batched_calls import _Call, _Flush
from ._client import BatchClient
from ._clock import Clock
from ._convert import to_wire, usage_tokens
from ._models import LineResponse, ResultError, ResultHTTPError, ResultLine, ResultSuccess
from ._retry import is_transient_status
from .errors import APIStatusError

logger = logging.getLogger("aiobatch.batched")

#: The file (in the journal folder) of the answers of calls sent online.
ONLINE_ANSWERS = "online-answers.sqlite"


class _Online:
    """Sending calls online and journaling their answers (a mixin of the client)."""

    _client: BatchClient
    _clock: Clock
    _folder: str | None
    _temp: str | None
    _failed: int
    _online: int
    _fallbacks: int
    _duplicates: int
    _duplicate_in: int
    _duplicate_out: int
    _falling: dict[str, tuple[ResultLine, str | None] | None]
    _online_keys: set[str]
    _answers: _OnlineAnswers | None
    _online_idle: asyncio.Event

    if TYPE_CHECKING:

        def _withdraw(self, call: _Call) -> None: ...

        def _answer(self, call: _Call, line: ResultLine, batch_id: str | None) -> Any: ...

    async def _go_online(self, call: _Call) -> Any:
        """Answer a call from the online endpoint (``realtime_fallback``): its journaled
        answer, or its error raised. A result its batch brings meanwhile or later is a
        duplicate; when the online request fails, such a result answers instead."""
        flush = call.home if isinstance(call.home, _Flush) else None
        self._falling[call.key] = None
        self._withdraw(call)
        self._fallbacks += 1
        self._online += 1
        self._online_idle.clear()
        if flush is not None:
            flush.fell_back = True
            self._cancel_if_unwanted(flush)
        try:
            line, final = await self._send_online(call)
            if final:
                self._journal_online(call, line)
        except asyncio.CancelledError:
            self._falling.pop(call.key, None)
            raise
        except Exception:
            late = self._falling.pop(call.key, None)
            if late is not None and not isinstance(late[0], ResultError):
                return self._answer(call, *late)  # the batch answered after all
            self._failed += 1
            raise
        finally:
            self._online -= 1
            if not self._online:
                self._online_idle.set()
        late = self._falling.pop(call.key, None)
        if late is not None:
            if not final and not isinstance(late[0], ResultError):
                return self._answer(call, *late)  # a batch answer beats a retryable error
            self._count_duplicate(late[0])
        return self._answer(call, line, None)

    async def _send_online(self, call: _Call) -> tuple[ResultLine, bool]:
        """The call's request sent to the online endpoint (retried as the client
        retries): its answer as a result line, and whether that is final (a success, or
        an error that sending again would not change)."""
        body = json.loads(call.data)["body"]
        try:
            response = await self._client.send_online(call.url, body)
        except APIStatusError as exc:
            answer = LineResponse(
                status_code=exc.status_code, body=exc.body, request_id=exc.request_id
            )
            final = not is_transient_status(exc.status_code)
            return ResultHTTPError(custom_id=call.key, response=answer), final
        return ResultSuccess(custom_id=call.key, response=response), True

    def _journal_online(self, call: _Call, line: ResultLine) -> None:
        """Keep an online answer in the journal folder (before the caller gets it)."""
        if self._answers is None:
            folder = self._folder if self._folder is not None else self._temp
            assert folder is not None
            self._answers = _OnlineAnswers(os.path.join(folder, ONLINE_ANSWERS))
        data = json.dumps(to_wire(line), separators=(",", ":"), ensure_ascii=False).encode()
        self._answers.add(call.key, call.url, data, self._clock.now())
        self._online_keys.add(call.key)

    def _count_duplicate(self, line: ResultLine) -> None:
        """A batch's result for a request answered online: paid twice."""
        if isinstance(line, ResultError):
            return  # it did not run: no cost
        self._duplicates += 1
        if isinstance(line, ResultSuccess):
            used_in, used_out = usage_tokens(line.response.body)
            self._duplicate_in += used_in
            self._duplicate_out += used_out
        logger.info(
            "batched: request %s, answered online, also came from its batch (a duplicate "
            "cost; kept in the journal, not returned)",
            line.custom_id,
        )

    def _cancel_if_unwanted(self, flush: _Flush) -> None:
        """Cancel a flush's batch run when no call waits for it any more (a batch cannot
        drop single lines)."""
        task = flush.task
        if not flush.waiting and not flush.expected and task is not None and not task.done():
            logger.info("batched: every call of %s went online; cancelling it", flush.path)
            flush.run.cancel()


class _OnlineAnswers:
    """The answers of calls sent online, by key, in a SQLite file of the journal folder
    (written in the loop's thread, as the run's journal is: one small commit each)."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS answers (custom_id TEXT PRIMARY KEY, url TEXT NOT NULL, "
            "data BLOB NOT NULL, answered_at REAL NOT NULL)"
        )

    def add(self, key: str, url: str, data: bytes, at: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO answers (custom_id, url, data, answered_at) "
            "VALUES (?, ?, ?, ?)",
            (key, url, data, at),
        )

    def close(self) -> None:
        self._db.close()


def _read_online_answers(path: str) -> dict[str, tuple[bytes, str | None]]:
    """The online answers kept in ``path``, by key (read-only)."""
    db = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True)
    try:
        return {
            str(key): (bytes(data), None)
            for key, data in db.execute("SELECT custom_id, data FROM answers")
        }
    finally:
        db.close()
