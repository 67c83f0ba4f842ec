"""Shared fixtures: a virtual clock, a raw-request driver for the fake batch service, the
fake-plus-client environment of the fleet tests, and the helpers of the runner and
command-line tests.

The test modules sit in folders by layer (client, providers, fleet, run, fake, transport,
cli); pytest puts this folder on ``sys.path``, so every module imports these helpers with
``from conftest import ...``. Module names stay unique across the folders."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from hypothesis import settings
from pytest_aiohttp import AiohttpServer

import aiobatch
from aiobatch import (
    Batch,
    BatchClient,
    BatchRun,
    FleetConfig,
    RetryPolicy,
    RunConfig,
    RunProgress,
    RunReport,
    RunResult,
)
from aiobatch._run._sqlite import JournalFile
from aiobatch.cli import main as cli_main
from aiobatch.testing import (
    FakeBatchService,
    FakeConfig,
    Front,
    VirtualClock,
    chat_requests,
    fake_client,
    make_app,
)
from aiobatch.testing.pytest_plugin import FakeServer
from aiobatch.transport import FilePart, InMemoryTransport, Multipart, Request, Response

BASE_URL = "http://fake.local/v1"
API_KEY = "sk-test-0123456789abcdef"

EXAMPLE = Path(aiobatch.__file__).parent / "examples" / "requests.jsonl"

T = TypeVar("T")

#: Hypothesis fails an example that takes longer than its deadline (200 ms of wall time
#: by default), which a loaded machine's stall makes it do whatever the code under test
#: does (DeadlineExceeded, then FlakyFailure when the replay is fast): no test here
#: checks speed that way, so the property tests run without a deadline.
settings.register_profile("aiobatch", deadline=None)
settings.load_profile("aiobatch")


def chat_line(
    custom_id: str,
    text: str = "hello",
    *,
    model: str = "gpt-4o-mini",
    url: str = "/v1/chat/completions",
    **body: Any,
) -> dict[str, Any]:
    """One chat-completions input line."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": url,
        "body": {"model": model, "messages": [{"role": "user", "content": text}], **body},
    }


def jsonl(lines: Iterable[Mapping[str, Any] | str]) -> bytes:
    """Encode lines (objects, or raw strings kept as they are) as a JSONL file."""
    out = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    return ("\n".join(out) + "\n").encode() if out else b""


class FakeApi:
    """Sends raw :class:`Request` objects to a fake service and decodes the answers."""

    def __init__(self, service: FakeBatchService, *, key: str | None = API_KEY) -> None:
        self.service = service
        self.key = key

    def headers(self) -> dict[str, str]:
        """The auth headers sent with every request."""
        return {"Authorization": f"Bearer {self.key}"} if self.key is not None else {}

    async def raw(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        body: bytes | Multipart | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send one request; ``path`` is relative to the ``/v1`` base URL."""
        if json_body is not None:
            body = json.dumps(json_body).encode()
        request = Request(
            method,
            BASE_URL + path,
            params=dict(params or {}),
            headers=dict(headers) if headers is not None else self.headers(),
            body=body,
        )
        return await self.service.handle(request)

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """Send one request and decode its JSON body."""
        response = await self.raw(method, path, **kwargs)
        return response.status, json.loads(await response.read())

    async def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request that must succeed; returns its decoded body."""
        status, data = await self.call(method, path, **kwargs)
        assert status == 200, data
        return data

    async def upload(
        self, content: bytes, *, filename: str = "input.jsonl", purpose: str = "batch"
    ) -> dict[str, Any]:
        """Upload a file; returns the File object."""
        form = Multipart(
            fields=(("purpose", purpose),),
            files=(("file", FilePart(filename, content=content)),),
        )
        data: dict[str, Any] = await self.ok("POST", "/files", body=form)
        return data

    async def create(
        self, input_file_id: str, *, endpoint: str = "/v1/chat/completions", **extra: Any
    ) -> dict[str, Any]:
        """Create a batch; returns the Batch object."""
        payload = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": "24h",
            **extra,
        }
        data: dict[str, Any] = await self.ok("POST", "/batches", json_body=payload)
        return data

    async def submit(
        self,
        lines: Iterable[Mapping[str, Any] | str],
        *,
        endpoint: str = "/v1/chat/completions",
        **extra: Any,
    ) -> dict[str, Any]:
        """Upload ``lines`` and create a batch from them."""
        uploaded = await self.upload(jsonl(lines))
        return await self.create(uploaded["id"], endpoint=endpoint, **extra)

    async def batch(self, batch_id: str) -> dict[str, Any]:
        """Retrieve a batch."""
        data: dict[str, Any] = await self.ok("GET", f"/batches/{batch_id}")
        return data

    async def content(self, file_id: str) -> bytes:
        """Download a file's content."""
        response = await self.raw("GET", f"/files/{file_id}/content")
        assert response.status == 200
        return await response.read()

    async def lines(self, file_id: str | None) -> list[dict[str, Any]]:
        """The decoded lines of a result file ([] for a null file id)."""
        if file_id is None:
            return []
        return [json.loads(line) for line in (await self.content(file_id)).splitlines()]


