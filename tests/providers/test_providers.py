"""Providers as data (headers, URLs, query, limits, quirks, environment) and the
converter's provider quirks (timestamps, statuses, nulls, error envelopes)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import attrs
import pytest

from aiobatch import (
    AZURE_LIMITS,
    MEANINGS,
    OPENAI_LIMITS,
    PORTKEY_BASE_URL,
    AzureOpenAIProvider,
    Batch,
    BatchClient,
    BatchErrors,
    BatchLifecycle,
    BatchStatus,
    CompatibleProvider,
    File,
    Limits,
    OpenAIProvider,
    PortkeyProvider,
    Provider,
    ResultSuccess,
    provider_from_env,
)
from aiobatch._convert import decode, decode_batch_output_line, parse_error_body
from aiobatch.errors import (
    AuthenticationError,
    ConfigurationError,
    DecodeError,
    UnknownStatusError,
)
from aiobatch.transport import InMemoryTransport, Request, Response

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")

S = BatchStatus
T0 = 1_750_000_000


def _batch(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "batch_1",
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-1",
        "completion_window": "24h",
        "status": "validating",
        "created_at": T0,
    }
    body.update(fields)
    return body


# --- providers as data -------------------------------------------------------------------


def test_every_builtin_provider_is_a_provider() -> None:
    """Each built-in dialect satisfies the Provider protocol and names itself."""
    providers = [
        OpenAIProvider(api_key="sk-x"),
        PortkeyProvider(api_key="pk-x", provider="@openai-prod"),
        AzureOpenAIProvider(endpoint="https://r.openai.azure.com", api_key="az-x"),
        CompatibleProvider(base_url="http://localhost:8000/v1"),
    ]
    assert [p.name for p in providers] == ["openai", "portkey", "azure", "compatible"]
    assert all(isinstance(p, Provider) for p in providers)


def test_openai_provider_is_unchanged_and_has_openai_limits() -> None:
    """OpenAIProvider keeps its bearer/org/project headers; limits 50,000 lines, 200 MB."""
    provider = OpenAIProvider(api_key="sk-x", organization="org-1", project="proj-1")
    assert dict(provider.headers()) == {
        "authorization": "Bearer sk-x",
        "openai-organization": "org-1",
        "openai-project": "proj-1",
    }
    assert provider.url("/batches") == "https://api.openai.com/v1/batches"
    assert provider.params() == {}
    assert provider.limits == Limits(50_000, 200 * 1024 * 1024) == OPENAI_LIMITS
    assert provider.quirks.batches_expire
    assert not provider.quirks.batch_output_endpoint


def test_portkey_headers_with_a_slug_a_config_and_a_plain_name() -> None:
    """Portkey sends its key plus provider or config; a provider key only with a plain name."""
    slug = PortkeyProvider(api_key="pk-secret", provider="@openai-prod")
    assert dict(slug.headers()) == {
        "x-portkey-api-key": "pk-secret",
        "x-portkey-provider": "@openai-prod",
    }
    config = PortkeyProvider(api_key="pk-secret", config={"retry": {"attempts": 3}})
    assert dict(config.headers())["x-portkey-config"] == '{"retry":{"attempts":3}}'
    named = PortkeyProvider(api_key="pk-secret", provider="openai", provider_api_key="sk-up")
    assert dict(named.headers())["authorization"] == "Bearer sk-up"
    assert named.base_url == PORTKEY_BASE_URL
    assert named.url("/batches/b/output") == "https://api.portkey.ai/v1/batches/b/output"
    assert named.quirks.batch_output_endpoint
    assert {s.reveal() for s in named.secrets} == {"pk-secret", "sk-up"}


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"api_key": "", "provider": "openai"}, "API key"),
        ({"api_key": "pk"}, "provider"),
        ({"api_key": "pk", "provider": "@slug", "provider_api_key": "sk"}, "plain provider"),
        ({"api_key": "pk", "config": "pc-1", "provider_api_key": "sk"}, "plain provider"),
    ],
)
def test_portkey_refuses_incomplete_settings(kwargs: dict[str, Any], needle: str) -> None:
    """A Portkey provider without a key, a route, or with a misplaced provider key is refused."""
    with pytest.raises(ConfigurationError, match=needle):
        PortkeyProvider(**kwargs)


def test_portkey_from_env_reads_key_provider_config_and_base_url() -> None:
    """PORTKEY_API_KEY, PORTKEY_PROVIDER / PORTKEY_CONFIG and PORTKEY_BASE_URL are read."""
    env = {
        "PORTKEY_API_KEY": "pk-env",
        "PORTKEY_CONFIG": "pc-abc",
        "PORTKEY_BASE_URL": "http://localhost:8787/v1/",
    }
    provider = PortkeyProvider.from_env(environ=env)
    assert (provider.api_key.reveal(), provider.config, provider.provider) == (
        "pk-env",
        "pc-abc",
        None,
    )
    assert provider.base_url == "http://localhost:8787/v1"
    routed = PortkeyProvider.from_env(environ={"PORTKEY_API_KEY": "k", "PORTKEY_PROVIDER": "@x"})
    assert routed.provider == "@x"
    with pytest.raises(ConfigurationError, match="PORTKEY_API_KEY"):
        PortkeyProvider.from_env(environ={"PORTKEY_PROVIDER": "@x"})


def test_azure_v1_and_dated_versions_build_their_paths_and_query() -> None:
    """v1 uses /openai/v1 with no query; a dated version /openai with ?api-version."""
    v1 = AzureOpenAIProvider(endpoint="https://r.openai.azure.com/", api_key="az")
    assert v1.url("/batches") == "https://r.openai.azure.com/openai/v1/batches"
    assert v1.params() == {}
    assert dict(v1.headers()) == {"api-key": "az"}
    dated = AzureOpenAIProvider(
        endpoint="https://r.openai.azure.com", ad_token="entra-token", api_version="2024-10-21"
    )
    assert dated.url("/files") == "https://r.openai.azure.com/openai/files"
    assert dated.params() == {"api-version": "2024-10-21"}
    assert dict(dated.headers()) == {"authorization": "Bearer entra-token"}
    preview = AzureOpenAIProvider(endpoint="https://r", api_key="k", api_version="preview")
    assert preview.url("/batches") == "https://r/openai/v1/batches"
    assert preview.params() == {"api-version": "preview"}
    assert dated.limits == AZURE_LIMITS
    assert AZURE_LIMITS.max_lines == 100_000
    quirks = dated.quirks
    assert quirks.wait_for_processed_file
    assert quirks.empty_error_file
    assert not quirks.batches_expire


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"endpoint": "", "api_key": "k"}, "AZURE_OPENAI_ENDPOINT"),
        ({"endpoint": "r.openai.azure.com", "api_key": "k"}, "resource root"),
        ({"endpoint": "https://r.openai.azure.com?x=1", "api_key": "k"}, "resource root"),
        (
            {
                "endpoint": "https://r.openai.azure.com/openai/v1",
                "api_key": "k",
                "api_version": "2024-10-21",
            },
            "v1 API",
        ),
        ({"endpoint": "https://r.openai.azure.com"}, "neither"),
        ({"endpoint": "https://r.openai.azure.com", "api_key": "k", "ad_token": "t"}, "not both"),
        ({"endpoint": "https://r.openai.azure.com", "api_key": "k", "api_version": ""}, "v1"),
        (
            {"endpoint": "https://r.openai.azure.com", "api_key": "k", "api_version": "24-1"},
            "dated",
        ),
    ],
)
def test_azure_refuses_bad_settings_saying_what_is_wrong(
    kwargs: dict[str, Any], needle: str
) -> None:
    """A missing or malformed endpoint, no or two credentials, a bad api_version are refused."""
    with pytest.raises(ConfigurationError, match=needle):
        AzureOpenAIProvider(**kwargs)


def test_azure_from_env_reads_the_sdk_variables() -> None:
    """AZURE_OPENAI_API_KEY, AZURE_OPENAI_ENDPOINT and OPENAI_API_VERSION are read."""
    env = {
        "AZURE_OPENAI_API_KEY": "az-env",
        "AZURE_OPENAI_ENDPOINT": "https://env.openai.azure.com",
        "OPENAI_API_VERSION": "2025-04-01-preview",
    }
    provider = AzureOpenAIProvider.from_env(environ=env)
    assert provider.base_url == "https://env.openai.azure.com/openai"
    assert provider.params() == {"api-version": "2025-04-01-preview"}
    assert provider.api_key is not None and provider.api_key.reveal() == "az-env"
    token = AzureOpenAIProvider.from_env(ad_token="t", environ=env)
    assert token.api_key is None


def test_compatible_provider_needs_only_a_base_url() -> None:
    """A compatible server takes a base URL and an optional key; no URL is refused."""
    bare = CompatibleProvider(base_url="http://localhost:8000/v1")
    assert dict(bare.headers()) == {}
    assert bare.secrets == ()
    keyed = CompatibleProvider.from_env(environ={"OPENAI_BASE_URL": "http://h/v1"}, api_key="k")
    assert dict(keyed.headers()) == {"authorization": "Bearer k"}
    with pytest.raises(ConfigurationError, match="OPENAI_BASE_URL"):
        CompatibleProvider.from_env(environ={})


def test_no_provider_shows_a_key_in_its_repr_or_its_headers_repr() -> None:
    """Keys are Secrets: neither the provider's repr nor its headers' repr shows one."""
    providers = [
        PortkeyProvider(api_key="pk-hidden-123", provider="openai", provider_api_key="sk-up-456"),
        AzureOpenAIProvider(endpoint="https://r.openai.azure.com", api_key="az-hidden-789"),
        CompatibleProvider(base_url="http://h/v1", api_key="cp-hidden-000"),
    ]
    for provider in providers:
        text = repr(provider) + repr(provider.headers()) + repr(attrs.asdict(provider))
        for secret in ("pk-hidden-123", "sk-up-456", "az-hidden-789", "cp-hidden-000"):
            assert secret not in text


def test_provider_from_env_by_name_and_its_errors() -> None:
    """Names select dialects; an unknown name or a misplaced argument is a clear error."""
    env = {
        "OPENAI_API_KEY": "sk",
        "PORTKEY_API_KEY": "pk",
        "PORTKEY_PROVIDER": "@p",
        "AZURE_OPENAI_API_KEY": "az",
        "AZURE_OPENAI_ENDPOINT": "https://r.openai.azure.com",
        "OPENAI_BASE_URL": "http://local/v1",
    }
    assert isinstance(provider_from_env(" Azure ", environ=env), AzureOpenAIProvider)
    assert isinstance(provider_from_env("portkey", environ=env), PortkeyProvider)
    assert isinstance(provider_from_env("compatible", environ=env), CompatibleProvider)
    assert isinstance(provider_from_env("openai", environ=env), OpenAIProvider)
    with pytest.raises(ConfigurationError, match=r"unknown provider 'bedrock'.*openai, portkey"):
        provider_from_env("bedrock", environ=env)
    with pytest.raises(ConfigurationError, match="AZURE_OPENAI_ENDPOINT"):
        provider_from_env("azure", base_url="https://x", environ=env)
    with pytest.raises(ConfigurationError, match="organization"):
        provider_from_env("portkey", organization="org", environ=env)


async def test_client_takes_a_provider_name_and_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """BatchClient(provider="azure") builds the Azure provider from the environment."""
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "az-from-env")
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://env.openai.azure.com")
    monkeypatch.delenv("OPENAI_API_VERSION", raising=False)
    async with BatchClient(provider="azure") as client:
        assert isinstance(client.provider, AzureOpenAIProvider)
        assert client.provider.base_url == "https://env.openai.azure.com/openai/v1"
    with pytest.raises(ConfigurationError, match="unknown provider"):
        BatchClient(provider="nope")
    with pytest.raises(TypeError, match="provider must be"):
        BatchClient(provider=42)  # type: ignore[arg-type]


def test_limits_refuse_nonsense() -> None:
    """Limits must be positive integers."""
    with pytest.raises(ConfigurationError, match="max_lines"):
        Limits(max_lines=0)


# --- the converter's provider quirks ----------------------------------------------------------


@pytest.mark.parametrize(
    "created_at",
    [
        T0 * 1000 + 999,
        float(T0 * 1000),
        "2025-06-15T15:06:40Z",
        "2025-06-15T15:06:40.9999999+00:00",
        "2025-06-15T17:06:40+02:00",
        "2025-06-15T17:06:40+02",
        "2025-06-15T13:36:40-0130",
        "2025-06-15 15:06:40",
        T0 + 0.5,
    ],
)
def test_timestamps_in_ms_iso_or_float_decode_to_unix_seconds(created_at: Any) -> None:
    """Milliseconds (by magnitude), ISO-8601 strings and floats become floored Unix seconds."""
    batch = decode(json.dumps(_batch(created_at=created_at, expires_at=created_at)), Batch)
    assert batch.created_at == T0
    assert batch.expires_at == T0


@pytest.mark.parametrize("value", ["yesterday", "2025-13-40T00:00:00Z", True, [1], "1750000000"])
def test_a_timestamp_that_is_none_of_these_names_the_field(value: Any) -> None:
    """A timestamp that is not seconds, ms or ISO-8601 is a DecodeError naming the field."""
    with pytest.raises(DecodeError) as info:
        decode(json.dumps(_batch(completed_at=value)), Batch)
    assert info.value.path == "$.completed_at"


def test_file_timestamps_take_the_same_quirks() -> None:
    """A file's created_at in ms and expires_at as ISO-8601 decode to seconds."""
    body = {
        "id": "file-1",
        "object": "file",
        "bytes": 3,
        "created_at": T0 * 1000,
        "expires_at": "2025-06-15T15:06:40Z",
        "filename": "a.jsonl",
        "purpose": "batch",
        "status": "pending",
    }
    file = decode(json.dumps(body), File)
    assert (file.created_at, file.expires_at, file.status) == (T0, T0, "pending")


