"""How the fake service plays each provider: auth headers, paths, error shapes, quirks.

A :class:`FakeDialect` is data plus small pure functions; the service asks it to check
each request (credentials and URL shape) and to rewrite what it sends (error bodies,
timestamps, statuses). The simulation underneath is the same for every dialect: only
the engine switches the dialect turns on (no expiry, an empty error file, files that
are ``pending`` for a while) change what happens.

The 401 shapes
--------------
What each dialect answers a request with a missing or wrong key, and why:

* ``openai``: OpenAI's envelope, ``{"error": {"message", "type":
  "invalid_request_error", "param": null, "code": "invalid_api_key" | null}}``, with
  OpenAI's messages (reference/batch-api.md §1.12).
* ``portkey``: the gateway checks ``x-portkey-api-key`` itself, before any provider is
  involved, and its own failures use its non-OpenAI envelope ``{"status": "failure",
  "message": ...}`` (§3.4, ``batchesHandler.ts``). The reference has no verbatim 401
  body; the messages here ("Invalid API Key", "x-portkey-api-key header is required")
  are our reading of what users report, and the shape is the point: clients must read
  ``message`` from the top level. A request with no ``x-portkey-provider`` /
  ``x-portkey-config`` gets the gateway's 400 "Either x-portkey-config or
  x-portkey-provider header is required" in the same envelope. With a plain provider
  name and no ``Authorization``, the upstream provider's 401 comes back wrapped as the
  gateway wraps every provider error (§3.4): ``{"error": {"message": "openai error:
  ..."}, "provider": "openai"}``.
* ``azure``: Azure's front door answers ``{"error": {"code": "401", "message": "Access
  denied due to ..."}}``: an ``error`` object with a string ``code`` and no ``type`` or
  ``param`` (the messages are Azure's well-known ones for a missing and for an invalid
  subscription key). A legacy ``/openai/...`` path without ``api-version`` is a 404
  ``{"error": {"code": "404", "message": "Resource not found"}}``, as Azure answers it;
  a malformed version is a 400 ``API version not supported``.
* ``anthropic``: Anthropic's envelope ``{"type": "error", "error": {"type":
  "authentication_error", "message": ...}}`` for a missing or wrong ``x-api-key`` (or
  ``Authorization: Bearer``, which the official SDK's 2.x releases send); a
  request without ``anthropic-version`` is a 400 ``invalid_request_error`` (the official
  SDK always sends it). Every error body of this dialect is in that envelope.

Neither Portkey's nor Azure's exact 401 text is in the reference material; where it is
silent the fake follows the documented envelope and says so here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import attrs

from .._models import BATCH_TIMESTAMPS
from ._wire import error_envelope

__all__ = ["DIALECT_NAMES", "FakeDialect"]

DialectName = Literal["openai", "portkey", "azure", "anthropic"]

#: The dialects the fake speaks.
DIALECT_NAMES: tuple[DialectName, ...] = ("openai", "portkey", "azure", "anthropic")

#: A reply the dialect decided on: (status, JSON-ready body).
Reply = tuple[int, dict[str, Any]]

_OPENAI_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
_AZURE_NO_KEY = (
    "Access denied due to missing subscription key. Make sure to include subscription key "
    "when making requests to an API."
)
_AZURE_BAD_KEY = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
    "provide a valid key for an active subscription and use a correct regional API "
    "endpoint for your resource."
)
_PORTKEY_NO_ROUTE = "Either x-portkey-config or x-portkey-provider header is required"

_API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?")


def mask(key: str) -> str:
    """Show a key as OpenAI does in errors: never the whole key."""
    if len(key) < 12:
        return "*" * len(key)
    return f"{key[:3]}{'*' * (len(key) - 7)}{key[-4:]}"


def _bearer(headers: Mapping[str, str]) -> str | None:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def _camel(status: str) -> str:
    return "".join(part.capitalize() for part in status.split("_"))


def _iso(seconds: int) -> str:
    # Azure's preview API versions write seven fraction digits and an explicit offset.
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.0000000+00:00")


@attrs.frozen(kw_only=True)
class FakeDialect:
    """Which provider the fake service plays, and which of its quirks it shows.

    Build one with :meth:`openai`, :meth:`portkey` or :meth:`azure` (their keyword
    arguments override single switches), or pass a name to
    ``FakeBatchService(dialect=...)``.

    Attributes:
        name: ``openai``, ``portkey`` or ``azure``: the credentials and paths required
            and the error shapes (see the module notes). Portkey also serves
            ``GET /v1/batches/{id}/output`` and can end batches in its own
            ``file_upload_failed`` / ``batch_start_failed`` statuses
            (``service.fail_next_batches(code, status=...)``).
        file_pending_seconds: an upload reports ``status: "pending"`` for this long
            before it is ``processed``, and a create with a pending file is a 400
            (Azure; 0: uploads are ``processed`` at once).
        batches_expire: unfinished batches expire at the end of the completion window
            (Azure's do not: they run past ``expires_at`` until done or cancelled).
        empty_error_file: a batch with no failed line still gets an ``error_file_id``,
            for an empty file (Azure).
        ms_timestamps: send every batch and file timestamp in milliseconds (as Vertex
            AI and Bedrock batches come through Portkey).
        iso_timestamps: send them as ISO-8601 strings (Azure's 2024 preview versions).
        capitalised_statuses: send statuses in CamelCase, ``"Validating"``,
            ``"InProgress"`` (Azure's 2024 preview versions).
        null_request_counts: send ``request_counts`` with null fields while a batch is
            validating (Azure's 2024 preview versions).
        key_required: refuse requests without credentials; False plays a local
            OpenAI-compatible server that takes requests with no key at all.
        max_completion_window_hours: the longest ``completion_window`` a create may ask
            for, as a duration in hours (``"36h"``) or days (``"7d"``), from ``24h``
            (Groq's: 168, ``7d``); 24 takes only ``"24h"``.
        legacy_endpoints: a create may name the endpoint as Azure's dated API
            versions do, ``/chat/completions`` (no ``/v1``), its lines' ``url`` the same
            (Azure).
    """

    name: DialectName = "openai"
    file_pending_seconds: float = 0.0
    batches_expire: bool = True
    empty_error_file: bool = False
    ms_timestamps: bool = False
    iso_timestamps: bool = False
    capitalised_statuses: bool = False
    null_request_counts: bool = False
    key_required: bool = True
    legacy_endpoints: bool = False
    max_completion_window_hours: int = 24

    def __attrs_post_init__(self) -> None:
        if self.name not in DIALECT_NAMES:
            raise ValueError(
                f"unknown fake dialect {self.name!r}: expected one of {', '.join(DIALECT_NAMES)}"
            )
        if not self.file_pending_seconds >= 0:
            raise ValueError(
                f"file_pending_seconds must be >= 0, got {self.file_pending_seconds!r}"
            )

    @classmethod
    def openai(cls, **switches: Any) -> FakeDialect:
        """OpenAI: bearer keys, ``/v1`` paths, OpenAI's error envelope."""
        return cls(name="openai", **switches)

    @classmethod
    def portkey(cls, **switches: Any) -> FakeDialect:
        """The Portkey gateway: ``x-portkey-*`` headers, the output endpoint, its statuses."""
        return cls(name="portkey", **switches)

    @classmethod
    def azure(cls, **switches: Any) -> FakeDialect:
        """Azure OpenAI: ``api-key``, ``/openai`` paths, uploads ``pending`` for 2 s, no
        expiry, an empty error file for successful batches, the ``/chat/completions``
        endpoint of its dated API versions.

        ``azure(iso_timestamps=True, capitalised_statuses=True, null_request_counts=True)``
        adds the quirks of the 2024 preview API versions.
        """
        defaults: dict[str, Any] = {
            "file_pending_seconds": 2.0,
            "batches_expire": False,
            "empty_error_file": True,
            "legacy_endpoints": True,
        }
        return cls(name="azure", **{**defaults, **switches})

    @classmethod
    def anthropic(cls, **switches: Any) -> FakeDialect:
        """Anthropic's Message Batches: ``x-api-key`` and ``anthropic-version``, the
        ``/v1/messages/batches`` endpoints (served by ``_anthropic_routes``), its error
        envelope."""
        return cls(name="anthropic", **switches)

    @classmethod
    def of(cls, value: str | FakeDialect) -> FakeDialect:
        """A dialect from its name (with that provider's default quirks), or as given."""
        if isinstance(value, FakeDialect):
            return value
        if value == "openai":
            return cls.openai()
        if value == "portkey":
            return cls.portkey()
        if value == "azure":
            return cls.azure()
        if value == "anthropic":
            return cls.anthropic()
        raise ValueError(
            f"unknown fake dialect {value!r}: expected one of {', '.join(DIALECT_NAMES)}"
        )

    def accepts_window(self, window: str) -> bool:
        """Whether a create may ask for this ``completion_window``."""
        if self.max_completion_window_hours <= 24:
            return window == "24h"
        match = re.fullmatch(r"([1-9][0-9]*)([hd])", window)
        if match is None:
            return False
        hours = int(match.group(1)) * (24 if match.group(2) == "d" else 1)
        return 24 <= hours <= self.max_completion_window_hours

    @property
    def batch_output_endpoint(self) -> bool:
        """Whether ``GET /batches/{id}/output`` is served (Portkey)."""
        return self.name == "portkey"

    @property
    def rewrites_bodies(self) -> bool:
        """Whether any switch changes the JSON of batches or files."""
        return (
            self.ms_timestamps
            or self.iso_timestamps
            or self.capitalised_statuses
            or self.null_request_counts
        )

    # -- requests -----------------------------------------------------------------------

    def check(
        self,
        url: str,
        params: Mapping[str, str],
        headers: Mapping[str, str],
        api_key: str | None,
    ) -> Reply | None:
        """The reply for a request with wrong credentials or a wrong URL, or None.

        Args:
            url: the request URL (its path is checked for Azure).
            params: the query parameters (from the URL and the request).
            headers: the request headers, lower-case names.
            api_key: the one key accepted, or None to accept any.
        """
        if not self.key_required:
            return self._check_azure_url(url, params) if self.name == "azure" else None
        if self.name == "portkey":
            return self._check_portkey(headers, api_key)
        if self.name == "azure":
            return self._check_azure(headers, api_key) or self._check_azure_url(url, params)
        if self.name == "anthropic":
            return self._check_anthropic(headers, api_key)
        return self._check_openai(headers, api_key)

    @staticmethod
    def _check_anthropic(headers: Mapping[str, str], api_key: str | None) -> Reply | None:
        # The SDK's 2.x releases send the key as a bearer token.
        token = headers.get("x-api-key", "").strip() or _bearer(headers)
        if not token:
            return 401, _anthropic_envelope("authentication_error", "x-api-key header is required")
        if api_key is not None and token != api_key:
            return 401, _anthropic_envelope("authentication_error", "invalid x-api-key")
        if not headers.get("anthropic-version", "").strip():
            return 400, _anthropic_envelope(
                "invalid_request_error", "anthropic-version: header is required"
            )
        return None

    @staticmethod
    def _check_openai(headers: Mapping[str, str], api_key: str | None) -> Reply | None:
        # api-key and x-portkey-api-key are accepted too: a plain fake takes any client.
        token = _bearer(headers) or headers.get("api-key") or headers.get("x-portkey-api-key")
        if not token:
            return 401, error_envelope(_OPENAI_NO_KEY)
        if api_key is not None and token != api_key:
            message = (
                f"Incorrect API key provided: {mask(token)}. You can find your API key at "
                "https://platform.openai.com/account/api-keys."
            )
            return 401, error_envelope(message, code="invalid_api_key")
        return None

    @staticmethod
    def _check_portkey(headers: Mapping[str, str], api_key: str | None) -> Reply | None:
        key = headers.get("x-portkey-api-key", "").strip()
        if not key:
            return 401, {"status": "failure", "message": "x-portkey-api-key header is required"}
        if api_key is not None and key != api_key:
            return 401, {"status": "failure", "message": "Invalid API Key"}
        provider = headers.get("x-portkey-provider") or headers.get("x-portkey-virtual-key")
        config = headers.get("x-portkey-config")
        if not provider and not config:
            return 400, {"status": "failure", "message": _PORTKEY_NO_ROUTE}
        plain_name = provider is not None and not provider.startswith("@") and not config
        if plain_name and "x-portkey-virtual-key" not in headers and not _bearer(headers):
            # The gateway forwards the request without a key; the provider refuses it.
            return 401, _wrap_provider_error(error_envelope(_OPENAI_NO_KEY))
        return None

    @staticmethod
    def _check_azure(headers: Mapping[str, str], api_key: str | None) -> Reply | None:
        # An api-key header, or (v1 API, Entra ID) a bearer token; the fake accepts the
        # service's key in either.
        token = headers.get("api-key", "").strip() or _bearer(headers)
        if not token:
            return 401, {"error": {"code": "401", "message": _AZURE_NO_KEY}}
        if api_key is not None and token != api_key:
            return 401, {"error": {"code": "401", "message": _AZURE_BAD_KEY}}
        return None

    @staticmethod
    def _check_azure_url(url: str, params: Mapping[str, str]) -> Reply | None:
        parts = urlsplit(url)
        segments = [unquote(s) for s in parts.path.split("/") if s]
        not_found: Reply = (404, {"error": {"code": "404", "message": "Resource not found"}})
        if not segments or segments[0] != "openai":
            return not_found
        if len(segments) > 1 and segments[1] == "v1":
            return None  # the v1 API: no api-version needed
        version = params.get("api-version")
        if version is None:
            return not_found
        if not _API_VERSION.fullmatch(version):
            return 400, {"error": {"code": "BadRequest", "message": "API version not supported"}}
        return None

    def wrap_error(self, body: dict[str, Any]) -> dict[str, Any]:
        """An error body as this dialect sends it (Portkey wraps the provider's)."""
        if self.name == "portkey" and isinstance(body.get("error"), dict):
            return _wrap_provider_error(body)
        if self.name == "anthropic" and body.get("type") != "error":
            inner = body.get("error")
            message = inner.get("message") if isinstance(inner, dict) else None
            kind = inner.get("type") if isinstance(inner, dict) else None
            if kind in (None, "server_error"):
                kind = "api_error"
            return _anthropic_envelope(str(kind), str(message or "error"))
        return body

    def fault_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """An injected fault's error body as this dialect sends it (Anthropic's
        envelope for the ``anthropic`` dialect; the others' as they are)."""
        return self.wrap_error(body) if self.name == "anthropic" else body

    # -- bodies -------------------------------------------------------------------------

    def batch_wire(self, wire: dict[str, Any]) -> dict[str, Any]:
        """A batch's JSON as this dialect sends it (the input is not changed)."""
        if not self.rewrites_bodies:
            return wire
        out = self._times(wire)
        status = wire.get("status")
        if self.null_request_counts and status == "validating":
            out["request_counts"] = {"total": None, "completed": None, "failed": None}
        if self.capitalised_statuses and isinstance(status, str):
            out["status"] = _camel(status)
        return out

    def file_wire(self, wire: dict[str, Any], *, pending: bool) -> dict[str, Any]:
        """A file's JSON as this dialect sends it (``pending``: not processed yet)."""
        if not self.rewrites_bodies and not pending:
            return wire
        out = self._times(wire) if self.rewrites_bodies else dict(wire)
        if pending:
            out["status"] = "pending"
        return out

    def _times(self, wire: dict[str, Any]) -> dict[str, Any]:
        out = dict(wire)
        if not (self.iso_timestamps or self.ms_timestamps):
            return out
        for key in BATCH_TIMESTAMPS:
            value = out.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                out[key] = _iso(value) if self.iso_timestamps else value * 1000
        return out


def _anthropic_envelope(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def _wrap_provider_error(body: dict[str, Any]) -> dict[str, Any]:
    """The gateway's wrapping of a provider error: message prefixed, ``provider`` added."""
    inner = dict(body["error"])
    message = inner.get("message")
    if isinstance(message, str) and not message.startswith("openai error: "):
        inner["message"] = f"openai error: {message}"
    return {"error": inner, "provider": "openai"}