@pytest.fixture
def clock() -> VirtualClock:
    """A virtual clock at a fixed start time."""
    return VirtualClock(start=1_750_000_000.0)


@pytest.fixture
async def base_url(aiohttp_server: AiohttpServer, service: FakeBatchService) -> str:
    """The test module's ``service`` served over HTTP on loopback; its ``/v1`` base URL."""
    server = await aiohttp_server(make_app(service))
    return str(server.make_url("/v1"))


@pytest.fixture
def make_api(clock: VirtualClock) -> Callable[..., FakeApi]:
    """Build a fake service on ``clock`` (config fields as keyword arguments) and a driver."""

    def make(
        *,
        responder: Any = None,
        api_key: str | None = None,
        seed: int = 0,
        key: str | None = API_KEY,
        **config: Any,
    ) -> FakeApi:
        service = FakeBatchService(
            clock=clock,
            config=FakeConfig(**config),
            responder=responder,
            api_key=api_key,
            seed=seed,
        )
        return FakeApi(service, key=key)

    return make


@pytest.fixture
def api(make_api: Callable[..., FakeApi]) -> FakeApi:
    """A driver for a fake service with the default configuration."""
    return make_api()


FLEET_TIMINGS = {"validation_seconds": 30.0, "lines_per_second": 0.5, "finalizing_seconds": 10.0}
"""Fake timings for fleet tests: fast, yet slow enough that a batch is polled a few times."""


class FleetEnv:
    """A fake service, a client on it, and helpers to create batches and count calls."""

    def __init__(self, clock: VirtualClock, service: FakeBatchService, client: BatchClient):
        self.clock = clock
        self.service = service
        self.client = client

    async def create(self, count: int, *, lines: int = 5) -> list[Batch]:
        """Create ``count`` batches of ``lines`` lines each (one upload shared)."""
        uploaded = await self.client.upload_file(chat_requests(lines))
        return [
            await self.client.create_batch(uploaded.id, "/v1/chat/completions")
            for _ in range(count)
        ]

    def calls(self, method: str, path: str) -> int:
        """How many requests the service received for a method and path pattern."""
        return self.service.request_count(method, path)

    def fleet_requests(self, since: float) -> list[float]:
        """Arrival times of the batch-API calls made since ``since`` (the fleet's)."""
        return [
            r.at
            for r in self.service.requests
            if r.at >= since
            and (
                (r.path.startswith("/batches") and r.method == "GET") or r.path.endswith("/cancel")
            )
        ]


class Ticker:
    """A task that counts the turns of the event loop until :meth:`stop` (how a test
    sees that other tasks ran while something was read or written)."""

    def __init__(self) -> None:
        self.ticks = 0
        self._stopped = asyncio.Event()
        self._task: asyncio.Future[None] | None = None

    @classmethod
    async def start(cls) -> Ticker:
        """A ticker that has ticked once."""
        ticker = cls()
        ticker._task = asyncio.ensure_future(ticker._run())
        await asyncio.sleep(0)
        return ticker

    async def _run(self) -> None:
        while not self._stopped.is_set():
            self.ticks += 1
            await asyncio.sleep(0)

    async def stop(self) -> None:
        """Stop counting (after the turn under way)."""
        self._stopped.set()
        if self._task is not None:
            await self._task


async def within(clock: VirtualClock, seconds: float, work: Awaitable[T]) -> T:
    """``work``'s result, or a failure when it is not done after ``seconds`` of virtual
    time (the clock auto-advances: a hang spins through virtual time)."""
    task = asyncio.ensure_future(work)
    timer = asyncio.ensure_future(clock.sleep(seconds))
    await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
    timer.cancel()
    if not task.done():
        # A hung run may hang in its cancel too: wait for that a while only.
        task.cancel()
        timer = asyncio.ensure_future(clock.sleep(seconds))
        await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
        timer.cancel()
        pytest.fail(f"not done after {seconds:g} virtual seconds")
    return task.result()


