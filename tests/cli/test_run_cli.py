"""``aiobatch run``, ``aiobatch status`` and ``aiobatch cancel``, in-process.

``run --fake`` drives the built-in fake service in memory on a virtual clock; the tests
check the exit status, the output file against the input, the printed report against
the output file, and what the journal holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    EXAMPLE,
    batch_ids_in,
    cancelled_at_start,
    chat_line,
    client_for,
    is_success,
    make_requests,
    read_output,
    run_argv,
    serve,
)

from aiobatch import BatchRun, RunConfig
from aiobatch._run._sqlite import JournalFile as Journal
from aiobatch.cli import _run as cli_run
from aiobatch.cli import main
from aiobatch.cli._run import EXAMPLE_REQUESTS
from aiobatch.testing import FakeBatchService, FakeConfig, Fault, VirtualClock, make_app

REPORT_COUNTS = re.compile(
    r"requests: ([\d,]+) \(([\d,]+) succeeded, ([\d,]+) failed, ([\d,]+) pending\)"
)


def example_ids() -> list[str]:
    """The custom_ids of the bundled example file, in order."""
    with EXAMPLE.open(encoding="utf-8") as fh:
        return [json.loads(line)["custom_id"] for line in fh if line.strip()]


def printed_counts(text: str) -> tuple[int, int, int, int]:
    """(requests, succeeded, failed, pending) from a printed report."""
    match = REPORT_COUNTS.search(text)
    assert match is not None, text
    requests, succeeded, failed, pending = (int(g.replace(",", "")) for g in match.groups())
    return requests, succeeded, failed, pending


def journal_meta(path: Path) -> dict[str, str]:
    """The journal's meta values."""
    with Journal(path, readonly=True) as journal:
        return journal.meta_values()


