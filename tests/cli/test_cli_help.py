"""``aiobatch --help`` and each command's help: defaults shown once as real values,
units named, examples and exit statuses at the end, and ``--version``."""

from __future__ import annotations

import re

import pytest

import aiobatch
from aiobatch.cli import COMMANDS, main


def help_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What ``aiobatch ARGV`` prints and exits 0 with."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    return capsys.readouterr().out


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    """``aiobatch --version`` prints the installed version."""
    assert help_of(["--version"], capsys).strip() == f"aiobatch {aiobatch.__version__}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_defaults_are_shown_once_as_real_values(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """No option's help shows a default of None, False, [] or a Python tuple, nor two
    defaults."""
    text = " ".join(help_of([name, "--help"], capsys).split())
    for bad in ("default: None", "default: False", "default: True", "default: []", "default: ("):
        assert bad not in text, (name, bad)
    for option in re.split(r"\s(?=--?\w)", text):
        assert option.count("default:") <= 1, option


def test_durations_and_fractions_name_their_units(capsys: pytest.CaptureFixture[str]) -> None:
    """Duration options take DURATION with an example and the real default; fractions
    say 0-1."""
    text = " ".join(help_of(["run", "--help"], capsys).split())
    assert "--poll-min DURATION the shortest pause between polls, e.g. 1s or 1m" in text
    assert "(default: 5s)" in text
    assert "--fake-faults 0-1" in text


@pytest.mark.parametrize(
    "name", ["run", "failures", "watch", "status", "cancel", "fake-server", "demo", "diagram"]
)
def test_help_ends_with_examples(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The command's help ends with an examples section naming the command."""
    text = help_of([name, "--help"], capsys)
    examples = text[text.index("\nexamples:\n") :]
    assert f"aiobatch {name} " in examples
