"""The demo job that README's first command runs."""

from __future__ import annotations

import pytest

from aiobatch.cli import main
from aiobatch.cli._demo import all_accounted, run_demo


async def test_demo_accounts_for_every_request_despite_faults() -> None:
    """Every batch completes and every request has exactly one result, faults included."""
    report = await run_demo(batches=12, lines=7, fault_rate=0.2, line_error_rate=0.1, seed=3)
    assert report.statuses == {"completed": 12}
    assert report.requests == 84
    assert report.succeeded + report.failed == 84
    assert report.failed > 0
    assert report.faults_injected > 0
    assert all_accounted(report)


async def test_demo_without_faults_succeeds_everywhere() -> None:
    """With no injected faults or failing lines, every request succeeds."""
    report = await run_demo(batches=3, lines=5, fault_rate=0.0, line_error_rate=0.0)
    assert (report.succeeded, report.failed, report.faults_injected) == (15, 0, 0)


def test_demo_command_prints_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    """`aiobatch demo` exits 0 and says that all results are accounted for."""
    assert main(["demo", "--batches", "4", "--lines", "3", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 created, polled and collected (4 completed)" in out
    assert out.rstrip().endswith("all results accounted for")


def test_demo_rejects_empty_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """--batches 0 is a usage error with a message."""
    assert main(["demo", "--batches", "0"]) == 2
    assert "--batches" in capsys.readouterr().err
