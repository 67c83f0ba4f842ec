"""Ingest: a new run's source, checked by preflight, into its journal in one go.

Every line is checked before anything is sent; the accepted requests and the run's facts
are committed together, or not at all (a source with bad lines leaves no journal behind,
unless ``skip_invalid``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterable, Iterator
from typing import Any

from .._clock import Clock
from ..errors import JournalError, PreflightError
from ._config import RequestSource, RunConfig
from ._context import logger
from ._journal import Journal
from ._preflight import LineProblem, Preflight
from ._records import PreparedRequest, RunMeta

__all__ = ["check_source", "ingest"]

#: Requests written to the journal per statement batch while ingesting.
_INGEST_CHUNK = 5000


def _file_lines(path: str, digest: Any) -> Iterator[bytes]:
    """A file's lines without their newlines, feeding every byte to ``digest``."""
    with open(path, "rb") as fh:
        for raw in fh:
            digest.update(raw)
            yield raw.rstrip(b"\n")


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


def fingerprint(path: str) -> str:
    """``sha256:...`` of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


async def ingest(
    journal: Journal,
    source: RequestSource,
    *,
    config: RunConfig,
    clock: Clock,
    max_line_bytes: int,
    custom_id_pattern: str | None = None,
) -> None:
    """Preflight the source into the journal: all or nothing.

    Raises:
        PreflightError: the source has bad lines (and ``skip_invalid`` is off), or no
            valid line at all.
    """
    is_path = isinstance(source, str | os.PathLike)
    name = os.fspath(source) if is_path else "<requests>"  # type: ignore[arg-type]
    preflight = Preflight(
        source=name,
        max_line_bytes=max_line_bytes,
        skip_invalid=config.skip_invalid,
        token_estimator=config.token_estimator,
        custom_id_pattern=custom_id_pattern,
    )
    rows: list[PreparedRequest] = []
    async with journal.ingest() as sink:

        async def keep(request: PreparedRequest | None) -> None:
            if request is not None:
                rows.append(request)
                if len(rows) >= _INGEST_CHUNK:
                    await sink.add(rows)
                    rows.clear()

        if is_path:
            digest = hashlib.sha256()
            for number, raw in enumerate(_file_lines(name, digest), start=1):
                await keep(preflight.check_line(raw, number))
                if number % 20000 == 0:
                    await asyncio.sleep(0)
            print_ = f"sha256:{digest.hexdigest()}"
        else:
            print_ = ""
            index = 0
            if isinstance(source, AsyncIterable):
                async for item in source:
                    index += 1
                    await keep(preflight.check_item(item, index))
            else:
                for item in source:  # type: ignore[union-attr]
                    index += 1
                    await keep(preflight.check_item(item, index))
        preflight.finish()
        await sink.add(rows)
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
        await sink.start(
            RunMeta(
                run_id=uuid.uuid4().hex[:16],
                source=name,
                fingerprint=print_,
                started_at=now,
                updated_at=now,
                state="running",
                skipped=preflight.rejected,
                problems="\n".join(str(p) for p in preflight.problems[:100]),
                order=config.order,
            )
        )
    for problem in preflight.problems[:20]:
        logger.warning("skipped invalid input line: %s", problem)
    if preflight.problem_count > 20:
        logger.warning(
            "... %d problems in all; %d invalid input lines skipped",
            preflight.problem_count,
            preflight.rejected,
        )


def check_source(journal: Journal, meta: RunMeta, source: RequestSource | None) -> None:
    """A file source given to a resumed run must be the file the run started with.

    Raises:
        JournalError: the file changed since.
    """
    if not isinstance(source, str | os.PathLike):
        return
    if meta.fingerprint and fingerprint(os.fspath(source)) != meta.fingerprint:
        raise JournalError(
            f"the journal {journal.location} belongs to a run of another input "
            f"({meta.source}); {os.fspath(source)} has changed since. "
            "Use a new journal for new input"
        )
