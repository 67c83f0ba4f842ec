"""``aiobatch cancel`` on a journal: a live run is flagged and stops itself; a run that
was SIGKILLed has its open batches cancelled by the command, and the next ``aiobatch run``
collects what they finished and re-submits only the rest, without spending retry rounds.

The fake service is served over real HTTP from the test process, on a virtual clock that
only the test moves: the batches stay ``in_progress`` with no line done until the test
advances the clock, so how far they got at the cancel is known exactly. The runs and the
cancels are the real command line in child processes (as in ``test_run_crash``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import serve
from test_run_crash import (
    API_KEY,
    CREATE_SETTLE,
    KILL_POINTS,
    MAX_LINES,
    REQUESTS,
    WAIT,
    Child,
    Killer,
    KillPoint,
    _shards,
    _shards_in,
    wait_for,
)

from aiobatch import read_report
from aiobatch._run._sqlite import JournalFile as Journal
from aiobatch.testing import FakeBatchService, FakeConfig, VirtualClock, make_app

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

SHARDS = -(-REQUESTS // MAX_LINES)
PROCESSING_SECONDS = 10.0  # a first-run batch of 10 lines: one line a second
ADVANCE = 4.5  # virtual seconds the test lets the batches run before the cancel
DONE = int(ADVANCE * MAX_LINES / PROCESSING_SECONDS)  # lines each batch finished: 4
#: Any poll of a batch (one by id, or the list).
POLL = KillPoint("GET", r"^/v1/batches(/[^/]+)?$")


class Speed:
    """``processing_seconds`` for the fake: the first run's batches are slow (the virtual
    clock does not move by itself, so they never finish); after ``fast()`` the batches
    created from then on finish at once."""

    def __init__(self) -> None:
        self.slow = True

    def fast(self) -> None:
        self.slow = False

    def __call__(self, batch_id: str, lines: int) -> float:
        return PROCESSING_SECONDS * lines / MAX_LINES if self.slow else 0.0


class OpenKiller(Killer):
    """Kills the child at its first poll of a batch once its journal shows every shard
    open (tracked with its batch id): every batch is in progress at the kill."""

    def matches(self, request: web.Request) -> bool:
        return super().matches(request) and _shards_in(self.journal, ("open",)) == SHARDS


def slow_service(speed: Speed) -> tuple[FakeBatchService, VirtualClock]:
    clock = VirtualClock(start=time.time())
    service = FakeBatchService(
        clock=clock,
        config=FakeConfig(
            validation_seconds=0.0,
            finalizing_seconds=0.0,
            cancel_seconds=0.0,
            processing_seconds=speed,
            request_log_size=None,
        ),
        api_key=API_KEY,
    )
    return service, clock


async def _aiobatch(child: Child, *args: str) -> tuple[int | None, str, str]:
    """``python -m aiobatch ARGS`` with the run's environment: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiobatch",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child.env,
        cwd=child.tmp_path,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None, "", "timed out"
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def _meta(journal: Path, key: str) -> str | None:
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])
    finally:
        db.close()


def _journal_results(journal: Path) -> dict[str, dict[str, Any]]:
    """custom_id -> the journal's result row (kind, code, shard, batch_id, attempts)."""
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute(
            "SELECT r.custom_id, s.kind, s.code, s.shard, s.batch_id, s.attempts "
            "FROM results s JOIN requests r ON r.seq = s.seq"
        )
        return {str(row["custom_id"]): dict(row) for row in rows}
    finally:
        db.close()


async def _finished_lines(
    service: FakeBatchService, batch_ids: list[str]
) -> dict[str, tuple[str, str]]:
    """custom_id -> (batch id, result line id) of every line the ended batches finished."""
    done: dict[str, tuple[str, str]] = {}
    for batch_id in batch_ids:
        batch = await service.get_batch(batch_id)
        if batch.output_file_id is None:
            continue
        for raw in service.file_content(batch.output_file_id).splitlines():
            line = json.loads(raw)
            assert line["error"] is None, line
            done[line["custom_id"]] = (batch_id, line["id"])
    return done


def _read_output(child: Child) -> list[dict[str, Any]]:
    return [json.loads(line) for line in child.output.read_bytes().splitlines()]


async def _check_resumed(
    child: Child,
    service: FakeBatchService,
    originals: list[str],
    finished: dict[str, tuple[str, str]],
) -> None:
    """The resumed run answered every request once, kept what the cancelled batches had
    finished, and ran the rest (and only the rest) in new batches, without retry rounds."""
    results = _read_output(child)
    ids = [r["custom_id"] for r in results]
    assert sorted(ids) == sorted(child.ids)
    assert len(ids) == len(set(ids))
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in results), [
        r for r in results if r["error"] is not None
    ]

    # What a cancelled batch finished is its own result line, not a re-run.
    by_id = {r["custom_id"]: r for r in results}
    rows = _journal_results(child.journal)
    for cid, (batch_id, line_id) in finished.items():
        assert by_id[cid]["id"] == line_id, cid
        assert rows[cid]["batch_id"] == batch_id, rows[cid]
    new = [b for b in service.batch_ids if b not in originals]
    old_line_ids = {line_id for _, line_id in finished.values()}
    for cid in set(child.ids) - set(finished):
        assert rows[cid]["batch_id"] in new, rows[cid]
        assert by_id[cid]["id"] not in old_line_ids, by_id[cid]

    # The new batches hold exactly the unfinished lines; no shard got a second batch.
    batches = [await service.get_batch(b) for b in service.batch_ids]
    totals = [b.request_counts.total for b in batches if b.id in new and b.request_counts]
    assert sum(totals) == REQUESTS - len(finished)
    per_shard = collections.Counter((b.metadata or {}).get("aiobatch_shard") for b in batches)
    assert all(n == 1 for n in per_shard.values()), per_shard

    # The cancel was the run's own: nothing spent a retry round (--max-rounds 0).
    assert all(row["attempts"] == 0 for row in rows.values()), rows
    with Journal(child.journal, readonly=True) as journal:
        report = read_report(journal)
    assert (report.state, report.requests, report.succeeded) == ("done", REQUESTS, REQUESTS)
    assert (report.failed, report.pending, report.rounds) == (0, 0, 0)


