"""The OpenAI-compatible presets (Groq, Gemini): each one's base URL, key variable and
limits, a missing key refused before any work, and a run through each against the fake
(Groq's completion windows longer than 24h accepted where its dialect says so)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aiobatch import (
    BatchClient,
    BatchRun,
    GeminiProvider,
    GroqProvider,
    RetryPolicy,
    RunConfig,
    provider_from_env,
)
from aiobatch.errors import BadRequestError, ConfigurationError
from aiobatch.testing import FakeBatchService, FakeConfig, FakeDialect, VirtualClock, chat_requests

TIMINGS = FakeConfig(validation_seconds=5.0, lines_per_second=2.0, finalizing_seconds=5.0)


@pytest.mark.parametrize(
    ("name", "variable", "url", "max_bytes"),
    [
        ("groq", "GROQ_API_KEY", "https://api.groq.com/openai/v1", 100 * 1024 * 1024),
        (
            "gemini",
            "GEMINI_API_KEY",
            "https://generativelanguage.googleapis.com/v1beta/openai",
            200 * 1024 * 1024,
        ),
    ],
)
def test_preset_reads_its_key_variable_and_knows_its_base_url(
    name: str, variable: str, url: str, max_bytes: int
) -> None:
    """provider_from_env(name) reads the preset's own key variable (not OPENAI_API_KEY),
    sends it as a bearer key to the preset's base URL, and has its limits."""
    provider = provider_from_env(name, environ={variable: "k-preset", "OPENAI_API_KEY": "no"})
    assert provider.name == name
    assert provider.url("/batches") == f"{url}/batches"
    assert provider.headers()["authorization"] == "Bearer k-preset"
    assert provider.limits.max_bytes == max_bytes
    moved = provider_from_env(name, base_url="http://localhost:9/v1/", environ={variable: "k"})
    assert moved.url("/files") == "http://localhost:9/v1/files"


@pytest.mark.parametrize(
    ("name", "variable"), [("groq", "GROQ_API_KEY"), ("gemini", "GEMINI_API_KEY")]
)
def test_preset_without_its_key_is_refused_naming_the_variable(name: str, variable: str) -> None:
    """A preset with no key is refused before any request, naming its key variable."""
    from aiobatch._provider import require_key

    with pytest.raises(ConfigurationError, match=variable):
        require_key(provider_from_env(name, environ={"OPENAI_API_KEY": "sk-other"}))


async def _run(
    clock: VirtualClock,
    tmp_path: Path,
    provider: GroqProvider | GeminiProvider,
    dialect: FakeDialect,
    window: str,
) -> tuple[FakeBatchService, list[dict[str, object]]]:
    service = FakeBatchService(clock=clock, config=TIMINGS, api_key="k", dialect=dialect)
    source = tmp_path / "in.jsonl"
    source.write_bytes(chat_requests(5))
    out = tmp_path / "out.jsonl"
    async with (
        BatchClient(
            provider=provider,
            transport=service.transport(),
            clock=clock,
            retry=RetryPolicy.for_testing(max_attempts=2),
        ) as client,
        clock.auto_advance(),
    ):
        config = RunConfig(completion_window=window, max_lines=2)
        report = await BatchRun(
            client, source, journal=tmp_path / "j", output=out, config=config
        ).run()
    assert report.state == "done"
    return service, [json.loads(x) for x in out.read_text().splitlines()]


async def test_groq_run_with_a_seven_day_window(clock: VirtualClock, tmp_path: Path) -> None:
    """A run through the Groq preset asks for a 7d window, which the fake's Groq-like
    dialect takes: every request answered, every batch created with that window."""
    provider = GroqProvider(api_key="k", base_url="http://fake.groq/v1")
    dialect = FakeDialect.openai(max_completion_window_hours=168)
    service, results = await _run(clock, tmp_path, provider, dialect, "7d")
    assert len(results) == 5 and all(r["error"] is None for r in results)
    windows = {(await service.get_batch(b)).completion_window for b in service.batch_ids}
    assert windows == {"7d"}


async def test_a_window_beyond_what_the_dialect_takes_is_refused(clock: VirtualClock) -> None:
    """OpenAI's dialect takes only 24h; the Groq-like one nothing beyond 7d."""
    for hours, window in ((24, "48h"), (168, "8d"), (168, "12h")):
        service = FakeBatchService(
            clock=clock,
            config=TIMINGS,
            api_key="k",
            dialect=FakeDialect.openai(max_completion_window_hours=hours),
        )
        async with BatchClient(
            provider=GroqProvider(api_key="k", base_url="http://fake/v1"),
            transport=service.transport(),
            clock=clock,
            retry=RetryPolicy.for_testing(),
        ) as client:
            file = await client.upload_file(chat_requests(1), filename="a.jsonl")
            with pytest.raises(BadRequestError, match=f"Invalid value: '{window}'") as info:
                await client.create_batch(file.id, "/v1/chat/completions", completion_window=window)
        assert info.value.error_param == "completion_window"
        assert service.batch_ids == []


async def test_gemini_run_through_the_preset(clock: VirtualClock, tmp_path: Path) -> None:
    """A run through the Gemini preset against the fake: one result per request."""
    provider = GeminiProvider(api_key="k", base_url="http://fake.gemini/v1")
    _service, results = await _run(clock, tmp_path, provider, FakeDialect.openai(), "24h")
    assert sorted(str(r["custom_id"]) for r in results) == sorted(
        str(r["custom_id"]) for r in results
    )
    assert len(results) == 5 and all(r["error"] is None for r in results)
