"""One throwaway PostgreSQL server per test session (started on first use, removed at the
end), and a fresh schema of it per test.

PostgreSQL tests skip when the machine has no PostgreSQL or no asyncpg, unless
``AIOBATCH_REQUIRE_POSTGRES=1`` (CI sets it, after installing PostgreSQL): then they fail.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os

import pytest

from aiobatch.testing._postgres import TempPostgres, find_pg_bin

_server: TempPostgres | None = None


def _missing() -> str | None:
    if importlib.util.find_spec("asyncpg") is None:
        return "asyncpg is not installed (pip install -e '.[test]')"
    if find_pg_bin() is None:
        return "PostgreSQL's initdb is not on this machine (apt-get install postgresql)"
    return None


def _skip_unless_postgres() -> None:
    missing = _missing()
    if missing is not None:
        if os.environ.get("AIOBATCH_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL tests are required here, but {missing}")
        pytest.skip(missing)


def pg_server() -> TempPostgres:
    """The session's server (started on first use)."""
    global _server
    if _server is None:
        _skip_unless_postgres()
        _server = TempPostgres().start()
    return _server


def own_pg_server(*, durable: bool = False) -> TempPostgres:
    """A server of the caller's own, started (the caller stops it): for a test that stops
    the server under a run."""
    _skip_unless_postgres()
    return TempPostgres(durable=durable).start()


def stop_pg_server() -> None:
    """Stop the session's server, if one was started."""
    global _server
    if _server is not None:
        _server.stop()
        _server = None


def pg_url(key: str, *, run: str | None = None) -> str:
    """A journal URL on the session's server, in a schema of its own for ``key`` (the
    same key gives the same schema)."""
    schema = "t_" + hashlib.sha1(key.encode()).hexdigest()[:16]
    url = pg_server().url() + f"&schema={schema}"
    return url + (f"&run={run}" if run else "")
