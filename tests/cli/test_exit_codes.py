"""The exit status of ``aiobatch run``: one code per outcome, as ``--help`` documents.

0 every request succeeded; 1 finished with failed requests (0 with ``--allow-failures``);
2 a usage error; 3 the provider refused the batches; 4 the run stopped on an error.
(130 and 143, interrupted and stopped, are pinned in test_run_crash_cancel and
test_run_lifecycle.)
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import API_KEY, chat_line, serve

from aiobatch.cli import main
from aiobatch.testing import FakeBatchService, FakeConfig, Fault, make_app

QUIET_FAKE = ["--fake-faults", "0", "--fake-transient-errors", "0"]


def requests_file(path: Path, n: int) -> Path:
    """A JSONL file of ``n`` chat requests."""
    path.write_text(
        "".join(json.dumps(chat_line(f"q-{i}", f"question {i}")) + "\n" for i in range(n)),
        encoding="utf-8",
    )
    return path


def fake_run(tmp_path: Path, *extra: str, n: int = 20) -> int:
    """``aiobatch run --fake`` of ``n`` requests; its exit status."""
    source = requests_file(tmp_path / "in.jsonl", n)
    output = tmp_path / "out.jsonl"
    return main(["run", str(source), "-o", str(output), "--fake", "--no-progress", *extra])


def fast_service() -> FakeBatchService:
    """A fake service that finishes a batch at once, on the real clock."""
    return FakeBatchService(
        config=FakeConfig(validation_seconds=0.0, lines_per_second=1e6, finalizing_seconds=0.0)
    )


def test_every_request_succeeded_exits_0(tmp_path: Path) -> None:
    """A run whose every request succeeded exits 0."""
    assert fake_run(tmp_path, *QUIET_FAKE, "--fake-permanent-errors", "0") == 0


def test_finished_with_failed_requests_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run that finished with some failed requests exits 1 and still prints the report."""
    assert fake_run(tmp_path, *QUIET_FAKE, "--fake-permanent-errors", "0.5") == 1
    assert "failed" in capsys.readouterr().out


def test_allow_failures_makes_a_finished_run_exit_0(tmp_path: Path) -> None:
    """``--allow-failures``: a run that finished with failed requests exits 0."""
    code = fake_run(tmp_path, *QUIET_FAKE, "--fake-permanent-errors", "0.5", "--allow-failures")
    assert code == 0


@pytest.mark.parametrize("allow", [[], ["--allow-failures"]])
async def test_provider_refusing_every_batch_exits_3(
    allow: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run whose batch creates the provider refuses (every request ends
    batch_create_rejected) exits 3, also with ``--allow-failures``."""
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    service = fast_service()
    service.faults.add(
        Fault.http(400, method="POST", path="/batches", times=None, message="bad metadata")
    )
    source = requests_file(tmp_path / "in.jsonl", 3)
    output = tmp_path / "out.jsonl"
    async with serve(make_app(service)) as base_url:
        argv = ["run", str(source), "-o", str(output), "--provider", "compatible"]
        argv += ["--base-url", base_url, "--no-progress", "--create-settle", "0", *allow]
        code = await asyncio.to_thread(main, argv)
    captured = capsys.readouterr()
    assert code == 3, captured.err
    assert "batch_create_rejected" in captured.out


async def test_provider_refusing_the_key_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose key the server refuses (401) exits 3: configuration, not a failure."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    service = FakeBatchService(config=FakeConfig(), api_key=API_KEY)
    source = requests_file(tmp_path / "in.jsonl", 2)
    output = tmp_path / "out.jsonl"
    async with serve(make_app(service)) as base_url:
        argv = ["run", str(source), "-o", str(output), "--provider", "compatible"]
        argv += ["--base-url", base_url, "--no-progress"]
        code = await asyncio.to_thread(main, argv)
    err = capsys.readouterr().err
    assert code == 3, err
    assert "credentials" in err and "sk-wrong" not in err


async def test_run_stopped_on_an_error_exits_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run whose step kept failing (``--give-up-after``) exits 4, not 1."""
    service = fast_service()
    service.faults.add(Fault.http(500, should_retry=False, times=None))
    source = requests_file(tmp_path / "in.jsonl", 2)
    output = tmp_path / "out.jsonl"
    async with serve(make_app(service)) as base_url:
        argv = ["run", str(source), "-o", str(output), "--provider", "compatible"]
        argv += ["--base-url", base_url, "--give-up-after", "1s", "--no-progress"]
        code = await asyncio.to_thread(main, argv)
    assert code == 4, capsys.readouterr().err


def test_input_failing_the_checks_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An input file with a line that fails the checks exits 2 (nothing was sent)."""
    source = tmp_path / "bad.jsonl"
    source.write_text(json.dumps(chat_line("a")) + "\n{oops\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    assert main(["run", str(source), "-o", str(output), "--fake", "--no-progress"]) == 2
    assert f"{source}:2" in capsys.readouterr().err


def test_run_help_lists_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    """``aiobatch run --help`` ends with the table of exit statuses and names
    --allow-failures."""
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    table = text[text.index("exit status:") :]
    for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "130", "143"):
        assert f"\n  {code}" in table, table
    assert "--allow-failures" in text
