"""The optional extra ``aiobatch[fast]`` (msgspec) changes speed, never results.

The same run, in a process where msgspec cannot be imported and in one where it can
(when it is installed), ends with the same report, output file and preflight problems.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiobatch import _json

#: A small run on the in-memory fake, with bad input lines (skipped), HTTP errors
#: (final, and retried then final) and results in every shape; it prints what it got.
SCRIPT = r"""
import asyncio, json, sys
if sys.argv[1] == "without":
    sys.modules["msgspec"] = None  # an import of it fails, as when it is not installed
from pathlib import Path
from aiobatch import BatchClient, BatchRun, RetryPolicy, RunConfig, _json
from aiobatch.testing import FakeBatchService, FakeConfig, LineErrorRule, VirtualClock

folder = Path(sys.argv[2])
lines = [
    json.dumps({"custom_id": f"r-{n}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "m", "messages": [{"role": "user", "content": f"q{n} é"}]}})
    for n in range(40)
]
lines[3] = '{"custom_id": "r-3", "url": NaN}'
lines[5] = lines[4]
lines[7] = '{"custom_id": "r-7", "method": "POST", "url": "/v1/chat/completions", "body": {}}'
lines[9] = json.dumps({"url": "/v1/chat/completions", "body": {"model": "m", "input": [1, 2]}})
(folder / "in.jsonl").write_text("\n".join(lines) + "\n")

async def main():
    clock = VirtualClock()
    rules = (
        LineErrorRule(status=400, predicate=lambda cid: cid.endswith("1"), code="bad"),
        LineErrorRule(status=500, predicate=lambda cid: cid.endswith("2")),
    )
    config = FakeConfig(validation_seconds=1, lines_per_second=10, line_errors=rules)
    service = FakeBatchService(clock=clock, config=config, seed=0)
    async with BatchClient(api_key="sk-x", base_url="http://fake.invalid/v1",
                           transport=service.transport(), clock=clock,
                           retry=RetryPolicy.for_testing()) as client, clock.auto_advance():
        run = BatchRun(client, folder / "in.jsonl", journal=folder / "run.journal",
                       output=folder / "out.jsonl",
                       config=RunConfig(max_lines=16, max_rounds=1, skip_invalid=True))
        report = await run.run()
    print(json.dumps({
        "fast": _json.FAST,
        "report": [report.requests, report.succeeded, report.failed, report.skipped,
                   dict(report.errors), report.input_tokens, report.output_tokens],
        "output": (folder / "out.jsonl").read_text(),
    }))

asyncio.run(main())
"""


def _run(mode: str, folder: Path) -> dict[str, object]:
    folder.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_a_run_without_msgspec_ends_as_one_with_it(tmp_path: Path) -> None:
    """Without msgspec (and with it, when installed) the same run gives the same report
    and the same output file, byte for byte."""
    without = _run("without", tmp_path / "without")
    assert without["fast"] is False
    report = without["report"]
    assert isinstance(report, list)
    assert report[:4] == [37, 28, 9, 3]  # 3 lines skipped, 9 HTTP errors in the end
    with_it = _run("with", tmp_path / "with")
    if not with_it["fast"]:
        pytest.skip("msgspec is not installed: only the run without it was made")
    assert with_it["report"] == without["report"]
    assert with_it["output"] == without["output"]


@given(
    st.lists(
        st.tuples(
            st.text(st.characters(blacklist_categories=("Cs",))),
            st.integers(-(2**63), 2**63 - 1),
            st.none() | st.booleans() | st.text(),
        ).map(list)
        | st.tuples(st.integers(), st.none())
    )
)
def test_rows_are_written_as_json_dumps_writes_them(rows: list[object]) -> None:
    """The journal's rows for SQLite's JSON functions are the text json.dumps gives
    (compact, non-ASCII as it is), with msgspec as without it."""
    assert _json.dumps(rows) == json.dumps(rows, ensure_ascii=False, separators=(",", ":"))
