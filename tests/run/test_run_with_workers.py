"""``BatchRun`` (``aiobatch run``) on a PostgreSQL journal and ``aiobatch worker``
processes on the same run: they share the shards by leases, never act on the same one,
and a cancel flagged in the database reaches every one of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import attrs
import pytest
from conftest import FAST_FLEET, chat_line, config, service_on, within_bucket
from pg import FrozenLink, own_pg_server, pg_server, pg_url

from aiobatch import BatchClient, BatchRun, RetryPolicy, RunConfig
from aiobatch._run._ingest import ingest
from aiobatch._run._journal import Journal
from aiobatch._run._postgres import PostgresJournal
from aiobatch._run._records import ShardPlan
from aiobatch._run._shared_budget import SharedBudget
from aiobatch._run._worker import Worker
from aiobatch.errors import JournalError, LeaseExpiredError, LeaseLostError, RunError
from aiobatch.testing import FakeBatchService, Fault, VirtualClock, fake_client
from aiobatch.transport import Request, Response, Transport


def _requests(n: int) -> list[dict[str, object]]:
    return [chat_line(f"r-{i}", f"question {i}") for i in range(n)]


async def _batches_per_shard(service: FakeBatchService) -> Counter[str]:
    batches = [await service.get_batch(b) for b in service.batch_ids]
    return Counter((b.metadata or {}).get("aiobatch_shard", "") for b in batches)


async def _ingested(url: str, n: int) -> PostgresJournal:
    """The run's journal with its requests recorded and nothing planned."""
    journal = await PostgresJournal.open(url)
    await ingest(
        journal, _requests(n), config=RunConfig(), clock=VirtualClock(), max_line_bytes=10**7
    )
    return journal


async def _planned(journal: PostgresJournal) -> None:
    """Wait until a worker planned the run's shards."""
    for _ in range(10_000):
        if await journal.shard_count():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no worker planned the run")


