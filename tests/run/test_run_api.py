"""The runner's library surface: BatchRun, RunConfig, results(), resume, cancel, journal.

Every test drives the in-memory fake service on a virtual clock (auto-advancing), with
files in tmp_path; what is checked is what a user sees (the report, the results, the
output file) and what the server received.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    cancelled_at_start,
    chat_line,
    client_for,
    config,
    is_success,
    read_output,
    run_to_end,
    service_on,
)
from pg import pg_url

from aiobatch import (
    BatchClient,
    BatchRun,
    BatchStatus,
    RunConfig,
    RunProgress,
    RunReport,
    read_report,
    request_cancel,
)
from aiobatch._run._sqlite import SCHEMA_VERSION
from aiobatch._run._sqlite import JournalFile as Journal
from aiobatch._run._states import ShardState
from aiobatch.errors import AiobatchError, JournalError, PreflightError
from aiobatch.testing import FakeBatchService, FakeConfig, LineErrorRule, VirtualClock

#: Fake timings: a 10-line batch takes about a minute of virtual time.
TIMINGS: dict[str, Any] = {
    "validation_seconds": 30.0,
    "lines_per_second": 1.0,
    "finalizing_seconds": 10.0,
}

TERMINAL = {s for s in BatchStatus if s.is_terminal}


@asynccontextmanager
async def fake_env(
    clock: VirtualClock, **config: Any
) -> AsyncIterator[tuple[FakeBatchService, BatchClient]]:
    """A fake service on ``clock`` (FakeConfig fields as keywords), a client on it, and
    the clock auto-advancing for the duration."""
    settings = {**TIMINGS, "request_log_size": None, **config}
    service = FakeBatchService(clock=clock, config=FakeConfig(**settings))
    async with (
        client_for(clock, service.transport()) as client,
        clock.auto_advance(),
    ):
        yield service, client


def requests(n: int, prefix: str = "r") -> list[dict[str, Any]]:
    """``n`` chat requests with custom_ids ``{prefix}-0`` ... and distinct prompts."""
    return [chat_line(f"{prefix}-{i}", f"question {i}") for i in range(n)]


def write_jsonl(path: Path, lines: Iterable[Mapping[str, Any] | str]) -> Path:
    """Write objects (as JSON) or raw strings as a JSONL file; returns the path."""
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


def journal_report(path: Path) -> RunReport:
    """The report read from a journal file (as ``aiobatch status`` reads it)."""
    with Journal(path, readonly=True) as journal:
        return read_report(journal)


def journal_files(journal: Path) -> list[str]:
    """The journal's files (the database, its WAL and shared memory, its result lines)
    that exist."""
    names = (f"{journal}{s}" for s in ("", "-wal", "-shm", "-data"))
    return [name for name in names if Path(name).exists()]


def as_schema_6(db: sqlite3.Connection, journal: Path) -> None:
    """Make a journal's results look as aiobatch before schema 7 wrote them: each line
    in its row (``results.data``), no ``-data`` file."""
    data = Path(f"{journal}-data")
    content = data.read_bytes() if data.exists() else b""
    rows = db.execute("SELECT seq, data_at, data_size FROM results").fetchall()
    for seq, at, size in rows:
        db.execute("UPDATE results SET data = ? WHERE seq = ?", (content[at : at + size], seq))
    db.execute("ALTER TABLE results DROP COLUMN data_at")
    db.execute("ALTER TABLE results DROP COLUMN data_size")
    db.execute("DELETE FROM meta WHERE key = 'data_end'")
    db.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    db.commit()
    data.unlink(missing_ok=True)


def reopen_shard(db: sqlite3.Connection, key: str) -> None:
    """Make a finished run's journal look stopped with shard ``key`` still open: its
    results gone, its batch in progress."""
    db.execute("DELETE FROM results WHERE shard = ?", (key,))
    db.execute(
        "UPDATE shards SET state = 'open', status = 'in_progress', output_done = 0, "
        "error_done = 0, input_tokens = 0, output_tokens = 0 WHERE key = ?",
        (key,),
    )
    db.execute("UPDATE meta SET value = 'stopped' WHERE key = 'state'")


def journal_meta(path: Path) -> dict[str, str]:
    """The journal's meta values."""
    with Journal(path, readonly=True) as journal:
        return journal.meta_values()


async def batches_on_server(service: FakeBatchService) -> list[Any]:
    """Every batch the service holds, as a client would see it now."""
    return [await service.get_batch(batch_id) for batch_id in service.batch_ids]


