"""Ingest: a new run's source, checked by preflight, into its journal in one go.

Every line is checked before anything is sent; the accepted requests and the run's facts
are committed together, or not at all (a source with bad lines leaves no journal behind,
unless ``skip_invalid``).

Lines are checked in batches (at most :data:`_BATCH_LINES` lines or
:data:`_BATCH_BYTES` bytes): each batch's requests are added to the journal, whose
unique index on ``custom_id`` finds the duplicates (no id of an accepted request is held
in memory; when the journal refuses a batch, its ids are looked up and the batch is
checked again), and the loop runs other tasks before the next batch.

The requests are planned as they are added (:class:`~aiobatch._run._planning.IngestPlanner`):
each goes into the journal queued in its shard, and the shards are recorded with the
run's facts, so a new run has its shards when the ingest commits.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterable, Iterator
from typing import Any

from .._aio import wait_out
from .._clock import Clock
from ..errors import JournalError, PreflightError
from ._config import RequestSource, RunConfig
from ._context import logger
from ._journal import Ingest, Journal
from ._planning import IngestPlanner, ShardLimits
from ._preflight import Inspected, LineProblem, Preflight
from ._records import NewShard, RequestRow, RunMeta

__all__ = ["check_source", "ingest"]

#: Lines checked per batch, at most ...
_BATCH_LINES = 500
#: ... and no more once they make this many bytes.
_BATCH_BYTES = 4 * 1024 * 1024
#: Bytes of a file read (and hashed) at a time.
_BLOCK = 1 << 20


def _file_lines(path: str, digest: Any) -> Iterator[bytes]:
    """A file's lines without their newlines, feeding every byte to ``digest``; read
    in blocks."""
    with open(path, "rb") as fh:
        carry = b""
        while block := fh.read(_BLOCK):
            digest.update(block)
            lines = block.split(b"\n")
            if carry:
                lines[0] = carry + lines[0]
            carry = lines.pop()
            yield from lines
        if carry:
            yield carry


def _empty_input(name: str) -> PreflightError:
    """An input file that holds no request (empty, or only blank lines): the caller's
    mistake (a wrong or truncated file), not a run of nothing."""
    message = "the file holds no requests (it is empty or has only blank lines)"
    problem = LineProblem(
        source=name, line=0, custom_id=None, field=None, code="empty_input", message=message
    )
    return PreflightError(
        f"{name}: {message}; nothing was uploaded",
        problems=(problem,),
        count=1,
        source=name,
    )


async def fingerprint(path: str) -> str:
    """``sha256:...`` of a file, read in blocks; the loop runs other tasks between two
    blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:  # noqa: ASYNC230 - read a block at a time, see below
        while chunk := fh.read(_BLOCK):
            digest.update(chunk)
            await asyncio.sleep(0)
    return f"sha256:{digest.hexdigest()}"


class _Batches:
    """Inspected lines on their way into the journal, a batch at a time.

    A batch goes in while the next one is inspected (the SQLite journal adds it in its
    worker thread; PostgreSQL's over its connection). In a run of 300,000
    requests over HTTP, one after the other, the SQLite journal's thread spent 1.9 s
    adding and the loop 0.9 s inspecting (function timers); the ingest alone on the real
    clock took 3.5-4.1 s so, and 2.9-3.2 s side by side. A batch is resolved against the
    journal only once the one before it is in, so it sees every id used before; a batch
    that fails stops the reading at the next line."""

    def __init__(self, preflight: Preflight, sink: Ingest, planner: IngestPlanner | None) -> None:
        self._preflight = preflight
        self._sink = sink
        self._planner = planner
        self._items: list[Inspected] = []
        self._bytes = 0
        self._adding: asyncio.Future[None] | None = None  # the batch going in
        self._failed = False  # it raised: flush at the next line, which raises it

    def hold(self, item: Inspected | None) -> bool:
        """Hold the next inspected line (None: a blank one); True when the batch is
        full (then :meth:`flush` it)."""
        if item is None:
            return False
        self._items.append(item)
        self._bytes += item.size
        return len(self._items) >= _BATCH_LINES or self._bytes >= _BATCH_BYTES or self._failed

    async def flush(self) -> None:
        """Send the held lines into the journal, once the batch before them is in (it
        goes on while the caller inspects the next lines), then let the loop run other
        tasks."""
        items = self._items
        if items:
            self._items = []
            self._bytes = 0
            await self.added()
            self._adding = asyncio.ensure_future(self._add(items))
            self._adding.add_done_callback(self._note_failure)
            await asyncio.sleep(0)

    def _note_failure(self, adding: asyncio.Future[None]) -> None:
        if not adding.cancelled() and adding.exception() is not None:
            self._failed = True

    async def added(self) -> None:
        """Wait until the batch going in is in the journal (raising what it raised)."""
        if self._adding is not None:
            adding, self._adding = self._adding, None
            await adding

    async def stop(self) -> None:
        """Stop the batch going in, if any, and wait until it has (the ingest failed: its
        transaction is rolled back once the journal's thread is done with it). A cancel
        that comes meanwhile is raised once it has."""
        if self._adding is None:
            return
        adding, self._adding = self._adding, None
        adding.cancel()
        try:
            await wait_out(adding)
        finally:
            if not adding.cancelled():
                adding.exception()  # seen: the ingest's own error is the one raised

    async def _add(self, items: list[Inspected]) -> None:
        """Settle ``items`` into the journal."""
        preflight, sink, planner = self._preflight, self._sink, self._planner
        # Only the ids of lines rejected anyway are looked up first (their problems
        # name the line that used the id before); the journal refuses the requests
        # when another id was used before, and then every id is looked up.
        mark = preflight.mark()
        planned = planner.mark() if planner is not None else None
        rejected = preflight.claims(items, rejected=True)
        rows = preflight.resolve_rows(items, await sink.taken(rejected) if rejected else {})
        if not await sink.add(self._queued(rows)):
            preflight.undo(mark)
            if planner is not None and planned is not None:
                planner.undo(planned)
            rows = preflight.resolve_rows(items, await sink.taken(preflight.claims(items)))
            if not await sink.add(self._queued(rows)):  # pragma: no cover
                raise AssertionError("a custom_id was taken twice")  # all were looked up

    def _queued(self, rows: list[RequestRow]) -> list[RequestRow]:
        """``rows`` queued in their shards, when the ingest plans."""
        return rows if self._planner is None else self._planner.place(rows)

    def shards(self) -> list[NewShard]:
        """Every shard the requests were queued in (none when not planned)."""
        return self._planner.finish() if self._planner else []


