"""The ``aiobatch`` command line: argument handling in-process, one real server as a subprocess."""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import importlib
import json
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from openai import AsyncOpenAI

import aiobatch.cli
import aiobatch.testing
from aiobatch.cli import COMMANDS, _command, build_parser, command, main
from aiobatch.cli._args import duration
from aiobatch.cli._fake import build_fake_service, describe, fault_rules, serve
from aiobatch.testing._faults import FaultKind


def _fake_server_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["fake-server", *argv])


# -- in-process ------------------------------------------------------------------------


def test_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    """``aiobatch --help`` exits 0 and names fake-server."""
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "fake-server" in capsys.readouterr().out


def test_no_subcommand_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    """``aiobatch`` alone prints the usage and returns 2."""
    assert main([]) == 2
    assert "usage: aiobatch" in capsys.readouterr().out


def test_fake_server_help_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """``aiobatch fake-server --help`` documents the timing, fault and key flags."""
    with pytest.raises(SystemExit) as info:
        main(["fake-server", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--host",
        "--port",
        "--api-key",
        "--access-log",
        "--validation-seconds",
        "--lines-per-second",
        "--finalizing-seconds",
        "--cancel-seconds",
        "--completion-window",
        "--fault-rate",
        "--fault-statuses",
        "--retry-after",
        "--drop-rate",
        "--drop-after",
        "--slow",
        "--slow-rate",
        "--malformed-rate",
        "--line-error-rate",
        "--fault-path",
        "--seed",
    ):
        assert flag in out, flag


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("10m", 600.0),
        ("24h", 86400.0),
        ("2d", 172800.0),
        (".5", 0.5),
    ],
)
def test_duration_parses_units(text: str, seconds: float) -> None:
    """Durations accept bare seconds and ms/s/m/h/d suffixes."""
    assert duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "argv",
    [
        ["--fault-rate", "1.5"],
        ["--drop-rate", "-0.1"],
        ["--port", "70000"],
        ["--validation-seconds", "soon"],
        ["--fault-statuses", "200"],
        ["--lines-per-second", "-1"],
    ],
)
def test_bad_arguments_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Out-of-range or malformed values exit 2 with a message."""
    with pytest.raises(SystemExit) as info:
        main(["fake-server", *argv])
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


#: Every flag of the command line that takes a fraction (a share, 0 to 1), and the
#: arguments its command needs besides it.
FRACTION_FLAGS = [
    *(
        (["fake-server"], flag)
        for flag in (
            "--fault-rate",
            "--drop-rate",
            "--slow-rate",
            "--malformed-rate",
            "--line-error-rate",
            "--webhook-drop",
            "--webhook-duplicate",
            "--webhook-delay",
            "--webhook-reorder",
        )
    ),
    *((["demo"], flag) for flag in ("--fault-rate", "--line-error-rate")),
    *(
        (["run", "in.jsonl", "-o", "out.jsonl", "--fake"], flag)
        for flag in ("--fake-faults", "--fake-transient-errors", "--fake-permanent-errors")
    ),
]


@pytest.mark.parametrize("value", ["10", "-0.1", "abc", "nan"])
@pytest.mark.parametrize(("command", "flag"), FRACTION_FLAGS)
def test_fractions_out_of_range_are_usage_errors(
    command: list[str],
    flag: str,
    value: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Every fraction flag refuses a value outside 0..1 (or not a number) at parse time:
    exit 2 naming the flag, no traceback."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main([*command, flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err
    assert "Traceback" not in err


def test_every_share_flag_is_checked_as_a_fraction() -> None:
    """Every option whose help says it is a share of something is in FRACTION_FLAGS (so
    the test above checks it)."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    shares = {
        (name, option)
        for name, sub in subparsers.choices.items()
        for action in sub._actions
        if (action.help or "").startswith("share of")
        for option in action.option_strings
        if option.startswith("--")
    }
    assert shares == {(command[0], flag) for command, flag in FRACTION_FLAGS}