@pytest.mark.parametrize(
    ("wire", "status"),
    [
        ("Validating", S.VALIDATING),
        ("InProgress", S.IN_PROGRESS),
        ("IN_PROGRESS", S.IN_PROGRESS),
        ("Finalizing", S.FINALIZING),
        ("Cancelling", S.CANCELLING),
        ("Canceling", S.CANCELLING),
        ("Canceled", S.CANCELLED),
        ("submitted", S.VALIDATING),
        ("scheduled", S.VALIDATING),
        ("Submitted", S.VALIDATING),
        ("stopping", S.CANCELLING),
        ("stopped", S.CANCELLED),
        ("partially_completed", S.COMPLETED),
        ("PartiallyCompleted", S.COMPLETED),
        ("FileUploadFailed", S.FILE_UPLOAD_FAILED),
    ],
)
def test_foreign_statuses_map_onto_the_machine_keeping_the_original(
    wire: str, status: BatchStatus
) -> None:
    """Capitalised and gateway statuses map onto the machine; raw_status keeps the string."""
    batch = decode(json.dumps(_batch(status=wire)), Batch)
    assert batch.status is status
    assert batch.raw_status == wire
    assert batch.wire_status == wire
    assert batch.lifecycle_status is status
    assert status.meaning in batch.outcome and repr(wire) in batch.outcome


