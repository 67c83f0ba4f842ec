"""The coalescing client exactly once across reruns: a harness run again with the same
journal folder gets the answers already paid for from it, and only the missing requests
go into new batches; also after the process was killed with SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import FAST_FLEET, executed, serve, within

from aiobatch import BatchClient, BatchedOpenAI, BatchedStats, RunConfig
from aiobatch.errors import JournalError
from aiobatch.testing import FakeBatchService, FakeConfig, VirtualClock, fake_client, make_app

FAST = {"validation_seconds": 5.0, "lines_per_second": 1000.0, "finalizing_seconds": 5.0}
API_KEY = "sk-batched-0123456789abcdef"
WAIT = 60.0


async def harness(
    client: BatchClient, folder: Path, n: int, **options: Any
) -> tuple[list[str], BatchedStats]:
    """The same harness every time: n chat calls under gather; their reply texts and the
    client's counts."""
    config = RunConfig(fleet=FAST_FLEET, max_lines=10)
    async with BatchedOpenAI(
        client, journal=folder, config=config, sdk_types=False, **options
    ) as openai:
        calls = [
            openai.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"q{i % (n // 2)}"}]
            )
            for i in range(n)
        ]
        results = await asyncio.gather(*calls)
        stats = openai.stats()
    return [str(r.body["choices"][0]["message"]["content"]) for r in results], stats


async def test_a_rerun_is_answered_from_the_journal(clock: VirtualClock, tmp_path: Path) -> None:
    """Run twice with the same folder: the second run makes no batch and returns the
    same answers (identical requests keep their own, by occurrence)."""
    service = FakeBatchService(clock=clock, config=FakeConfig(**FAST, request_log_size=None))
    async with fake_client(service=service) as setup, clock.auto_advance():
        first, _ = await within(clock, 600, harness(setup.client, tmp_path, 20))
        batches = len(service.batch_ids)
        second, stats = await within(clock, 600, harness(setup.client, tmp_path, 20))
        assert second == first
        assert len(service.batch_ids) == batches
        assert stats.reused == 20
        assert set((await executed(service)).values()) == {1}
        assert len(await executed(service)) == 20


def _lose_result_files(folder: Path) -> list[Path]:
    """Delete the ``-data`` files of the folder's journals; their paths."""
    lost = [path for path in folder.iterdir() if path.name.endswith(".journal-data")]
    for path in lost:
        path.unlink()
    return lost


