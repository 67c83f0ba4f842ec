"""Choosing the PostgreSQL driver of the journal: asyncpg against psycopg 3 (async).

The statements a run makes, on a throwaway server (``aiobatch.testing._postgres``),
100,000 request rows of ~150 bytes: COPY them in (ingest), update each by key in one
transaction (``executemany``, as an add_shard of 100k would without arrays), 2,000 small
transactions of one UPDATE each (moves, status updates), and read them back (a shard's
lines). Prints wall time and the client process's CPU for each, per driver.

Run: ``python benchmarks/bench_pg_driver.py`` (needs ``pip install asyncpg 'psycopg[binary]'``).

Measured on the 2-core machine (PostgreSQL 15, Unix socket, client CPU in brackets)::

    asyncpg  copy 0.44 s (0.04)  executemany 1.28 s (0.16)  2000 tx 0.45 s (0.25)
             fetch 0.26 s (0.12)
    psycopg  copy 0.55 s (0.19)  executemany 1.31 s (1.09)  2000 tx 1.41 s (0.85)
             fetch 0.28 s (0.16)

asyncpg spends 3-7x less client CPU on every kind of statement and is 3x faster on small
transactions: the journal uses asyncpg.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiobatch.testing._postgres import TempPostgres

N = 100_000
ROWS = [
    (
        i,
        b'{"custom_id":"r%d","method":"POST","url":"/v1/chat/completions","body":'
        b'{"model":"m","messages":[{"role":"user","content":"hello there"}]}}' % i,
    )
    for i in range(N)
]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _timed(step: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), _cpu()
    await step()
    return time.perf_counter() - wall, _cpu() - cpu


async def with_asyncpg(url: str) -> list[tuple[float, float]]:
    import asyncpg

    conn = await asyncpg.connect(url)
    await conn.execute("CREATE TABLE a (seq int PRIMARY KEY, data bytea, state text)")

    async def copy() -> None:
        async with conn.transaction():
            await conn.copy_records_to_table("a", records=ROWS, columns=["seq", "data"])

    async def many() -> None:
        async with conn.transaction():
            await conn.executemany(
                "UPDATE a SET state = 'q' WHERE seq = $1", [(i,) for i in range(N)]
            )

    async def small() -> None:
        for i in range(2000):
            async with conn.transaction():
                await conn.execute("UPDATE a SET state = 'd' WHERE seq = $1", i)

    async def fetch() -> None:
        await conn.fetch("SELECT seq, data FROM a ORDER BY seq")

    figures = [await _timed(step) for step in (copy, many, small, fetch)]
    await conn.close()
    return figures


async def with_psycopg(url: str) -> list[tuple[float, float]]:
    import psycopg

    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await conn.execute("CREATE TABLE b (seq int PRIMARY KEY, data bytea, state text)")

    async def copy() -> None:
        async with (
            conn.transaction(),
            conn.cursor() as cur,
            cur.copy("COPY b (seq, data) FROM STDIN") as sink,
        ):
            for row in ROWS:
                await sink.write_row(row)

    async def many() -> None:
        async with conn.transaction(), conn.cursor() as cur:
            await cur.executemany(
                "UPDATE b SET state = 'q' WHERE seq = %s", [(i,) for i in range(N)]
            )

    async def small() -> None:
        for i in range(2000):
            async with conn.transaction():
                await conn.execute("UPDATE b SET state = 'd' WHERE seq = %s", (i,))

    async def fetch() -> None:
        cur = await conn.execute("SELECT seq, data FROM b ORDER BY seq")
        await cur.fetchall()

    figures = [await _timed(step) for step in (copy, many, small, fetch)]
    await conn.close()
    return figures


def main() -> None:
    labels = ("copy", "executemany", "2000 tx", "fetch")
    with TempPostgres() as server:
        for name, bench in (("asyncpg", with_asyncpg), ("psycopg", with_psycopg)):
            figures = asyncio.run(bench(server.url()))
            shown = "  ".join(
                f"{label} {wall:.2f} s ({cpu:.2f})"
                for label, (wall, cpu) in zip(labels, figures, strict=True)
            )
            print(f"{name:8} {shown}")


if __name__ == "__main__":
    main()
