"""Journal locations that are PostgreSQL URLs: telling them from paths, our own query
parameters, and the URL as shown in messages (never with its password).

``postgresql://USER:PASSWORD@HOST:PORT/DATABASE?schema=SCHEMA&run=NAME``: ``schema`` puts
aiobatch's tables in a schema of their own (created when missing; default: the
connection's search path, usually ``public``); ``run`` names the run (what a path does
for a SQLite journal: the same name continues the same run). Every other parameter goes
to the driver. No driver is imported here.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs

from ..errors import JournalError

__all__ = ["PgLocation", "is_postgres_url", "parse_postgres_url", "redact_url"]

_SCHEMES = ("postgresql://", "postgres://")
_OURS = ("schema", "run")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def is_postgres_url(location: str | os.PathLike[str]) -> bool:
    """Whether a journal location is a PostgreSQL URL (else it is a SQLite file)."""
    return isinstance(location, str) and location.lower().startswith(_SCHEMES)


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


@attrs.frozen
class PgLocation:
    """A parsed journal URL.

    Attributes:
        dsn: the URL for the driver (our parameters removed).
        schema: the schema of aiobatch's tables (None: the search path's).
        run: the run's name or id from ``?run=`` (None when not given).
        shown: the URL for messages (no password, no parameters of ours).
    """

    dsn: str
    schema: str | None
    run: str | None
    shown: str


def parse_postgres_url(url: str) -> PgLocation:
    """Split our parameters off a journal URL.

    Raises:
        JournalError: the URL is malformed, or its schema is no plain identifier.
    """
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise JournalError(f"the journal URL {redact_url(url)!r} is malformed: {exc}") from exc
    ours = {k: v for k, v in query if k in _OURS}
    rest = [(k, v) for k, v in query if k not in _OURS]
    schema = ours.get("schema") or None
    if schema is not None and not _IDENTIFIER.fullmatch(schema):
        raise JournalError(
            f"the journal URL's schema {schema!r} is not a plain identifier "
            "(letters, digits and _, up to 63)"
        )
    dsn = urlunsplit(parts._replace(query=urlencode(rest), fragment=""))
    return PgLocation(dsn=dsn, schema=schema, run=ours.get("run") or None, shown=redact_url(dsn))