def test_timing_flags_reach_the_service_config() -> None:
    """Timing, window, key and line-error flags configure the fake service."""
    args = _fake_server_args(
        "--validation-seconds",
        "2s",
        "--lines-per-second",
        "50",
        "--finalizing-seconds",
        "250ms",
        "--cancel-seconds",
        "3",
        "--completion-window",
        "1h",
        "--line-error-rate",
        "0.2",
        "--api-key",
        "sk-cli",
    )
    service = build_fake_service(args)
    config = service.config
    assert config.validation_seconds == 2.0
    assert config.lines_per_second == 50.0
    assert config.finalizing_seconds == 0.25
    assert config.cancel_seconds == 3.0
    assert config.completion_window_seconds == 3600.0
    (rule,) = config.line_errors
    assert (rule.status, rule.ratio) == (500, 0.2)
    assert len(service.faults) == 0


def test_defaults_finish_a_small_batch_in_seconds() -> None:
    """With no flags a few-line batch goes through every stage within a few seconds."""
    config = build_fake_service(_fake_server_args()).config
    total = config.validation_seconds + 10 / config.lines_per_second + config.finalizing_seconds
    assert 0 < total <= 5


def test_banner_describes_the_service() -> None:
    """The start-up line shows the stage times, the fault count and the key check."""
    service = build_fake_service(
        _fake_server_args("--validation-seconds", "3", "--fault-rate", "0.1", "--api-key", "k")
    )
    text = describe(service, key_required=True)
    assert "validating 3s" in text
    assert "3 fault rules" in text
    assert "api key required" in text


#: What each dialect's banner must name, and headers that, per the banner, make a
#: request with any key (the --api-key one, when given) acceptable.
BANNER_HEADERS: dict[str, tuple[str, dict[str, str]]] = {
    "openai": ("Authorization: Bearer KEY", {"Authorization": "Bearer {key}"}),
    "azure": ("api-key: KEY", {"api-key": "{key}"}),
    "portkey": (
        "x-portkey-api-key: KEY",
        {"x-portkey-api-key": "{key}", "x-portkey-provider": "@openai-prod"},
    ),
    "anthropic": (
        "x-api-key: KEY",
        {"x-api-key": "{key}", "anthropic-version": "2023-06-01"},
    ),
}
#: Where each dialect lists its batches, under the printed base URL.
LIST_PATHS = {"anthropic": "/v1/messages/batches"}