async def test_a_run_and_two_workers_share_its_shards(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A BatchRun on PostgreSQL joining a run that two workers carry: they act side by
    side, every shard gets one batch, every request one result in the output."""
    caplog.set_level(logging.INFO, logger="aiobatch.run")
    url = pg_url(str(tmp_path), run="shared")
    journal = await _ingested(url, 60)
    clock = VirtualClock()
    service = service_on(clock)
    out = tmp_path / "out.jsonl"
    async with (
        fake_client(service=service, clock=clock, retry=RetryPolicy.for_testing()) as fake,
        clock.auto_advance(),
    ):
        workers = [
            Worker(
                fake.client, journal=url, config=config(max_lines=5), worker_id=f"w{i}",
                claim_limit=4,
            )
            for i in range(2)
        ]  # fmt: skip
        tasks = [asyncio.ensure_future(w.run()) for w in workers]
        await _planned(journal)
        run = BatchRun(
            fake.client, _requests(60), journal=url, output=out, config=config(max_lines=5)
        )
        reports = await asyncio.gather(run.run(), *tasks)
    await journal.close()
    assert reports[0].state == "done"
    per_shard = await _batches_per_shard(service)
    assert len(per_shard) == 12 and set(per_shard.values()) == {1}
    ids = Counter(json.loads(line)["custom_id"] for line in out.read_text().splitlines())
    assert ids == Counter(f"r-{i}" for i in range(60))
    # No process tripped over another's step (each such trip logs a warning).
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    took = [r.getMessage() for r in caplog.records if " took shard " in r.getMessage()]
    assert any("worker w" in message for message in took)  # the workers did act


def _cli(*args: str) -> tuple[int, str]:
    """Run the command line in this thread, capturing what it prints."""
    import contextlib
    import io

    from aiobatch.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse refusing the arguments
            code = int(exc.code or 0)
    return code, printed.getvalue()


async def test_a_cancel_by_url_stops_every_worker_and_cancels_their_batches(
    tmp_path: Path,
) -> None:
    """``aiobatch cancel URL --run ID`` while two workers carry a run: both stop with a
    cancelled report, and every batch they had open is cancelled."""
    url = pg_url(str(tmp_path), run="shared")
    journal = await _ingested(url, 40)
    clock = VirtualClock()
    service = service_on(clock, lines_per_second=0.0001)  # the batches stay in progress
    async with (
        fake_client(service=service, clock=clock, retry=RetryPolicy.for_testing()) as fake,
        clock.auto_advance(),
    ):
        workers = [
            Worker(fake.client, journal=url, config=config(max_lines=5), lease_seconds=3.0)
            for _ in range(2)
        ]
        tasks = [asyncio.ensure_future(w.run()) for w in workers]
        for _ in range(10_000):
            if len(service.batch_ids) == 8:
                break
            await asyncio.sleep(0.01)
        run_id = (await journal.meta()).run_id  # type: ignore[union-attr]
        base = url.split("&run=")[0]
        code, said = await asyncio.to_thread(_cli, "cancel", base, "--run", run_id)
        assert code == 0 and "cancel requested" in said
        reports = await asyncio.gather(*tasks)
        batches = [await service.get_batch(b) for b in service.batch_ids]
    await journal.close()
    assert [r.state for r in reports] == ["cancelled", "cancelled"]
    assert {b.status.value for b in batches} == {"cancelled"}


async def test_a_worker_done_cancelling_reports_cancelled_though_another_is_still_cancelling(
    tmp_path: Path,
) -> None:
    """A cancelled worker's report says cancelled though another set the run cancelling since."""
    url = pg_url(str(tmp_path), run="shared")
    journal = await _ingested(url, 10)
    clock = VirtualClock()
    service = service_on(clock, lines_per_second=0.0001)  # the batches stay in progress

    class AnotherStillCancelling(Worker):
        """After its "cancelled", another worker (later to see the cancel) records "cancelling"."""

        async def _record_state(self, own: Journal, state: str) -> None:
            await super()._record_state(own, state)
            if state == "cancelled":
                await journal.set_state("cancelling", at=clock.now())

    async with (
        fake_client(service=service, clock=clock, retry=RetryPolicy.for_testing()) as fake,
        clock.auto_advance(),
    ):
        worker = AnotherStillCancelling(
            fake.client, journal=url, config=config(max_lines=5), lease_seconds=3.0
        )
        task = asyncio.ensure_future(worker.run())
        for _ in range(10_000):
            if len(service.batch_ids) == 2:
                break
            await clock.sleep(0.1)
        await journal.request_cancel(clock.now())
        report = await task
    recorded = await journal.meta()
    await journal.close()
    assert recorded is not None
    assert (report.state, recorded.state) == ("cancelled", "cancelling")


async def test_status_by_url_shows_one_run_of_many_in_a_database(tmp_path: Path) -> None:
    """Two runs in one database: ``aiobatch status URL?run=NAME --json`` reports each
    run's own requests, and ``--run`` names a run the same way."""
    url = pg_url(str(tmp_path))
    first = await _ingested(url + "&run=first", 7)
    second = await _ingested(url + "&run=second", 3)
    second_id = (await second.meta()).run_id  # type: ignore[union-attr]
    await first.close()
    await second.close()
    code, said = await asyncio.to_thread(_cli, "status", url + "&run=first", "--json")
    assert code == 0
    assert json.loads(said)["requests"] == 7
    code, said = await asyncio.to_thread(_cli, "status", url, "--run", second_id, "--json")
    assert code == 0
    shown = json.loads(said)
    assert (shown["requests"], shown["run_id"]) == (3, second_id)
    code, said = await asyncio.to_thread(_cli, "status", url, "--run", "third")
    assert code == 1


async def test_workers_share_one_request_budget_for_every_request(tmp_path: Path) -> None:
    """Three workers given one account budget: the fake sees every request (uploads,
    creates, polls, downloads) at most ``burst + rate * span`` over any span together."""
    url = pg_url(str(tmp_path), run="shared")
    journal = await _ingested(url, 120)
    clock = VirtualClock()
    service = service_on(clock)
    rate, burst = 2.0, 3
    async with (
        fake_client(service=service, clock=clock, retry=RetryPolicy.for_testing()) as fake,
        clock.auto_advance(),
    ):
        workers = [
            Worker(
                fake.client, journal=url, config=config(max_lines=10), worker_id=f"w{i}",
                lease_seconds=6.0, requests_per_second=rate, burst=burst,
            )
            for i in range(3)
        ]  # fmt: skip
        reports = await asyncio.gather(*(w.run() for w in workers))
    assert await journal.not_done_count() == 0
    await journal.close()
    assert {r.state for r in reports} == {"done"}
    kinds = Counter(r.method + " " + r.path.split("/")[1] for r in service.requests)
    assert kinds["POST files"] >= 12 and kinds["POST batches"] >= 12 and kinds["GET files"]
    assert [w.request_budget.granted for w in workers if w.request_budget] != [0, 0, 0]
    assert within_bucket([r.at for r in service.requests], rate, burst)


async def test_a_database_gone_mid_run_stops_the_worker_and_the_run_resumes_when_back(
    tmp_path: Path,
) -> None:
    """The database killed mid-run (``pg_ctl stop -m immediate``): the worker stops with a
    typed error naming the database; once it is back, a new worker adopts the lapsed
    leases and finishes the run, one batch per shard, one result per request."""
    pg = own_pg_server(durable=True)
    try:
        url = pg.url() + "&run=shared"
        journal = await _ingested(url, 200)
        await journal.close()
        clock = VirtualClock()
        service = service_on(clock, lines_per_second=2.0)
        async with (
            fake_client(service=service, clock=clock, retry=RetryPolicy.for_testing()) as fake,
            clock.auto_advance(),
        ):
            first = Worker(fake.client, journal=url, config=config(max_lines=10), lease_seconds=2.0)
            task = asyncio.ensure_future(first.run())
            for _ in range(10_000):
                if len(service.batch_ids) >= 5 or task.done():
                    break
                await asyncio.sleep(0.01)
            assert not task.done()
            await asyncio.to_thread(pg.halt)
            with pytest.raises((JournalError, RunError)) as stopped:
                await asyncio.wait_for(task, 60)
            assert "journal" in str(stopped.value) or "database" in str(stopped.value)
            await asyncio.to_thread(pg.restart)
            second = Worker(
                fake.client, journal=url, config=config(max_lines=10), lease_seconds=2.0
            )
            report = await asyncio.wait_for(second.run(), 120)
        assert report.state == "done"
        journal = await PostgresJournal.open(url)
        assert await journal.not_done_count() == 0
        shards = await journal.shards()
        await journal.close()
        got = pg.psql("SELECT count(*), count(DISTINCT seq) FROM aiobatch_results")
        assert got.strip() == "200|200"
        per_shard = await _batches_per_shard(service)
        assert per_shard == Counter(s.key for s in shards)
    finally:
        pg.stop()


class _Gated:
    """A transport that sends nothing until ``opened`` is set."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()

    def over(self, inner: Transport) -> _Gated:
        """Gate ``inner``."""
        self.inner = inner
        return self

    async def send(self, request: Request, *, stream: bool = False) -> Response:
        await self.opened.wait()
        return await self.inner.send(request, stream=stream)

    async def aclose(self) -> None:
        pass


async def test_a_worker_joining_late_gets_a_share_of_the_shards_not_started(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that planned every shard alone lets the ones it has not started go when a
    second worker joins, and the second one carries them: one batch per shard."""
    caplog.set_level(logging.INFO, logger="aiobatch.run")
    url = pg_url(str(tmp_path), run="shared")
    journal = await _ingested(url, 60)
    clock = VirtualClock()
    service = service_on(clock)
    slow = config(max_lines=5, max_submissions=1)  # the shards wait their turn, planned
    async with (
        fake_client(service=service, clock=clock, retry=RetryPolicy.for_testing()) as fake,
        clock.auto_advance(),
    ):
        # The first worker sends nothing until the second one took shards.
        gated = _Gated()
        held = fake.client.with_options(wrap_transport=gated.over)
        first = Worker(held, journal=url, config=slow, worker_id="w0", lease_seconds=3.0)
        tasks = [asyncio.ensure_future(first.run())]
        schema = url.split("schema=")[1].split("&")[0]
        query = f"SELECT count(*) FROM {schema}.aiobatch_shards WHERE lease_owner = 'w0'"
        for _ in range(10_000):  # the first worker planned and took all 12 shards
            if (await asyncio.to_thread(pg_server().psql, query)).strip() == "12":
                break
            await asyncio.sleep(0.01)
        second = Worker(fake.client, journal=url, config=slow, worker_id="w1", lease_seconds=3.0)
        tasks.append(asyncio.ensure_future(second.run()))
        for _ in range(10_000):
            if any("worker w1 took shard" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.01)
        gated.opened.set()
        reports = await asyncio.gather(*tasks)
    await journal.close()
    assert [r.state for r in reports] == ["done", "done"]
    per_shard = await _batches_per_shard(service)
    assert len(per_shard) == 12 and set(per_shard.values()) == {1}
    said = [r.getMessage() for r in caplog.records]
    assert any("worker w0 let shard" in m for m in said)
    assert any("worker w1 took shard" in m for m in said)


async def test_a_worker_whose_planner_lease_lapsed_plans_nothing_more(tmp_path: Path) -> None:
    """Planning outlasting the planner lease: once another worker took the lease, the first
    one's next shard is refused (LeaseLostError, nothing written), so two planners never
    write the same shard."""
    url = pg_url(str(tmp_path), run="shared")
    first = await _ingested(url, 4)
    second = await PostgresJournal.open(url)
    first.owner, second.owner = "w0", "w1"
    first.lease_seconds = 0.0  # its planner lease lapses at once
    assert await first.plan_lease()
    assert await second.plan_lease()
    plan = ShardPlan("/v1/chat/completions", "gpt-4o-mini", (1, 2), 100, 10)
    with pytest.raises(LeaseLostError):
        await first.add_shard("s000000", plan, planned_at=1.0)
    assert await second.shard_count() == 0
    await second.add_shard("s000000", plan, planned_at=1.0)
    assert [s.key for s in await first.shards()] == ["s000000"]
    await first.close()
    await second.close()


async def test_a_postgres_run_keeps_its_requests_per_second_for_every_request(
    tmp_path: Path,
) -> None:
    """``BatchRun`` on PostgreSQL with ``RunConfig.requests_per_second``
    (``aiobatch run --requests-per-second``): uploads, creates, polls and downloads
    together stay within ``burst + rate * span`` (the burst is the fleet's)."""
    url = pg_url(str(tmp_path), run="shared")
    clock = VirtualClock()
    service = service_on(clock)
    fleet = attrs.evolve(FAST_FLEET, burst=3)
    async with (
        fake_client(service=service, clock=clock, retry=RetryPolicy.for_testing()) as fake,
        clock.auto_advance(),
    ):
        run = BatchRun(
            fake.client, _requests(60), journal=url, output=tmp_path / "out.jsonl",
            config=config(max_lines=10, fleet=fleet, requests_per_second=2.0),
        )  # fmt: skip
        report = await run.run()
    assert report.state == "done"
    assert (
        Counter(r.method + " " + r.path.split("/")[1] for r in service.requests)["POST files"] == 6
    )
    assert within_bucket([r.at for r in service.requests], 2.0, 3)


async def test_a_fleet_config_alone_puts_no_budget_on_a_postgres_run(tmp_path: Path) -> None:
    """A fleet config without ``RunConfig.requests_per_second`` (``--poll-min`` alone) on
    PostgreSQL: the fleet's own rate paces only its polls; the uploads go out at once."""
    url = pg_url(str(tmp_path), run="shared")
    clock = VirtualClock()
    service = service_on(clock)
    fleet = attrs.evolve(FAST_FLEET, requests_per_second=0.01, burst=1)  # 100 s apart
    async with (
        fake_client(service=service, clock=clock, retry=RetryPolicy.for_testing()) as fake,
        clock.auto_advance(),
    ):
        run = BatchRun(
            fake.client, _requests(60), journal=url, output=tmp_path / "out.jsonl",
            config=config(max_lines=10, fleet=fleet),
        )  # fmt: skip
        report = await run.run()
    assert report.state == "done"
    uploads = [r.at for r in service.requests if r.method == "POST" and r.path == "/files"]
    # Paced by the fleet's rate, the 6 uploads would span at least 500 s (100 s apart).
    # Unpaced they go out at once, but the journal's queries are real IO, which
    # auto_advance takes for idleness: on a loaded machine virtual time moved ~200 s
    # while they ran.
    assert len(uploads) == 6 and max(uploads) - min(uploads) < 400.0


async def test_a_429_pauses_the_shared_budget_of_a_postgres_run(tmp_path: Path) -> None:
    """A 429 with ``retry-after: 30`` on a create, on a run with a shared budget: the run
    sends nothing for those 30 s (no other upload or create hits the server meanwhile)."""
    url = pg_url(str(tmp_path), run="shared")
    clock = VirtualClock()
    service = service_on(clock)
    service.faults.add(Fault.http(429, retry_after=30, method="POST", path="/batches"))
    async with (
        fake_client(service=service, clock=clock, retry=RetryPolicy.for_testing()) as fake,
        clock.auto_advance(),
    ):
        run = BatchRun(
            fake.client, _requests(60), journal=url, output=tmp_path / "out.jsonl",
            config=config(max_lines=10, max_submissions=6, requests_per_second=50.0),
        )  # fmt: skip
        report = await run.run()
    assert report.state == "done"
    limited = next(r.at for r in service.requests if r.status == 429)
    during = [r for r in service.requests if limited < r.at < limited + 30.0]
    assert during == []


async def test_a_worker_whose_database_stalls_for_less_than_the_lease_carries_on(
    tmp_path: Path,
) -> None:
    """A worker's database link frozen past half its lease time but not the whole: its
    provider requests wait meanwhile, and once the link is back it renews and finishes
    the run (one batch per shard, no error)."""
    url = pg_url(str(tmp_path), run="shared")
    journal = await _ingested(url, 40)
    clock = VirtualClock()
    service = service_on(clock)
    folder = tempfile.mkdtemp(prefix="aiobatch-link-")
    try:
        async with (
            FrozenLink(pg_server(), folder) as link,
            fake_client(service=service, clock=clock, retry=RetryPolicy.for_testing()) as fake,
            clock.auto_advance(),
        ):
            worker = Worker(
                fake.client, journal=link.url(url), config=config(max_lines=10),
                lease_seconds=6.0,
            )  # fmt: skip
            task = asyncio.ensure_future(worker.run())
            for _ in range(10_000):
                if len(service.batch_ids) >= 2 or task.done():
                    break
                await asyncio.sleep(0.01)
            link.freeze()
            # Real time: the leases run on the database's clock. Past half the lease, and
            # about 2.5 s short of the whole of it (a stalled machine takes some of that).
            await asyncio.sleep(3.5)
            link.thaw()
            report = await asyncio.wait_for(task, 60)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert report.state == "done"
    shards = await journal.shards()
    await journal.close()
    assert await _batches_per_shard(service) == Counter(s.key for s in shards)


async def test_a_failure_at_a_workers_first_heartbeat_gets_the_same_grace(
    tmp_path: Path,
) -> None:
    """A worker whose first lease renewal fails (its connection cut while it waits on a
    lock) does not stop at once: it renews at its next heartbeat and finishes the run."""
    import asyncpg

    from aiobatch._run._pg_url import parse_postgres_url

    url = pg_url(str(tmp_path), run="shared")
    journal = await _ingested(url, 10)
    where = parse_postgres_url(url)
    locker = await asyncpg.connect(where.dsn)
    clock = VirtualClock()
    service = service_on(clock)
    async with (
        fake_client(service=service, clock=clock, retry=RetryPolicy.for_testing()) as fake,
        clock.auto_advance(),
    ):
        async with locker.transaction():
            await locker.execute(f'LOCK TABLE "{where.schema}".aiobatch_workers')
            worker = Worker(
                fake.client, journal=url, config=config(max_lines=10), worker_id="w0",
                lease_seconds=30.0,
            )  # fmt: skip
            task = asyncio.ensure_future(worker.run())
            waiting = None
            for _ in range(10_000):  # its first renewal waits on the lock
                await locker.execute("SELECT pg_stat_clear_snapshot()")
                waiting = await locker.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%aiobatch_workers%' AND pid != pg_backend_pid()"
                )
                if waiting is not None or task.done():
                    break
                await asyncio.sleep(0.01)
            assert waiting is not None
            await locker.execute("SELECT pg_terminate_backend($1)", waiting)
        report = await asyncio.wait_for(task, 60)
    await locker.close()
    await journal.close()
    assert report.state == "done"
    assert await _batches_per_shard(service) == Counter({"s000000": 1})


