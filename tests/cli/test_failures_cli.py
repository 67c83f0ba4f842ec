"""``aiobatch failures JOURNAL``: failed requests grouped by error code and HTTP status,
and ``--retry-file`` writing them out as a new input file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import chat_line

from aiobatch.cli import main


def requests_file(path: Path, n: int) -> Path:
    """A JSONL file of ``n`` chat requests."""
    path.write_text(
        "".join(json.dumps(chat_line(f"q-{i}", f"question {i}")) + "\n" for i in range(n)),
        encoding="utf-8",
    )
    return path


@pytest.fixture
def failed_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """A finished ``aiobatch run --fake`` of 40 requests, about half failing with a 400."""
    source = requests_file(tmp_path / "in.jsonl", 40)
    output = tmp_path / "out.jsonl"
    argv = ["run", str(source), "-o", str(output), "--fake", "--no-progress"]
    argv += ["--fake-faults", "0", "--fake-transient-errors", "0"]
    argv += ["--fake-permanent-errors", "0.5"]
    assert main(argv) == 1
    capsys.readouterr()
    lines = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    failed = [line for line in lines if line.get("error") or line["response"]["status_code"] != 200]
    assert failed
    return {"source": source, "journal": Path(f"{output}.journal"), "failed": failed}


def test_failures_table_groups_by_code_and_status(
    failed_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """The table names the run's failed count, each code with its HTTP status and count,
    and an example custom_id that did fail."""
    assert main(["failures", str(failed_run["journal"])]) == 0
    text = capsys.readouterr().out
    n = len(failed_run["failed"])
    assert f"{n:,} of 40 requests failed" in text
    row = next(line for line in text.splitlines() if line.startswith("invalid_value"))
    assert row.split()[1:3] == ["400", str(n)]
    ids = {line["custom_id"] for line in failed_run["failed"]}
    assert any(cid in row for cid in ids)


def test_failures_json_counts_match_the_output(
    failed_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--json`` gives the groups, whose counts add up to the output's failed lines."""
    assert main(["failures", str(failed_run["journal"]), "--json", "--examples", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["requests"] == 40
    assert data["failed"] == len(failed_run["failed"])
    assert sum(group["count"] for group in data["errors"]) == data["failed"]
    group = data["errors"][0]
    assert (group["code"], group["status"]) == ("invalid_value", 400)
    assert 1 <= len(group["examples"]) <= 2
    assert group["examples"][0]["message"]


def test_retry_file_holds_the_failed_request_lines(
    failed_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--retry-file`` writes exactly the failed requests' input lines, which
    ``aiobatch run`` accepts as a new input."""
    retry = tmp_path / "retry.jsonl"
    assert main(["failures", str(failed_run["journal"]), "--retry-file", str(retry)]) == 0
    assert f"wrote {len(failed_run['failed'])} request(s)" in capsys.readouterr().out
    originals = {
        json.loads(line)["custom_id"]: line
        for line in failed_run["source"].read_text(encoding="utf-8").splitlines()
    }
    written = retry.read_text(encoding="utf-8").splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in written) == sorted(
        line["custom_id"] for line in failed_run["failed"]
    )
    assert all(originals[json.loads(line)["custom_id"]] == line for line in written)
    again = ["run", str(retry), "-o", str(tmp_path / "again.jsonl"), "--fake", "--no-progress"]
    assert main([*again, "--fake-permanent-errors", "0", "--fake-faults", "0"]) == 0


@pytest.mark.parametrize(("codes", "expected"), [(["invalid_value"], True), (["500"], False)])
def test_retry_file_keeps_only_the_chosen_codes(
    codes: list[str],
    expected: bool,
    failed_run: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--code`` (an error code or an HTTP status) limits what the retry file holds."""
    retry = tmp_path / "retry.jsonl"
    argv = ["failures", str(failed_run["journal"]), "--retry-file", str(retry)]
    for code in codes:
        argv += ["--code", code]
    assert main(argv) == 0
    count = len(retry.read_text(encoding="utf-8").splitlines())
    assert count == (len(failed_run["failed"]) if expected else 0)


def test_an_existing_retry_file_is_kept_without_force(
    failed_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing ``--retry-file`` is a usage error (exit 2), left as it was."""
    retry = tmp_path / "retry.jsonl"
    retry.write_text("keep me\n", encoding="utf-8")
    assert main(["failures", str(failed_run["journal"]), "--retry-file", str(retry)]) == 2
    assert retry.read_text(encoding="utf-8") == "keep me\n"
    assert "--force" in capsys.readouterr().err


def test_failures_of_a_missing_journal_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing journal exits 4 naming the path."""
    missing = tmp_path / "nope.journal"
    assert main(["failures", str(missing)]) == 4
    assert str(missing) in capsys.readouterr().err