async def wait_until_completed_lines(
    clock: VirtualClock, service: FakeBatchService, count: int
) -> None:
    """Wait (on the clock) until the first batch on the server has ``count`` finished
    lines while still in progress."""
    while True:
        await clock.sleep(1.0)
        if service.batch_ids:
            batch = await service.get_batch(service.batch_ids[0])
            assert batch.status not in TERMINAL, "the batch ended before the test could act"
            if batch.request_counts is not None and batch.request_counts.completed >= count:
                return


# --- 1. preflight ------------------------------------------------------------------------


def bad_file(tmp_path: Path) -> Path:
    """A file with good lines and one bad line of each kind (lines 2 to 5)."""
    streaming = chat_line("c", stream=True)
    no_model = chat_line("d")
    del no_model["body"]["model"]
    return write_jsonl(
        tmp_path / "bad.jsonl",
        [
            chat_line("a"),  # 1 good
            '{"custom_id": "x", "method": ',  # 2 invalid JSON
            chat_line("a", "again"),  # 3 duplicate custom_id
            streaming,  # 4 stream=true
            no_model,  # 5 body.model missing
            chat_line("b"),  # 6 good
        ],
    )


async def test_preflight_failure_names_every_problem_and_sends_nothing(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """Bad lines raise PreflightError naming file, line, custom_id and field; nothing is
    sent to the server and no journal is left behind."""
    source = bad_file(tmp_path)
    journal = tmp_path / "run.journal"
    async with fake_env(clock) as (service, client):
        run = BatchRun(client, source, journal=journal, output=tmp_path / "out.jsonl")
        with pytest.raises(PreflightError) as info:
            await run.run()
    found = {(p.line, p.custom_id, p.field, p.code) for p in info.value.problems}
    assert found == {
        (2, None, None, "invalid_json"),
        (3, "a", "custom_id", "duplicate_custom_id"),
        (4, "c", "body.stream", "stream_not_supported"),
        (5, "d", "body.model", "missing_field"),
    }
    assert {p.source for p in info.value.problems} == {str(source)}
    for line in (2, 3, 4, 5):
        assert f"{source}:{line}" in str(info.value)
    assert service.requests == ()
    assert service.file_ids == []
    assert journal_files(journal) == []
    assert not (tmp_path / "out.jsonl").exists()


async def test_duplicates_are_found_however_far_apart_they_are(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A custom_id used again thousands of lines later, by an accepted line or by a
    line rejected for another reason, is a duplicate naming the line of its first use."""
    lines: list[Mapping[str, Any] | str] = [chat_line(f"r-{n}") for n in range(5000)]
    lines[1] = chat_line("c", stream=True)  # line 2: rejected, still holds "c"
    lines[4599] = chat_line("c", "again")  # line 4600
    lines[4600] = chat_line("r-2", "again")  # line 4601: line 3 has it
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    async with fake_env(clock) as (service, client):
        with pytest.raises(PreflightError) as info:
            await BatchRun(client, source, journal=tmp_path / "run.journal").run()
        assert service.requests == ()
    found = [(p.line, p.custom_id, p.code, p.message) for p in info.value.problems]
    assert found == [
        (2, "c", "stream_not_supported", "streaming is not supported in batches (stream=true)"),
        (4600, "c", "duplicate_custom_id", "duplicate: line 2 already uses this custom_id"),
        (4601, "r-2", "duplicate_custom_id", "duplicate: line 3 already uses this custom_id"),
    ]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_skipped_duplicates_far_apart_leave_the_first_use_of_each_id(
    backend: str, clock: VirtualClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With skip_invalid, ids used again hundreds of lines later (by good lines, twice in
    a row, or by a line bad for another reason too) are skipped naming the first use, the
    run answers every other line once, in order, in full batches, on either journal."""
    lines: list[Mapping[str, Any] | str] = [chat_line(f"r-{n}") for n in range(1300)]
    lines[799] = chat_line("r-5", "again")  # line 800
    lines[800] = chat_line("r-5", "and again")  # line 801
    lines[801] = chat_line("r-6", stream=True)  # line 802: a duplicate, and streams
    lines[1199] = chat_line("r-1198")  # line 1200: line 1199 has it
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    journal: str | Path = tmp_path / "run.journal"
    if backend == "postgres":
        journal = pg_url(str(tmp_path))
    output = tmp_path / "out.jsonl"
    async with fake_env(clock, validation_seconds=1.0, lines_per_second=1000.0) as (
        service,
        client,
    ):
        run = BatchRun(
            client,
            source,
            journal=journal,
            output=output,
            config=config(skip_invalid=True, max_lines=300),
        )
        with caplog.at_level(logging.WARNING):
            report = await run.run()
        batches = [await service.get_batch(b) for b in service.batch_ids]
    totals = sorted(b.request_counts.total for b in batches if b.request_counts)
    assert totals == [96, 300, 300, 300, 300]
    prefix = f"skipped invalid input line: {source}:"
    skipped = [
        r.getMessage().removeprefix(prefix) for r in caplog.records if prefix in r.getMessage()
    ]
    assert skipped == [
        "800: custom_id 'r-5': custom_id: duplicate: line 6 already uses this custom_id",
        "801: custom_id 'r-5': custom_id: duplicate: line 6 already uses this custom_id",
        "802: custom_id 'r-6': custom_id: duplicate: line 7 already uses this custom_id",
        "802: custom_id 'r-6': body.stream: streaming is not supported in batches (stream=true)",
        "1200: custom_id 'r-1198': custom_id: duplicate: line 1199 already uses this custom_id",
    ]
    assert (report.requests, report.succeeded, report.skipped) == (1296, 1296, 4)
    expected = [f"r-{n}" for n in range(1300) if n not in {799, 800, 801, 1199}]
    assert [line["custom_id"] for line in read_output(output)] == expected


async def test_a_new_run_has_every_request_in_a_planned_batch_once_its_input_is_in(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A new run's ingest puts every request in a planned batch, numbered as they open."""
    models = ["a", "b", "a", "c", "b", "a", "a", "b", "a", "a"]
    source = write_jsonl(
        tmp_path / "in.jsonl", [chat_line(f"r-{n}", model=m) for n, m in enumerate(models)]
    )
    journal = tmp_path / "run.journal"
    async with fake_env(clock) as (_, client):
        run = BatchRun(client, source, journal=journal, config=config(max_lines=2))
        run._on_progress = lambda _: run.stop()
        assert (await run.run()).state == "stopped"
    with Journal(journal, readonly=True) as db:
        assert db.pending_count() == 0
        shards = [
            (
                s.key,
                s.state,
                s.round,
                s.model,
                [q.custom_id for _, q in sorted(db.queued_at(s.key).items())],
            )
            for s in db.shards()
        ]
    planned = ShardState.PLANNED
    assert shards == [
        ("s000000", planned, 0, "a", ["r-0", "r-2"]),
        ("s000001", planned, 0, "b", ["r-1", "r-4"]),
        ("s000002", planned, 0, "c", ["r-3"]),
        ("s000003", planned, 0, "a", ["r-5", "r-6"]),
        ("s000004", planned, 0, "b", ["r-7"]),
        ("s000005", planned, 0, "a", ["r-8", "r-9"]),
    ]


async def test_skip_invalid_runs_the_good_lines_and_counts_the_skipped(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """skip_invalid=True skips (and counts) the bad lines and runs the good ones; the
    output has one line per good request."""
    both = chat_line("e", stream=True)  # one line with two problems: no model, stream
    del both["body"]["model"]
    source = bad_file(tmp_path)
    with source.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(both) + "\n")
    output = tmp_path / "out.jsonl"
    async with fake_env(clock) as (service, client):
        run = BatchRun(
            client,
            source,
            journal=tmp_path / "run.journal",
            output=output,
            config=RunConfig(skip_invalid=True),
        )
        report = await run.run()
    assert report.state == "done"
    assert report.requests == 2
    assert report.succeeded == 2
    assert report.skipped == 5  # input lines 2, 3, 4, 5 and 7
    lines = read_output(output)
    assert [line["custom_id"] for line in lines] == ["a", "b"]
    assert all(is_success(line) for line in lines)
    assert len(service.batch_ids) == 1


async def test_a_source_file_name_that_is_not_utf8_runs_and_is_shown_escaped(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A source file whose name is not UTF-8 runs (with a bad line skipped) and its name
    is kept in the journal with the odd byte escaped."""
    source = tmp_path / os.fsdecode(b"in-\xff.jsonl")
    lines = [json.dumps(chat_line("a")), '{"custom_id": 3}']
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    async with fake_env(clock) as (_service, client):
        run = BatchRun(
            client,
            source,
            journal=tmp_path / "run.journal",
            output=tmp_path / "out.jsonl",
            config=RunConfig(skip_invalid=True),
        )
        report = await run.run()
    assert (report.state, report.succeeded, report.skipped) == ("done", 1, 1)
    with Journal(tmp_path / "run.journal", readonly=True) as db:
        meta = db.meta()
    assert meta is not None
    assert meta.source.endswith("in-\\udcff.jsonl")
    assert "in-\\udcff.jsonl:2" in meta.problems


async def test_skip_invalid_with_no_valid_line_says_what_was_wrong(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """With skip_invalid, an input whose every line is invalid stops with an error that
    names the problems (file and line), not only that there are no requests."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"custom_id": "a", "method": \n{"custom_id": 3}\n', encoding="utf-8")
    service = service_on(clock)
    async with client_for(clock, service.transport()) as client:
        run = BatchRun(
            client, source, journal=tmp_path / "run.journal", config=config(skip_invalid=True)
        )
        with pytest.raises(AiobatchError) as info:
            await run.run()
    problems = getattr(info.value, "problems", ())
    assert problems or f"{source}:1" in str(info.value), str(info.value)
    assert service.requests == ()


# --- 3. sources ----------------------------------------------------------------------------


async def _agen(items: Iterable[Any]) -> AsyncIterator[Any]:
    for item in items:
        await asyncio.sleep(0)
        yield item


def _summary(lines: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """(custom_id, success, reply text) of each output line."""
    return [
        (
            line["custom_id"],
            is_success(line),
            line["response"]["body"]["choices"][0]["message"]["content"],
        )
        for line in lines
    ]


async def _run_once(
    tmp_path: Path, name: str, source: Any, *, config: RunConfig | None = None
) -> list[dict[str, Any]]:
    """Run ``source`` on a fresh fake (same seed) with a fresh journal; the output."""
    clock = VirtualClock()
    output = tmp_path / f"{name}.out.jsonl"
    async with fake_env(clock) as (_service, client):
        run = BatchRun(
            client,
            source,
            journal=tmp_path / f"{name}.journal",
            output=output,
            config=config or RunConfig(max_lines=4),
        )
        report = await run.run()
    assert report.state == "done", name
    return read_output(output)


async def test_every_kind_of_source_gives_the_same_results(tmp_path: Path) -> None:
    """A path (str or Path), a list of dicts, and async generators of dicts or of JSON
    lines give the same results."""
    items = requests(10)
    path = write_jsonl(tmp_path / "in.jsonl", items)
    sources: dict[str, Callable[[], Any]] = {
        "str-path": lambda: str(path),
        "pathlib": lambda: path,
        "list": lambda: list(items),
        "agen-dicts": lambda: _agen(items),
        "agen-lines": lambda: _agen(json.dumps(item) for item in items),
    }
    outputs = {
        name: _summary(await _run_once(tmp_path, name, make())) for name, make in sources.items()
    }
    expected = outputs["str-path"]
    assert [cid for cid, _, _ in expected] == [item["custom_id"] for item in items]
    assert all(ok for _, ok, _ in expected)
    for name, got in outputs.items():
        assert got == expected, name


async def test_generated_custom_ids_are_deterministic(tmp_path: Path) -> None:
    """Requests without custom_id get ids made from their content: unique (identical
    requests too), the same on every run and for every kind of source."""
    items = requests(6)
    items.append(dict(items[0]))  # an identical request, twice
    for item in items:
        del item["custom_id"]
    runs = [
        await _run_once(tmp_path, "first", list(items)),
        await _run_once(tmp_path, "second", list(items)),
        await _run_once(tmp_path, "file", write_jsonl(tmp_path / "noid.jsonl", items)),
    ]
    ids = [[line["custom_id"] for line in lines] for lines in runs]
    assert len(ids[0]) == len(items)
    assert len(set(ids[0])) == len(items)
    assert ids[1] == ids[0]
    assert ids[2] == ids[0]
    assert all(is_success(line) for line in runs[0])


# --- 4. results() ----------------------------------------------------------------------------


def first_created_takes(service_box: list[FakeBatchService], first: float, rest: float) -> Any:
    """A processing_seconds hook: the first batch created runs ``first`` seconds, every
    other ``rest`` seconds."""

    def hook(batch_id: str, lines: int) -> float:
        return first if batch_id == service_box[0].batch_ids[0] else rest

    return hook


@asynccontextmanager
async def two_speed_env(
    clock: VirtualClock, first: float, rest: float
) -> AsyncIterator[tuple[FakeBatchService, BatchClient]]:
    """fake_env whose first created batch runs ``first`` s and the others ``rest`` s."""
    box: list[FakeBatchService] = []
    async with fake_env(clock, processing_seconds=first_created_takes(box, first, rest)) as env:
        box.append(env[0])
        yield env


async def test_results_in_input_order_each_once(clock: VirtualClock, tmp_path: Path) -> None:
    """results() yields every request once, in input order, even when a later batch
    finishes first."""
    source = write_jsonl(tmp_path / "in.jsonl", requests(20))
    async with two_speed_env(clock, first=500.0, rest=5.0) as (_service, client):
        run = BatchRun(
            client,
            source,
            journal=tmp_path / "run.journal",
            config=RunConfig(max_lines=10, max_submissions=1),
        )
        runner = asyncio.ensure_future(run.run())
        got = [result async for result in run.results()]
        report = await runner
    assert report.state == "done"
    assert [r.index for r in got] == list(range(20))
    assert [r.custom_id for r in got] == [f"r-{i}" for i in range(20)]
    assert all(r.ok for r in got)
    assert all(r.result.custom_id == r.custom_id for r in got)


async def test_results_in_completion_order(clock: VirtualClock, tmp_path: Path) -> None:
    """With order="completion" the fast batch's results come first, each request once."""
    source = write_jsonl(tmp_path / "in.jsonl", requests(20))
    async with two_speed_env(clock, first=500.0, rest=5.0) as (service, client):
        run = BatchRun(
            client,
            source,
            journal=tmp_path / "run.journal",
            output=tmp_path / "out.jsonl",
            config=RunConfig(max_lines=10, max_submissions=1, order="completion"),
        )
        runner = asyncio.ensure_future(run.run())
        got = [result async for result in run.results()]
        await runner
    slow = service.batch_ids[0]
    assert sorted(r.index for r in got) == list(range(20))
    batches = [r.batch_id for r in got]
    assert slow not in batches[:10]
    assert batches[10:] == [slow] * 10
    assert [r.index for r in got] != list(range(20))
    # The output file follows the same order.
    assert [line["custom_id"] for line in read_output(tmp_path / "out.jsonl")] == [
        r.custom_id for r in got
    ]


async def test_results_stream_while_the_run_goes_on(clock: VirtualClock, tmp_path: Path) -> None:
    """results() started beside run() yields the first batch's results before the run
    ends."""
    source = write_jsonl(tmp_path / "in.jsonl", requests(20))
    async with two_speed_env(clock, first=5.0, rest=500.0) as (_service, client):
        run = BatchRun(
            client,
            source,
            journal=tmp_path / "run.journal",
            config=RunConfig(max_lines=10, max_submissions=1),
        )
        runner = asyncio.ensure_future(run.run())
        ended: list[float] = []
        runner.add_done_callback(lambda _: ended.append(clock.now()))
        seen = [(r.index, clock.now(), runner.done()) async for r in run.results()]
        await runner
    assert [index for index, _, _ in seen] == list(range(20))
    _, first_at, finished = seen[0]
    assert not finished
    assert first_at < ended[0] - 100  # the slow batch still had minutes to go
    assert seen[9][1] < ended[0] - 100


async def test_results_alone_runs_the_whole_job(clock: VirtualClock, tmp_path: Path) -> None:
    """Iterating results() without calling run() runs the job to its end."""
    source = write_jsonl(tmp_path / "in.jsonl", requests(12))
    journal = tmp_path / "run.journal"
    output = tmp_path / "out.jsonl"
    async with fake_env(clock) as (_service, client):
        run = BatchRun(
            client, source, journal=journal, output=output, config=RunConfig(max_lines=5)
        )
        got = [result async for result in run.results()]
    assert [r.index for r in got] == list(range(12))
    assert all(r.ok for r in got)
    report = journal_report(journal)
    assert report.state == "done"
    assert report.succeeded == 12
    assert [line["custom_id"] for line in read_output(output)] == [r.custom_id for r in got]


async def test_own_error_results_name_the_batch_they_are_about(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A result aiobatch writes itself for a failed batch (no result line came back) has
    ``id`` None and names that batch in ``batch_id``, as RunResult documents."""
    service = service_on(clock)
    service.fail_next_batches("model_not_found")
    source = write_jsonl(tmp_path / "in.jsonl", requests(2))
    async with client_for(clock, service.transport()) as client:
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=config())
        async with clock.auto_advance():
            _report, results = await run_to_end(run)
    assert len(results) == 2
    assert all(not r.ok and r.result.id is None for r in results)  # aiobatch's own lines
    assert [r.batch_id for r in results] == service.batch_ids * 2


# --- 5. resume -------------------------------------------------------------------------------


async def test_rerun_of_a_completed_journal_sends_nothing(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A new BatchRun on a completed journal creates no batch, uploads nothing, and
    rewrites the same output file."""
    source = write_jsonl(tmp_path / "in.jsonl", requests(12))
    journal = tmp_path / "run.journal"
    output = tmp_path / "out.jsonl"
    async with fake_env(clock) as (service, client):
        first = await BatchRun(
            client, source, journal=journal, output=output, config=RunConfig(max_lines=5)
        ).run()
        written = output.read_bytes()
        output.unlink()
        batches = list(service.batch_ids)
        posts = service.request_count("POST")
        second = await BatchRun(
            client, source, journal=journal, output=output, config=RunConfig(max_lines=5)
        ).run()
        assert service.batch_ids == batches
        assert service.request_count("POST") == posts
    assert first.state == second.state == "done"
    assert (second.requests, second.succeeded, second.batches) == (
        first.requests,
        first.succeeded,
        first.batches,
    )
    assert output.read_bytes() == written
    assert len(read_output(output)) == 12


@pytest.mark.parametrize("how", ["run.cancel", "task.cancel"])
async def test_cancel_keeps_finished_lines_and_resumes(
    clock: VirtualClock, tmp_path: Path, how: str
) -> None:
    """Cancelling (run.cancel() or cancelling the task) cancels the open batches on the
    server and journals their finished lines; a new run on the journal completes the job
    with one result per request and no second batch for any shard."""
    items = requests(30)
    source = write_jsonl(tmp_path / "in.jsonl", items)
    journal = tmp_path / "run.journal"
    output = tmp_path / "out.jsonl"
    config = RunConfig(max_lines=10)
    async with fake_env(clock, lines_per_second=0.1) as (service, client):
        run = BatchRun(client, source, journal=journal, output=output, config=config)
        runner = asyncio.ensure_future(run.run())
        await wait_until_completed_lines(clock, service, 3)
        if how == "run.cancel":
            run.cancel()
            report = await runner
            assert report.state == "cancelled"
        else:
            runner.cancel()
            with pytest.raises(asyncio.CancelledError):
                await runner
            report = journal_report(journal)
        # What the server and the journal hold when the run returned (or raised).
        on_server = await batches_on_server(service)
        assert on_server, "no batch was created"
        assert on_server[0].status is BatchStatus.CANCELLED
        assert all(b.status in TERMINAL for b in on_server)
        assert service.request_count("POST", "/batches/*/cancel") >= 1
        finished = sum(b.request_counts.completed for b in on_server if b.request_counts)
        assert finished >= 3
        assert report.state == "cancelled"
        assert report.succeeded == finished
        assert report.pending == 30 - finished
        assert journal_meta(journal)["state"] == "cancelled"
        assert not output.exists()
        created_before = {b.metadata["aiobatch_shard"] for b in on_server}

        resumed = BatchRun(client, source, journal=journal, output=output, config=config)
        final = await resumed.run()
        on_server = await batches_on_server(service)
    assert final.state == "done"
    assert final.succeeded == 30
    lines = read_output(output)
    assert [line["custom_id"] for line in lines] == [item["custom_id"] for item in items]
    assert all(is_success(line) for line in lines)
    shards = Counter(b.metadata["aiobatch_shard"] for b in on_server)
    assert all(count == 1 for count in shards.values()), shards
    assert created_before <= set(shards)
    assert len(on_server) > len(created_before)  # the cancelled lines ran in new batches


# --- 6. journal errors -----------------------------------------------------------------------


async def test_journal_of_another_input_is_refused(clock: VirtualClock, tmp_path: Path) -> None:
    """A journal made for another input file raises JournalError, sends nothing, and
    stays usable for its own input."""
    source = write_jsonl(tmp_path / "in.jsonl", requests(8))
    other = write_jsonl(tmp_path / "other.jsonl", requests(8, prefix="o"))
    journal = tmp_path / "run.journal"
    async with fake_env(clock) as (service, client):
        stopped = await cancelled_at_start(client, source, journal)
        assert stopped.state == "cancelled"
        assert stopped.pending == 8
        sent = len(service.requests)
        with pytest.raises(JournalError):
            await BatchRun(client, other, journal=journal, output=tmp_path / "o.jsonl").run()
        assert len(service.requests) == sent
        assert not (tmp_path / "o.jsonl").exists()
        report = await BatchRun(
            client, source, journal=journal, output=tmp_path / "out.jsonl"
        ).run()
    assert report.state == "done"
    assert [line["custom_id"] for line in read_output(tmp_path / "out.jsonl")] == [
        f"r-{i}" for i in range(8)
    ]


async def test_journal_in_use_is_refused(clock: VirtualClock, tmp_path: Path) -> None:
    """A second BatchRun on a journal that a run holds raises JournalError; the first run
    is not disturbed."""
    source = write_jsonl(tmp_path / "in.jsonl", requests(10))
    journal = tmp_path / "run.journal"
    output = tmp_path / "out.jsonl"
    async with fake_env(clock) as (service, client):
        first = BatchRun(client, source, journal=journal, output=output)
        runner = asyncio.ensure_future(first.run())
        await wait_until_completed_lines(clock, service, 1)
        second = BatchRun(client, source, journal=journal, output=tmp_path / "second.jsonl")
        with pytest.raises(JournalError):
            await second.run()
        report = await runner
    assert report.state == "done"
    assert report.succeeded == 10
    assert len(service.batch_ids) == 1
    assert len(read_output(output)) == 10
    assert not (tmp_path / "second.jsonl").exists()


async def test_corrupt_journal_is_refused(clock: VirtualClock, tmp_path: Path) -> None:
    """A journal path holding a file that is not SQLite raises JournalError, sends
    nothing, and leaves the file as it was."""
    source = write_jsonl(tmp_path / "in.jsonl", requests(3))
    journal = tmp_path / "run.journal"
    garbage = b"this is not a database\n" * 200
    journal.write_bytes(garbage)
    async with fake_env(clock) as (service, client):
        with pytest.raises(JournalError):
            await BatchRun(client, source, journal=journal).run()
    assert service.requests == ()
    assert journal.read_bytes() == garbage


async def test_other_sqlite_database_is_refused(clock: VirtualClock, tmp_path: Path) -> None:
    """A journal path holding another program's SQLite database raises JournalError,
    sends nothing, and leaves the database as it was."""
    source = write_jsonl(tmp_path / "in.jsonl", requests(3))
    journal = tmp_path / "app.db"
    db = sqlite3.connect(journal)
    db.execute("CREATE TABLE users (name TEXT)")
    db.execute("INSERT INTO users VALUES ('ada')")
    db.commit()
    db.close()
    async with fake_env(clock) as (service, client):
        with pytest.raises(JournalError):
            await BatchRun(client, source, journal=journal).run()
        assert service.requests == ()
    db = sqlite3.connect(journal)
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    db.close()
    assert tables == {"users"}


async def test_a_journal_of_the_previous_schema_is_upgraded_and_resumed(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A journal written by the previous aiobatch (schema 4, without the per-request
    batch count) can be read by ``status``, and a run upgrades it in place and finishes."""
    source = write_jsonl(tmp_path / "in.jsonl", requests(8))
    journal = tmp_path / "run.journal"
    async with fake_env(clock) as (_service, client):
        stopped = await cancelled_at_start(client, source, journal)
        assert stopped.pending == 8
        db = sqlite3.connect(journal)
        as_schema_6(db, journal)
        db.execute("ALTER TABLE requests DROP COLUMN batches")
        db.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
        db.commit()
        db.close()
        assert journal_report(journal).pending == 8
        report = await BatchRun(
            client, source, journal=journal, output=tmp_path / "out.jsonl"
        ).run()
    assert report.state == "done"
    assert report.succeeded == 8
    assert journal_meta(journal)["schema_version"] == str(SCHEMA_VERSION)


def as_schema_5(db: sqlite3.Connection, journal: Path) -> None:
    """Make a journal look as aiobatch with schema 5 wrote it: as schema 6, and each
    request with a result marked ``done``."""
    as_schema_6(db, journal)
    db.execute("UPDATE requests SET state = 'done' WHERE seq IN (SELECT seq FROM results)")
    db.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")


def without_members_index(db: sqlite3.Connection, journal: Path) -> None:
    """Make a journal look as aiobatch with schema 7 wrote it before the index of shard
    members."""
    db.execute("DROP INDEX requests_members")


@pytest.mark.parametrize("made_older", [as_schema_5, without_members_index])
async def test_an_older_journal_stopped_with_a_shard_open_is_resumed(
    clock: VirtualClock, tmp_path: Path, made_older: Callable[[sqlite3.Connection, Path], None]
) -> None:
    """A journal written by an earlier aiobatch (schema 5, or schema 7 before the index
    of shard members), stopped with one shard collected and the other open, is read by
    ``status`` and resumed in place: the results it had stay, the others are collected,
    each request ends once."""
    source = write_jsonl(tmp_path / "in.jsonl", requests(8))
    journal = tmp_path / "run.journal"
    output = tmp_path / "out.jsonl"
    async with fake_env(clock) as (service, client):
        await BatchRun(client, source, journal=journal, config=RunConfig(max_lines=4)).run()
        db = sqlite3.connect(journal)
        reopen_shard(db, "s000001")
        made_older(db, journal)
        db.commit()
        db.close()
        assert journal_report(journal).pending == 4
        report = await BatchRun(client, source, journal=journal, output=output).run()
        batches = len(service.batch_ids)
    assert (report.state, report.succeeded, report.pending) == ("done", 8, 0)
    ids = [line["custom_id"] for line in read_output(output)]
    assert ids == [f"r-{n}" for n in range(8)]
    assert batches == 2
    assert journal_meta(journal)["schema_version"] == str(SCHEMA_VERSION)


# --- 7. request_cancel -----------------------------------------------------------------------


async def test_request_cancel_stops_the_run_within_the_poll_interval(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """request_cancel(journal) makes the running run cancel within cancel_poll_interval
    clock seconds; a later run on the journal is not cancelled by the old flag."""
    source = write_jsonl(tmp_path / "in.jsonl", requests(20))
    journal = tmp_path / "run.journal"
    output = tmp_path / "out.jsonl"
    interval = 7.0
    config = RunConfig(max_lines=10, cancel_poll_interval=interval)
    cancelling_at: list[float] = []

    def on_progress(progress: RunProgress) -> None:
        if progress.state == "cancelling" and not cancelling_at:
            cancelling_at.append(clock.now())

    async with fake_env(clock, lines_per_second=0.1) as (service, client):
        run = BatchRun(
            client, source, journal=journal, output=output, config=config, on_progress=on_progress
        )
        runner = asyncio.ensure_future(run.run())
        await wait_until_completed_lines(clock, service, 2)
        asked_at = clock.now()
        request_cancel(journal)
        report = await runner
        assert report.state == "cancelled"
        assert cancelling_at, "the run never went cancelling"
        assert asked_at <= cancelling_at[0] <= asked_at + interval
        assert (await service.get_batch(service.batch_ids[0])).status is BatchStatus.CANCELLED
        assert 0 < report.pending < 20

        final = await BatchRun(client, source, journal=journal, output=output, config=config).run()
    assert final.state == "done"
    assert final.succeeded == 20
    assert len(read_output(output)) == 20


# --- 8. RunConfig validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("max_rounds", {"max_rounds": -1}),
        ("order", {"order": "random"}),
        ("metadata", {"metadata": {f"k{i}": "v" for i in range(14)}}),
        ("enqueued_token_limits", {"enqueued_token_limits": {"gpt-4o-mini": 0}}),
        ("enqueued_token_limits", {"enqueued_token_limits": {"gpt-4o-mini": -5}}),
        ("max_lines", {"max_lines": 0}),
        ("max_bytes", {"max_bytes": -1}),
        ("cancel_poll_interval", {"cancel_poll_interval": 0}),
        ("collect_chunk", {"collect_chunk": 0}),
        ("batch_timeout", {"batch_timeout": -3.0}),
        ("max_batches_per_request", {"max_batches_per_request": 0}),
    ],
)
def test_run_config_rejects_bad_values(field: str, kwargs: dict[str, Any]) -> None:
    """A bad RunConfig value raises ValueError naming the field."""
    with pytest.raises(ValueError, match=field):
        RunConfig(**kwargs)


def test_run_config_accepts_the_edges() -> None:
    """The edge values next to the rejected ones are accepted."""
    config = RunConfig(
        max_rounds=0,
        order="completion",
        metadata={f"k{i}": "v" for i in range(13)},
        enqueued_token_limits={"gpt-4o-mini": 1},
        max_lines=1,
    )
    assert config.max_rounds == 0
    assert len(config.metadata) == 13


# --- 9. progress -----------------------------------------------------------------------------


async def test_progress_snapshots_add_up_and_end_done(clock: VirtualClock, tmp_path: Path) -> None:
    """on_progress snapshots have consistent totals, never go backwards, and the last one
    is "done" with the report's counts."""
    source = write_jsonl(tmp_path / "in.jsonl", requests(25))
    failed_once: set[str] = set()

    def transient(custom_id: str) -> bool:
        if custom_id == "r-7" and custom_id not in failed_once:
            failed_once.add(custom_id)
            return True
        return False

    rules = [
        LineErrorRule(status=400, predicate=lambda cid: cid == "r-3", code="invalid_value"),
        LineErrorRule(status=500, predicate=transient),
    ]
    snapshots: list[RunProgress] = []
    async with fake_env(clock, line_errors=rules) as (_service, client):
        run = BatchRun(
            client,
            source,
            journal=tmp_path / "run.journal",
            config=RunConfig(max_lines=10, retry_coalesce=5.0),
            on_progress=snapshots.append,
        )
        report = await run.run()
    assert snapshots
    done = 0
    for snap in snapshots:
        assert snap.succeeded >= 0 and snap.failed >= 0 and snap.retrying >= 0
        assert snap.done == snap.succeeded + snap.failed
        assert snap.done + snap.retrying <= snap.total
        assert snap.total in (0, 25)
        assert snap.done >= done
        done = snap.done
    final = snapshots[-1]
    assert final.state == "done"
    assert (final.total, final.succeeded, final.failed, final.retrying) == (25, 24, 1, 0)
    assert final.round == 1
    assert (report.succeeded, report.failed, report.retried) == (24, 1, 1)
    assert sum(final.batches.values()) == report.batches
    assert final.open_batches == 0