async def _inspect_all(
    source: RequestSource, path: str, preflight: Preflight, batches: _Batches
) -> str:
    """Inspect every line of ``source`` (``path``: its file, when it is one) into
    ``batches``, the last one in the journal on return; the file's fingerprint
    (``""`` for another source)."""
    if isinstance(source, str | os.PathLike):
        digest = hashlib.sha256()
        inspect = preflight.inspect_line
        hold = batches.hold
        for number, raw in enumerate(_file_lines(path, digest), start=1):
            if hold(inspect(raw, number)):
                await batches.flush()
        print_ = f"sha256:{digest.hexdigest()}"
    else:
        print_ = ""
        index = 0
        if isinstance(source, AsyncIterable):
            async for item in source:
                index += 1
                if batches.hold(preflight.inspect_item(item, index)):
                    await batches.flush()
        else:
            for item in source:
                index += 1
                if batches.hold(preflight.inspect_item(item, index)):
                    await batches.flush()
    await batches.flush()
    await batches.added()
    return print_


async def ingest(
    journal: Journal,
    source: RequestSource,
    *,
    config: RunConfig,
    clock: Clock,
    max_line_bytes: int,
    plan: ShardLimits | None = None,
    custom_id_pattern: str | None = None,
) -> None:
    """Preflight the source into the journal: all or nothing. ``plan``: the requests
    go in queued in shards cut within these limits; None: they are left pending.

    Raises:
        PreflightError: the source has bad lines (and ``skip_invalid`` is off), or no
            valid line at all.
    """
    is_path = isinstance(source, str | os.PathLike)
    path = os.fspath(source) if is_path else "<requests>"  # type: ignore[arg-type]
    # The name shown (and kept in the journal as text): a file name that is not UTF-8
    # (its bytes are unpaired surrogates in Python) is shown with those escaped.
    name = path.encode("utf-8", "backslashreplace").decode("utf-8")
    preflight = Preflight(
        source=name,
        max_line_bytes=max_line_bytes,
        skip_invalid=config.skip_invalid,
        token_estimator=config.token_estimator,
        custom_id_pattern=custom_id_pattern,
        remember_ids=False,  # the journal finds duplicates
    )
    # Each batch is added in the journal's worker thread (see Journal.ingest).
    async with journal.ingest(background=True) as sink:
        planner = IngestPlanner(plan) if plan is not None else None
        batches = _Batches(preflight, sink, planner)
        try:
            print_ = await _inspect_all(source, path, preflight, batches)
        except BaseException:
            await batches.stop()
            raise
        preflight.finish()
        if preflight.accepted == 0 and preflight.problem_count:
            shown = "\n".join(f"  {p}" for p in preflight.problems[:10])
            raise PreflightError(
                f"{name}: no valid request; {preflight.problem_count} problems in "
                f"{preflight.rejected} lines; nothing was uploaded\n{shown}",
                problems=preflight.problems,
                count=preflight.problem_count,
                source=name,
            )
        if is_path and preflight.accepted == 0 and preflight.problem_count == 0:
            raise _empty_input(name)
        now = clock.now()
        run_id = uuid.uuid4().hex[:16]
        shards = batches.shards()
        await sink.start(
            RunMeta(
                run_id=run_id,
                source=name,
                fingerprint=print_,
                started_at=now,
                updated_at=now,
                state="running",
                skipped=preflight.rejected,
                problems="\n".join(str(p) for p in preflight.problems[:100]),
                order=config.order,
            ),
            shards,
        )
    if shards:
        logger.info("run %s: planned %d batch(es)", run_id, len(shards))
    for problem in preflight.problems[:20]:
        logger.warning("skipped invalid input line: %s", problem)
    if preflight.problem_count > 20:
        logger.warning(
            "... %d problems in all; %d invalid input lines skipped",
            preflight.problem_count,
            preflight.rejected,
        )


async def check_source(journal: Journal, meta: RunMeta, source: RequestSource | None) -> None:
    """A file source given to a resumed run must be the file the run started with.

    Raises:
        JournalError: the file changed since.
    """
    if not isinstance(source, str | os.PathLike):
        return
    if meta.fingerprint and await fingerprint(os.fspath(source)) != meta.fingerprint:
        raise JournalError(
            f"the journal {journal.location} belongs to a run of another input "
            f"({meta.source}); {os.fspath(source)} has changed since. "
            "Use a new journal for new input"
        )