def test_mapped_statuses_drive_the_lifecycle() -> None:
    """A batch seen as submitted, InProgress then stopped is validating -> ... -> cancelled."""
    lifecycle = BatchLifecycle()
    for wire in ("submitted", "InProgress", "stopping", "stopped"):
        lifecycle.observe(decode(json.dumps(_batch(status=wire)), Batch).lifecycle_status)
    assert lifecycle.status is S.CANCELLED


def test_a_status_that_maps_to_nothing_is_still_unknown() -> None:
    """An unmappable string decodes as UNKNOWN; observing it raises naming the string."""
    batch = decode(json.dumps(_batch(status="JOB_STATE_PAUSED")), Batch)
    assert (batch.status, batch.raw_status) == (S.UNKNOWN, "JOB_STATE_PAUSED")
    with pytest.raises(UnknownStatusError, match="JOB_STATE_PAUSED"):
        BatchLifecycle().observe(batch.lifecycle_status)


def test_null_request_counts_and_missing_optional_fields_decode() -> None:
    """Null counts read as 0; a body with only the essentials decodes with defaults."""
    counts = {"total": None, "completed": None, "failed": None}
    batch = decode(json.dumps(_batch(status="Validating", request_counts=counts)), Batch)
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.failed) == (0, 0)
    minimal = {
        "id": "b",
        "endpoint": "/v1/embeddings",
        "input_file_id": "f",
        "status": "in_progress",
        "created_at": T0,
    }
    sparse = decode(json.dumps(minimal), Batch)
    assert (sparse.object, sparse.completion_window, sparse.request_counts) == ("batch", None, None)
    assert (sparse.expires_at, sparse.metadata, sparse.errors, sparse.usage) == (None,) * 4
    tagged = decode(json.dumps({**minimal, "object": None, "completion_window": None}), Batch)
    assert (tagged.object, tagged.completion_window) == ("batch", None)