class _Shared:
    """Another client's transport, never closed by the client sending through it."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner

    async def send(self, request: Request, *, stream: bool = False) -> Response:
        return await self.inner.send(request, stream=stream)

    async def aclose(self) -> None:
        pass


def _creates(service: FakeBatchService) -> int:
    return sum(1 for r in service.requests if r.method == "POST" and r.path.endswith("/batches"))


async def test_a_partitioned_worker_sends_no_create_once_its_leases_may_have_lapsed(
    tmp_path: Path,
) -> None:
    """A worker cut off from its database (its queries hang) after recording a create,
    whose create then waits out a Retry-After: another worker adopts the shard and makes
    its batch; the cut-off one sends nothing more (LeaseExpiredError): one batch."""
    url = pg_url(str(tmp_path), run="shared")
    journal = await _ingested(url, 10)
    clock = VirtualClock()
    service = service_on(clock)
    service.faults.add(Fault.http(429, retry_after=60, method="POST", path="/batches"))
    stalled = VirtualClock(start=clock.now())  # the first worker's: it moves when told
    folder = tempfile.mkdtemp(prefix="aiobatch-link-")
    try:
        async with (
            FrozenLink(pg_server(), folder) as link,
            fake_client(service=service, clock=clock, retry=RetryPolicy.for_testing()) as fake,
            BatchClient(
                provider=fake.client.provider, transport=_Shared(fake.client._transport),
                clock=stalled, create_settle=fake.client.create_settle,
            ) as own,
        ):  # fmt: skip
            first = Worker(
                own, journal=link.url(url), config=config(max_lines=10), worker_id="w0",
                lease_seconds=2.0,
            )  # fmt: skip
            first_run = asyncio.ensure_future(first.run())
            for _ in range(10_000):  # its create was answered 429, retry after 60 s
                if _creates(service) or first_run.done():
                    break
                await asyncio.sleep(0.01)
            assert _creates(service) == 1 and not first_run.done()
            link.freeze()
            async with clock.auto_advance():
                second = Worker(
                    fake.client, journal=url, config=config(max_lines=10), worker_id="w1",
                    lease_seconds=2.0,
                )  # fmt: skip
                report = await asyncio.wait_for(second.run(), 60)
            assert report.state == "done" and len(service.batch_ids) == 1
            async with stalled.auto_advance():  # the first worker's Retry-After runs out
                for _ in range(300):
                    if first_run.done() or len(service.batch_ids) > 1:
                        break
                    await asyncio.sleep(0.01)
                link.thaw()
                first.stop()
                outcome = await asyncio.gather(
                    asyncio.wait_for(first_run, 60), return_exceptions=True
                )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    await journal.close()
    assert await _batches_per_shard(service) == Counter({"s000000": 1})
    assert isinstance(outcome[0], LeaseExpiredError)


async def _advance(clock: VirtualClock, seconds: float) -> None:
    """Move ``clock`` on by ``seconds`` a tenth of a second at a time, letting every
    task woken run."""
    for _ in range(round(seconds * 10)):
        clock.advance(0.1)
        for _ in range(20):
            await asyncio.sleep(0)


async def test_a_worker_joining_the_shared_budget_starts_with_an_empty_bucket(
    tmp_path: Path,
) -> None:
    """Two workers' shares of one budget (1/s, burst 20): the second joins while the
    first spends its full bucket and rate until its next heartbeat; together they are
    granted at most ``burst + rate * span`` over any span."""
    url = pg_url(str(tmp_path), run="shared")
    journals = [await _ingested(url, 1), await PostgresJournal.open(url)]
    for i, journal in enumerate(journals):
        journal.owner, journal.lease_seconds = f"w{i}", 600.0
    granted: list[float] = []
    async with fake_client() as fake:
        clock = fake.clock
        budgets = [SharedBudget(1.0, 20, fake.client) for _ in journals]

        async def spend(budget: SharedBudget) -> None:
            while True:
                await budget.cleared.wait()
                await budget.budget.acquire()
                granted.append(clock.now())

        await journals[0].renew()
        await budgets[0].split(journals[0], 1)  # alone: the full rate and a full bucket
        await journals[1].renew()
        await budgets[1].split(journals[1], 2)  # joins: held back until the first counts 2
        spenders = [asyncio.ensure_future(spend(b)) for b in budgets]
        await _advance(clock, 10.0)  # (the database's answers take no virtual time)
        await budgets[0].split(journals[0], 2)  # the first one's next heartbeat
        await budgets[1].split(journals[1], 2)  # the second one's: cleared
        await _advance(clock, 5.0)
        for spender in spenders:
            spender.cancel()
        await asyncio.gather(*spenders, return_exceptions=True)
    for journal in journals:
        await journal.close()
    assert len(granted) >= 30
    assert within_bucket(granted, 1.0, 20)


async def test_a_worker_whose_budget_row_lapsed_waits_to_be_cleared_again(
    tmp_path: Path,
) -> None:
    """A worker counted out by the others (its row lapsed) and back: it counts one more
    worker than they do, so it sends nothing until they lowered their shares again."""
    url = pg_url(str(tmp_path), run="shared")
    journals = [await _ingested(url, 1), await PostgresJournal.open(url)]
    for i, journal in enumerate(journals):
        journal.owner, journal.lease_seconds = f"w{i}", 600.0
    async with fake_client() as fake:
        budgets = [SharedBudget(1.0, 20, fake.client) for _ in journals]
        for journal in journals:
            await journal.renew()
        for journal, budget in zip(journals, budgets, strict=True):
            await budget.split(journal, 2)
        assert budgets[1].cleared.is_set()
        await budgets[0].split(journals[0], 1)  # the first one counted the second out
        await budgets[1].split(journals[1], 2)  # the second, back: the first sends at 1/1
        assert not budgets[1].cleared.is_set()
    for journal in journals:
        await journal.close()