async def test_a_journal_whose_results_file_is_lost_is_not_skipped(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A rerun whose folder holds a journal with its ``-data`` file gone raises
    JournalError naming that file, and sends nothing: skipping the journal would send
    (and pay for) its requests again."""
    service = FakeBatchService(clock=clock, config=FakeConfig(**FAST, request_log_size=None))
    async with fake_client(service=service) as setup, clock.auto_advance():
        await within(clock, 600, harness(setup.client, tmp_path, 20))
        lost = _lose_result_files(tmp_path)
        assert lost
        sent = len(service.requests)
        # The folder's journals are read in name order: the first one stops the start.
        with pytest.raises(JournalError, match=re.escape(str(min(lost)))):
            await within(clock, 600, harness(setup.client, tmp_path, 20))
        assert len(service.requests) == sent


async def test_reuse_false_sends_every_call_again(clock: VirtualClock, tmp_path: Path) -> None:
    """reuse=False: the folder's answers are not used; every call goes to a new batch."""
    service = FakeBatchService(clock=clock, config=FakeConfig(**FAST, request_log_size=None))
    async with fake_client(service=service) as setup, clock.auto_advance():
        await within(clock, 600, harness(setup.client, tmp_path, 10))
        batches = len(service.batch_ids)
        _, stats = await within(clock, 600, harness(setup.client, tmp_path, 10, reuse=False))
        assert len(service.batch_ids) == 2 * batches
        assert stats.reused == 0


CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from aiobatch import BatchClient, BatchedOpenAI, FleetConfig, RetryPolicy, RunConfig

    FLEET = FleetConfig(min_interval=0.05, max_interval=0.2, validating_interval=0.05,
                        finalizing_interval=0.05, cancelling_interval=0.05,
                        in_progress_interval=0.05, jitter=0.0)

    async def main(base_url, folder, out):
        async with BatchClient(api_key="{key}", base_url=base_url, create_settle=0.2,
                               retry=RetryPolicy.for_testing(max_attempts=3)) as client:
            config = RunConfig(fleet=FLEET, max_lines=10, step_backoff=0.05)
            async with BatchedOpenAI(client, journal=folder, max_wait=0.2, config=config,
                                     sdk_types=False) as openai:
                calls = [openai.chat.completions.create(
                            model="gpt-4o-mini",
                            messages=[{{"role": "user", "content": f"q{{i}}"}}])
                         for i in range({n})]
                results = await asyncio.gather(*calls)
                stats = openai.stats()
        texts = [r.body["choices"][0]["message"]["content"] for r in results]
        with open(out, "w") as fh:
            json.dump({{"texts": texts, "reused": stats.reused}}, fh)

    asyncio.run(main(*sys.argv[1:]))
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
async def test_a_harness_killed_with_sigkill_pays_for_no_request_twice(tmp_path: Path) -> None:
    """The harness is SIGKILLed once its second batch exists; run again, it gets every
    answer, each request ran in exactly one batch, and a third run makes no batch."""
    n = 40
    service = FakeBatchService(
        config=FakeConfig(validation_seconds=0.3, lines_per_second=20.0, finalizing_seconds=0.1),
        api_key=API_KEY,
    )
    child_proc: list[asyncio.subprocess.Process] = []
    creates = 0

    @web.middleware
    async def killer(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        nonlocal creates
        response = await handler(request)
        if request.method == "POST" and request.path == "/v1/batches" and child_proc:
            creates += 1
            if creates == 2:  # the batch is made; the child never learns its id
                proc = child_proc.pop()
                proc.send_signal(signal.SIGKILL)
                await asyncio.wait_for(proc.wait(), WAIT)
        return response

    app = make_app(service)
    app.middlewares.insert(0, killer)
    script = tmp_path / "harness.py"
    script.write_text(CHILD.format(key=API_KEY, n=n), encoding="utf-8")
    folder = tmp_path / "journals"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    async def run_child(out: Path) -> int:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), base_url, str(folder), str(out), env=env
        )
        child_proc.append(proc)
        try:
            return await asyncio.wait_for(proc.wait(), WAIT)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    async with serve(app) as base_url:
        assert await run_child(tmp_path / "out1.json") == -signal.SIGKILL
        assert not (tmp_path / "out1.json").exists()
        child_proc.clear()
        assert await run_child(tmp_path / "out2.json") == 0
        second = json.loads((tmp_path / "out2.json").read_text())
        batches = len(service.batch_ids)
        assert await run_child(tmp_path / "out3.json") == 0
        third = json.loads((tmp_path / "out3.json").read_text())
    for i, text in enumerate(second["texts"]):
        assert text.endswith(f"to: q{i}")
    counts = await executed(service)
    assert len(counts) == n
    assert set(counts.values()) == {1}
    assert third["texts"] == second["texts"]
    assert third["reused"] == n
    assert len(service.batch_ids) == batches


def test_the_readme_harness_runs_against_the_fake_and_again_from_its_journal(
    tmp_path: Path,
) -> None:
    """The README's BatchedOpenAI example runs as written; run again, every answer comes
    from its journal folder."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    (example,) = [
        block
        for block in re.findall(r"```python\n(.*?)\n```", readme, flags=re.S)
        if "BatchedOpenAI(" in block
    ]
    script = tmp_path / "example.py"
    script.write_text(example, encoding="utf-8")
    outputs = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=WAIT * 2,
            check=True,
        )
        outputs.append(done.stdout)
    assert outputs[0].startswith("3000 Fake reply")
    assert "reused=0" in outputs[0]
    assert "reused=3000" in outputs[1]