def test_portkey_only_statuses_are_terminal_with_an_explained_outcome() -> None:
    """file_upload_failed and batch_start_failed are terminal; outcome says what happened."""
    for status in (S.FILE_UPLOAD_FAILED, S.BATCH_START_FAILED):
        errors = {"object": "list", "data": [{"code": status.value, "message": "upstream 503"}]}
        batch = decode(json.dumps(_batch(status=status.value, errors=errors)), Batch)
        assert batch.is_terminal
        assert batch.raw_status is None
        assert batch.outcome.startswith(MEANINGS[status])
        assert "nothing was billed" in batch.outcome
        assert batch.outcome.endswith(f"{status.value}: upstream 503")


_WRAPPED = {"error": {"message": "openai error: nope", "type": None}, "provider": "openai"}


@pytest.mark.parametrize(
    ("body", "message", "code", "kind"),
    [
        ({"status": "failure", "message": "Went wrong"}, "Went wrong", None, "failure"),
        ({"error": {"code": "401", "message": "Access denied"}}, "Access denied", "401", None),
        ({"error": {"code": 429, "message": "Slow down"}}, "Slow down", "429", None),
        ({"statusCode": 401, "message": "Denied (APIM)"}, "Denied (APIM)", "401", None),
        ({"detail": "Not Found"}, "Not Found", None, None),
        (_WRAPPED, "openai error: nope", None, None),
    ],
)
def test_non_openai_error_envelopes_are_read(
    body: dict[str, Any], message: str, code: str | None, kind: str | None
) -> None:
    """Portkey's, Azure's and small servers' error bodies give their message and code."""
    envelope = parse_error_body(body)
    assert envelope is not None
    assert (envelope.message, envelope.code, envelope.type) == (message, code, kind)


