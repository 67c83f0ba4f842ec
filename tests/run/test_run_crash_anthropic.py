"""``aiobatch run --provider anthropic`` against the fake's anthropic dialect over real
HTTP: killed with SIGKILL at a step, then started again, every request gets exactly one
result and no shard gets a second batch; with faults on the wire it ends the same way.

As in ``test_run_crash`` (whose server-side killer and child process this reuses), the
run is the real command line in a child process and the kill is decided by the server.
Anthropic's creates carry the requests inline and its batches carry no metadata: a create
whose answer was lost is found again by its request count and creation time.
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import sys
from pathlib import Path

import pytest
from aiohttp import web
from conftest import serve
from test_run_crash import (
    COLLECT_CHUNK,
    MAX_LINES,
    PARTIAL_LINES,
    REQUESTS,
    WAIT,
    Child,
    Killer,
    KillPoint,
    _committed_lines,
    _shards,
    wait_for,
)

from aiobatch import read_report
from aiobatch._provider._anthropic import ANTHROPIC_VERSION
from aiobatch._run._sqlite import JournalFile as Journal
from aiobatch.testing import FakeBatchService, FakeConfig, Fault, make_app
from aiobatch.transport import Request

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

API_KEY = "sk-ant-crash-0123456789abcdef"
CREATE = r"^/v1/messages/batches$"
RESULTS = r"^/v1/messages/batches/[^/]+/results$"

KILL_POINTS = {
    # The shards are planned and a create key journaled; no create reaches the service.
    "after-intent": KillPoint("POST", CREATE),
    # The service made the first batch; the child never learns its id.
    "after-create": KillPoint("POST", CREATE, before=False),
    # One batch is open and tracked; the second is made but its id is unknown.
    "after-second-create": KillPoint(
        "POST", CREATE, nth=2, before=False, once_a_shard_is=("open", "collecting")
    ),
    # Part of the first batch's results is read and committed, the rest never arrives.
    "mid-collection": KillPoint("GET", RESULTS, partial=True),
}


class ResultsKiller(Killer):
    """The killer, cutting an Anthropic results stream instead of a file's content."""

    async def _partial_content(self, request: web.Request) -> web.StreamResponse:
        # The whole results, asked of the service directly (not through this server).
        headers = {"x-api-key": API_KEY, "anthropic-version": ANTHROPIC_VERSION}
        full = await self.service.handle(Request("GET", str(request.url), headers=headers))
        assert full.status == 200, full
        lines = (await full.read()).splitlines(keepends=True)
        assert len(lines) > PARTIAL_LINES > COLLECT_CHUNK, "the results are too short"
        response = web.StreamResponse(status=200, headers={"content-type": "application/binary"})
        await response.prepare(request)
        await response.write(b"".join(lines[:PARTIAL_LINES]))
        await wait_for(lambda: _committed_lines(self.journal) > 0, "the child commits a chunk")
        await self.kill()
        return response


def anthropic_child(tmp_path: Path, server_url: str) -> Child:
    """The crash test's child, running ``--provider anthropic`` on lines for
    ``/v1/messages``, its key in ``ANTHROPIC_API_KEY``."""
    child = Child(tmp_path, server_url)
    with open(child.input, "w") as fh:
        for cid in child.ids:
            body = {
                "model": "claude-test",
                "max_tokens": 32,
                "messages": [{"role": "user", "content": f"say {cid}"}],
            }
            line = {"custom_id": cid, "method": "POST", "url": "/v1/messages", "body": body}
            fh.write(json.dumps(line) + "\n")
    argv = child.argv
    argv[argv.index("compatible")] = "anthropic"
    argv[argv.index("--base-url") + 1] = server_url.removesuffix("/v1")
    child.env = {k: v for k, v in child.env.items() if not k.startswith("ANTHROPIC_")}
    child.env.pop("OPENAI_API_KEY", None)
    child.env["ANTHROPIC_API_KEY"] = API_KEY
    return child


def anthropic_service() -> FakeBatchService:
    """The fake in the anthropic dialect, finishing batches at once, on the real clock."""
    config = FakeConfig(
        validation_seconds=0.0,
        lines_per_second=100_000.0,
        finalizing_seconds=0.0,
        request_log_size=None,
    )
    return FakeBatchService(config=config, api_key=API_KEY, dialect="anthropic")


