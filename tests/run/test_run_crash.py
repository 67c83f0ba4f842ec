"""``aiobatch run`` killed with SIGKILL at each step, then started again: no shard gets
a second batch or a second upload, and every request gets exactly one result.

The fake service is served over real HTTP from the test process; the run is the real
command line in a child process. The kill is decided on the server side, so it lands at
a known step: an aiohttp middleware SIGKILLs the child when a chosen request arrives
(before the service handles it), or after the service handled it but before the answer
goes out (the server did it, the child never learns the id), or, for a result file, after
part of the file was sent and the child committed some of it to its journal.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp import web
from conftest import serve

from aiobatch import BatchRequest, read_report
from aiobatch._run._disk import WRITE_BYTES
from aiobatch._run._sqlite import JournalFile as Journal
from aiobatch.testing import (
    DefaultResponder,
    FakeBatchService,
    FakeConfig,
    ResponderResult,
    make_app,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

API_KEY = "sk-crash-0123456789abcdef"
REQUESTS = 30
MAX_LINES = 10  # -> 3 shards of 10 lines
COLLECT_CHUNK = 5  # lines per journal commit while collecting
PARTIAL_LINES = 7  # lines of a result file sent before the child is killed
WAIT = 60.0  # the bound on every wait for the child (a loaded CI box)
#: ``--create-settle``: this server acts on a create as it arrives, so a create that may
#: have been sent is looked up after a short wait, not the default 10 s.
CREATE_SETTLE = "0.2"
CONTENT = re.compile(r"^/v1/files/([^/]+)/content$")


@attrs.define(frozen=True)
class KillPoint:
    """Where the server kills the child: at the ``nth`` request matching ``method`` and
    ``path`` (a regex), ``before`` the service handles it or after (``before=False``:
    the service acted, the answer is never sent). ``partial`` streams part of a result
    file and kills once the child committed some of it. With ``once_a_shard_is`` the
    request is held until the child's journal shows a shard in one of those states
    (other shards are in flight at once: this pins down how far they got)."""

    method: str
    path: str
    nth: int = 1
    before: bool = True
    partial: bool = False
    once_a_shard_is: tuple[str, ...] = ()


KILL_POINTS = {
    # The shard intents are journaled; the first upload never reaches the service.
    "after-intent": KillPoint("POST", r"^/v1/files$"),
    # The service stored the first upload; the child never learns its file id.
    "after-upload": KillPoint("POST", r"^/v1/files$", before=False),
    # The create key is journaled; the first create never reaches the service.
    "before-create": KillPoint("POST", r"^/v1/batches$"),
    # The service created the first batch; the child never learns its id.
    "after-create": KillPoint("POST", r"^/v1/batches$", before=False),
    # One batch is open and tracked, the second is created but its id is unknown.
    "after-second-create": KillPoint(
        "POST", r"^/v1/batches$", nth=2, before=False, once_a_shard_is=("open", "collecting")
    ),
    # Part of the first result file is read and committed, the rest never arrives.
    "mid-collection": KillPoint("GET", CONTENT.pattern, partial=True),
    # One shard is fully collected; the second result file is never sent.
    "between-collections": KillPoint("GET", CONTENT.pattern, nth=2, once_a_shard_is=("collected",)),
}


class Killer:
    """The server side of a kill: arms on the first run's child, fires once."""

    def __init__(self, point: KillPoint, journal: Path, service: FakeBatchService) -> None:
        self.point = point
        self.journal = journal
        self.service = service
        self.proc: asyncio.subprocess.Process | None = None
        self.started = asyncio.Event()
        self.spawned = asyncio.Event()
        self.seen = 0
        self.fired = False
        self.dead = asyncio.Event()

    @property
    def armed(self) -> bool:
        return self.started.is_set() and not self.dead.is_set()

    async def start(self, child: Child) -> asyncio.subprocess.Process:
        """Start the child this killer watches (armed before its first request)."""
        self.started.set()
        self.proc = await child.start()
        self.spawned.set()
        return self.proc

    async def kill(self) -> None:
        """SIGKILL the child and wait until it is gone (shielded: the kill closes the
        connection whose handler runs this)."""
        await self.spawned.wait()  # its first request may come before start() returned
        proc = self.proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        task = asyncio.ensure_future(asyncio.wait_for(proc.wait(), WAIT))
        task.add_done_callback(lambda _: self.dead.set())
        await asyncio.shield(task)

    def matches(self, request: web.Request) -> bool:
        point = self.point
        return request.method == point.method and re.match(point.path, request.path) is not None

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not self.armed:
            return await handler(request)
        if self.fired:
            # The child is being killed: nothing more reaches the service from it.
            await self.dead.wait()
            return _dropped(request)
        if not self.matches(request):
            return await handler(request)
        self.seen += 1
        if self.seen < self.point.nth:
            return await handler(request)
        self.fired = True
        if self.point.once_a_shard_is:
            states = self.point.once_a_shard_is
            await wait_for(lambda: _shards_in(self.journal, states) > 0, f"a shard is in {states}")
        if self.point.partial:
            return await self._partial_content(request)
        if self.point.before:
            await self.kill()
            return _dropped(request)
        response = await handler(request)
        await self.kill()
        return response

    async def _partial_content(self, request: web.Request) -> web.StreamResponse:
        match = CONTENT.match(request.path)
        assert match is not None
        lines = self.service.file_content(match.group(1)).splitlines(keepends=True)
        assert len(lines) > PARTIAL_LINES > COLLECT_CHUNK, "the result file is too short"
        response = web.StreamResponse(
            status=200, headers={"content-type": "application/octet-stream"}
        )
        await response.prepare(request)
        await response.write(b"".join(lines[:PARTIAL_LINES]))
        await wait_for(lambda: _committed_lines(self.journal) > 0, "the child commits a chunk")
        await self.kill()
        return response