def test_portkey_output_lines_and_its_errors_object() -> None:
    """An /output line is a result line; the errors object Portkey sends instead is BatchErrors."""
    line = decode_batch_output_line(
        '{"id":"r","custom_id":"a","response":{"status_code":200,"body":{}},"error":null}'
    )
    assert isinstance(line, ResultSuccess)
    errors = decode_batch_output_line(
        '{"object":"list","data":[{"code":"invalid_json_line","message":"bad","line":2}]}'
    )
    assert isinstance(errors, BatchErrors)
    assert errors.data[0].line == 2


async def test_readme_providers_example_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Providers example builds every client it shows (environment set)."""
    section = README.split("## Providers\n", 1)[1]
    (block,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    for name, value in {
        "PORTKEY_API_KEY": "pk-env",
        "PORTKEY_PROVIDER": "@openai-prod",
        "AZURE_OPENAI_API_KEY": "az-env",
        "AZURE_OPENAI_ENDPOINT": "https://env.openai.azure.com",
        "ANTHROPIC_API_KEY": "sk-ant-env",
        "GROQ_API_KEY": "gsk-env",
        "GEMINI_API_KEY": "gm-env",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("OPENAI_API_VERSION", "ANTHROPIC_BASE_URL", "GROQ_BASE_URL", "GEMINI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    namespace: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    clients = [v for v in namespace.values() if isinstance(v, BatchClient)]
    assert [c.provider.name for c in clients] == [
        "openai",
        "portkey",
        "portkey",
        "portkey",
        "azure",
        "azure",
        "anthropic",
        "groq",
        "gemini",
        "compatible",
    ]
    for client in clients:
        await client.aclose()


# --- batches other providers' shapes reach us in, through Portkey ------------------------------


def test_bedrock_batch_through_portkey_without_endpoint_or_window_decodes() -> None:
    """Portkey's Bedrock retrieve sends no endpoint, window or counts: they decode as None."""
    body = {
        "id": "arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Amodel-invocation-job%2Fj1",
        "object": "batch",
        "created_at": T0 * 1000,
        "status": "partially_completed",
        "input_file_id": "s3%3A%2F%2Fb%2Fin.jsonl",
        "output_file_id": "s3%3A%2F%2Fb%2Fout%2F",
        "finalizing_at": None,
        "expires_at": (T0 + 86_400) * 1000,
        "errors": {"object": "list", "data": [{"code": "failed", "message": "3 records failed"}]},
        "failed_at": T0 * 1000,
    }
    batch = decode(json.dumps(body), Batch)
    assert (batch.endpoint, batch.completion_window, batch.request_counts) == (None, None, None)
    assert (batch.status, batch.raw_status, batch.created_at) == (
        S.COMPLETED,
        "partially_completed",
        T0,
    )
    assert batch.is_terminal and "3 records failed" in batch.outcome


