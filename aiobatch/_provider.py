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

:func:`provider_from_env` picks one by name (``"openai"``, ``"portkey"``, ``"azure"``,
``"compatible"``) and fills it from the usual environment variables.

Every key lives in a :class:`Secret`, which never shows its value in a repr or str, so
neither a provider nor anything that holds one can leak it into a log or a traceback;
the mapping :meth:`headers` returns masks every value in its repr.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import types
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, overload, runtime_checkable
from urllib.parse import urlsplit

import attrs

from .errors import ConfigurationError

__all__ = [
    "AZURE_API_VERSION_V1",
    "AZURE_LIMITS",
    "DEFAULT_BASE_URL",
    "OPENAI_LIMITS",
    "PORTKEY_BASE_URL",
    "PROVIDER_NAMES",
    "AzureOpenAIProvider",
    "CompatibleProvider",
    "Limits",
    "OpenAIProvider",
    "PortkeyProvider",
    "Provider",
    "Quirks",
    "Secret",
    "provider_from_env",
    "require_key",
]

#: OpenAI's API root.
DEFAULT_BASE_URL = "https://api.openai.com/v1"

#: Portkey's hosted gateway (a self-hosted gateway listens on ``http://localhost:8787/v1``).
PORTKEY_BASE_URL = "https://api.portkey.ai/v1"

#: The ``api_version`` of Azure's v1 API: ``/openai/v1/...`` paths, no ``api-version``.
AZURE_API_VERSION_V1 = "v1"

_NO_QUERY: Mapping[str, str] = types.MappingProxyType({})


class Secret:
    """A string that is never shown: repr and str are masked.

    Args:
        value: the secret, such as an API key.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"a Secret holds a str, not {type(value).__name__}")
        self._value = value

    def reveal(self) -> str:
        """The secret value itself (put it in a header, never in a message)."""
        return self._value

    @overload
    def redact(self, text: str) -> str: ...

    @overload
    def redact(self, text: bytes) -> bytes: ...

    def redact(self, text: str | bytes) -> str | bytes:
        """``text`` with every occurrence of the secret replaced by ``***``.

        For text built from what a server sent (an error body, a body that failed to
        decode), which may echo the key back. A value shorter than 4 characters is not a
        real secret and is left alone: masking it would garble ordinary text.
        """
        value = self._value
        if len(value) < _MIN_REDACTED:
            return text
        if isinstance(text, bytes):
            needle = value.encode()
            return text.replace(needle, b"***") if needle in text else text
        return text.replace(value, "***") if value in text else text

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __reduce__(self) -> Any:
        raise TypeError("a Secret cannot be pickled")

    def __bool__(self) -> bool:
        return bool(self._value)


#: Secrets shorter than this are not masked by :meth:`Secret.redact`.
_MIN_REDACTED = 4


def _to_secret(value: str | Secret | None) -> Secret | None:
    """Wrap an API key, dropping whitespace around it (a key read from a file often
    ends with a newline) and refusing control characters, which no header may carry."""
    if value is None:
        return None
    text = value.reveal() if isinstance(value, Secret) else value
    stripped = text.strip()
    if not stripped:
        # A blank key would silently send no credentials at all (and get a 401 later).
        raise ConfigurationError(
            "the API key is empty or only whitespace; pass None (or leave the variable "
            "unset) to send no key"
        )
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in stripped):
        raise ValueError("the API key contains a control character (the key is not shown)")
    if isinstance(value, Secret) and stripped == text:
        return value
    return Secret(stripped)


class _Headers(dict[str, str]):
    """Request headers whose repr shows names only: values may hold credentials."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{name!r}: '***'" for name in self) + "}"


def _strip_slash(value: str) -> str:
    """A base URL without blanks around it (a value read from a file or the environment
    often ends in a newline) or a trailing slash."""
    return value.strip().rstrip("/")


def _optional_text(value: str | None) -> str | None:
    """A header value without blanks around it (a newline would be refused by the
    transport); None for an empty one."""
    if value is None:
        return None
    return value.strip() or None


def _api_version(value: str) -> str:
    return value.strip() if isinstance(value, str) else value


