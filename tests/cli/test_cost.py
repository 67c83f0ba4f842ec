"""Tokens per model and cost at batch prices in ``aiobatch run`` and ``aiobatch status``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import chat_line

from aiobatch.cli import main


@pytest.fixture
def two_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """A finished ``run --fake`` of requests to two models, with a price for one."""
    source = tmp_path / "in.jsonl"
    lines = [chat_line(f"a-{i}", f"question {i}", model="gpt-4o-mini") for i in range(6)]
    lines += [chat_line(f"b-{i}", f"other {i}", model="gpt-4o") for i in range(4)]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"gpt-4o": {"input": 1.25, "output": 5.0}}), encoding="utf-8")
    output = tmp_path / "out.jsonl"
    argv = ["run", str(source), "-o", str(output), "--fake", "--no-progress"]
    argv += ["--fake-faults", "0", "--fake-transient-errors", "0", "--fake-permanent-errors", "0"]
    assert main([*argv, "--prices", str(prices)]) == 0
    return {"journal": Path(f"{output}.journal"), "prices": prices, "out": capsys.readouterr().out}


def test_status_json_has_tokens_and_cost_per_model(
    two_models: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Tokens per model add up to the run's totals; the cost of a priced model is its
    tokens times its prices per million."""
    argv = ["status", str(two_models["journal"]), "--json", "--prices", str(two_models["prices"])]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    by_model = data["tokens_by_model"]
    assert set(by_model) == {"gpt-4o-mini", "gpt-4o"}
    assert sum(t["input"] for t in by_model.values()) == data["input_tokens"]
    assert sum(t["output"] for t in by_model.values()) == data["output_tokens"]
    mini = by_model["gpt-4o"]
    expected = (mini["input"] * 1.25 + mini["output"] * 5.0) / 1_000_000
    assert data["cost_by_model"] == {"gpt-4o": pytest.approx(expected)}


def test_run_and_status_print_tokens_and_cost(
    two_models: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """The run's report and ``status --prices`` print each model's tokens, its cost
    (or that it has no price) and the total cost."""
    assert main(["status", str(two_models["journal"]), "--prices", str(two_models["prices"])]) == 0
    text = capsys.readouterr().out
    for printed in (text, two_models["out"]):
        assert "tokens by model:" in printed
        assert "gpt-4o-mini:" in printed and "no price given" in printed
        assert "cost at batch prices: $" in printed


def test_a_bad_price_table_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A price table without numeric input/output prices exits 2 naming the model."""
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"gpt-4o": {"input": "cheap"}}), encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        main(["status", str(tmp_path / "j"), "--prices", str(prices)])
    assert info.value.code == 2
    assert "gpt-4o" in capsys.readouterr().err