def test_vertex_batch_through_portkey_with_string_counts_and_an_rpc_error_decodes() -> None:
    """Vertex's int64 counts arrive as digit strings and its error code as an int."""
    body = _batch(
        status="failed",
        completion_window=None,
        request_counts={"total": 5, "completed": "3", "failed": "2"},
        errors={"object": "list", "data": [{"code": 3, "message": "bad input", "details": []}]},
    )
    batch = decode(json.dumps(body), Batch)
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (5, 3)
    assert batch.request_counts.failed == 2
    assert batch.errors is not None and batch.errors.data[0].code == "3"
    assert batch.outcome.endswith("3: bad input")


@pytest.mark.parametrize(
    ("counts", "path"),
    [
        ({"total": "3x", "completed": 0, "failed": 0}, "$.request_counts.total"),
        ({"total": 1, "completed": "-1", "failed": 0}, "$.request_counts.completed"),
        ({"total": 1, "completed": 0, "failed": 1.5}, "$.request_counts.failed"),
    ],
)
def test_counts_that_are_not_whole_numbers_still_name_the_field(
    counts: dict[str, Any], path: str
) -> None:
    """Only digit strings are read as counts; anything else is a DecodeError at the field."""
    with pytest.raises(DecodeError) as info:
        decode(json.dumps(_batch(request_counts=counts)), Batch)
    assert info.value.path == path


# --- a Portkey config given inline holds credentials ---------------------------------------

_UPSTREAM = "sk-upstream-inline-0123456789"
_AWS = "aws-secret-inline-9876543210"
_INLINE = {
    "strategy": {"mode": "fallback"},
    "targets": [
        {"provider": "openai", "api_key": _UPSTREAM},
        {"provider": "bedrock", "aws_secret_access_key": _AWS, "aws_region": "us-east-1"},
    ],
}


@pytest.mark.parametrize("config", [_INLINE, json.dumps(_INLINE)], ids=["mapping", "json"])
def test_an_inline_portkey_config_never_shows_its_credentials(config: Any) -> None:
    """An inline config's keys stay out of repr, str and asdict; a config id stays visible."""
    provider = PortkeyProvider(api_key="pk-hidden-123", config=config)
    texts = [repr(provider), str(provider), repr(attrs.asdict(provider))]
    texts.append(repr(provider.headers()))
    for text in texts:
        assert _UPSTREAM not in text and _AWS not in text
    sent = json.loads(provider.headers()["x-portkey-config"])
    assert sent == _INLINE
    assert {_UPSTREAM, _AWS} <= {s.reveal() for s in provider.secrets}
    by_id = PortkeyProvider(api_key="pk-hidden-123", config="pc-abc-123")
    assert by_id.config == "pc-abc-123" and "pc-abc-123" in repr(by_id)


async def test_an_upstream_key_from_an_inline_config_echoed_in_an_error_is_masked() -> None:
    """A gateway error echoing a key from the inline config shows it masked."""

    async def echo(request: Request) -> Response:
        message = f"openai error: Incorrect API key provided: {_UPSTREAM}"
        body = {"error": {"message": message, "type": None}, "provider": "openai"}
        return Response(401, {}, json.dumps(body).encode())

    provider = PortkeyProvider(api_key="pk-hidden-123", config=_INLINE, base_url="http://gw/v1")
    client = BatchClient(provider=provider, transport=InMemoryTransport(echo))
    with pytest.raises(AuthenticationError) as info:
        await client.retrieve_batch("batch_1")
    assert _UPSTREAM not in str(info.value) and _UPSTREAM not in repr(info.value.body)
    assert "***" in str(info.value)


# --- settings read from the environment carry stray whitespace -------------------------------


