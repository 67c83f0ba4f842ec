"""Tokens per model and their cost at batch prices, for ``run`` and ``status``.

A price table is a small JSON (or, on Python 3.11+, TOML) file: for each model, the
price of a million prompt (``input``) and completion (``output``) tokens at batch
prices, e.g. ``{"gpt-4o-mini": {"input": 0.075, "output": 0.30}}``. Tokens come from the
run's final results (each request counted once, whatever batch answered it).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping

__all__ = ["Prices", "cost_lines", "prices_file"]

#: Model -> (price per million input tokens, per million output tokens).
Prices = Mapping[str, tuple[float, float]]


def prices_file(path: str) -> dict[str, tuple[float, float]]:
    """Read a price table (an argparse type: a bad file is a usage error)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if path.endswith(".toml"):
            import tomllib  # type: ignore[import-not-found,unused-ignore]

            data = tomllib.loads(raw.decode())
        else:
            data = json.loads(raw)
    except ImportError:
        raise argparse.ArgumentTypeError(
            f"{path}: TOML needs Python 3.11+; give the prices as JSON"
        ) from None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{path}: not a price table: {exc}") from None
    table: dict[str, tuple[float, float]] = {}
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError(f"{path}: expected {{model: {{input, output}}}}")
    for model, entry in data.items():
        try:
            table[str(model)] = (float(entry["input"]), float(entry["output"]))
        except (TypeError, KeyError, ValueError):
            raise argparse.ArgumentTypeError(
                f"{path}: {model!r} needs numeric 'input' and 'output' prices per million tokens"
            ) from None
    return table


def cost_lines(tokens: Mapping[str, tuple[int, int]], prices: Prices | None) -> list[str]:
    """One line per model: its tokens, and its cost when ``prices`` has it; a total."""
    lines = []
    total = 0.0
    priced = False
    for model, (tin, tout) in sorted(tokens.items()):
        line = f"  {model or '(no model)'}: {tin:,} in, {tout:,} out"
        if prices is not None and model in prices:
            pin, pout = prices[model]
            cost = (tin * pin + tout * pout) / 1_000_000
            total += cost
            priced = True
            line += f", ${cost:,.4f}"
        elif prices is not None:
            line += ", no price given"
        lines.append(line)
    if not lines:
        return []
    head = ["tokens by model:"]
    if priced:
        lines.append(f"cost at batch prices: ${total:,.4f}")
    return head + lines