def _dropped(request: web.Request) -> web.StreamResponse:
    """Hang up without an answer (on a child that is dead by now)."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=500)


def _journal_count(journal: Path, sql: str, *args: Any) -> int:
    """One number from the child's journal, read-only while the child may write it."""
    if not journal.exists():
        return 0
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=10.0)
    try:
        return int(db.execute(sql, args).fetchone()[0])
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0
    finally:
        db.close()


def _committed_lines(journal: Path) -> int:
    """Result-file lines the child committed to its journal."""
    return _journal_count(journal, "SELECT coalesce(sum(output_done), 0) FROM shards")


def _shards_in(journal: Path, states: tuple[str, ...]) -> int:
    """The child's shards in one of ``states``."""
    marks = ", ".join("?" for _ in states)
    return _journal_count(journal, f"SELECT count(*) FROM shards WHERE state IN ({marks})", *states)


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll another process's progress, bounded (the only way to see its journal)."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.01)


def _shards(journal: Path) -> list[dict[str, Any]]:
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM shards ORDER BY key")]
    finally:
        db.close()


def _run_id(journal: Path) -> str:
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        return str(db.execute("SELECT value FROM meta WHERE key = 'run_id'").fetchone()[0])
    finally:
        db.close()


def _write_input(path: Path) -> list[str]:
    ids = [f"req-{i:03d}" for i in range(REQUESTS)]
    with open(path, "w") as fh:
        for cid in ids:
            line = {
                "custom_id": cid,
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": f"say {cid}"}],
                },
            }
            fh.write(json.dumps(line) + "\n")
    return ids


