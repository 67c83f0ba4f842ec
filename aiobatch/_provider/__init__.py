"""Providers (dialects): where to send requests, how to authenticate, and what to expect.

A provider turns an API path (``/batches``) into a URL and the query every request
carries, says which headers every request carries, and describes the service as data:
its :class:`Limits` (lines and bytes per batch) and its :class:`Quirks` (behaviours the
client adapts to: waiting for an upload to be processed, Portkey's output endpoint...).
A provider does no IO and holds no connection; transports know nothing of providers,
and the wire quirks of bodies (timestamps, statuses) live in the converter.

Four dialects (reference/batch-api.md §1, §3, §4):

* :class:`OpenAIProvider`: ``Authorization: Bearer``, and ``OpenAI-Organization`` /
  ``OpenAI-Project`` when set; ``{base_url}/batches``.
* :class:`PortkeyProvider`: ``x-portkey-api-key``, plus ``x-portkey-provider`` (a
  provider name or an ``@slug``) and/or ``x-portkey-config``; the provider's own key
  as ``Authorization: Bearer`` with a plain name; ``{base_url}/batches`` and Portkey's
  ``/batches/{id}/output``.
* :class:`AzureOpenAIProvider`: ``api-key`` (or ``Authorization: Bearer`` with an Entra
  ID token); ``{endpoint}/openai/v1/batches``, or ``{endpoint}/openai/batches`` with
  ``?api-version=`` on every request.
* :class:`CompatibleProvider`: ``Authorization: Bearer`` or nothing;
  ``{base_url}/batches``.
* :class:`AnthropicProvider`: ``x-api-key`` and ``anthropic-version``;
  ``{base_url}/v1/messages/batches``, requests inline in the create.
* OpenAI-compatible presets (a :class:`CompatibleProvider` with a base URL, a key
  variable, limits): :class:`GroqProvider` (``GROQ_API_KEY``, windows up to ``7d``,
  100 MB files), :class:`GeminiProvider` (``GEMINI_API_KEY``).

:func:`provider_from_env` picks one by name (``"openai"``, ``"portkey"``, ``"azure"``,
``"compatible"``) and fills it from the usual environment variables.

Every key lives in a :class:`Secret`, which never shows its value in a repr or str, so
neither a provider nor anything that holds one can leak it into a log or a traceback;
the mapping :meth:`headers` returns masks every value in its repr.

Layout: :mod:`aiobatch._secret` holds :class:`Secret`; ``_base`` the protocol,
:class:`Limits`, :class:`Quirks` and what the dialects share; one module per dialect
(``_openai``, ``_portkey``, ``_azure``, ``_compatible``); ``_registry`` the names,
:func:`provider_from_env` and :func:`require_key`. A new provider is a new module
here, exported below and named in ``_registry``.
"""

from .._secret import Secret
from .._secret import _Headers as _Headers  # for the client's request headers
from ._anthropic import ANTHROPIC_BASE_URL, ANTHROPIC_LIMITS, AnthropicProvider
from ._azure import AZURE_API_VERSION_V1, AZURE_LIMITS, AzureOpenAIProvider
from ._base import Limits, Provider, Quirks
from ._compatible import CompatibleProvider
from ._gemini import GEMINI_BASE_URL, GeminiProvider
from ._groq import GROQ_BASE_URL, GROQ_LIMITS, GroqProvider
from ._openai import DEFAULT_BASE_URL, OPENAI_LIMITS, OpenAIProvider
from ._portkey import PORTKEY_BASE_URL, PortkeyProvider
from ._registry import PROVIDER_NAMES, provider_from_env, require_key

__all__ = [
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_LIMITS",
    "AZURE_API_VERSION_V1",
    "AZURE_LIMITS",
    "DEFAULT_BASE_URL",
    "GEMINI_BASE_URL",
    "GROQ_BASE_URL",
    "GROQ_LIMITS",
    "OPENAI_LIMITS",
    "PORTKEY_BASE_URL",
    "PROVIDER_NAMES",
    "AnthropicProvider",
    "AzureOpenAIProvider",
    "CompatibleProvider",
    "GeminiProvider",
    "GroqProvider",
    "Limits",
    "OpenAIProvider",
    "PortkeyProvider",
    "Provider",
    "Quirks",
    "Secret",
    "provider_from_env",
    "require_key",
]