@pytest.fixture
def make_env(clock: VirtualClock) -> Callable[..., Any]:
    """Build a FleetEnv (fake config fields as keyword arguments; ``front`` stands in front
    of the service, to play a server that differs from the fake) as an async context."""

    @asynccontextmanager
    async def make(front: Front | None = None, **config: Any) -> AsyncIterator[FleetEnv]:
        settings = {**FLEET_TIMINGS, "request_log_size": None, **config}
        async with fake_client(
            clock=clock,
            config=FakeConfig(**settings),
            front=front,
            retry=RetryPolicy.for_testing(max_attempts=3),
        ) as fake:
            yield FleetEnv(fake.clock, fake.service, fake.client)

    return make


# --- the runner tests' environment ---------------------------------------------------

#: Polls often, so a run of a few hundred virtual seconds is observed closely.
FAST_FLEET = FleetConfig(
    min_interval=1.0,
    max_interval=10.0,
    validating_interval=1.0,
    finalizing_interval=1.0,
    cancelling_interval=1.0,
    in_progress_interval=5.0,
    jitter=0.0,
    seed=0,
)

Handler = Callable[[Request], Awaitable[Response]]


def config(**overrides: Any) -> RunConfig:
    """A RunConfig polling with FAST_FLEET unless told otherwise."""
    return RunConfig(**{"fleet": FAST_FLEET, **overrides})


def service_on(clock: VirtualClock, **settings: Any) -> FakeBatchService:
    """A fake service on ``clock`` with fast, seeded timings (FakeConfig overrides)."""
    values = {
        "validation_seconds": 5.0,
        "lines_per_second": 1.0,
        "finalizing_seconds": 5.0,
        "request_log_size": None,
        **settings,
    }
    return FakeBatchService(clock=clock, config=FakeConfig(**values))


@asynccontextmanager
async def client_for(
    clock: VirtualClock,
    transport: InMemoryTransport,
    *,
    retry: RetryPolicy | None = None,
    **kwargs: Any,
) -> AsyncIterator[BatchClient]:
    """A client over ``transport`` on ``clock`` (OpenAI provider unless ``provider``)."""
    if "provider" not in kwargs:
        kwargs = {"api_key": API_KEY, "base_url": BASE_URL, **kwargs}
    async with BatchClient(
        transport=transport,
        clock=clock,
        retry=retry or RetryPolicy.for_testing(max_attempts=3),
        **kwargs,
    ) as client:
        yield client


def in_front(service: FakeBatchService, handler: Callable[[Request, Handler], Any]) -> Any:
    """An in-memory transport whose requests go through ``handler(request, service.handle)``."""

    async def handle(request: Request) -> Response:
        result: Response = await handler(request, service.handle)
        return result

    return InMemoryTransport(handle, clock=service.clock)


def path_of(request: Request) -> str:
    """The request path after the API root (``/batches/batch_1``)."""
    path = request.url.split("://", 1)[-1]
    path = path[path.index("/") :] if "/" in path else "/"
    for root in ("/openai/v1", "/openai", "/v1"):
        if path.startswith(root + "/"):
            return path[len(root) :]
    return path


def error_response(status: int, message: str) -> Response:
    """An OpenAI-shaped error answer."""
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    return Response(status, {"content-type": "application/json"}, json.dumps(body).encode())


def requests(n: int, prefix: str = "r", *, model: str = "gpt-4o-mini") -> list[dict[str, Any]]:
    """``n`` chat requests with custom_ids ``{prefix}-0``... and distinct prompts."""
    return [chat_line(f"{prefix}-{i}", f"question {i}", model=model) for i in range(n)]