async def _serve_in_task(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[asyncio.Task[int], str, str]:
    """``serve()`` as ``aiobatch fake-server ARGV`` runs it, in a task: the task, the
    printed base URL and the banner line."""
    args = _fake_server_args("--port", "0", *argv)
    service = build_fake_service(args)
    task = asyncio.ensure_future(
        serve(
            service,
            host=args.host,
            port=args.port,
            banner=describe(service, key_required=args.api_key is not None),
        )
    )
    printed = ""
    while "Press Ctrl-C" not in printed:
        assert not task.done(), capsys.readouterr()
        await asyncio.sleep(0)  # a turn of the loop: the server binds, then prints
        printed += capsys.readouterr().out
    match = re.search(r"listening on (\S+)\n  (.*)\n", printed)
    assert match is not None, printed
    return task, match.group(1), match.group(2)


@pytest.mark.parametrize("dialect", sorted(BANNER_HEADERS))
@pytest.mark.parametrize("fixed_key", [False, True])
async def test_banner_says_how_to_call_the_printed_url(
    dialect: str, fixed_key: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fake server's printed base URL answers, with the key headers its banner
    names: any key (or only the --api-key one) is accepted, none is refused with 401;
    the banner never claims the key is not checked and never shows the key."""
    argv = ["--dialect", dialect, *(["--api-key", "sk-cli-secret"] if fixed_key else [])]
    task, base_url, banner = await _serve_in_task(argv, capsys)
    named, headers = BANNER_HEADERS[dialect]
    try:
        assert named in banner
        assert "not checked" not in banner
        assert "sk-cli-secret" not in banner
        assert ("only the --api-key key" if fixed_key else "any key") in banner

        def with_key(key: str) -> dict[str, str]:
            return {name: value.format(key=key) for name, value in headers.items()}

        async with aiohttp.ClientSession() as http:

            async def status(sent: dict[str, str]) -> int:
                path = LIST_PATHS.get(dialect, "/batches")
                async with http.get(f"{base_url}{path}", headers=sent) as resp:
                    return resp.status

            # (Anthropic's version header, required too, is no key.)
            no_key = {name: value for name, value in headers.items() if "{key}" not in value}
            assert await status(no_key) == 401
            assert await status(with_key("sk-cli-secret")) == 200
            assert await status(with_key("sk-whatever")) == (401 if fixed_key else 200)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_no_fault_flags_no_rules() -> None:
    """Without fault flags the service is well behaved."""
    assert fault_rules(_fake_server_args()) == []


def test_fault_rate_is_split_evenly_and_exactly() -> None:
    """--fault-rate over N statuses: first-match rules whose total rate is exactly the flag."""
    rules = fault_rules(
        _fake_server_args(
            "--fault-rate", "0.3", "--fault-statuses", "429,500,503", "--retry-after", "2"
        )
    )
    assert [r.kind for r in rules] == [FaultKind.HTTP] * 3
    assert [r.status for r in rules] == [429, 500, 503]
    assert [r.retry_after for r in rules] == [2.0, None, 2.0]
    assert all(r.times is None and r.path == "*" for r in rules)
    # Chance that rule i is the one that fires, given rules are tried in order.
    left, shares = 1.0, []
    for r in rules:
        shares.append(left * r.probability)
        left *= 1 - r.probability
    assert shares == pytest.approx([0.1, 0.1, 0.1])


def test_drop_slow_and_malformed_flags_make_rules() -> None:
    """Drop, slow, malformed and --fault-path flags map to rules in a fixed order."""
    rules = fault_rules(
        _fake_server_args(
            "--drop-rate",
            "0.05",
            "--drop-after",
            "--malformed-rate",
            "0.01",
            "--slow",
            "1.5s",
            "--slow-rate",
            "0.5",
            "--fault-path",
            "/batches*",
        )
    )
    assert [(r.kind, r.probability) for r in rules] == [
        (FaultKind.DROP_AFTER, 0.05),
        (FaultKind.MALFORMED, 0.01),
        (FaultKind.SLOW, 0.5),
    ]
    assert rules[2].delay == 1.5
    assert {r.path for r in rules} == {"/batches*"}


def test_fault_flags_arm_the_service() -> None:
    """The service built from the flags has the rules armed."""
    service = build_fake_service(_fake_server_args("--drop-rate", "0.1", "--fault-rate", "0.2"))
    assert len(service.faults) == 1 + 3


def test_new_subcommands_plug_in(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A function registered with command() becomes a subcommand with its own arguments."""
    monkeypatch.setattr(_command, "COMMANDS", dict(COMMANDS))

    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--name", default="world")

    @command("hello", "say hello", configure)
    def hello(args: argparse.Namespace) -> int:
        print(f"hello {args.name}")
        return 7

    assert main(["hello", "--name", "batch"]) == 7
    assert capsys.readouterr().out == "hello batch\n"
    assert "fake-server" in _command.COMMANDS


def _relative_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(level, module, names) of every relative import in a file, also inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        (node.level, node.module or "", [alias.name for alias in node.names])
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]


def test_cli_modules_import_one_way_and_only_public_testing_names() -> None:
    """No module of the aiobatch.cli package imports one that imports it (the package
    itself included), and of aiobatch.testing the CLI uses only its public names."""
    folder = Path(aiobatch.cli.__file__).parent
    modules = {path.stem: path for path in folder.glob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for level, module, names in _relative_imports(path):
            if level == 1:
                targets = [module] if module else [n if n in modules else "__init__" for n in names]
                edges[name].update(t.partition(".")[0] for t in targets)
            elif level == 2 and module.partition(".")[0] == "testing":
                assert module == "testing", f"{name} imports aiobatch.{module}"
                private = sorted(set(names) - set(aiobatch.testing.__all__))
                assert not private, f"{name} imports {private} from aiobatch.testing"
    assert edges["__init__"], "the package imports its command modules"
    for name in modules:
        if name != "__init__":
            assert "__init__" not in edges[name], f"{name} imports the package"

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cyclic = sorted(name for name in modules if reaches(name, name, {name}))
    assert not cyclic, f"import cycle through {cyclic}"


def test_the_aiobatch_script_runs_main() -> None:
    """pyproject's ``aiobatch`` script names the CLI's main."""
    pyproject = (Path(aiobatch.__file__).parent.parent / "pyproject.toml").read_text()
    match = re.search(r'^aiobatch = "([\w.]+):(\w+)"$', pyproject, flags=re.M)
    assert match is not None
    target = getattr(importlib.import_module(match.group(1)), match.group(2))
    assert target is main


def test_port_in_use_fails_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    """A port that is taken: exit status 1 and a message, no traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert main(["fake-server", "--port", str(taken)]) == 1
    err = capsys.readouterr().err
    assert "cannot listen" in err
    assert "Traceback" not in err


# -- a real server in a subprocess -----------------------------------------------------

URL_LINE = re.compile(r"listening on (http://\S+/v1)")


@pytest.fixture
async def fake_server() -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """``aiobatch fake-server`` on a free port with near-zero stage times and a key."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiobatch",
        "fake-server",
        "--port",
        "0",
        "--api-key",
        "sk-test",
        "--validation-seconds",
        "0",
        "--finalizing-seconds",
        "0",
        "--lines-per-second",
        "1000000",
        "--access-log",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode()
        match = URL_LINE.search(line)
        assert match, f"unexpected first line {line!r}"
        yield proc, match.group(1)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _stop(proc: asyncio.subprocess.Process, sig: signal.Signals) -> tuple[int, str, str]:
    proc.send_signal(sig)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
async def test_fake_server_subprocess_serves_a_batch_and_stops(
    fake_server: tuple[asyncio.subprocess.Process, str],
) -> None:
    """The real server completes a batch for the openai SDK, needs the key, stops on SIGTERM."""
    proc, base_url = fake_server
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/batches") as resp:
        assert resp.status == 401
    lines = "".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            }
        )
        + "\n"
        for i in range(3)
    )
    async with AsyncOpenAI(api_key="sk-test", base_url=base_url, max_retries=0) as client:
        uploaded = await client.files.create(file=("in.jsonl", lines.encode()), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        # Stage times are zero: a few polls see it finish; no real waiting.
        for _ in range(50):
            batch = await client.batches.retrieve(batch.id)
            if batch.status == "completed":
                break
        assert batch.status == "completed"
        assert batch.output_file_id is not None
        content = await client.files.content(batch.output_file_id)
        ids = sorted(json.loads(line)["custom_id"] for line in content.text.splitlines())
        assert ids == ["r0", "r1", "r2"]
    code, out, err = await _stop(proc, signal.SIGTERM)
    assert code == 0, err
    assert "stopped" in out
    assert "POST /v1/batches" in err  # --access-log: one line per request


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
async def test_fake_server_subprocess_stops_on_ctrl_c(
    fake_server: tuple[asyncio.subprocess.Process, str],
) -> None:
    """SIGINT (Ctrl-C) stops the server cleanly with status 0 and no traceback."""
    proc, _ = fake_server
    code, out, err = await _stop(proc, signal.SIGINT)
    assert code == 0
    assert "stopped" in out
    assert "Traceback" not in err
