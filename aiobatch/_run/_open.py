"""Opening a run's journal from its location: a SQLite file path (the default) or a
``postgresql://`` URL (:mod:`aiobatch._run._postgres`, with ``aiobatch[postgres]``); and
which class a :class:`~aiobatch._run._batch_run.BatchRun` on that journal is.

A run on a PostgreSQL journal shares its shards with workers by leases: ``BatchRun(...,
journal="postgresql://...")`` builds a :class:`~aiobatch._run._worker.SharedRun`.
``_worker`` (a subclass of ``BatchRun``) registers it here when imported (the package
imports it), so ``_batch_run`` never imports ``_worker``."""

from __future__ import annotations

import os
from typing import Any

from ..errors import JournalError
from ._journal import Journal
from ._pg_url import is_postgres_url, parse_postgres_url
from ._sqlite_journal import SQLiteJournal

__all__ = [
    "is_postgres_url",
    "open_journal",
    "pg_run_name",
    "register_shared_run",
    "shared_run_class",
]

_shared_run: type[Any] | None = None


def register_shared_run(cls: type[Any]) -> None:
    """Make ``cls`` what ``BatchRun(...)`` builds on a PostgreSQL journal."""
    global _shared_run
    _shared_run = cls


def shared_run_class(journal: str | os.PathLike[str] | None) -> type[Any] | None:
    """The class a ``BatchRun`` on ``journal`` is built as (None: ``BatchRun`` itself)."""
    if journal is None or not is_postgres_url(os.fspath(journal)):
        return None
    assert _shared_run is not None, "aiobatch._run imports ._worker, which registers it"
    return _shared_run


def pg_run_name(
    url: str, *, output: str | None, source: object | None, required: bool = True
) -> str | None:
    """The name of the run a PostgreSQL journal URL continues: its ``?run=``, else the
    output file's absolute path, else the input file's (what a SQLite journal's path
    does: the same command continues the same run).

    Raises:
        JournalError: none of them is there (and ``required``).
    """
    where = parse_postgres_url(url)
    if where.run:
        return where.run
    if output is not None:
        return os.path.abspath(output)
    if isinstance(source, str | os.PathLike):
        return os.path.abspath(os.fspath(source))
    if required:
        raise JournalError(
            f"the journal URL {where.shown} names no run and the run has no output file to "
            "name it by: add ?run=NAME to the URL"
        )
    return None


async def open_journal(location: str, *, create: bool, name: str | None = None) -> Journal:
    """The journal at ``location`` (a PostgreSQL run is opened by ``name``).

    Raises:
        JournalError: it cannot be opened (see the backends).
    """
    if is_postgres_url(location):
        from ._postgres import PostgresJournal

        return await PostgresJournal.open(location, name=name)
    return SQLiteJournal(location, create=create)
