"""A pytest plugin: fixtures that test your code against aiobatch's fake batch service.

Installed with aiobatch (a ``pytest11`` entry point), so the fixtures are there in every
test session of an environment that has aiobatch; async tests need pytest-asyncio
(``asyncio_mode = "auto"``, or ``@pytest.mark.asyncio``). Every name starts with
``aiobatch_``:

``aiobatch_fake``
    A :class:`~aiobatch.testing.FakeSetup`: a fake service in memory, the virtual clock
    it runs on, and a :class:`~aiobatch.BatchClient` bound to it. The clock jumps ahead
    whenever the test waits on it (``auto_advance=False`` to move it yourself), so a
    batch's simulated minutes pass at once.
``aiobatch_client``
    ``aiobatch_fake.client``.
``aiobatch_server``
    A :class:`FakeServer`: a fake service served over real HTTP on a free loopback port,
    on the real clock, finishing batches at once by default: its ``base_url`` (the
    ``/v1`` root) and ``api_key`` are for code that uses the official SDKs or any HTTP
    client (``env`` holds them as ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY``).
``aiobatch_server_client``
    A :class:`~aiobatch.BatchClient` sending to ``aiobatch_server`` over HTTP.
``aiobatch_fake_factory``, ``aiobatch_server_factory``
    ``await factory(**options)`` builds another one (closed when the test ends).

Options, given to a factory or to the ``aiobatch`` marker (which configures the
fixtures of the tests it marks; a factory's own options win)::

    @pytest.mark.aiobatch(dialect="azure", faults=[Fault.http(429, times=2)],
                          validation_seconds=30, rate_limit=RateLimit(...))

- ``config``: a :class:`~aiobatch.testing.FakeConfig`; any of its fields as keywords
  (``validation_seconds``, ``lines_per_second``, ``line_errors``, ``rate_limit``...)
  change it;
- ``dialect``: the provider the service plays (``openai``, ``portkey``, ``azure``...);
- ``faults``: :class:`~aiobatch.testing.Fault` rules armed on the service;
- ``seed``: the service's seed; ``api_key``: the key it requires (default: any);
- ``auto_advance`` (in memory only): whether the clock jumps on its own (default True).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import pytest

if TYPE_CHECKING:
    from .._client import BatchClient
    from ._service import FakeBatchService
    from ._setup import FakeSetup

try:  # pytest-asyncio in strict mode needs its own decorator for async fixtures
    from pytest_asyncio import fixture as _async_fixture
except ImportError:  # pragma: no cover - async fixtures then need another plugin
    _async_fixture = pytest.fixture  # type: ignore[assignment]

__all__ = [
    "FakeServer",
    "aiobatch_client",
    "aiobatch_fake",
    "aiobatch_fake_factory",
    "aiobatch_server",
    "aiobatch_server_client",
    "aiobatch_server_factory",
]

#: The key the fixtures' clients send (and the server requires when none is given).
DEFAULT_API_KEY = "sk-aiobatch-fake"

#: Timings of :func:`aiobatch_server`: a batch finishes at its first poll.
SERVER_TIMINGS: Mapping[str, Any] = {
    "validation_seconds": 0.0,
    "lines_per_second": 1_000_000.0,
    "finalizing_seconds": 0.0,
    "cancel_seconds": 0.0,
}

_OPTIONS = ("config", "dialect", "faults", "seed", "api_key", "auto_advance")


@attrs.frozen
class FakeServer:
    """The fake service served over HTTP.

    Attributes:
        base_url: the API root to give a client (``http://127.0.0.1:PORT/v1``).
        api_key: a key the server accepts.
        service: the fake service behind it (its ``faults``, ``requests``...).
    """

    base_url: str
    api_key: str
    service: FakeBatchService

    @property
    def env(self) -> dict[str, str]:
        """``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` for this server (for
        ``monkeypatch.setenv``, or an SDK's ``base_url``/``api_key``)."""
        return {"OPENAI_BASE_URL": self.base_url, "OPENAI_API_KEY": self.api_key}


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``aiobatch`` marker."""
    config.addinivalue_line(
        "markers",
        "aiobatch(**options): configure the aiobatch_* fixtures of the test (config, "
        "FakeConfig fields, dialect, faults, seed, api_key, auto_advance)",
    )


def _marker_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers("aiobatch"))):
        if marker.args:
            raise TypeError("@pytest.mark.aiobatch takes keyword options only")
        options.update(marker.kwargs)
    return options


def _service(options: Mapping[str, Any], timings: Mapping[str, Any], clock: Any) -> Any:
    from ._config import FakeConfig
    from ._service import FakeBatchService

    fields = {k: v for k, v in options.items() if k not in _OPTIONS}
    unknown = sorted(set(fields) - {a.name for a in attrs.fields(FakeConfig)})
    if unknown:
        raise TypeError(f"unknown aiobatch fixture option(s): {', '.join(unknown)}")
    base = options.get("config") or FakeConfig(**timings)
    config = attrs.evolve(base, **fields)
    service = FakeBatchService(
        clock=clock,
        config=config,
        seed=options.get("seed", 0),
        dialect=options.get("dialect", "openai"),
        api_key=options.get("api_key"),
    )
    for fault in options.get("faults", ()):
        service.faults.add(fault)
    return service


@contextlib.asynccontextmanager
async def _fake(options: Mapping[str, Any]) -> AsyncIterator[FakeSetup]:
    from ._clock import VirtualClock
    from ._setup import fake_client

    service = _service(options, {}, VirtualClock())
    key = options.get("api_key") or DEFAULT_API_KEY
    async with fake_client(service=service, api_key=key) as setup:
        if options.get("auto_advance", True):
            async with setup.clock.auto_advance():
                yield setup
        else:
            yield setup


@contextlib.asynccontextmanager
async def _server(options: Mapping[str, Any]) -> AsyncIterator[FakeServer]:
    from ._app import run_fake_server

    if "auto_advance" in options:
        raise TypeError("auto_advance is for the in-memory fake: the server runs on real time")
    service = _service(options, SERVER_TIMINGS, None)
    async with run_fake_server(service) as base_url:
        if service.dialect.name == "azure":
            base_url = base_url.removesuffix("/v1") + "/openai/v1"
        yield FakeServer(base_url, options.get("api_key") or DEFAULT_API_KEY, service)


@_async_fixture
async def aiobatch_fake_factory(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[..., Awaitable[FakeSetup]]]:
    """``await aiobatch_fake_factory(**options)``: another in-memory fake service, its
    virtual clock and a client bound to it (see the module's options)."""
    marked = _marker_options(request)
    async with contextlib.AsyncExitStack() as stack:

        async def make(**options: Any) -> FakeSetup:
            return await stack.enter_async_context(_fake({**marked, **options}))

        yield make


@_async_fixture
async def aiobatch_fake(
    aiobatch_fake_factory: Callable[..., Awaitable[FakeSetup]],
) -> FakeSetup:
    """An in-memory fake service, its virtual clock and a client bound to it,
    configured by the test's ``aiobatch`` marker."""
    return await aiobatch_fake_factory()


@pytest.fixture
def aiobatch_client(aiobatch_fake: FakeSetup) -> BatchClient:
    """The :class:`~aiobatch.BatchClient` of ``aiobatch_fake``."""
    return aiobatch_fake.client


@_async_fixture
async def aiobatch_server_factory(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[..., Awaitable[FakeServer]]]:
    """``await aiobatch_server_factory(**options)``: another fake service served over
    HTTP on a free port (see the module's options)."""
    marked = _marker_options(request)
    async with contextlib.AsyncExitStack() as stack:

        async def make(**options: Any) -> FakeServer:
            return await stack.enter_async_context(_server({**marked, **options}))

        yield make


@_async_fixture
async def aiobatch_server(
    aiobatch_server_factory: Callable[..., Awaitable[FakeServer]],
) -> FakeServer:
    """A fake service served over HTTP on a free loopback port, configured by the
    test's ``aiobatch`` marker."""
    return await aiobatch_server_factory()


@_async_fixture
async def aiobatch_server_client(aiobatch_server: FakeServer) -> AsyncIterator[BatchClient]:
    """A :class:`~aiobatch.BatchClient` sending to ``aiobatch_server`` over HTTP."""
    from .._client import BatchClient
    from ._setup import _provider_for

    server = aiobatch_server
    root = server.base_url
    if server.service.dialect.name == "azure":
        root = root.removesuffix("/openai/v1") + "/v1"
    provider = _provider_for(server.service.dialect, server.api_key, root)
    async with BatchClient(provider=provider) as client:
        yield client