def _child(tmp_path: Path, base_url: str) -> Child:
    child = Child(tmp_path, base_url)
    child.argv += ["--max-rounds", "0"]
    return child


async def test_cancel_after_sigkill_cancels_open_batches_and_resume_reruns_the_rest(
    tmp_path: Path,
) -> None:
    """A killed run's open batches are cancelled by the command; resume re-runs the rest."""
    speed = Speed()
    service, clock = slow_service(speed)
    app = make_app(service)
    killer = OpenKiller(POLL, tmp_path / "run.journal", service)
    app.middlewares.append(killer.middleware)
    async with serve(app) as base_url:
        child = _child(tmp_path, base_url)
        try:
            rc = await child.finish(await killer.start(child))
            assert killer.fired, f"the run ended ({rc}) before its batches were open"
            assert rc == -signal.SIGKILL, child.stderr(1)
            originals = service.batch_ids
            assert len(originals) == SHARDS
            shards = _shards(child.journal)
            assert sorted(s["batch_id"] for s in shards) == sorted(originals)
            clock.advance(ADVANCE)  # every batch finishes DONE lines, then is cancelled
            for batch_id in originals:
                assert (await service.get_batch(batch_id)).status.value == "in_progress"

            rc, out, err = await _aiobatch(
                child,
                "cancel",
                str(child.journal),
                "--provider",
                "compatible",
                "--base-url",
                base_url,
                "--create-settle",
                CREATE_SETTLE,
            )
            assert rc == 0, err
            assert f"sent cancels for {SHARDS} " in out, out
            assert service.request_count("POST", "/batches/*/cancel") == SHARDS
            statuses = [(await service.get_batch(b)).status.value for b in originals]
            assert set(statuses) <= {"cancelling", "cancelled"}, statuses
            clock.advance(1.0)  # past any cancelling time: the batches have ended
            finished = await _finished_lines(service, originals)
            assert len(finished) == SHARDS * DONE

            speed.fast()
            rc = await child.finish(await child.start())
            assert rc == 0, child.stderr(2)
            await _check_resumed(child, service, originals, finished)
        finally:
            await child.close()


async def test_cancel_of_a_live_run_flags_it_and_the_run_stops_cancelled(tmp_path: Path) -> None:
    """A live run, flagged by the command, cancels its batches and exits 130; resume ends it."""
    speed = Speed()
    service, clock = slow_service(speed)
    async with serve(make_app(service)) as base_url:
        child = _child(tmp_path, base_url)
        try:
            proc = await child.start()
            await wait_for(
                lambda: (
                    proc.returncode is not None or _shards_in(child.journal, ("open",)) == SHARDS
                ),
                "every shard is open",
            )
            assert proc.returncode is None, child.stderr(1)
            originals = service.batch_ids
            assert len(originals) == SHARDS
            clock.advance(ADVANCE)  # every batch finishes DONE lines before the cancel

            rc, out, err = await _aiobatch(child, "cancel", str(child.journal))
            assert rc == 0, err
            assert "cancel requested" in out, out
            rc = await child.finish(proc)
            assert rc == 130, child.stderr(1)
            assert _meta(child.journal, "state") == "cancelled"
            statuses = [(await service.get_batch(b)).status.value for b in originals]
            assert statuses == ["cancelled"] * SHARDS, statuses
            finished = await _finished_lines(service, originals)
            assert len(finished) == SHARDS * DONE
            # The stopped run collected what its batches finished before it exited.
            rows = _journal_results(child.journal)
            assert {cid for cid, row in rows.items() if row["kind"] == "success"} == set(finished)

            speed.fast()
            rc = await child.finish(await child.start())
            assert rc == 0, child.stderr(2)
            await _check_resumed(child, service, originals, finished)
        finally:
            await child.close()


async def test_cancel_of_a_run_killed_before_any_create_sends_nothing(tmp_path: Path) -> None:
    """A run killed as its only create was being sent (no batch made): the command looks
    the shard's batch up, finds none, says there is nothing to cancel and sends no cancel."""
    service, _clock = slow_service(Speed())
    app = make_app(service)
    killer = Killer(KILL_POINTS["before-create"], tmp_path / "run.journal", service)
    app.middlewares.append(killer.middleware)
    async with serve(app) as base_url:
        child = _child(tmp_path, base_url)
        try:
            rc = await child.finish(await killer.start(child))
            assert killer.fired, f"the run ended ({rc}) before its first create"
            assert rc == -signal.SIGKILL, child.stderr(1)
            assert service.batch_ids == []
            shards = _shards(child.journal)
            assert shards, "the run journaled no shard"
            sent = len(service.requests)

            rc, out, err = await _aiobatch(
                child,
                "cancel",
                str(child.journal),
                "--provider",
                "compatible",
                "--base-url",
                base_url,
                "--create-settle",
                CREATE_SETTLE,
            )
            assert rc == 0, err
            assert "nothing to cancel" in out, out
            later = service.requests[sent:]
            assert later, "the shard left creating was not looked up"
            assert all(r.method == "GET" for r in later), [(r.method, r.path) for r in later]
            assert _shards(child.journal) == shards
        finally:
            await child.close()
