"""The public surface: what is exported, and that the README stays true to the code."""

from __future__ import annotations

import re
from pathlib import Path

import aiobatch
import aiobatch.errors
import aiobatch.testing
import aiobatch.transport
import aiobatch.webhooks
from aiobatch._lifecycle import mermaid_diagram
from aiobatch._run._states import mermaid_diagram as shard_diagram

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
PUBLIC = [aiobatch, aiobatch.errors, aiobatch.testing, aiobatch.transport, aiobatch.webhooks]


def test_every_public_module_exports_a_sorted_complete_all() -> None:
    """Each public module lists every name it exports, sorted, and each name exists."""
    for module in PUBLIC:
        names = list(module.__all__)
        assert names == sorted(names), module.__name__
        assert len(names) == len(set(names)), module.__name__
        for name in names:
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_public_classes_are_reachable_from_their_package() -> None:
    """Classes a user needs are importable from the documented public paths."""
    assert aiobatch.BatchClient.__name__ == "BatchClient"
    assert aiobatch.transport.AiohttpTransport.__name__ == "AiohttpTransport"
    assert aiobatch.testing.FakeBatchService.__name__ == "FakeBatchService"
    assert issubclass(aiobatch.errors.RateLimitError, aiobatch.errors.APIStatusError)
    for provider in ("OpenAIProvider", "PortkeyProvider", "AzureOpenAIProvider"):
        assert provider in aiobatch.__all__
    assert "CompatibleProvider" in aiobatch.__all__
    assert "FakeDialect" in aiobatch.testing.__all__
    assert issubclass(aiobatch.errors.ConfigurationError, ValueError)
    assert aiobatch.Worker.__name__ == "Worker"  # a worker of a run shared on PostgreSQL


def test_readme_names_no_private_module() -> None:
    """The README sends users to public import paths only (never ``aiobatch._x``)."""
    assert re.findall(r"aiobatch\._\w+", README) == []


def test_package_ships_py_typed() -> None:
    """The package is marked as typed."""
    assert (Path(aiobatch.__file__).parent / "py.typed").exists()


def test_readme_diagrams_are_generated_from_the_tables() -> None:
    """The README's Mermaid diagrams are exactly what the batch and shard tables produce."""
    blocks = re.findall(r"```mermaid\n(.*?)\n```", README, flags=re.S)
    assert blocks == [mermaid_diagram(), shard_diagram()], (
        "run `aiobatch diagram` and `aiobatch diagram --shard` and paste them into README.md"
    )


def test_readme_python_examples_compile() -> None:
    """Every Python example in the README is valid Python."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks
    for block in blocks:
        compile(block, "README.md", "exec")


def test_readme_opens_with_the_two_commands_ci_runs() -> None:
    """README starts with the main job on the fake and the test command, and .ci/run runs
    both."""
    first_block = re.search(r"```sh\n(.*?)\n```", README, flags=re.S)
    assert first_block is not None
    assert README.index(first_block.group(0)) < README.index("\n## ")
    demo, tests = first_block.group(1).splitlines()
    assert "aiobatch run aiobatch/examples/requests.jsonl" in demo
    assert "--fake" in demo
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert tests in ci
    assert demo in ci
