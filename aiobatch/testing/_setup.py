"""One call for a fake service, the virtual clock it runs on, and a client bound to it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import attrs

from .._client import DEFAULT_CREATE_SETTLE, BatchClient
from .._provider import AzureOpenAIProvider, OpenAIProvider, PortkeyProvider, Provider
from .._retry import RetryPolicy
from ..transport import InMemoryTransport, Request, Response
from ._clock import VirtualClock
from ._config import FakeConfig
from ._dialects import FakeDialect
from ._faults import Fault
from ._service import FakeBatchService

__all__ = ["FakeSetup", "Front", "fake_client"]

#: The API root the client of :func:`fake_client` sends to (Azure: its ``/openai/v1``).
_BASE_URL = "http://fake.local/v1"

#: The key the client of :func:`fake_client` sends unless told otherwise.
_API_KEY = "sk-fake"

#: Stands in front of the service: ``front(request, handle)`` answers a request, usually
#: by calling ``handle(request)`` (the service) and changing the request or the answer.
Front = Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]


@attrs.frozen
class FakeSetup:
    """What :func:`fake_client` yields.

    Attributes:
        service: the fake batch service.
        clock: the virtual clock the service and the client run on.
        client: a client whose requests go to ``service`` in memory.
    """

    service: FakeBatchService
    clock: VirtualClock
    client: BatchClient


@contextlib.asynccontextmanager
async def fake_client(
    *,
    config: FakeConfig | None = None,
    seed: int | None = None,
    dialect: str | FakeDialect | None = None,
    faults: Iterable[Fault] = (),
    clock: VirtualClock | None = None,
    service: FakeBatchService | None = None,
    retry: RetryPolicy | None = None,
    api_key: str | None = None,
    provider: Provider | None = None,
    front: Front | None = None,
    create_settle: float = DEFAULT_CREATE_SETTLE,
    timeout: float | None = 120.0,
) -> AsyncIterator[FakeSetup]:
    """A fake service on a virtual clock and a :class:`~aiobatch.BatchClient` bound to it.

    The client talks to the service in memory (no sockets), as the provider the
    service's dialect plays (OpenAI, Portkey with an ``@slug``, or Azure's v1 API), and
    waits (retries, polls, timeouts) on the same clock. Time moves only when told to:
    wrap the code under test in ``async with setup.clock.auto_advance():``. On exit the
    client and its transport are closed; a bug raised by a request handler that ran on
    after its caller timed out is raised then.

    Args:
        config: the service's timings, limits and line errors (default ``FakeConfig()``).
        seed: the service's seed for ids, faults and results (default 0).
        dialect: the provider the service plays (default ``"openai"``).
        faults: fault rules armed on the service, checked in this order.
        clock: the clock (default a new :class:`VirtualClock`).
        service: a service built beforehand, on a :class:`VirtualClock` (instead of
            ``config``, ``seed`` and ``dialect``); ``faults`` are added to its own.
        retry: the client's retry policy (default the client's, waiting on the clock;
            ``RetryPolicy.for_testing()`` retries without waiting).
        api_key: the key the client sends (default ``"sk-fake"``); give the service's
            own when it was built with ``api_key``.
        provider: the provider the client uses, instead of the one for the dialect.
        front: ``front(request, handle)`` answers each request instead of the service,
            usually by calling ``handle(request)``: a server that differs from the fake.
        create_settle: the client's ``create_settle``.
        timeout: the client's default seconds per request, on the clock.

    Yields:
        The service, the clock and the client.

    Raises:
        TypeError: ``service`` together with ``config``, ``seed`` or ``dialect``, or
            ``provider`` together with ``api_key``.
        ValueError: ``service`` does not run on a :class:`VirtualClock`, or on another
            one than ``clock``.
    """
    if service is None:
        clock = clock if clock is not None else VirtualClock()
        service = FakeBatchService(
            clock=clock,
            config=config,
            seed=seed if seed is not None else 0,
            dialect=dialect if dialect is not None else "openai",
        )
    else:
        if config is not None or seed is not None or dialect is not None:
            raise TypeError("pass either service or config/seed/dialect, not both")
        clock = _clock_of(service, clock)
    if provider is not None and api_key is not None:
        raise TypeError("pass either provider or api_key, not both")
    for fault in faults:
        service.faults.add(fault)
    transport = _transport(service, clock, front)
    if provider is None:
        provider = _provider_for(service.dialect, api_key if api_key is not None else _API_KEY)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(transport.aclose)
        client = await stack.enter_async_context(
            BatchClient(
                provider=provider,
                transport=transport,
                clock=clock,
                retry=retry,
                timeout=timeout,
                create_settle=create_settle,
            )
        )
        yield FakeSetup(service=service, clock=clock, client=client)


def _clock_of(service: FakeBatchService, clock: VirtualClock | None) -> VirtualClock:
    """The virtual clock ``service`` runs on (which must be ``clock`` when given)."""
    if not isinstance(service.clock, VirtualClock):
        raise ValueError(
            f"fake_client needs a service on a VirtualClock, not {type(service.clock).__name__}"
        )
    if clock is not None and clock is not service.clock:
        raise ValueError("the service runs on another clock than the one given")
    return service.clock


def _transport(
    service: FakeBatchService, clock: VirtualClock, front: Front | None
) -> InMemoryTransport:
    """The in-memory transport to ``service``, through ``front`` when given."""
    if front is None:
        return service.transport()

    async def handle(request: Request) -> Response:
        return await front(request, service.handle)

    return InMemoryTransport(handle, clock=clock)


def _provider_for(dialect: FakeDialect, api_key: str, base_url: str = _BASE_URL) -> Provider:
    """The provider whose requests a service of ``dialect`` at ``base_url`` (its ``/v1``
    root) accepts."""
    if dialect.name == "azure":
        return AzureOpenAIProvider(endpoint=base_url.removesuffix("/v1"), api_key=api_key)
    if dialect.name == "portkey":
        return PortkeyProvider(api_key=api_key, provider="@fake", base_url=base_url)
    return OpenAIProvider(api_key=api_key, base_url=base_url)