@pytest.fixture
def finished(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """A finished ``aiobatch run --fake`` of the example file: its paths and what it
    printed."""
    output = tmp_path / "out.jsonl"
    code = main(run_argv(output))
    captured = capsys.readouterr()
    return {
        "code": code,
        "output": output,
        "journal": Path(f"{output}.journal"),
        "out": captured.out,
        "err": captured.err,
    }


async def _cancelled_run(source: Path, journal: Path) -> str:
    """Run ``source`` on a library fake and cancel it at its first progress report;
    returns the journal's state."""
    clock = VirtualClock()
    service = FakeBatchService(clock=clock, config=FakeConfig())
    async with (
        client_for(clock, service.transport()) as client,
        clock.auto_advance(),
    ):
        report = await cancelled_at_start(client, source, journal)
    return report.state


# --- run ---------------------------------------------------------------------------------


def test_fake_run_writes_one_result_per_request(finished: dict[str, Any]) -> None:
    """``aiobatch run --fake`` exits 1 (finished, some requests failed), writes one
    result per input custom_id in input order, and prints counts that match the output
    file."""
    assert finished["code"] == 1, finished["err"]
    lines = read_output(finished["output"])
    ids = example_ids()
    assert len(ids) == 2000
    assert [line["custom_id"] for line in lines] == ids
    succeeded = sum(1 for line in lines if is_success(line))
    assert printed_counts(finished["out"]) == (len(ids), succeeded, len(ids) - succeeded, 0)
    assert "done" in finished["out"]


def test_rerun_with_the_same_journal_does_no_new_work(
    finished: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Running the same command again exits as the first run did, sends nothing, adds no
    batch, and writes the same output."""
    assert finished["code"] == 1
    before = finished["output"].read_bytes()
    batches = batch_ids_in(finished["journal"])
    services: list[FakeBatchService] = []
    real = cli_run.fake_environment

    def recording(**kwargs: Any) -> tuple[FakeBatchService, VirtualClock]:
        service, clock = real(**kwargs)
        services.append(service)
        return service, clock

    monkeypatch.setattr(cli_run, "fake_environment", recording)
    finished["output"].unlink()
    assert main(run_argv(finished["output"])) == 1
    again = capsys.readouterr().out
    assert finished["output"].read_bytes() == before
    assert batch_ids_in(finished["journal"]) == batches
    assert printed_counts(again) == printed_counts(finished["out"])
    assert len(services) == 1
    assert services[0].requests == ()


PROGRESS_LINE = re.compile(
    r"^([\d,]+)/([\d,]+) requests \(([\d,]+) ok, ([\d,]+) failed, [\d,]+ retrying\)"
    r".* \| (\S+) elapsed, done$"
)


def test_final_progress_line_is_printed_once_and_agrees_with_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A run logs its final progress line once, with the report's requests, outcomes
    and elapsed time; so does the same command run again on the finished journal."""
    caplog.set_level(logging.INFO, logger="aiobatch.run")
    output = tmp_path / "out.jsonl"
    for _ in range(2):
        caplog.clear()
        assert main(run_argv(output)) == 1
        report = capsys.readouterr().out
        lines = [
            r.getMessage()
            for r in caplog.records
            if r.name == "aiobatch.run" and " requests (" in r.getMessage()
        ]
        finals = [line for line in lines if line.endswith(", done")]
        assert len(finals) == 1 and lines[-1] == finals[0], lines
        match = PROGRESS_LINE.match(finals[0])
        assert match is not None, finals[0]
        done, total, ok, failed = (int(g.replace(",", "")) for g in match.groups()[:4])
        requests, succeeded, failed_requests, pending = printed_counts(report)
        assert (done, total, ok, failed) == (
            requests - pending,
            requests,
            succeeded,
            failed_requests,
        )
        elapsed = re.search(r": done, (\S+) elapsed", report)
        assert elapsed is not None, report
        assert match.group(5) == elapsed.group(1)


# --- status --------------------------------------------------------------------------------


def test_status_prints_the_report(
    finished: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """``aiobatch status JOURNAL`` prints the run's report with the output's counts."""
    assert main(["status", str(finished["journal"])]) == 0
    out = capsys.readouterr().out
    lines = read_output(finished["output"])
    succeeded = sum(1 for line in lines if is_success(line))
    assert printed_counts(out) == (2000, succeeded, 2000 - succeeded, 0)
    assert "done" in out


def test_status_json_matches_the_output(
    finished: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """``aiobatch status --json`` prints JSON whose counts match the output file."""
    assert main(["status", str(finished["journal"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    lines = read_output(finished["output"])
    succeeded = sum(1 for line in lines if is_success(line))
    assert data["state"] == "done"
    assert data["requests"] == len(lines) == 2000
    assert data["succeeded"] == succeeded
    assert data["failed"] == len(lines) - succeeded
    assert data["pending"] == 0
    assert sum(data["errors"].values()) == data["failed"]
    assert data["output"] == str(finished["output"].resolve())


def test_status_of_a_missing_journal_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``aiobatch status`` on a missing journal exits 1 naming the path."""
    missing = tmp_path / "nope.journal"
    assert main(["status", str(missing)]) == 1
    captured = capsys.readouterr()
    assert str(missing) in captured.err
    assert "no journal" in captured.err
    assert not missing.exists()


def snapshot(journal: Path, target: Path) -> None:
    """Copy what a kill of the run at this moment leaves: the journal's committed state,
    with no process holding it."""
    source = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
    finally:
        copy.close()
        source.close()


def status_json(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """``aiobatch status --json PATH``, decoded."""
    capsys.readouterr()
    assert main(["status", str(path), "--json"]) == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


@pytest.mark.parametrize("cancelling", [False, True])
async def test_status_tells_a_killed_run_from_a_live_one(
    cancelling: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """While a run goes on, ``aiobatch status`` says ``running`` (live); on the journal a
    kill leaves (running, or cancelling after a Ctrl-C), it says ``interrupted`` (not
    live) with what to do, and the elapsed time up to the run's last record (it notes the
    time every cancel_poll_interval, and when it starts cancelling)."""
    source = make_requests(tmp_path / "in.jsonl", 20)
    journal = tmp_path / "run.journal"
    killed = tmp_path / "killed.journal"
    clock = VirtualClock()
    started = clock.now()
    service = FakeBatchService(
        clock=clock,
        config=FakeConfig(lines_per_second=0.01, cancel_seconds=1000.0),
    )
    async with (
        client_for(clock, service.transport()) as client,
        clock.auto_advance(),
    ):
        run = BatchRun(client, source, journal=journal, config=RunConfig(cancel_poll_interval=5.0))
        runner = asyncio.ensure_future(run.run())
        while clock.now() < started + 102.5:
            await clock.sleep(0.5)
        last_step = clock.now()
        if cancelling:
            run.cancel()
            while journal_meta(journal).get("state") != "cancelling":
                await clock.sleep(0.5)
        else:
            last_step -= 5.0  # the run notes the time every cancel_poll_interval
        live = status_json(journal, capsys)
        killed_at = clock.now()
        snapshot(journal, killed)
        run.stop()
        await runner

    assert live["state"] == ("cancelling" if cancelling else "running")
    assert live["live"] is True

    dead = status_json(killed, capsys)
    assert dead["state"] == "interrupted"
    assert dead["live"] is False
    assert last_step - started <= dead["elapsed"] <= killed_at - started
    assert main(["status", str(killed)]) == 0
    text = capsys.readouterr().out
    assert f"run {dead['run_id']}: interrupted (no process is running it" in text
    assert "run the same command again to resume" in text


# --- a reader that went away (``| head -0``) -----------------------------------------------


def into_closed_pipe(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m aiobatch ARGV`` with its stdout on a pipe whose reader has already
    gone (as ``aiobatch ... | head -0``): every write to it fails."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "aiobatch", *argv],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write)


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_status_into_a_closed_pipe_exits_0_quietly(
    extra: list[str], finished: dict[str, Any], tmp_path: Path
) -> None:
    """``aiobatch status J | head -0`` exits 0 with nothing on stderr (no
    BrokenPipeError traceback)."""
    done = into_closed_pipe("status", str(finished["journal"]), *extra, cwd=tmp_path)
    assert done.stderr == ""
    assert done.returncode == 0


def test_run_into_a_closed_pipe_exits_with_the_runs_own_status(tmp_path: Path) -> None:
    """``aiobatch run ... | head -0`` finishes the run, writes the output file and exits
    0 (the run's status), with no traceback or broken-pipe error on stderr."""
    source = make_requests(tmp_path / "in.jsonl", 20)
    output = tmp_path / "out.jsonl"
    done = into_closed_pipe(*run_argv(output, "--fake-faults", "0", source=source), cwd=tmp_path)
    assert "Traceback" not in done.stderr
    assert "Broken pipe" not in done.stderr
    assert done.returncode == 0, done.stderr
    assert len(read_output(output)) == 20


# --- cancel --------------------------------------------------------------------------------


def test_cancel_of_a_finished_run_fails(
    finished: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """``aiobatch cancel`` on a finished run exits 1 saying it is done, and sets no flag."""
    assert main(["cancel", str(finished["journal"])]) == 1
    assert "done" in capsys.readouterr().err
    assert "cancel_requested" not in journal_meta(finished["journal"])


async def test_cancel_flags_a_running_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``aiobatch cancel`` on a journal a run holds exits 0 and sets the cancel flag; the
    run then stops "cancelled"."""
    source = make_requests(tmp_path / "in.jsonl", 20)
    journal = tmp_path / "run.journal"
    clock = VirtualClock()
    service = FakeBatchService(
        clock=clock,
        config=FakeConfig(validation_seconds=30.0, lines_per_second=0.1, finalizing_seconds=10),
    )
    async with (
        client_for(clock, service.transport()) as client,
        clock.auto_advance(),
    ):
        run = BatchRun(client, source, journal=journal)
        runner = asyncio.ensure_future(run.run())
        while not service.batch_ids:
            await clock.sleep(1.0)
        assert main(["cancel", str(journal)]) == 0
        assert "cancel requested" in capsys.readouterr().out
        assert journal_meta(journal).get("cancel_requested")
        report = await runner
    assert report.state == "cancelled"
    assert report.pending > 0


# --- errors --------------------------------------------------------------------------------


def test_preflight_failure_prints_the_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run whose input fails preflight exits 2 (a usage error), prints each problem as
    file:line, and leaves no output and no journal."""
    source = tmp_path / "bad.jsonl"
    streaming = chat_line("b", stream=True)
    source.write_text(
        "\n".join([json.dumps(chat_line("a")), "{oops", json.dumps(streaming)]) + "\n",
        encoding="utf-8",
    )
    output = tmp_path / "out.jsonl"
    assert main(run_argv(output, source=source)) == 2
    err = capsys.readouterr().err
    assert f"{source}:2" in err
    assert f"{source}:3" in err
    assert "stream" in err
    assert not output.exists()
    assert not Path(f"{output}.journal").exists()


def test_input_file_without_requests_exits_with_the_usage_error_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run of an input file holding only blank lines exits 2 and says the file holds
    no requests, and leaves no output and no journal."""
    source = tmp_path / "blank.jsonl"
    source.write_text("\n\n   \n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    assert main(run_argv(output, source=source)) == 2
    err = capsys.readouterr().err
    assert str(source) in err
    assert "no requests" in err
    assert not output.exists()
    assert not Path(f"{output}.journal").exists()


def test_run_with_a_bad_option_value_exits_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``aiobatch run --max-rounds -1`` exits with a usage error naming the option, not a
    Python traceback (and sends nothing)."""
    source = make_requests(tmp_path / "in.jsonl", 2)
    argv = ["run", str(source), "-o", str(tmp_path / "out.jsonl"), "--fake", "-q"]
    code = main([*argv, "--max-rounds", "-1"])
    assert code in (1, 2)
    assert "max-rounds" in capsys.readouterr().err.replace("_", "-")
    assert not (tmp_path / "out.jsonl.journal").exists()


@pytest.mark.parametrize(
    ("provider", "variable"),
    [
        ("openai", "OPENAI_API_KEY"),
        ("portkey", "PORTKEY_API_KEY"),
        ("azure", "AZURE_OPENAI_API_KEY"),
        ("anthropic", "ANTHROPIC_API_KEY"),
    ],
)
def test_run_without_the_key_stops_before_any_work(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    provider: str,
    variable: str,
) -> None:
    """``aiobatch run`` with the provider's key variable unset exits 2 at once with a
    message naming the variable, before the input is checked or a journal is made."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "PORTKEY_API_KEY", "AZURE_OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AZURE_OPENAI_AD_TOKEN", raising=False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    monkeypatch.setenv("PORTKEY_PROVIDER", "openai")
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://resource.openai.azure.invalid")

    def no_lookups(*args: Any, **kwargs: Any) -> Any:  # nothing may leave the machine
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookups)
    source = tmp_path / "in.jsonl"
    source.write_text("{not checked yet\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    argv = ["run", str(source), "-o", str(output), "--provider", provider, "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert variable in err, err
    assert "not checked yet" not in err and ":1" not in err, err
    assert not Path(f"{output}.journal").exists()
    assert not output.exists()


async def test_give_up_after_stops_a_run_against_a_server_failing_every_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """``--give-up-after 1s`` against a server answering every call 500: each failed try
    is logged with the time left, and the run exits 4 saying which step kept failing,
    with what error, and that the journal is intact."""
    caplog.set_level(logging.WARNING, logger="aiobatch.run")
    service = FakeBatchService(config=FakeConfig())
    service.faults.add(Fault.http(500, should_retry=False, times=None))
    source = make_requests(tmp_path / "in.jsonl", 3)
    output = tmp_path / "out.jsonl"
    async with serve(make_app(service)) as base_url:
        argv = ["run", str(source), "-o", str(output), "--provider", "compatible"]
        argv += ["--base-url", base_url, "--give-up-after", "1s", "--no-progress"]
        code = await asyncio.to_thread(main, argv)
    err = capsys.readouterr().err
    assert code == 4, err
    assert "shard s000000 (uploading) kept failing" in err, err
    assert "give_up_after 1.0s" in err and "HTTP 500" in err, err
    assert "journal is intact" in err, err
    tries = [r.getMessage() for r in caplog.records if "attempt 1 failed" in r.getMessage()]
    assert tries and "giving up in" in tries[0], tries
    assert journal_meta(Path(f"{output}.journal"))["state"] == "failed"


def test_fake_refuses_to_resume_an_unfinished_journal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``run --fake`` on an unfinished journal exits 2 with a message and leaves the
    journal as it was."""
    source = make_requests(tmp_path / "in.jsonl", 10)
    journal = tmp_path / "run.journal"
    assert asyncio.run(_cancelled_run(source, journal)) == "cancelled"
    before = journal_meta(journal)
    output = tmp_path / "out.jsonl"
    code = main(run_argv(output, "--journal", str(journal), source=source))
    err = capsys.readouterr().err
    assert code == 2
    assert "unfinished" in err
    assert str(journal) in err
    assert not output.exists()
    assert journal_meta(journal) == before


def test_webhook_listen_needs_the_secret_in_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """run --webhook-listen without the secret's variable set is a usage error that
    names the variable, before any work."""
    monkeypatch.delenv("AIOBATCH_TEST_HOOK_SECRET", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    args = ["run", EXAMPLE_REQUESTS, "-o", str(tmp_path / "out.jsonl")]
    args += ["--webhook-listen", "127.0.0.1:0", "--webhook-secret-env", "AIOBATCH_TEST_HOOK_SECRET"]
    assert main(args) == 2
    assert "AIOBATCH_TEST_HOOK_SECRET" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl.journal").exists()


def test_webhook_listen_is_refused_with_the_virtual_clock_fake(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """run --fake --webhook-listen is refused, pointing at fake-server --webhook-url."""
    monkeypatch.setenv("OPENAI_WEBHOOK_SECRET", "whsec_c2VjcmV0")
    args = ["run", EXAMPLE_REQUESTS, "--fake", "-o", str(tmp_path / "out.jsonl")]
    assert main([*args, "--webhook-listen", "127.0.0.1:0"]) == 2
    assert "fake-server --webhook-url" in capsys.readouterr().err


def test_fake_server_webhooks_need_the_secret_in_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """fake-server --webhook-url without the secret's variable set exits 2 naming it."""
    monkeypatch.delenv("AIOBATCH_TEST_HOOK_SECRET", raising=False)
    args = ["fake-server", "--port", "0", "--webhook-url", "http://127.0.0.1:9/webhooks"]
    assert main([*args, "--webhook-secret-env", "AIOBATCH_TEST_HOOK_SECRET"]) == 2
    assert "AIOBATCH_TEST_HOOK_SECRET" in capsys.readouterr().err
