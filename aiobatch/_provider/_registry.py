"""The built-in providers by name: :data:`PROVIDER_NAMES`, :func:`provider_from_env`,
and :func:`require_key` (a provider that sends no key where one is always wanted)."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from .._secret import Secret
from ..errors import ConfigurationError
from ._anthropic import ANTHROPIC_BASE_URL, AnthropicProvider
from ._azure import AzureOpenAIProvider
from ._base import Provider
from ._compatible import CompatibleProvider
from ._gemini import GeminiProvider
from ._groq import GroqProvider
from ._openai import DEFAULT_BASE_URL, OpenAIProvider
from ._portkey import PortkeyProvider

__all__ = ["PROVIDER_NAMES", "provider_from_env", "require_key"]


def require_key(provider: Provider) -> None:
    """Refuse a provider that sends no key to a service that always wants one.

    OpenAI's own API (``api.openai.com``) answers every request without a key with a
    401: an unset ``OPENAI_API_KEY`` is refused here, before any work, rather than met
    at the first request; so is an unset ``ANTHROPIC_API_KEY`` for Anthropic's API.
    (Portkey and Azure providers refuse a missing key when they are built; a server of
    one's own, at another base URL, may take none.)

    Raises:
        ConfigurationError: naming the variable to set.
    """
    if isinstance(provider, OpenAIProvider) and not provider.api_key:
        host = urlsplit(provider.base_url).hostname or ""
        if host.lower() == urlsplit(DEFAULT_BASE_URL).hostname:
            raise ConfigurationError(
                f"no API key for OpenAI ({provider.base_url}): set OPENAI_API_KEY or pass "
                "api_key (a server that takes no key is the 'compatible' provider)"
            )
    for preset, variable in _PRESETS.values():
        if isinstance(provider, preset) and not provider.api_key:
            raise ConfigurationError(
                f"no API key for {provider.name} ({provider.base_url}): set {variable} "
                "or pass api_key"
            )
    if isinstance(provider, AnthropicProvider) and not provider.api_key:
        host = urlsplit(provider.base_url).hostname or ""
        if host.lower() == urlsplit(ANTHROPIC_BASE_URL).hostname:
            raise ConfigurationError(
                f"no API key for Anthropic ({provider.base_url}): set ANTHROPIC_API_KEY "
                "or pass api_key"
            )


#: The names :func:`provider_from_env` (and ``BatchClient(provider=...)``) accept.
PROVIDER_NAMES: tuple[str, ...] = (
    "openai",
    "portkey",
    "azure",
    "compatible",
    "anthropic",
    "groq",
    "gemini",
)

#: The OpenAI-compatible presets: a base URL, a key variable, limits and quirks each.
_PRESETS = {"groq": (GroqProvider, "GROQ_API_KEY"), "gemini": (GeminiProvider, "GEMINI_API_KEY")}


def provider_from_env(
    name: str,
    *,
    api_key: str | Secret | None = None,
    base_url: str | None = None,
    organization: str | None = None,
    project: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Provider:
    """A provider chosen by name, filled from the environment for what is not given.

    ``openai``: :meth:`OpenAIProvider.from_env`; ``portkey``:
    :meth:`PortkeyProvider.from_env` (``base_url`` is the gateway); ``azure``:
    :meth:`AzureOpenAIProvider.from_env` (the endpoint comes from
    ``AZURE_OPENAI_ENDPOINT``: build an :class:`AzureOpenAIProvider` to pass it in
    code); ``compatible``: :meth:`CompatibleProvider.from_env`.

    Args:
        name: one of :data:`PROVIDER_NAMES` (case and surrounding blanks ignored).
        api_key: the provider's key (Portkey's own key for ``portkey``).
        base_url: the API root (not for ``azure``).
        organization: ``OpenAI-Organization`` (``openai`` only).
        project: ``OpenAI-Project`` (``openai`` only).
        environ: the environment to read (default ``os.environ``).

    Raises:
        ConfigurationError: an unknown name, an argument the provider does not take,
            or what that provider's constructor refuses.
    """
    if not isinstance(name, str):
        raise ConfigurationError(f"a provider name is a str, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in PROVIDER_NAMES:
        raise ConfigurationError(
            f"unknown provider {name!r}: expected one of {', '.join(PROVIDER_NAMES)} "
            "(or pass a provider object)"
        )
    given = {
        "base_url": base_url,
        "organization": organization,
        "project": project,
    }
    takes = {
        "openai": {"base_url", "organization", "project"},
        "portkey": {"base_url"},
        "azure": set(),
        "compatible": {"base_url"},
        "anthropic": {"base_url"},
        "groq": {"base_url"},
        "gemini": {"base_url"},
    }[key]
    extra = sorted(k for k, v in given.items() if v is not None and k not in takes)
    if extra:
        hint = (
            "; set AZURE_OPENAI_ENDPOINT or pass AzureOpenAIProvider(endpoint=...)"
            if key == "azure" and "base_url" in extra
            else ""
        )
        raise ConfigurationError(f"the {key} provider does not take {', '.join(extra)}{hint}")
    if key == "openai":
        return OpenAIProvider.from_env(
            api_key=api_key,
            base_url=base_url,
            organization=organization,
            project=project,
            environ=environ,
        )
    if key == "portkey":
        return PortkeyProvider.from_env(api_key=api_key, base_url=base_url, environ=environ)
    if key == "azure":
        return AzureOpenAIProvider.from_env(api_key=api_key, environ=environ)
    if key == "anthropic":
        return AnthropicProvider.from_env(api_key=api_key, base_url=base_url, environ=environ)
    if key in _PRESETS:
        preset = _PRESETS[key][0]
        return preset.from_env(base_url=base_url, api_key=api_key, environ=environ)
    return CompatibleProvider.from_env(base_url=base_url, api_key=api_key, environ=environ)
