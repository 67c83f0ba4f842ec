"""The SQLite journal's schema: its version, the tables, and the statements that bring a
journal of an earlier version forward in place (:meth:`JournalFile._upgrade
<aiobatch._run._sqlite.JournalFile>` runs them in one transaction)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["PAGE_SIZE", "READABLE_VERSIONS", "SCHEMA", "SCHEMA_VERSION", "UPGRADES"]

SCHEMA_VERSION = 7

#: The schema versions ``aiobatch status`` reads (what it reads is the same in each).
READABLE_VERSIONS = frozenset({"4", "5", "6", str(SCHEMA_VERSION)})

#: The page size of a new journal file: 32 KiB (a file keeps the size it was made with).
#:
#: - 64 KiB, SQLite's largest, until result lines moved to the ``-data`` file (schema
#:   7): with 4 KiB pages a line was a chain of overflow pages, and collecting 200 MB of
#:   output took 40% longer (benchmarks/bench_run_collect.py).
#: - Since then, at 300,000 requests (500 commits of collected results), 32 KiB pages
#:   took 7.83-8.18 s outside the fake and 16 KiB 7.82-8.01 s, against 8.31-8.70 s for
#:   64 KiB (5 runs each, benchmarks/bench_run_100k.py). At 100,000 no difference
#:   showed; the runner's peak memory growth at 1,000,000 was 22.7 MB (22.5 MB when
#:   measured before with 64 KiB pages).
#: - Requests stay in the file: the ingest of 5,000 requests of 20 KB or 50,000 of 2 KB
#:   took as long with 32 KiB as with 64 KiB pages, and 8% longer with 16 KiB.
#:
#: The price of large pages: a damaged page loses more rows.
PAGE_SIZE = 32768

#: ``results``: since schema 7 a result line is in the journal's ``-data`` file, at
#: ``data_at`` (``data_size`` bytes), and ``data`` is empty; a row written before holds
#: its line in ``data`` (``data_at`` NULL). ``n``, the completion order, is the rowid:
#: results are never deleted, so each new row takes a higher one (journals before
#: schema 7 say ``AUTOINCREMENT``, which costs a write of ``sqlite_sequence`` per row).
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY,
    custom_id TEXT NOT NULL UNIQUE,
    line INTEGER NOT NULL,
    url TEXT NOT NULL,
    model TEXT,
    tokens INTEGER NOT NULL,
    inputs INTEGER NOT NULL DEFAULT 1,
    data BLOB NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',  -- 'pending' or 'queued'; done: in results
    shard TEXT,
    pos INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error BLOB,
    batches INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS requests_pending ON requests (url, model, seq)
    WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS requests_shard ON requests (shard, seq) WHERE shard IS NOT NULL;
CREATE INDEX IF NOT EXISTS requests_retried ON requests (seq) WHERE attempts > 0;
-- What collection asks of a result line's custom_id, answered from the index alone:
-- without it, each line cost a read of its request's row (request bytes included) in
-- random order, 0.8-0.9 s of look-ups for 100,000 lines against 0.2-0.3 s with it. The
-- price is paid when requests are queued in a shard: 0.03-0.3 s more per 100,000 (more
-- with random ids and small shards). Made on open when missing (journals of schema 7
-- written before it), under the write lock: about 0.1 s per 100,000 requests.
CREATE INDEX IF NOT EXISTS requests_members ON requests (custom_id, shard, state, attempts)
    WHERE shard IS NOT NULL;
CREATE TABLE IF NOT EXISTS shards (
    key TEXT PRIMARY KEY,
    round INTEGER NOT NULL,
    url TEXT NOT NULL,
    model TEXT,
    lines INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    state TEXT NOT NULL,
    planned_at REAL NOT NULL,
    upload_started_at REAL,
    file_id TEXT,
    creates INTEGER NOT NULL DEFAULT 0,
    create_key TEXT,
    create_started_at REAL,
    not_before REAL,
    batch_id TEXT,
    status TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    output_done INTEGER NOT NULL DEFAULT 0,
    error_done INTEGER NOT NULL DEFAULT 0,
    cancel_reason TEXT,
    history TEXT NOT NULL DEFAULT '',
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    note TEXT
);
CREATE INDEX IF NOT EXISTS shards_state ON shards (state);
CREATE TABLE IF NOT EXISTS results (
    n INTEGER PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE REFERENCES requests (seq),
    kind TEXT NOT NULL,
    code TEXT,
    shard TEXT,
    batch_id TEXT,
    attempts INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    data BLOB NOT NULL,
    data_at INTEGER,
    data_size INTEGER
);
"""

#: Version -> the statements that bring a journal of the version before to it.
UPGRADES: Mapping[int, tuple[str, ...]] = MappingProxyType(
    {
        # ``requests.batches``, estimated from what the journal knows (its rounds, and
        # the shard it is in); a shard whose upload was started is ``uploading``.
        5: (
            "ALTER TABLE requests ADD COLUMN batches INTEGER NOT NULL DEFAULT 0",
            "UPDATE requests SET batches = attempts + (state != 'pending')",
            "UPDATE shards SET state = 'uploading' "
            "WHERE state = 'planned' AND upload_started_at IS NOT NULL",
        ),
        # A request with a result is no longer marked ``done`` (its result row says it).
        6: ("UPDATE requests SET state = 'queued' WHERE state = 'done'",),
        # Result lines go to the journal's ``-data`` file (the rows already written
        # keep theirs in ``data``).
        7: (
            "ALTER TABLE results ADD COLUMN data_at INTEGER",
            "ALTER TABLE results ADD COLUMN data_size INTEGER",
        ),
    }
)
