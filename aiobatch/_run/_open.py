"""Opening a run's journal from its location: a SQLite file path (the default) or a
``postgresql://`` URL (:mod:`aiobatch._run._postgres`, with ``aiobatch[postgres]``)."""

from __future__ import annotations

import os

from ..errors import JournalError
from ._journal import Journal
from ._pg_url import is_postgres_url, parse_postgres_url
from ._sqlite_journal import SQLiteJournal

__all__ = ["is_postgres_url", "open_journal", "pg_run_name"]


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
