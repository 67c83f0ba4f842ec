"""One throwaway PostgreSQL server per test session (started on first use, removed at the
end), and a fresh schema of it per test.

PostgreSQL tests skip when the machine has no PostgreSQL or no asyncpg, unless
``AIOBATCH_REQUIRE_POSTGRES=1`` (CI sets it, after installing PostgreSQL): then they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
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


class FrozenLink:
    """A Unix-socket proxy in front of a server's socket: a worker connected through it
    loses its database on :meth:`freeze` (its queries hang, unanswered, as over a
    partitioned network) and gets it back on :meth:`thaw`."""

    def __init__(self, server: TempPostgres, folder: str) -> None:
        self._target = os.path.join(server.socket_dir, ".s.PGSQL.5432")
        self._server_dir = server.socket_dir
        self.folder = folder
        self._thawed = asyncio.Event()
        self._thawed.set()
        self._pipes: set[asyncio.Task[None]] = set()
        self._listener: asyncio.AbstractServer | None = None

    def freeze(self) -> None:
        """Hold every byte either way from now on."""
        self._thawed.clear()

    def thaw(self) -> None:
        """Let the bytes flow again."""
        self._thawed.set()

    def url(self, url: str) -> str:
        """``url`` (on the server) through this link."""
        return url.replace(self._server_dir, self.folder)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                await self._thawed.wait()
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._thawed.wait()
        up_reader, up_writer = await asyncio.open_unix_connection(self._target)
        for pipe in (self._pipe(reader, up_writer), self._pipe(up_reader, writer)):
            task = asyncio.ensure_future(pipe)
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def __aenter__(self) -> FrozenLink:
        path = os.path.join(self.folder, ".s.PGSQL.5432")
        self._listener = await asyncio.start_unix_server(self._accept, path=path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.thaw()
        assert self._listener is not None
        self._listener.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
