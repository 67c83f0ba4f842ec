"""A run on a PostgreSQL journal (one process): BatchRun and ``aiobatch run`` with
``postgresql://`` URLs, and the clear errors of a wrong URL, refused credentials, a
missing database, or a database that is not aiobatch's.

A throwaway server serves the session (tests/pg.py); each test has a schema of its own.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import chat_line, config, service_on
from pg import pg_server, pg_url

from aiobatch import BatchRun, RetryPolicy
from aiobatch.errors import JournalError
from aiobatch.testing import VirtualClock, fake_client


def _requests(n: int) -> list[dict[str, object]]:
    return [chat_line(f"r-{i}", f"question {i}") for i in range(n)]


def _output(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def _open(url: str) -> object:
    from aiobatch._run._postgres import PostgresJournal

    return await PostgresJournal.open(url)


async def test_a_run_on_postgres_answers_every_request_once(tmp_path: Path) -> None:
    """BatchRun with a postgresql:// journal ends with one result per request in the
    output file and its report."""
    url = pg_url(str(tmp_path))
    clock = VirtualClock()
    service = service_on(clock)
    out = tmp_path / "out.jsonl"
    async with (
        fake_client(service=service, clock=clock, retry=RetryPolicy.for_testing()) as fake,
        clock.auto_advance(),
    ):
        run = BatchRun(
            fake.client, _requests(25), journal=url, output=out, config=config(max_lines=10)
        )
        report = await run.run()
    assert report.state == "done"
    assert (report.requests, report.succeeded) == (25, 25)
    ids = Counter(line["custom_id"] for line in _output(out))
    assert ids == Counter(f"r-{i}" for i in range(25))
    assert len(service.batch_ids) == 3


async def test_a_stopped_run_on_postgres_continues_where_it_stopped(tmp_path: Path) -> None:
    """A run stopped after its first batches were created continues with the same URL
    (and output): the same run id, no batch made twice, every request answered once."""
    url = pg_url(str(tmp_path))
    clock = VirtualClock()
    service = service_on(clock)
    out = tmp_path / "out.jsonl"
    async with (
        fake_client(service=service, clock=clock, retry=RetryPolicy.for_testing()) as fake,
        clock.auto_advance(),
    ):
        first = BatchRun(
            fake.client, _requests(30), journal=url, output=out, config=config(max_lines=10)
        )

        def stop_once_created(progress: object) -> None:
            if len(service.batch_ids) >= 2:
                first.stop()

        first._on_progress = stop_once_created
        stopped = await first.run()
        assert stopped.state == "stopped"
        second = BatchRun(
            fake.client, _requests(30), journal=url, output=out, config=config(max_lines=10)
        )
        report = await second.run()
    assert report.state == "done"
    assert second.run_id == first.run_id
    assert len(service.batch_ids) == 3  # one batch per shard, none made twice
    assert Counter(line["custom_id"] for line in _output(out)) == Counter(
        f"r-{i}" for i in range(30)
    )


async def test_a_wrong_url_is_a_clear_error(tmp_path: Path) -> None:
    """An unreachable server, a missing database and a malformed port each raise
    JournalError saying so, never with the URL's password."""
    with pytest.raises(JournalError, match="cannot be reached") as caught:
        await _open("postgresql://u:hunter2@127.0.0.1:1/db?run=x")
    assert "hunter2" not in str(caught.value)
    server = pg_server()
    with pytest.raises(JournalError, match="does not exist"):
        await _open(server.url("no_such_db") + "&run=x")
    with pytest.raises(JournalError, match="malformed"):
        await _open("postgresql://u@host:notaport/db?run=x")


async def test_refused_credentials_are_a_clear_error(tmp_path: Path) -> None:
    """A user the server does not know is refused with a JournalError naming the
    credentials."""
    server = pg_server()
    url = server.url().replace(f"{server.user}@", "intruder:pw@") + "&run=x"
    with pytest.raises(JournalError, match="refused the credentials") as caught:
        await _open(url)
    assert ":pw@" not in str(caught.value)


async def test_a_database_of_another_program_is_refused(tmp_path: Path) -> None:
    """A schema holding other tables (and no journal) is refused, and left as it was."""
    url = pg_url(str(tmp_path), run="x")
    schema = url.split("schema=")[1].split("&")[0]
    server = pg_server()
    server.psql(f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.customers (id int)")
    with pytest.raises(JournalError, match="another program's tables"):
        await _open(url)
    tables = server.psql(f"SELECT tablename FROM pg_tables WHERE schemaname = '{schema}'")
    assert tables.split() == ["customers"]


async def test_a_newer_journal_schema_is_refused(tmp_path: Path) -> None:
    """A journal at a schema version newer than this aiobatch's is refused."""
    url = pg_url(str(tmp_path), run="x")
    journal = await _open(url)
    await journal.close()  # type: ignore[attr-defined]
    schema = url.split("schema=")[1].split("&")[0]
    pg_server().psql(f"UPDATE {schema}.aiobatch_schema SET version = version + 1")
    with pytest.raises(JournalError, match="upgrade aiobatch"):
        await _open(url)


def test_aiobatch_run_takes_a_postgres_journal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``aiobatch run INPUT -o OUT --journal postgresql://...`` answers every request once
    and records the run in the database."""
    from aiobatch.cli import main

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in _requests(40)))
    out = tmp_path / "out.jsonl"
    url = pg_url(str(tmp_path))
    where = ["run", str(source), "-o", str(out), "--journal", url, "--fake"]
    quiet = ["--fake-faults", "0", "--fake-transient-errors", "0", "--fake-permanent-errors", "0"]
    code = main([*where, *quiet, "--max-lines", "15", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert [line["custom_id"] for line in _output(out)] == [f"r-{i}" for i in range(40)]
    schema = url.split("schema=")[1].split("&")[0]
    names = pg_server().psql(f"SELECT name, state FROM {schema}.aiobatch_runs")
    assert names.strip() == f"{out.resolve()}|done"


async def test_two_workers_share_a_run_and_adopt_a_stopped_workers_shards(
    tmp_path: Path,
) -> None:
    """A run ingested by one process is carried by two workers in turn: the first
    stops (letting its leases go) while holding shards; the second adopts them; every shard
    ends with one batch and every request with one result."""
    from aiobatch._run._worker import Worker

    url = pg_url(str(tmp_path))
    clock = VirtualClock()
    service = service_on(clock)
    out = tmp_path / "out.jsonl"
    async with (
        fake_client(service=service, clock=clock, retry=RetryPolicy.for_testing()) as fake,
        clock.auto_advance(),
    ):
        starter = BatchRun(
            fake.client, _requests(40), journal=url, output=out, config=config(max_lines=10)
        )
        starter._on_progress = lambda _: starter.stop()
        assert (await starter.run()).state == "stopped"
        run_id = starter.run_id
        first = Worker(fake.client, journal=url, run=run_id, config=config(), lease_seconds=1.0)
        first._on_progress = lambda _: first.stop() if len(service.batch_ids) >= 2 else None
        await first.run()
        second = Worker(fake.client, journal=url, run=run_id, config=config(), lease_seconds=1.0)
        report = await second.run()
        assert report.state == "done"
        final = await BatchRun(fake.client, None, journal=url, output=out, config=config()).run()
    assert final.state == "done"
    assert len(service.batch_ids) == 4
    assert Counter(line["custom_id"] for line in _output(out)) == Counter(
        f"r-{i}" for i in range(40)
    )