async def check_one_result_each(child: Child, service: FakeBatchService) -> None:
    """Every request has exactly one successful result, every shard its own batch, and
    the service made no other batch."""
    results = [json.loads(line) for line in child.output.read_bytes().splitlines()]
    ids = [r["custom_id"] for r in results]
    assert sorted(ids) == sorted(child.ids)
    assert len(ids) == len(set(ids))
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in results)
    assert all(r["response"]["body"]["type"] == "message" for r in results)
    assert all(f"say {r['custom_id']}" in json.dumps(r["response"]["body"]) for r in results)

    shards = _shards(child.journal)
    assert len(shards) == -(-REQUESTS // MAX_LINES)
    assert all(s["state"] == "collected" and s["status"] == "completed" for s in shards)
    batch_ids = [s["batch_id"] for s in shards]
    assert len(set(batch_ids)) == len(shards)
    # The service's own ids are the wire ids without Anthropic's "msg" prefix.
    assert sorted("msg" + b for b in service.batch_ids) == sorted(batch_ids)
    assert service.request_count("POST", "/files") == 0

    with Journal(child.journal, readonly=True) as journal:
        report = read_report(journal)
    assert (report.state, report.requests, report.succeeded) == ("done", REQUESTS, REQUESTS)
    assert (report.failed, report.pending, report.retried) == (0, 0, 0)
    usage = [r["response"]["body"]["usage"] for r in results]
    assert report.input_tokens == sum(u["input_tokens"] for u in usage)
    assert report.output_tokens == sum(u["output_tokens"] for u in usage)


@pytest.mark.parametrize("where", list(KILL_POINTS))
async def test_killed_anthropic_run_resumes_without_duplicates(where: str, tmp_path: Path) -> None:
    """SIGKILLed here, then resumed: one inline batch per shard, one result per id."""
    service = anthropic_service()
    app = make_app(service)
    killer = ResultsKiller(KILL_POINTS[where], tmp_path / "run.journal", service)
    app.middlewares.append(killer.middleware)
    async with serve(app) as server_url:
        child = anthropic_child(tmp_path, server_url)
        try:
            rc = await child.finish(await killer.start(child))
            assert killer.fired, f"the run ended ({rc}) before reaching {where}:\n{child.stderr(1)}"
            assert rc == -signal.SIGKILL
            assert not child.output.exists()
            _check_kill_window(where, child.journal, service)

            rc = await child.finish(await child.start())
            assert rc == 0, child.stderr(2)
            await check_one_result_each(child, service)
        finally:
            await child.close()


def _check_kill_window(where: str, journal: Path, service: FakeBatchService) -> None:
    """The journal at the kill (and the service) show the step the kill was meant to cut."""
    shards = _shards(journal)
    states = collections.Counter(s["state"] for s in shards)
    assert len(shards) == -(-REQUESTS // MAX_LINES), shards
    if where == "after-intent":
        assert states["creating"] >= 1, shards
        assert service.batch_ids == []
    elif where in ("after-create", "after-second-create"):
        cut = [s for s in shards if s["state"] == "creating" and s["batch_id"] is None]
        assert cut, shards
        known = {s["batch_id"] for s in shards if s["batch_id"]}
        # The service made a batch no journal row knows.
        assert {"msg" + b for b in service.batch_ids} - known, (shards, service.batch_ids)
        if where == "after-second-create":
            assert states["open"] + states["collecting"] + states["collected"] >= 1, shards
    elif where == "mid-collection":
        cut = [s for s in shards if s["state"] == "collecting" and s["output_done"]]
        assert cut, shards
        assert all(0 < s["output_done"] < s["lines"] for s in cut), shards


async def test_anthropic_run_with_faults_gets_one_result_each(tmp_path: Path) -> None:
    """Over HTTP with 529s, 429s with retry-after, answers lost after a create and
    dropped connections, the run ends with one result per request and one batch a shard."""
    service = anthropic_service()
    service.faults.add(Fault.drop(after=True, method="POST", path="/messages/batches"))
    service.faults.add(Fault.http(529, times=3, path="/messages/batches/*"))
    service.faults.add(Fault.http(429, retry_after=0.05, times=3, path="/messages/batches/*"))
    service.faults.add(Fault.drop(after=False, times=2, path="/messages/batches/*/results"))
    service.faults.add(Fault.http(503, times=None, probability=0.1))
    async with serve(make_app(service)) as server_url:
        child = anthropic_child(tmp_path, server_url)
        try:
            rc = await child.finish(await child.start())
            assert rc == 0, child.stderr(1)
            await check_one_result_each(child, service)
        finally:
            await child.close()


async def test_fake_server_command_serves_an_anthropic_run(tmp_path: Path) -> None:
    """``aiobatch fake-server --dialect anthropic`` (with faults) and ``aiobatch run
    --provider anthropic --base-url <the printed URL>``, both as commands: every request
    answered once; the banner names Anthropic's key header and the URL has no /v1."""
    server = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "aiobatch", "fake-server", "--dialect", "anthropic"],
        *["--port", "0", "--api-key", API_KEY, "--validation-seconds", "0.1"],
        *["--lines-per-second", "1000", "--finalizing-seconds", "0"],
        *["--fault-rate", "0.2", "--fault-statuses", "429,529", "--retry-after", "0.05"],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert server.stdout is not None
        url = (await asyncio.wait_for(server.stdout.readline(), WAIT)).decode().split()[-1]
        banner = (await asyncio.wait_for(server.stdout.readline(), WAIT)).decode()
        assert url.startswith("http://127.0.0.1:") and not url.endswith("/v1"), url
        assert "anthropic dialect" in banner and "x-api-key: KEY" in banner, banner
        assert API_KEY not in banner
        child = anthropic_child(tmp_path, url + "/v1")
        rc = await child.finish(await child.start())
        assert rc == 0, child.stderr(1)
        results = [json.loads(line) for line in child.output.read_bytes().splitlines()]
        assert sorted(r["custom_id"] for r in results) == sorted(child.ids)
        assert all(r["response"]["status_code"] == 200 for r in results)
        assert {s["state"] for s in _shards(child.journal)} == {"collected"}
    finally:
        server.send_signal(signal.SIGTERM)
        await asyncio.wait_for(server.wait(), WAIT)
