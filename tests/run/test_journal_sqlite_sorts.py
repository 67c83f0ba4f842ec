"""The SQLite journal's statements over every result read them without sorting them in
memory (SQLite's sorter took up to 16 MiB with 64 KiB pages, and the process keeps what it
took)."""

from __future__ import annotations

import re
import sqlite3
from collections import defaultdict
from pathlib import Path

from aiobatch._run._records import (
    FinalResult,
    JournalCounts,
    ModelTokens,
    NamedResult,
    NewShard,
    PreparedRequest,
    RequestRow,
    RunMeta,
    ShardPlan,
)
from aiobatch._run._sqlite_journal import SQLiteJournal

URL = "/v1/chat/completions"


async def _journal(path: Path) -> SQLiteJournal:
    """A journal of 6 requests in two shards of two models, each with a final result
    (successes and errors of two codes)."""
    journal = SQLiteJournal(path, create=True)
    requests = [
        PreparedRequest(
            seq=seq,
            url=URL,
            model="a" if seq < 3 else "b",
            tokens=1,
            line=seq + 1,
            custom_id=f"r{seq}",
            data=b'{"custom_id":"r%d"}' % seq,
        )
        for seq in range(6)
    ]
    async with journal.ingest() as sink:
        await sink.add([r.row() for r in requests])
        await sink.start(RunMeta(run_id="run1", started_at=1.0, updated_at=1.0))
    kinds = [("success", None), ("error", "e1"), ("success", None), ("error", "e2")] * 2
    for key, model, seqs in (("s0", "a", (0, 1, 2)), ("s1", "b", (3, 4, 5))):
        plan = ShardPlan(URL, model, seqs, sum(requests[seq].size for seq in seqs), 0)
        await journal.add_shard(key, plan, planned_at=2.0)
        finals = [
            FinalResult(
                seq=seq,
                kind=kinds[seq][0],
                code=kinds[seq][1],
                shard=key,
                batch_id=f"b{key}",
                attempts=0,
                data=b"{}",
                input_tokens=10 * (seq + 1),
                output_tokens=seq + 1,
            )
            for seq in seqs
        ]
        await journal.record(key, finals)
    return journal


def _sorts_of_results(path: Path, statements: list[str]) -> list[str]:
    """The statements among ``statements`` that read the results and sort what they read
    (a temp b-tree at the level of the plan that scans the results)."""
    db = sqlite3.connect(path)
    sorting = []
    for sql in statements:
        if "results" not in sql:
            continue
        # The results table, by its name and by its aliases in the statement.
        names = {"results"} | set(re.findall(r"\bresults (?:AS )?([a-z]\w*)\b(?! *\()", sql))
        names -= {"WHERE", "GROUP", "LEFT", "JOIN", "ON", "ORDER", "LIMIT"}
        levels: dict[int, list[str]] = defaultdict(list)
        for _id, parent, _unused, detail in db.execute("EXPLAIN QUERY PLAN " + sql):
            levels[parent].append(detail)
        for details in levels.values():
            scans = any(d.split()[:1] == ["SCAN"] and d.split()[1] in names for d in details)
            if scans and any("TEMP B-TREE" in d for d in details):
                sorting.append(sql)
    db.close()
    return sorting


async def _report_statements(
    journal: SQLiteJournal,
) -> tuple[list[str], JournalCounts, dict[str, ModelTokens]]:
    """The statements the report's figures run, and the figures."""
    statements: list[str] = []
    journal.file._db._connection.set_trace_callback(statements.append)
    counts = await journal.counts()
    tokens = await journal.tokens_by_model()
    journal.file._db._connection.set_trace_callback(None)
    return statements, counts, tokens


async def test_the_report_reads_the_results_without_sorting_them(tmp_path: Path) -> None:
    """The report's counts by kind and code and its tokens by model read the results
    without a sort, with or without an index of results beside the table's own, and the
    figures are right."""
    path = tmp_path / "run.journal"
    journal = await _journal(path)
    statements, counts, tokens = await _report_statements(journal)
    await journal.close()
    assert _sorts_of_results(path, statements) == []
    assert counts.kinds == {"success": 3, "error": 3}
    assert counts.codes == {"e1": 2, "e2": 1}
    assert tokens == {"a": ModelTokens(60, 6), "b": ModelTokens(150, 15)}

    db = sqlite3.connect(path)  # no index of results but the table's own
    for (name,) in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'results' "
        "AND sql IS NOT NULL"
    ).fetchall():
        db.execute(f"DROP INDEX {name}")
    db.commit()
    db.close()
    again = SQLiteJournal(path)
    statements, counts, tokens = await _report_statements(again)
    await again.close()
    assert _sorts_of_results(path, statements) == []
    assert counts.kinds == {"success": 3, "error": 3}
    assert tokens == {"a": ModelTokens(60, 6), "b": ModelTokens(150, 15)}


async def test_a_shards_queued_requests_are_read_without_a_sort(tmp_path: Path) -> None:
    """Reading a shard's requests without a result walks the shard in order, sorting
    nothing (a failed batch of 50,000 lines would be sorted in memory), and finds them."""
    path = tmp_path / "run.journal"
    journal = SQLiteJournal(path, create=True)
    rows = [
        RequestRow(seq, f"r{seq}", seq + 1, URL, "a", 1, 1, b"{}", "s0", seq + 1)
        for seq in range(6)
    ]
    async with journal.ingest() as sink:
        await sink.add(rows)
        await sink.start(
            RunMeta(run_id="run1", started_at=1.0, updated_at=1.0),
            [NewShard("s0", URL, "a", 6, 18, 6)],
        )
    done = [NamedResult(f"r{seq}", "success", None, 0, 0, b"{}") for seq in (0, 3, 4)]
    assert await journal.record_named("s0", "b0", done)
    statements: list[str] = []
    journal.file._db._connection.set_trace_callback(statements.append)
    queued = await journal.queued_at("s0")
    journal.file._db._connection.set_trace_callback(None)
    await journal.close()
    assert [(pos, line.seq, line.custom_id) for pos, line in queued.items()] == [
        (2, 1, "r1"),
        (3, 2, "r2"),
        (6, 5, "r5"),
    ]
    db = sqlite3.connect(path)
    plans = [
        detail
        for sql in statements
        if sql.startswith("SELECT")
        for *_ids, detail in db.execute("EXPLAIN QUERY PLAN " + sql)
    ]
    db.close()
    assert plans
    assert not [detail for detail in plans if "TEMP B-TREE" in detail]