def write_jsonl(path: Path, lines: Iterable[Mapping[str, Any]]) -> Path:
    """Write request objects as a JSONL file; returns the path."""
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def read_output(path: Path) -> list[dict[str, Any]]:
    """The decoded lines of an output file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def is_success(line: Mapping[str, Any]) -> bool:
    """An output line holds a 200 response and no error."""
    response = line.get("response")
    return line.get("error") is None and response is not None and response["status_code"] == 200


async def cancelled_at_start(client: BatchClient, source: Path, journal: Path) -> RunReport:
    """A run of ``source`` cancelled at its first progress report: its journal is
    unfinished (ingested, nothing submitted)."""
    holder: list[BatchRun] = []

    def on_progress(_: RunProgress) -> None:
        holder[0].cancel()

    run = BatchRun(client, source, journal=journal, on_progress=on_progress)
    holder.append(run)
    return await run.run()


async def run_to_end(run: BatchRun) -> tuple[RunReport, list[RunResult]]:
    """Run to the end with results() read alongside."""
    streamed = asyncio.ensure_future(_all_results(run))
    try:
        report = await run.run()
        return report, await streamed
    finally:
        if not streamed.done():
            streamed.cancel()


async def _all_results(run: BatchRun) -> list[RunResult]:
    return [result async for result in run.results()]


async def shards_of_batches(service: FakeBatchService) -> Counter[str]:
    """How many batches the service holds per ``aiobatch_shard`` (the service's own view)."""
    shards: Counter[str] = Counter()
    for batch_id in service.batch_ids:
        batch = await service.get_batch(batch_id)
        shards[(batch.metadata or {}).get("aiobatch_shard", "?")] += 1
    return shards


async def executed(service: FakeBatchService) -> Counter[str]:
    """How many times each custom_id was answered by some batch (output and error files)."""
    counts: Counter[str] = Counter()
    for batch_id in service.batch_ids:
        batch = await service.get_batch(batch_id)
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id is None:
                continue
            for line in service.file_content(file_id).splitlines():
                item = json.loads(line)
                if item.get("response") is not None:  # it ran (success or HTTP error)
                    counts[item["custom_id"]] += 1
    return counts


def shard_rows(journal: Path) -> list[dict[str, Any]]:
    """The journal's shard rows, read as ``aiobatch status`` would (read-only)."""
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in db.execute("SELECT * FROM shards ORDER BY key")]
    finally:
        db.close()


def page_size(path: Path) -> int:
    """The SQLite page size of a database file (read-only)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(db.execute("PRAGMA page_size").fetchone()[0])
    finally:
        db.close()


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on loopback as a real server does (a handler keeps running when its
    client hangs up, as in :func:`aiobatch.testing.run_fake_server`); yields the base URL."""
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}/v1"
    finally:
        await runner.cleanup()


# --- the command-line tests' helpers ------------------------------------------------


def run_argv(output: Path, *extra: str, source: Path = EXAMPLE) -> list[str]:
    """``aiobatch run SOURCE -o OUTPUT --fake --max-lines 200 --no-progress ...``."""
    return [
        "run",
        str(source),
        "-o",
        str(output),
        "--fake",
        "--max-lines",
        "200",
        "--no-progress",
        *extra,
    ]


def make_requests(path: Path, n: int) -> Path:
    """A JSONL file of ``n`` chat requests."""
    path.write_text(
        "".join(json.dumps(chat_line(f"q-{i}", f"question {i}")) + "\n" for i in range(n)),
        encoding="utf-8",
    )
    return path


def batch_ids_in(path: Path) -> list[str | None]:
    """The batch id of every shard the journal holds, by shard key."""
    with JournalFile(path, readonly=True) as journal:
        return [row.batch_id for row in journal.shards()]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the session's throwaway PostgreSQL server (tests/pg.py), if one ran."""
    from pg import stop_pg_server

    stop_pg_server()


# --- the CLI over the plugin's fake server -------------------------------------------


class Cli:
    """Runs ``aiobatch`` against the server, in a thread (it runs its own loop)."""

    def __init__(self, server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
        self.server = server
        self.capsys = capsys

    async def __call__(self, *argv: str) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) of ``aiobatch ARGV --provider compatible ...``."""
        self.capsys.readouterr()
        where = ["--provider", "compatible", "--base-url", self.server.base_url]
        code = await asyncio.to_thread(cli_main, [*argv, *where])
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err


@pytest.fixture
def cli(
    aiobatch_server: FakeServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Cli:
    """``aiobatch`` against the plugin's fake server, with its key in the environment."""
    monkeypatch.setenv("OPENAI_API_KEY", aiobatch_server.api_key)
    return Cli(aiobatch_server, capsys)


async def create(client: BatchClient, n: int, **metadata: str) -> Any:
    """A batch of ``n`` requests with ``metadata``."""
    uploaded = await client.upload_file(chat_requests(n))
    return await client.create_batch(uploaded.id, "/v1/chat/completions", metadata=metadata)


def within_bucket(times: list[float], rate: float, burst: int) -> bool:
    """Whether, over every span [t_i, t_j], at most burst + rate * span grants happened
    (spans measured to the microsecond the budget rounds to)."""
    times = sorted(times)
    return all(
        j - i + 1 <= burst + rate * (times[j] - times[i] + 1e-5) + 1e-9
        for i in range(len(times))
        for j in range(i, len(times))
    )
