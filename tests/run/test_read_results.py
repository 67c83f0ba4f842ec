"""Reading a run's output back with the public decoder: ``aiobatch.read_results`` and
``aiobatch.decode_result_line``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import config

import aiobatch
from aiobatch import BatchClient, BatchRun, ResultError, ResultHTTPError, ResultSuccess
from aiobatch.errors import DecodeError
from aiobatch.testing import LineErrorRule, chat_requests


@pytest.mark.aiobatch(line_errors=[LineErrorRule(status=400, custom_ids={"req-1"})])
async def test_read_results_of_a_real_run(aiobatch_client: BatchClient, tmp_path: Path) -> None:
    """A run's output reads back as one typed result per request: successes with their
    bodies, and the failed request as an HTTP error with its status and error body."""
    source = tmp_path / "requests.jsonl"
    source.write_bytes(chat_requests(4))
    output = tmp_path / "results.jsonl"
    run = BatchRun(aiobatch_client, source, journal=tmp_path / "j", output=output, config=config())
    report = await run.run()
    assert (report.succeeded, report.failed) == (3, 1)
    results = {r.custom_id: r for r in aiobatch.read_results(output)}
    assert sorted(results) == ["req-0", "req-1", "req-2", "req-3"]
    failed = results.pop("req-1")
    assert isinstance(failed, ResultHTTPError) and failed.kind == "http_error"
    assert failed.status_code == 400
    assert failed.response.body["error"]["message"]
    for result in results.values():
        assert isinstance(result, ResultSuccess) and result.kind == "success"
        assert result.body["choices"][0]["message"]["content"]
    raw = output.read_bytes().splitlines()
    assert [aiobatch.decode_result_line(line) for line in raw] == list(
        aiobatch.read_results(str(output))
    )


def test_read_results_streams_and_names_a_bad_line(tmp_path: Path) -> None:
    """Lines come one at a time (those before a bad line are read first), blank lines
    are skipped, an error line without a response is a ResultError, and a bad line is a
    DecodeError naming the file and line."""
    path = tmp_path / "results.jsonl"
    expired = {"id": "r1", "custom_id": "a", "response": None,
               "error": {"code": "batch_expired", "message": "expired"}}  # fmt: skip
    path.write_text(json.dumps(expired) + "\n\n" + '{"custom_id": "b"\n')
    lines = aiobatch.read_results(path)
    first = next(lines)
    assert isinstance(first, ResultError) and first.code == "batch_expired"
    with pytest.raises(DecodeError) as info:
        next(lines)
    assert f"line 3 of {path}" in str(info.value)


def test_read_results_of_a_missing_file(tmp_path: Path) -> None:
    """A file that does not exist: OSError when reading starts."""
    with pytest.raises(FileNotFoundError):
        list(aiobatch.read_results(tmp_path / "nope.jsonl"))