class Child:
    """``python -m aiobatch run`` against the test's server."""

    def __init__(self, tmp_path: Path, base_url: str) -> None:
        self.tmp_path = tmp_path
        self.input = tmp_path / "requests.jsonl"
        self.output = tmp_path / "results.jsonl"
        self.journal = tmp_path / "run.journal"
        self.ids = _write_input(self.input)
        self.argv = [
            sys.executable,
            "-m",
            "aiobatch",
            "run",
            str(self.input),
            "-o",
            str(self.output),
            "--journal",
            str(self.journal),
            "--provider",
            "compatible",
            "--base-url",
            base_url,
            "--poll-min",
            "0.02",
            "--poll-max",
            "0.2",
            "--max-lines",
            str(MAX_LINES),
            "--collect-chunk",
            str(COLLECT_CHUNK),
            "--create-settle",
            CREATE_SETTLE,
            "--no-progress",
        ]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
        self.env["OPENAI_API_KEY"] = API_KEY
        self.runs = 0
        self.procs: list[asyncio.subprocess.Process] = []

    def _logs(self) -> tuple[Any, Any]:
        self.runs += 1
        out = open(self.tmp_path / f"stdout{self.runs}.txt", "wb")  # noqa: SIM115
        err = open(self.tmp_path / f"stderr{self.runs}.txt", "wb")  # noqa: SIM115
        return out, err

    async def start(self) -> asyncio.subprocess.Process:
        """Start the run (its output and log go to files, so no pipe can fill up)."""
        out, err = self._logs()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, stdout=out, stderr=err, env=self.env, cwd=self.tmp_path
            )
        finally:
            out.close()
            err.close()
        self.procs.append(proc)
        return proc

    async def finish(self, proc: asyncio.subprocess.Process) -> int | None:
        """The child's exit code; None (after killing it) when it does not end in time."""
        try:
            return await asyncio.wait_for(proc.wait(), WAIT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return None

    async def close(self) -> None:
        """Kill whatever child a failed test left running."""
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    def stderr(self, run: int) -> str:
        return (self.tmp_path / f"stderr{run}.txt").read_text(errors="replace")


async def _server_files(base_url: str) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{base_url}/files", headers=headers, params={"limit": "10000"}) as resp,
    ):
        assert resp.status == 200
        data: list[dict[str, Any]] = (await resp.json())["data"]
        return data


def _service(**kwargs: Any) -> FakeBatchService:
    """The fake service of these tests: every step at once."""
    return FakeBatchService(
        config=FakeConfig(
            validation_seconds=0.0,
            lines_per_second=100_000.0,
            finalizing_seconds=0.0,
            request_log_size=None,
        ),
        api_key=API_KEY,
        **kwargs,
    )


@pytest.mark.parametrize("where", list(KILL_POINTS))
async def test_killed_run_resumes_without_duplicates(where: str, tmp_path: Path) -> None:
    """SIGKILLed here, then resumed: one batch and one upload per shard, one result per id."""
    await _killed_and_resumed(where, _service(), tmp_path)


async def _killed_and_resumed(where: str, service: FakeBatchService, tmp_path: Path) -> Child:
    """The command line run against ``service``, SIGKILLed at ``where``, run again and
    checked (:func:`_kill_and_resume`); the child, done."""
    app = make_app(service)
    killer = Killer(KILL_POINTS[where], tmp_path / "run.journal", service)
    app.middlewares.append(killer.middleware)
    async with serve(app) as base_url:
        child = Child(tmp_path, base_url)
        try:
            await _kill_and_resume(where, killer, service, child, base_url)
        finally:
            await child.close()
    return child


class _LongReplies:
    """The default answers, every third with a reply longer than a write call takes."""

    def __init__(self) -> None:
        self._default = DefaultResponder()

    def __call__(self, request: BatchRequest) -> ResponderResult:
        status, body = self._default(request)
        if int(request.custom_id.rsplit("-", 1)[1]) % 3 == 0:
            body["choices"][0]["message"]["content"] += "x" * (WRITE_BYTES + 1000)
        return status, body


async def test_killed_mid_collection_of_long_lines_resumes_with_every_byte(tmp_path: Path) -> None:
    """Killed while lines of over 1 MiB are collected, then resumed: each line is the server's."""
    service = _service(responder=_LongReplies())
    child = await _killed_and_resumed("mid-collection", service, tmp_path)
    served = set()
    for batch_id in service.batch_ids:
        output_file_id = (await service.get_batch(batch_id)).output_file_id
        assert output_file_id is not None
        served.update(service.file_content(output_file_id).splitlines())
    lines = child.output.read_bytes().splitlines()
    assert set(lines) == served
    assert sum(len(line) > WRITE_BYTES for line in lines) == REQUESTS // 3


