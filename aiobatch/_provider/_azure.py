"""Azure OpenAI's dialect: :class:`AzureOpenAIProvider`, its API versions, endpoint
rules and limits."""

from __future__ import annotations

import re
import types
from collections.abc import Mapping
from typing import ClassVar

import attrs

from .._secret import Secret, _Headers, _to_secret
from ..errors import ConfigurationError
from ._base import _NO_QUERY, Limits, Quirks, _env, _env_key, _join, _limits

__all__ = ["AZURE_API_VERSION_V1", "AZURE_LIMITS", "AzureOpenAIProvider"]

#: The ``api_version`` of Azure's v1 API: ``/openai/v1/...`` paths, no ``api-version``.
AZURE_API_VERSION_V1 = "v1"

#: Azure OpenAI's limits (reference/batch-api.md §4).
AZURE_LIMITS = Limits(max_lines=100_000, max_bytes=200 * 1024 * 1024)


_API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?|v1|preview|latest")


#: The api_version values that use the v1 API's paths.
_V1_VERSIONS = frozenset({AZURE_API_VERSION_V1, "preview", "latest"})


#: An Azure endpoint: a scheme and a host, and maybe a path (an API Management gateway's).
_AZURE_ENDPOINT = re.compile(r"https?://[^/?#\s]+(/[^?#\s]*)?")


def _azure_endpoint(value: str) -> str:
    return value.strip().rstrip("/")


def _api_version(value: str) -> str:
    return value.strip() if isinstance(value, str) else value


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