@attrs.frozen
class Limits:
    """How big one batch may be, per input file (both must hold).

    Attributes:
        max_lines: requests per batch (OpenAI 50,000; Azure 100,000).
        max_bytes: bytes of the input file (200 MB for both).
        max_embedding_inputs: embedding inputs per ``/v1/embeddings`` batch, summed over
            its lines (a line's ``input`` list counts each element; 50,000 on OpenAI).
    """

    max_lines: int = 50_000
    max_bytes: int = 200 * 1024 * 1024
    max_embedding_inputs: int = 50_000

    def __attrs_post_init__(self) -> None:
        for name in ("max_lines", "max_bytes", "max_embedding_inputs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigurationError(f"Limits.{name} must be a positive int, got {value!r}")


#: OpenAI's limits (reference/batch-api.md §1.10).
OPENAI_LIMITS = Limits(max_lines=50_000, max_bytes=200 * 1024 * 1024)
#: Azure OpenAI's limits (reference/batch-api.md §4).
AZURE_LIMITS = Limits(max_lines=100_000, max_bytes=200 * 1024 * 1024)


@attrs.frozen
class Quirks:
    """What a provider does differently, as data the client acts on.

    Attributes:
        wait_for_processed_file: an upload answers before the file is usable (Azure:
            ``pending``, then ``processed``); :meth:`BatchClient.upload_file
            <aiobatch.BatchClient.upload_file>` then polls the file until it is
            ``processed``, so that a create never meets a file still pending.
        batches_expire: unfinished batches expire when the completion window ends
            (Azure's keep running past 24 h until done or cancelled).
        empty_error_file: a batch with no failed request still gets an
            ``error_file_id``, for an empty file (Azure); reading it yields no lines.
        submission: how a run submits a shard: ``"file"`` (upload its input file,
            then create the batch from it).
        batch_output_endpoint: ``GET /batches/{id}/output`` streams a finished batch's
            output in one call (Portkey; see :meth:`BatchClient.iter_batch_output
            <aiobatch.BatchClient.iter_batch_output>`).
    """

    wait_for_processed_file: bool = False
    batches_expire: bool = True
    empty_error_file: bool = False
    batch_output_endpoint: bool = False
    submission: str = "file"


@runtime_checkable
class Provider(Protocol):
    """What :class:`~aiobatch.BatchClient` needs from a provider.

    Write your own for a server none of the built-in ones fits; it must be pure data
    (no IO) and keep every credential in a :class:`Secret`.
    """

    @property
    def name(self) -> str:
        """The dialect's name (``openai``, ``portkey``, ``azure``, ``compatible``)."""
        ...

    @property
    def base_url(self) -> str:
        """The API root every path is joined to (no trailing slash)."""
        ...

    @property
    def limits(self) -> Limits:
        """How big one batch may be."""
        ...

    @property
    def quirks(self) -> Quirks:
        """What the provider does differently."""
        ...

    @property
    def secrets(self) -> tuple[Secret, ...]:
        """Every credential sent, so that none is ever shown in an error (masked with
        :meth:`Secret.redact`)."""
        ...

    def url(self, path: str) -> str:
        """The absolute URL of an API path such as ``/batches/batch_1`` (no query)."""
        ...

    def params(self) -> Mapping[str, str]:
        """The query parameters every request carries (Azure's ``api-version``)."""
        ...

    def headers(self) -> Mapping[str, str]:
        """The headers every request carries (lower-case names)."""
        ...


def _join(base_url: str, path: str) -> str:
    if path.startswith("/"):
        return base_url + path
    return f"{base_url}/{path}"


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _env_key(env: Mapping[str, str], name: str) -> str | None:
    """A credential from the environment: None when unset or empty; a value of only
    whitespace is a mistake (it would send no credentials), named in the error."""
    value = env.get(name)
    if not value:
        return None
    if not value.strip():
        raise ConfigurationError(
            f"${name} is set but holds only whitespace; set the key, or unset it to send none"
        )
    return value


def _limits(value: Limits | None, default: Limits) -> Limits:
    return default if value is None else value


@attrs.frozen(kw_only=True)
class OpenAIProvider:
    """OpenAI's dialect: base URL, ``Authorization: Bearer`` and the optional
    ``OpenAI-Organization`` / ``OpenAI-Project`` headers.

    The constructor reads no environment; :meth:`from_env` does.

    Args:
        api_key: the API key (a str is wrapped in a :class:`Secret`; whitespace around
            it is dropped); None sends no ``Authorization`` header (for local servers
            that need none).
        base_url: the API root, e.g. ``https://api.openai.com/v1``.
        organization: sent as ``OpenAI-Organization`` when set.
        project: sent as ``OpenAI-Project`` when set.
        limits: how big one batch may be (default OpenAI's 50,000 lines, 200 MB).
    """

    name: ClassVar[str] = "openai"
    quirks: ClassVar[Quirks] = Quirks()

    api_key: Secret | None = attrs.field(default=None, converter=_to_secret)
    base_url: str = attrs.field(default=DEFAULT_BASE_URL, converter=_strip_slash)
    organization: str | None = attrs.field(default=None, converter=_optional_text)
    project: str | None = attrs.field(default=None, converter=_optional_text)
    limits: Limits = OPENAI_LIMITS

    @property
    def secrets(self) -> tuple[Secret, ...]:
        """The API key, when there is one."""
        return (self.api_key,) if self.api_key else ()

    def params(self) -> Mapping[str, str]:
        """No query parameters."""
        return _NO_QUERY

    @classmethod
    def from_env(
        cls,
        *,
        api_key: str | Secret | None = None,
        base_url: str | None = None,
        organization: str | None = None,
        project: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> OpenAIProvider:
        """Build a provider, taking what is not given from the environment.

        ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``, ``OPENAI_ORG_ID`` and
        ``OPENAI_PROJECT_ID``, as the official SDK reads them.

        Args:
            api_key: the key; default ``$OPENAI_API_KEY``.
            base_url: the API root; default ``$OPENAI_BASE_URL`` or OpenAI's.
            organization: default ``$OPENAI_ORG_ID``.
            project: default ``$OPENAI_PROJECT_ID``.
            environ: the environment to read (default ``os.environ``).
        """
        env = os.environ if environ is None else environ
        return cls(
            api_key=api_key if api_key is not None else _env_key(env, "OPENAI_API_KEY"),
            base_url=base_url or env.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
            organization=organization or env.get("OPENAI_ORG_ID") or None,
            project=project or env.get("OPENAI_PROJECT_ID") or None,
        )

    def url(self, path: str) -> str:
        """The absolute URL of an API path such as ``/batches/batch_1``."""
        return _join(self.base_url, path)

    def headers(self) -> Mapping[str, str]:
        """The headers every request carries (lower-case names), made afresh on each call.

        The provider keeps no revealed key (so ``attrs.asdict(provider)`` shows none);
        the mapping's repr masks every value.
        """
        headers = _Headers()
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key.reveal()}"
        if self.organization:
            headers["openai-organization"] = self.organization
        if self.project:
            headers["openai-project"] = self.project
        return headers


def _portkey_config(value: str | Secret | Mapping[str, Any] | None) -> str | Secret | None:
    """A Portkey config: a saved config's id (``pc-...``, kept as a str), or the config
    itself (a mapping or JSON text), kept as a :class:`Secret`: an inline config may
    hold the upstream providers' keys (``"api_key"``, ``"aws_secret_access_key"``...)."""
    if value is None:
        return None
    if isinstance(value, Secret):
        value = value.reveal()
    if isinstance(value, Mapping):
        return Secret(json.dumps(dict(value), separators=(",", ":")))
    text = value.strip()
    if text.startswith(("{", "[")):
        return Secret(text)
    return text or None


#: Names of config fields whose string values are credentials (masked in errors).
_CREDENTIAL_FIELD = re.compile(r"key|token|secret|password|credential|authori[sz]ation", re.I)


def _config_secrets(config: Secret) -> tuple[Secret, ...]:
    """The credentials inside an inline Portkey config: every string under a field whose
    name says it is one (at any depth), so that an error echoing one shows it masked."""
    try:
        data = json.loads(config.reveal())
    except ValueError:
        return ()
    found: list[Secret] = []
    todo: list[tuple[Any, bool]] = [(data, False)]
    while todo:
        node, credential = todo.pop()
        if isinstance(node, dict):
            for name, value in node.items():
                todo.append((value, credential or bool(_CREDENTIAL_FIELD.search(str(name)))))
        elif isinstance(node, list):
            todo.extend((value, credential) for value in node)
        elif credential and isinstance(node, str) and node:
            found.append(Secret(node))
    return tuple(found)


@attrs.frozen(kw_only=True)
class PortkeyProvider:
    """The Portkey gateway's dialect (reference/batch-api.md §3).

    Every request carries ``x-portkey-api-key`` and says where the gateway should send
    it: ``x-portkey-provider`` (a provider name such as ``openai``, or a Model Catalog
    slug such as ``@openai-prod`` whose credentials Portkey holds) and/or
    ``x-portkey-config`` (a saved config's id, or a config as JSON). With a plain
    provider name, the provider's own key goes in ``Authorization: Bearer``.

    Portkey's extra ``GET /batches/{id}/output`` is available
    (:meth:`BatchClient.iter_batch_output <aiobatch.BatchClient.iter_batch_output>`).

    Args:
        api_key: the Portkey API key (required).
        provider: ``x-portkey-provider``: a provider name or an ``@slug``.
        config: ``x-portkey-config``: a config id, or a config (a mapping or JSON text).
            A config given inline is kept as a :class:`Secret` (it may hold provider
            keys): never shown, and every credential in it masked in errors.
        provider_api_key: the upstream provider's key, sent as ``Authorization:
            Bearer``; only with a plain provider name (an ``@slug`` or a config carries
            its own credentials).
        base_url: the gateway's API root (default Portkey's hosted gateway; a
            self-hosted one is usually ``http://localhost:8787/v1``).
        limits: how big one batch may be (default OpenAI's; pass the upstream
            provider's, e.g. :data:`~aiobatch.AZURE_LIMITS` behind Azure).

    Raises:
        ConfigurationError: no key, neither provider nor config, or a provider key
            with an ``@slug``.
    """

    name: ClassVar[str] = "portkey"
    quirks: ClassVar[Quirks] = Quirks(batch_output_endpoint=True)

    api_key: Secret = attrs.field(converter=_to_secret)
    provider: str | None = None
    config: str | Secret | None = attrs.field(default=None, converter=_portkey_config)
    provider_api_key: Secret | None = attrs.field(default=None, converter=_to_secret)
    base_url: str = attrs.field(default=PORTKEY_BASE_URL, converter=_strip_slash)
    limits: Limits = OPENAI_LIMITS

    def __attrs_post_init__(self) -> None:
        if not self.api_key:
            raise ConfigurationError(
                "Portkey needs its API key (pass api_key, or set PORTKEY_API_KEY)"
            )
        provider = self.provider.strip() if self.provider else None
        if provider != self.provider:
            object.__setattr__(self, "provider", provider or None)
        if not self.provider and not self.config:
            raise ConfigurationError(
                "Portkey needs to know where to send requests: pass provider (a name such "
                "as 'openai', or an '@slug'; or set PORTKEY_PROVIDER) or config (a config "
                "id; or set PORTKEY_CONFIG)"
            )
        if self.provider_api_key and (not self.provider or self.provider.startswith("@")):
            raise ConfigurationError(
                "provider_api_key goes with a plain provider name such as 'openai'; an "
                f"@slug or a config carries its own credentials (provider={self.provider!r})"
            )

    @classmethod
    def from_env(
        cls,
        *,
        api_key: str | Secret | None = None,
        provider: str | None = None,
        config: str | Secret | Mapping[str, Any] | None = None,
        provider_api_key: str | Secret | None = None,
        base_url: str | None = None,
        limits: Limits | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> PortkeyProvider:
        """Build a provider, taking what is not given from the environment.

        ``PORTKEY_API_KEY``, ``PORTKEY_PROVIDER``, ``PORTKEY_CONFIG`` and
        ``PORTKEY_BASE_URL`` (for a self-hosted gateway). The upstream provider's key is
        never read from the environment: pass ``provider_api_key``.

        Raises:
            ConfigurationError: no Portkey key, or neither provider nor config.
        """
        env = _env(environ)
        key = api_key if api_key is not None else _env_key(env, "PORTKEY_API_KEY")
        if key is None:
            raise ConfigurationError(
                "Portkey needs its API key: pass api_key or set PORTKEY_API_KEY"
            )
        if provider is None and config is None:
            provider = env.get("PORTKEY_PROVIDER") or None
            config = env.get("PORTKEY_CONFIG") or None
        return cls(
            api_key=key,
            provider=provider,
            config=config,
            provider_api_key=provider_api_key,
            base_url=base_url or env.get("PORTKEY_BASE_URL") or PORTKEY_BASE_URL,
            limits=_limits(limits, OPENAI_LIMITS),
        )

    @property
    def secrets(self) -> tuple[Secret, ...]:
        """The Portkey key, the provider key, and an inline config with the credentials
        in it."""
        found = [s for s in (self.api_key, self.provider_api_key) if s]
        if isinstance(self.config, Secret):
            found += [self.config, *_config_secrets(self.config)]
        return tuple(found)

    def url(self, path: str) -> str:
        """The absolute URL of an API path such as ``/batches/batch_1``."""
        return _join(self.base_url, path)

    def params(self) -> Mapping[str, str]:
        """No query parameters."""
        return _NO_QUERY

    def headers(self) -> Mapping[str, str]:
        """The headers every request carries (values masked in the repr)."""
        headers = _Headers({"x-portkey-api-key": self.api_key.reveal()})
        if self.provider:
            headers["x-portkey-provider"] = self.provider
        config = self.config
        if config:
            headers["x-portkey-config"] = config.reveal() if isinstance(config, Secret) else config
        if self.provider_api_key:
            headers["authorization"] = f"Bearer {self.provider_api_key.reveal()}"
        return headers


_API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?|v1|preview|latest")


#: The api_version values that use the v1 API's paths.
_V1_VERSIONS = frozenset({AZURE_API_VERSION_V1, "preview", "latest"})


#: An Azure endpoint: a scheme and a host, and maybe a path (an API Management gateway's).
_AZURE_ENDPOINT = re.compile(r"https?://[^/?#\s]+(/[^?#\s]*)?")


def _azure_endpoint(value: str) -> str:
    return value.strip().rstrip("/")


@attrs.frozen(kw_only=True)
class AzureOpenAIProvider:
    """Azure OpenAI's dialect (reference/batch-api.md §4).

    ``api_version="v1"`` (the default) uses the v1 API, ``{endpoint}/openai/v1/batches``
    with no ``api-version`` (``"preview"`` or ``"latest"``: the v1 paths with
    ``?api-version=preview``, for the v1 API's preview features); a dated version
    (``2024-10-21``, ``2025-04-01-preview``...) uses the older paths,
    ``{endpoint}/openai/batches``, with ``?api-version=<version>`` on every request.
    Files and batches are not deployment-scoped; each input line's ``body.model`` names
    a Global-Batch deployment.

    The client adapts to Azure's quirks (see :class:`Quirks`): an upload is polled until
    it is ``processed``; batches do not expire after 24 h; a successful batch's empty
    error file yields no lines. A file may hold 100,000 requests.

    Args:
        endpoint: the resource's root, ``https://<resource>.openai.azure.com``, or an
            API Management gateway's URL with its path. A trailing ``/openai`` or
            ``/openai/v1`` (as Azure's docs show the v1 API's base URL) is dropped: the
            paths add it.
        api_key: sent as ``api-key``.
        ad_token: an Entra ID (Azure AD) bearer token, sent as ``Authorization:
            Bearer``, instead of ``api_key``. It is fixed for the provider's life:
            build a new client when it expires.
        api_version: ``v1`` or a dated API version.
        limits: how big one batch may be (default 100,000 lines, 200 MB).

    Raises:
        ConfigurationError: no endpoint, an endpoint that is not an http(s) URL or
            has a query, one ending in ``/openai/v1`` with a dated api_version, no
            credential or two, or an api_version that is not one.
    """

    name: ClassVar[str] = "azure"
    quirks: ClassVar[Quirks] = Quirks(
        wait_for_processed_file=True, batches_expire=False, empty_error_file=True
    )

    endpoint: str = attrs.field(converter=_azure_endpoint)
    api_key: Secret | None = attrs.field(default=None, converter=_to_secret)
    ad_token: Secret | None = attrs.field(default=None, converter=_to_secret)
    api_version: str = attrs.field(default=AZURE_API_VERSION_V1, converter=_api_version)
    limits: Limits = AZURE_LIMITS

    def __attrs_post_init__(self) -> None:
        endpoint = self.endpoint
        if not endpoint:
            raise ConfigurationError(
                "Azure OpenAI needs the resource endpoint, https://<resource>.openai.azure.com "
                "(pass endpoint, or set AZURE_OPENAI_ENDPOINT)"
            )
        if not _AZURE_ENDPOINT.fullmatch(endpoint):
            raise ConfigurationError(
                "the Azure endpoint must be the resource root, such as "
                "https://<resource>.openai.azure.com (a gateway's path may follow it), "
                f"without a query; got {endpoint!r}"
            )
        if bool(self.api_key) == bool(self.ad_token):
            raise ConfigurationError(
                "Azure OpenAI needs exactly one credential: api_key (or "
                "AZURE_OPENAI_API_KEY) or ad_token (an Entra ID token, or "
                "AZURE_OPENAI_AD_TOKEN), " + ("not both" if self.api_key else "and got neither")
            )
        if not isinstance(self.api_version, str) or not _API_VERSION.fullmatch(self.api_version):
            raise ConfigurationError(
                "api_version must be 'v1' or a dated Azure API version such as "
                f"'2024-10-21' or '2025-04-01-preview' (OPENAI_API_VERSION); got "
                f"{self.api_version!r}"
            )
        # An endpoint copied with the API's own prefix on it (the v1 API's base URL,
        # https://<resource>.openai.azure.com/openai/v1/, is what Azure's docs show):
        # keep the root, the paths add the prefix back.
        lowered = endpoint.lower()
        if lowered.endswith("/openai/v1"):
            if not self.v1:
                raise ConfigurationError(
                    f"the Azure endpoint {endpoint!r} names the v1 API (/openai/v1) but "
                    f"api_version is {self.api_version!r}: drop /openai/v1 from the endpoint "
                    "for a dated version, or use api_version='v1'"
                )
            object.__setattr__(self, "endpoint", endpoint[: -len("/openai/v1")])
        elif lowered.endswith("/openai"):
            object.__setattr__(self, "endpoint", endpoint[: -len("/openai")])

    @classmethod
    def from_env(
        cls,
        *,
        endpoint: str | None = None,
        api_key: str | Secret | None = None,
        ad_token: str | Secret | None = None,
        api_version: str | None = None,
        limits: Limits | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> AzureOpenAIProvider:
        """Build a provider, taking what is not given from the environment.

        ``AZURE_OPENAI_ENDPOINT``, ``AZURE_OPENAI_API_KEY`` or, when it is not set,
        ``AZURE_OPENAI_AD_TOKEN`` (neither is read when ``api_key`` or ``ad_token`` is
        given) and ``OPENAI_API_VERSION`` (default ``v1``), as the official SDK reads
        them.

        Raises:
            ConfigurationError: see the class.
        """
        env = _env(environ)
        if api_key is None and ad_token is None:
            env_key = _env_key(env, "AZURE_OPENAI_API_KEY")
            if env_key:
                api_key = env_key
            else:
                ad_token = _env_key(env, "AZURE_OPENAI_AD_TOKEN")
        return cls(
            endpoint=endpoint or env.get("AZURE_OPENAI_ENDPOINT") or "",
            api_key=api_key,
            ad_token=ad_token,
            api_version=api_version or env.get("OPENAI_API_VERSION") or AZURE_API_VERSION_V1,
            limits=_limits(limits, AZURE_LIMITS),
        )

    @property
    def v1(self) -> bool:
        """Whether requests go to the v1 API's paths (``/openai/v1``)."""
        return self.api_version in _V1_VERSIONS

    @property
    def base_url(self) -> str:
        """``{endpoint}/openai/v1``, or ``{endpoint}/openai`` for a dated API version."""
        return f"{self.endpoint}/openai/v1" if self.v1 else f"{self.endpoint}/openai"

    @property
    def secrets(self) -> tuple[Secret, ...]:
        """The key or the token."""
        return tuple(s for s in (self.api_key, self.ad_token) if s)

    def url(self, path: str) -> str:
        """The absolute URL of an API path such as ``/batches/batch_1``."""
        return _join(self.base_url, path)

    def params(self) -> Mapping[str, str]:
        """``{"api-version": ...}``, except for ``v1`` itself, which needs none."""
        if self.api_version == AZURE_API_VERSION_V1:
            return _NO_QUERY
        return types.MappingProxyType({"api-version": self.api_version})

    def headers(self) -> Mapping[str, str]:
        """``api-key``, or ``authorization: Bearer`` with an Entra ID token."""
        if self.ad_token:
            return _Headers({"authorization": f"Bearer {self.ad_token.reveal()}"})
        assert self.api_key is not None  # checked when built
        return _Headers({"api-key": self.api_key.reveal()})


@attrs.frozen(kw_only=True)
class CompatibleProvider:
    """Any other OpenAI-compatible server (a self-hosted gateway, a vLLM-style server):
    a base URL and, when the server wants one, a bearer key.

    The converter is tolerant of what such servers leave out (optional fields, the
    ``object`` tag, null counts) and of their timestamps and status spellings.

    Args:
        base_url: the API root, such as ``http://localhost:8000/v1`` (required).
        api_key: sent as ``Authorization: Bearer``; None sends none.
        limits: how big one batch may be (default OpenAI's).

    Raises:
        ConfigurationError: no base URL.
    """

    name: ClassVar[str] = "compatible"
    quirks: ClassVar[Quirks] = Quirks()

    base_url: str = attrs.field(converter=_strip_slash)
    api_key: Secret | None = attrs.field(default=None, converter=_to_secret)
    limits: Limits = OPENAI_LIMITS

    def __attrs_post_init__(self) -> None:
        if not re.match(r"https?://[^/]", self.base_url):
            raise ConfigurationError(
                "an OpenAI-compatible server needs its base URL, such as "
                f"http://localhost:8000/v1 (pass base_url, or set OPENAI_BASE_URL); got "
                f"{self.base_url!r}"
            )

    @classmethod
    def from_env(
        cls,
        *,
        base_url: str | None = None,
        api_key: str | Secret | None = None,
        limits: Limits | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> CompatibleProvider:
        """Build a provider from ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` (optional)
        for what is not given."""
        env = _env(environ)
        return cls(
            base_url=base_url or env.get("OPENAI_BASE_URL") or "",
            api_key=api_key if api_key is not None else _env_key(env, "OPENAI_API_KEY"),
            limits=_limits(limits, OPENAI_LIMITS),
        )

    @property
    def secrets(self) -> tuple[Secret, ...]:
        """The API key, when there is one."""
        return (self.api_key,) if self.api_key else ()

    def url(self, path: str) -> str:
        """The absolute URL of an API path such as ``/batches/batch_1``."""
        return _join(self.base_url, path)

    def params(self) -> Mapping[str, str]:
        """No query parameters."""
        return _NO_QUERY

    def headers(self) -> Mapping[str, str]:
        """``authorization: Bearer``, when there is a key."""
        headers = _Headers()
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key.reveal()}"
        return headers


def require_key(provider: Provider) -> None:
    """Refuse a provider that sends no key to a service that always wants one.

    OpenAI's own API (``api.openai.com``) answers every request without a key with a
    401: an unset ``OPENAI_API_KEY`` is refused here, before any work, rather than met
    at the first request. (Portkey and Azure providers refuse a missing key when they are
    built; a server of one's own, at another base URL, may take none.)

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


#: The names :func:`provider_from_env` (and ``BatchClient(provider=...)``) accept.
PROVIDER_NAMES: tuple[str, ...] = ("openai", "portkey", "azure", "compatible")


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
    return CompatibleProvider.from_env(base_url=base_url, api_key=api_key, environ=environ)