async def _kill_and_resume(
    where: str, killer: Killer, service: FakeBatchService, child: Child, base_url: str
) -> None:
    # The first run: killed by the server at the chosen step.
    rc = await child.finish(await killer.start(child))
    assert killer.fired, f"the run ended ({rc}) before reaching {where}:\n{child.stderr(1)}"
    assert rc == -signal.SIGKILL
    assert not child.output.exists()
    await _check_kill_window(where, child.journal, service, base_url)

    # The second run: the same command, no kill.
    rc = await child.finish(await child.start())
    assert rc == 0, child.stderr(2)

    # Exactly one result per custom_id, all successes.
    results = [json.loads(line) for line in child.output.read_bytes().splitlines()]
    ids = [r["custom_id"] for r in results]
    assert sorted(ids) == sorted(child.ids)
    assert len(ids) == len(set(ids))
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in results)

    # One batch per shard: every shard has its own, and the service made no other.
    shards = _shards(child.journal)
    assert len(shards) == -(-REQUESTS // MAX_LINES)
    assert all(s["state"] == "collected" and s["status"] == "completed" for s in shards)
    batch_ids = [s["batch_id"] for s in shards]
    assert len(set(batch_ids)) == len(shards)
    assert sorted(service.batch_ids) == sorted(batch_ids)
    batches = [await service.get_batch(bid) for bid in service.batch_ids]
    per_shard = collections.Counter((b.metadata or {}).get("aiobatch_shard") for b in batches)
    assert per_shard == collections.Counter(s["key"] for s in shards)

    # One upload per shard: a landed upload was adopted, not sent again.
    run_id = _run_id(child.journal)
    names = [f["filename"] for f in await _server_files(base_url) if f["purpose"] == "batch"]
    assert collections.Counter(names) == collections.Counter(
        f"aiobatch-{run_id}-{s['key']}.jsonl" for s in shards
    )
    assert {b.input_file_id for b in batches} == {s["file_id"] for s in shards}

    # The accounting saw every line once: nothing counted as failed, retried or read
    # twice (a resumed collection skips the lines it had committed).
    with Journal(child.journal, readonly=True) as journal:
        report = read_report(journal)
    assert (report.state, report.requests, report.succeeded) == ("done", REQUESTS, REQUESTS)
    assert (report.failed, report.pending, report.retried, report.rounds) == (0, 0, 0, 0)
    assert report.batches == len(shards)
    usage = [r["response"]["body"]["usage"] for r in results]
    prompt = sum(u["prompt_tokens"] for u in usage)
    completion = sum(u["completion_tokens"] for u in usage)
    assert (report.input_tokens, report.output_tokens) == (prompt, completion)
    assert sum(s["input_tokens"] for s in shards) == prompt
    assert sum(s["output_tokens"] for s in shards) == completion


async def _check_kill_window(
    where: str, journal: Path, service: FakeBatchService, base_url: str
) -> None:
    """The journal at the kill (and the server) show the step the kill was meant to cut."""
    shards = _shards(journal)
    states = collections.Counter(s["state"] for s in shards)
    assert len(shards) == -(-REQUESTS // MAX_LINES), shards
    if where in ("after-intent", "after-upload"):
        cut = [s for s in shards if s["state"] == "uploading" and s["upload_started_at"]]
        assert cut, shards
        assert not any(s["file_id"] for s in cut), shards
        if where == "after-upload":
            # The server holds an upload of a shard whose journal row has no file id.
            run_id = _run_id(journal)
            names = {f["filename"] for f in await _server_files(base_url)}
            assert any(f"aiobatch-{run_id}-{s['key']}.jsonl" in names for s in cut), names
    elif where in ("before-create", "after-create", "after-second-create"):
        cut = [s for s in shards if s["state"] == "creating" and s["batch_id"] is None]
        assert cut, shards
        keys = [(await service.get_batch(b)).metadata for b in service.batch_ids]
        made = {(m or {}).get("aiobatch_create_key") for m in keys}
        if where == "before-create":
            assert not any(s["create_key"] in made for s in cut), (cut, made)
        else:
            # The server made a batch for a shard whose journal row has no batch id.
            assert any(s["create_key"] in made for s in cut), (cut, made)
        if where == "after-second-create":
            assert states["open"] + states["collecting"] + states["collected"] >= 1, shards
    elif where == "mid-collection":
        cut = [s for s in shards if s["state"] == "collecting" and s["output_done"]]
        assert cut, shards
        assert all(0 < s["output_done"] < s["lines"] for s in cut), shards
    elif where == "between-collections":
        assert states["collected"] >= 1, shards
        assert states["collected"] < len(shards), shards