def test_whitespace_around_urls_versions_and_ids_from_the_environment_is_dropped() -> None:
    """A value from a .env file or a mounted secret often ends in a newline: it is dropped."""
    openai = provider_from_env(
        "openai",
        environ={
            "OPENAI_API_KEY": "sk-a\n",
            "OPENAI_BASE_URL": " http://h/v1/\n",
            "OPENAI_ORG_ID": "org-1\n",
            "OPENAI_PROJECT_ID": " proj_1 ",
        },
    )
    assert openai.url("/batches") == "http://h/v1/batches"
    assert dict(openai.headers()) == {
        "authorization": "Bearer sk-a",
        "openai-organization": "org-1",
        "openai-project": "proj_1",
    }
    compatible = provider_from_env("compatible", environ={"OPENAI_BASE_URL": "http://h/v1/\n"})
    assert compatible.base_url == "http://h/v1"
    portkey = provider_from_env(
        "portkey",
        environ={
            "PORTKEY_API_KEY": "pk",
            "PORTKEY_PROVIDER": "@x",
            "PORTKEY_BASE_URL": "http://localhost:8787/v1\n",
        },
    )
    assert portkey.base_url == "http://localhost:8787/v1"
    azure = provider_from_env(
        "azure",
        environ={
            "AZURE_OPENAI_ENDPOINT": "https://r.openai.azure.com/\n",
            "AZURE_OPENAI_API_KEY": "k\n",
            "OPENAI_API_VERSION": "2024-10-21\n",
        },
    )
    assert isinstance(azure, AzureOpenAIProvider)
    assert azure.api_version == "2024-10-21"
    assert dict(azure.params()) == {"api-version": "2024-10-21"}
    assert OpenAIProvider(organization=" \n").headers() == {}


@pytest.mark.parametrize(
    ("endpoint", "api_version", "url"),
    [
        ("https://r.openai.azure.com/openai", "v1", "https://r.openai.azure.com/openai/v1/batches"),
        (
            "https://r.openai.azure.com/openai/v1/",
            "v1",
            "https://r.openai.azure.com/openai/v1/batches",
        ),
        (
            "https://r.openai.azure.com/openai/",
            "2024-10-21",
            "https://r.openai.azure.com/openai/batches",
        ),
        (
            "https://apim.example.net/team-a",
            "v1",
            "https://apim.example.net/team-a/openai/v1/batches",
        ),
        (
            "https://apim.example.net/team-a/openai",
            "2024-10-21",
            "https://apim.example.net/team-a/openai/batches",
        ),
    ],
)
def test_azure_endpoint_with_openai_on_it_or_behind_a_gateway_path(
    endpoint: str, api_version: str, url: str
) -> None:
    """An endpoint copied with /openai or /openai/v1 on it, or an APIM path, builds one URL."""
    provider = AzureOpenAIProvider(endpoint=endpoint, api_key="k", api_version=api_version)
    assert provider.url("/batches") == url
    assert not provider.endpoint.endswith(("/openai", "/openai/v1"))


def test_azure_from_env_reads_an_entra_token_when_there_is_no_key() -> None:
    """AZURE_OPENAI_AD_TOKEN is read, as the SDK reads it, when no key is set."""
    env = {"AZURE_OPENAI_ENDPOINT": "https://r.openai.azure.com", "AZURE_OPENAI_AD_TOKEN": "tok"}
    provider = provider_from_env("azure", environ=env)
    assert dict(provider.headers()) == {"authorization": "Bearer tok"}
    keyed = provider_from_env("azure", environ={**env, "AZURE_OPENAI_API_KEY": "az"})
    assert dict(keyed.headers()) == {"api-key": "az"}
    explicit = AzureOpenAIProvider.from_env(api_key="arg", environ=env)
    assert dict(explicit.headers()) == {"api-key": "arg"}
    with pytest.raises(ConfigurationError, match="AZURE_OPENAI_AD_TOKEN"):
        provider_from_env("azure", environ={"AZURE_OPENAI_ENDPOINT": "https://r"})


def test_a_blank_key_is_refused_not_sent_as_no_credentials() -> None:
    """An explicit key of only whitespace, or a key variable holding only whitespace, is a
    ConfigurationError naming it; an empty variable counts as unset."""
    with pytest.raises(ConfigurationError, match="empty or only whitespace"):
        OpenAIProvider(api_key="   ")
    with pytest.raises(ConfigurationError, match=r"\$OPENAI_API_KEY"):
        OpenAIProvider.from_env(environ={"OPENAI_API_KEY": " \n"})
    with pytest.raises(ConfigurationError, match=r"\$AZURE_OPENAI_API_KEY"):
        AzureOpenAIProvider.from_env(
            environ={"AZURE_OPENAI_API_KEY": "\t", "AZURE_OPENAI_ENDPOINT": "https://r.test"}
        )
    assert OpenAIProvider.from_env(environ={"OPENAI_API_KEY": ""}).api_key is None
