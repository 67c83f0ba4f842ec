"""End to end over real sockets: ``aiobatch fake-server --webhook-url`` signs webhooks that
an ``aiobatch run --webhook-listen`` receives, and the run ends on them, not on a poll."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import make_requests

SECRET = "whsec_" + base64.b64encode(b"cli-webhooks-test-secret-0123456").decode()
URL_LINE = re.compile(r"listening on (http://\S+/v1)")
#: Well under the run's first safety-net poll (600 s after it starts): a run that ends
#: within this was told of its batch's end by a webhook.
RUN_TIMEOUT = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _aiobatch(*argv: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiobatch",
        *argv,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.fixture
async def hook_server() -> AsyncIterator[tuple[str, str]]:
    """``aiobatch fake-server`` signing webhooks (secret from AIOBATCH_TEST_HOOK_SECRET)
    to a free loopback port; yields its base URL and the webhook URL. Batches spend 3 s
    validating, so the run tracks its batch before the webhook comes (one that came
    earlier would wait until the run adds the batch)."""
    hook_url = f"http://127.0.0.1:{_free_port()}/webhooks"
    proc = await _aiobatch(
        "fake-server",
        "--port",
        "0",
        "--api-key",
        "sk-test",
        "--validation-seconds",
        "3",
        "--finalizing-seconds",
        "0",
        "--lines-per-second",
        "1000000",
        "--webhook-url",
        hook_url,
        "--webhook-secret-env",
        "AIOBATCH_TEST_HOOK_SECRET",
        env={"AIOBATCH_TEST_HOOK_SECRET": SECRET},
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode()
        match = URL_LINE.search(line)
        assert match, f"unexpected first line {line!r}"
        yield match.group(1), hook_url
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _run_listening(
    source: Path, output: Path, hook_server: tuple[str, str], *, key: str
) -> tuple[int | None, str, str]:
    """``aiobatch run SOURCE -o OUTPUT --webhook-listen`` against the fake server, with
    API key ``key``: its exit status, stdout and stderr."""
    base_url, hook_url = hook_server
    listen = hook_url.removeprefix("http://").removesuffix("/webhooks")
    run = await _aiobatch(
        "run",
        str(source),
        "-o",
        str(output),
        "--provider",
        "compatible",
        "--base-url",
        base_url,
        "--webhook-listen",
        listen,
        "--no-progress",
        env={"OPENAI_API_KEY": key, "OPENAI_WEBHOOK_SECRET": SECRET},
    )
    try:
        out, err = await asyncio.wait_for(run.communicate(), timeout=RUN_TIMEOUT)
    finally:
        if run.returncode is None:
            run.kill()
            await run.wait()
    return run.returncode, out.decode(), err.decode()


async def test_run_ends_on_the_fake_servers_signed_webhook(
    tmp_path: Path, hook_server: tuple[str, str]
) -> None:
    """A run listening for webhooks (secret from OPENAI_WEBHOOK_SECRET) writes its output
    within RUN_TIMEOUT, long before its first safety-net poll, and reports one verified
    webhook that named its batch and none refused."""
    hook_url = hook_server[1]
    source = make_requests(tmp_path / "in.jsonl", 3)
    output = tmp_path / "out.jsonl"
    code, out, stderr = await _run_listening(source, output, hook_server, key="sk-test")
    assert code == 0, stderr
    assert f"receiving webhooks on {hook_url}" in stderr, stderr
    assert "webhooks: 1 received, 1 named this run's batches" in stderr, stderr
    assert ", 0 refused (" in stderr, stderr
    ids = sorted(json.loads(line)["custom_id"] for line in output.read_text().splitlines())
    assert ids == ["q-0", "q-1", "q-2"], out


async def test_a_run_that_fails_still_says_what_its_webhook_receiver_did(
    tmp_path: Path, hook_server: tuple[str, str]
) -> None:
    """A run the server refuses (a wrong key: exit 3) still prints its receiver's
    summary, the line that tells a bad webhook registration or secret apart."""
    source = make_requests(tmp_path / "in.jsonl", 2)
    code, _, stderr = await _run_listening(
        source, tmp_path / "out.jsonl", hook_server, key="sk-wrong"
    )
    assert code == 3, stderr
    assert "webhooks: 0 received, 0 named this run's batches" in stderr, stderr
