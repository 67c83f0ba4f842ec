"""``aiobatch run --provider azure`` on input written as Azure's batch how-to writes it:
a dated api-version, lines whose ``url`` is ``/chat/completions`` (no ``/v1``) and whose
``model`` is a Global-Batch deployment's name; against the fake's azure dialect over HTTP."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import serve
from test_provider_sdks import azure_doc_lines

from aiobatch import read_report
from aiobatch._run._sqlite import JournalFile as Journal
from aiobatch.cli import main
from aiobatch.testing import FakeBatchService, FakeConfig, FakeDialect, Fault, make_app

KEY = "az-run-0123456789abcdef"


async def test_run_on_azures_legacy_endpoint_answers_every_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documentation's lines with OPENAI_API_VERSION=2024-10-21: every task gets a
    chat completion from the named deployment, none ends as batch_create_rejected, and
    every request went to the /openai/... paths with that api-version."""
    service = FakeBatchService(
        config=FakeConfig(
            validation_seconds=0.0, lines_per_second=100_000.0, finalizing_seconds=0.0
        ),
        api_key=KEY,
        dialect=FakeDialect.azure(file_pending_seconds=0.1),
    )
    service.faults.add(Fault.http(429, retry_after=0.05, times=2, path="/batches*"))
    source = tmp_path / "test.jsonl"
    source.write_bytes(azure_doc_lines("gpt-4o-batch", count=7))
    output = tmp_path / "out.jsonl"
    async with serve(make_app(service)) as server_url:
        monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", server_url.removesuffix("/v1"))
        monkeypatch.setenv("AZURE_OPENAI_API_KEY", KEY)
        monkeypatch.delenv("AZURE_OPENAI_AD_TOKEN", raising=False)
        monkeypatch.setenv("OPENAI_API_VERSION", "2024-10-21")
        argv = ["run", str(source), "-o", str(output), "--provider", "azure"]
        argv += ["--max-lines", "3", "--poll-min", "0.02", "--poll-max", "0.2"]
        argv += ["--create-settle", "0.2", "--no-progress", "-q"]
        code = await asyncio.to_thread(main, argv)
    assert code == 0
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == [f"task-{i}" for i in range(7)]
    assert all(r["error"] is None for r in results), results
    bodies = [r["response"]["body"] for r in results]
    assert all(b["object"] == "chat.completion" and b["model"] == "gpt-4o-batch" for b in bodies)
    with Journal(Path(f"{output}.journal"), readonly=True) as journal:
        report = read_report(journal)
    assert (report.state, report.succeeded, report.failed, report.batches) == ("done", 7, 0, 3)
    assert {(await service.get_batch(b)).endpoint for b in service.batch_ids} == {
        "/chat/completions"
    }
    sent = [r for r in service.requests if r.path.startswith(("/files", "/batches"))]
    assert sent and {r.params.get("api-version") for r in sent} == {"2024-10-21"}
