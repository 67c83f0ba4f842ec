"""What every command shares: argument types for the parser, :func:`out`, and
:func:`webhook_secret` (run receives webhooks, fake-server signs them)."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Callable
from typing import TypeVar

from .._secret import Secret
from ..errors import ConfigurationError

__all__ = [
    "count",
    "duration",
    "duration_text",
    "host_port",
    "non_negative",
    "out",
    "port",
    "positive",
    "rate",
    "statuses",
    "webhook_secret",
]

_N = TypeVar("_N", int, float)


def out(text: str) -> None:
    """Print ``text`` (and a newline) to stdout, at once.

    A reader that went away (``aiobatch status J | head -0``) is not an error: the rest
    of the output goes to ``os.devnull`` (so that Python's flush at exit does not fail
    either), and the command goes on to end with its own exit status.
    """
    try:
        print(text, flush=True)
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, sys.stdout.fileno())
            finally:
                os.close(devnull)


# -- argument types --------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def duration(text: str) -> float:
    """Seconds from ``"90"``, ``"1.5s"``, ``"250ms"``, ``"10m"``, ``"24h"`` or ``"2d"``."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 30, 1.5s, 10m, 24h)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def duration_text(seconds: float) -> str:
    """A duration as the flags take it: ``1s``, ``1.5s``, ``10m``, ``24h``, ``2d``."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _read(text: str, kind: Callable[[str], _N], what: str) -> _N:
    """``text`` read by ``kind`` (``float`` or ``int``); else the flag's error that it is
    not ``what``."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


def rate(text: str) -> float:
    """A probability in [0, 1]."""
    value = _read(text, float, "a number")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def non_negative(text: str) -> float:
    """A number >= 0."""
    value = _read(text, float, "a number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def statuses(text: str) -> tuple[int, ...]:
    """HTTP error statuses from ``"429,500,503"``."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of statuses: {text!r}") from None
    if not values or any(not 400 <= v <= 599 for v in values):
        raise argparse.ArgumentTypeError(f"statuses must be 400-599, got {text!r}")
    return values


def positive(text: str) -> float:
    """A finite number > 0."""
    value = _read(text, float, "a number")
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def count(text: str) -> int:
    """An integer >= 1."""
    value = _read(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def port(text: str) -> int:
    """A TCP port (0 picks a free one)."""
    value = _read(text, int, "a port")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {text}")
    return value


def host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for an IPv6 host) as ``(host, port)``."""
    host, sep, number = text.rpartition(":")
    if not sep or not host or not number.isdigit() or not 0 <= int(number) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(number)


def webhook_secret(variable: str) -> Secret:
    """The webhook signing secret from the environment variable ``variable``.

    Raises:
        ConfigurationError: the variable is unset or empty.
    """
    value = os.environ.get(variable, "").strip()
    if not value:
        raise ConfigurationError(
            f"webhooks need the signing secret (whsec_...) in the environment variable "
            f"{variable}, which is not set"
        )
    return Secret(value)
