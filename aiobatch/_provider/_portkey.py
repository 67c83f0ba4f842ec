"""The Portkey gateway's dialect: :class:`PortkeyProvider`, its hosted gateway's URL,
and how an inline config's credentials are kept secret."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from .._secret import Secret, _Headers, _to_secret
from ..errors import ConfigurationError
from ._base import _NO_QUERY, Limits, Quirks, _env, _env_key, _join, _limits, _strip_slash
from ._openai import OPENAI_LIMITS

__all__ = ["PORTKEY_BASE_URL", "PortkeyProvider"]

#: Portkey's hosted gateway (a self-hosted gateway listens on ``http://localhost:8787/v1``).
PORTKEY_BASE_URL = "https://api.portkey.ai/v1"


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
