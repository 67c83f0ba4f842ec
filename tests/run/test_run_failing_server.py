"""A run against a server that fails: how long it waits, what it says, when it gives up.

A ``retry-after`` larger than ``RunConfig.max_retry_wait`` is waited only that long (then
the run tries again) and a WARNING says so; a step that keeps failing stops the run with
:class:`~aiobatch.errors.StepFailedError` once ``give_up_after`` has passed, each failed
attempt logged; a create refused with 409 for a while is tried again, and one refused
every time stops the run after ``max_step_failures``; a server that cannot be reached at
all before it ever answered stops the run with :class:`~aiobatch.errors.UnreachableError`
after ``unreachable_after``.

The fake service plays the failing server on a virtual clock; the unreachable server is
a loopback port with nothing listening, or a name under the reserved ``.invalid`` domain
(it never resolves, and no query leaves the machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from pathlib import Path

import pytest
from conftest import (
    API_KEY,
    Handler,
    client_for,
    config,
    error_response,
    in_front,
    path_of,
    requests,
    run_to_end,
    service_on,
    write_jsonl,
)

from aiobatch import BatchClient, BatchRun, RetryPolicy, RunConfig, RunProgress
from aiobatch._aio import first_of
from aiobatch._run._sqlite import JournalFile as Journal
from aiobatch.errors import (
    AiobatchError,
    ConnectError,
    RunError,
    StepFailedError,
    UnreachableError,
)
from aiobatch.testing import Fault, VirtualClock
from aiobatch.transport import AiohttpTransport, InMemoryTransport, Request, Response


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The WARNING messages of the run's and the fleet's loggers."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and record.name.startswith("aiobatch")
    ]


# --- a huge retry-after ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "cap"),
    [
        ("POST", "/files", None),  # a step's wait (the upload)
        ("GET", "/batches*", None),  # the fleet's budget pause (a poll)
        ("GET", "/batches*", 60.0),
    ],
)
async def test_a_huge_retry_after_is_waited_at_most_max_retry_wait(
    clock: VirtualClock,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    cap: float | None,
) -> None:
    """A 429 asking to wait 99,999 s is waited max_retry_wait (300 s by default), then
    the run tries again and ends within minutes; a WARNING says what was asked and why
    less is waited."""
    caplog.set_level(logging.WARNING, logger="aiobatch")
    service = service_on(clock)
    service.faults.add(Fault.http(429, retry_after=99999, method=method, path=path))
    source = write_jsonl(tmp_path / "in.jsonl", requests(3))
    settings = config() if cap is None else config(max_retry_wait=cap)
    waited = 300 if cap is None else int(cap)
    async with client_for(clock, service.transport()) as client, clock.auto_advance():
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=settings)
        started = clock.monotonic()
        report = await run.run()
        elapsed = clock.monotonic() - started
    assert (report.state, report.succeeded) == ("done", 3)
    assert waited <= elapsed < waited + 600, elapsed
    said = [m for m in warnings_of(caplog) if "99999" in m]
    assert said, warnings_of(caplog)
    assert f"server asked to wait 99999 s; waiting {waited} s (max_retry_wait)" in said[0]


def test_max_retry_wait_must_be_positive() -> None:
    """A zero or negative max_retry_wait is refused when the config is made."""
    with pytest.raises(ValueError, match="max_retry_wait"):
        RunConfig(max_retry_wait=0)


# --- a server that fails every call --------------------------------------------------------


@pytest.mark.parametrize("give_up_after", [None, 120.0])
async def test_a_server_failing_every_call_stops_the_run_at_give_up_after(
    clock: VirtualClock,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    give_up_after: float | None,
) -> None:
    """Every call answered 500: each failed attempt is logged (the error with its status
    and request id, the attempt number, the next try, the time left), and the run stops
    with StepFailedError naming the step and the error once give_up_after (10 minutes
    by default) has passed; the journal stays resumable."""
    caplog.set_level(logging.WARNING, logger="aiobatch")
    service = service_on(clock)
    service.faults.add(Fault.http(500, times=None))
    source = write_jsonl(tmp_path / "in.jsonl", requests(3))
    settings = config() if give_up_after is None else config(give_up_after=give_up_after)
    budget = 600.0 if give_up_after is None else give_up_after
    async with client_for(clock, service.transport()) as client, clock.auto_advance():
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=settings)
        started = clock.monotonic()
        with pytest.raises(StepFailedError) as info:
            await run.run()
        elapsed = clock.monotonic() - started
    error = info.value
    assert budget <= elapsed <= budget + 1.0, elapsed
    assert error.elapsed >= budget
    assert error.attempts >= 3
    assert "HTTP 500" in str(error) and "s000000" in str(error), str(error)
    assert "give_up_after" in str(error)
    assert error.__cause__ is error.cause
    tries = [
        m for m in warnings_of(caplog) if re.search(r"s000000 \((planned|uploading)\): attempt", m)
    ]
    assert len(tries) == error.attempts - 1, tries  # the last one is the error itself
    assert "attempt 1 " in tries[0] and "attempt 2 " in tries[1], tries[:2]
    for message in tries:
        assert "request id" in message, message
        assert "next try in" in message and "giving up in" in message, message
    with Journal(tmp_path / "run.journal", readonly=True) as journal:
        assert journal.get_meta("state") == "failed"
        assert journal.pending_count() + journal.not_done_count() > 0


# --- a create that is refused ----------------------------------------------------------------


async def test_a_create_answered_409_for_a_while_is_tried_again_not_rejected(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A create refused with 409 Conflict (transient, like 429 and 5xx, in aiobatch's retry
    policy) beyond the client's retries is tried again later: the requests succeed
    instead of ending with batch_create_rejected."""
    service = service_on(clock)
    service.faults.add(Fault.http(409, method="POST", path="/batches", times=3))
    source = write_jsonl(tmp_path / "in.jsonl", requests(3))
    async with client_for(clock, service.transport()) as client:
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=config())
        async with clock.auto_advance():
            report, results = await run_to_end(run)
    assert dict(report.errors) == {}
    assert report.succeeded == 3
    assert all(r.ok for r in results)


@pytest.mark.parametrize("status", [404, 500])
async def test_a_create_refused_every_time_stops_the_run_after_max_step_failures(
    clock: VirtualClock, tmp_path: Path, status: int
) -> None:
    """A server that answers every create with a 404 or a 500 (making no batch) stops the
    run with RunError after max_step_failures failed creates, instead of uploading or
    looking up and creating again for ever."""
    service = service_on(clock)
    creates = 0

    async def refusing(request: Request, handle: Handler) -> Response:
        nonlocal creates
        if request.method == "POST" and path_of(request) == "/batches":
            creates += 1
            return error_response(status, "the create endpoint refuses")
        return await handle(request)

    source = write_jsonl(tmp_path / "in.jsonl", requests(2))
    settings = config(step_backoff=60.0, max_step_failures=3)
    async with client_for(clock, in_front(service, refusing)) as client, clock.auto_advance():
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=settings)
        runner = asyncio.ensure_future(run.run())
        with contextlib.suppress(AiobatchError):
            await first_of(
                asyncio.ensure_future(asyncio.shield(runner)),
                asyncio.ensure_future(clock.sleep(6 * 3600.0)),
            )
        ended = runner.done()
        if not ended:
            run.stop()
        with contextlib.suppress(BaseException):
            await runner
    uploads = service.request_count("POST", "/files")
    assert ended, f"still running after 6 hours: {uploads} uploads, {creates} create attempts"
    assert isinstance(runner.exception(), RunError), repr(runner.exception())
    assert uploads <= 3, uploads


# --- a server that cannot be reached -------------------------------------------------------


def closed_port() -> int:
    """A loopback port with nothing listening (bound to get a free one, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class RealNetwork:
    """The real aiohttp transport, counting the requests in flight, so the virtual clock
    moves only while none is (``auto_advance`` would take a wait on real IO for idle)."""

    def __init__(self) -> None:
        self.transport = AiohttpTransport()
        self.in_flight = 0

    async def send(self, request: Request, *, stream: bool = False) -> Response:
        self.in_flight += 1
        try:
            return await self.transport.send(request, stream=stream)
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        await self.transport.aclose()


async def drive(clock: VirtualClock, network: RealNetwork) -> None:
    """Move the clock to the next wake-up whenever nothing runs and no request is out."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(0.001)  # real IO (a refused connect, a lookup) gets its turn
        for _ in range(10_000):  # let what is ready run first
            if not getattr(loop, "_ready", None):
                break
            await asyncio.sleep(0)
        wake = clock.next_wakeup
        if network.in_flight == 0 and wake is not None:
            clock.advance_to(wake)


@pytest.mark.parametrize("where", ["refused", "no such name"])
async def test_an_unreachable_server_stops_the_run_after_unreachable_after(
    clock: VirtualClock, tmp_path: Path, where: str
) -> None:
    """A host whose name does not resolve, or that refuses the connection, from the first
    call on: the run stops with UnreachableError saying so plainly, after about
    unreachable_after (30 s by default) rather than after many minutes."""
    if where == "refused":
        host = f"127.0.0.1:{closed_port()}"
        reason = "connection refused"
    else:
        host = "aiobatch-test.invalid"
        reason = "name does not resolve"
    source = write_jsonl(tmp_path / "in.jsonl", requests(3))
    network = RealNetwork()
    driver = asyncio.ensure_future(drive(clock, network))
    try:
        async with BatchClient(
            api_key=API_KEY,
            base_url=f"http://{host}/v1",
            transport=network,
            clock=clock,
            retry=RetryPolicy(),  # 6 attempts a call, once the server answers
        ) as client:
            run = BatchRun(client, source, journal=tmp_path / "run.journal", config=config())
            started = clock.monotonic()
            with pytest.raises(UnreachableError) as info:
                await run.run()
            elapsed = clock.monotonic() - started
    finally:
        driver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await driver
        await network.aclose()
    error = info.value
    # The last try starts at 30 s; until the server answers, a call makes 3 quick
    # attempts of its own (waits of at most 1 + 2 s).
    assert 30.0 <= elapsed <= 33.0, elapsed
    assert f"cannot reach {host}: {reason}" in str(error), str(error)
    assert (error.host, error.reason) == (host, reason)
    with Journal(tmp_path / "run.journal", readonly=True) as journal:
        assert journal.get_meta("state") == "failed"


async def test_a_resumed_run_whose_server_is_unreachable_stops_after_unreachable_after(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A run stopped with its batches open, resumed against a server that refuses every
    connection: its first calls are the fleet's polls, and the run stops with
    UnreachableError soon after unreachable_after instead of polling for ever."""
    service = service_on(clock, validation_seconds=3600.0)
    source = write_jsonl(tmp_path / "in.jsonl", requests(3))
    journal = tmp_path / "run.journal"
    async with client_for(clock, service.transport()) as client, clock.auto_advance():
        holder: list[BatchRun] = []

        def stop_once_open(progress: RunProgress) -> None:
            if progress.batches.get("validating"):
                holder[0].stop()

        run = BatchRun(client, source, journal=journal, config=config(), on_progress=stop_once_open)
        holder.append(run)
        assert (await run.run()).state == "stopped"
    host = f"127.0.0.1:{closed_port()}"
    network = RealNetwork()
    driver = asyncio.ensure_future(drive(clock, network))
    try:
        async with BatchClient(
            api_key=API_KEY,
            base_url=f"http://{host}/v1",
            transport=network,
            clock=clock,
            retry=RetryPolicy(),  # 6 attempts a call, once the server answers
        ) as client:
            resumed = BatchRun(client, source, journal=journal, config=config())
            started = clock.monotonic()
            with pytest.raises(UnreachableError) as info:
                await resumed.run()
            elapsed = clock.monotonic() - started
    finally:
        driver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await driver
        await network.aclose()
    # The fleet reports every fifth failed poll in a row (FAST_FLEET: polls 2, 4, 8 and
    # then 10 s apart), so the run learns of it at most 50 s after the budget.
    assert 30.0 <= elapsed <= 30.0 + 50.0, elapsed
    assert f"cannot reach {host}: connection refused" in str(info.value)
    with Journal(journal, readonly=True) as journal_db:
        assert journal_db.get_meta("state") == "failed"
        assert len(journal_db.open_batches()) == 1  # still there for the next run


async def test_connection_failures_after_the_server_answered_use_give_up_after(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """Once the server has answered, a lost connection is an outage, not a wrong address:
    the run keeps trying for give_up_after, not unreachable_after, and finishes when the
    server comes back."""
    service = service_on(clock)
    down_until: list[float] = []

    async def refusing_creates_for_5_minutes(request: Request) -> Response:
        # The upload is answered; then creates cannot connect for 5 minutes.
        if request.method == "POST" and request.url.endswith("/batches"):
            if not down_until:
                down_until.append(clock.monotonic() + 300.0)
            if clock.monotonic() < down_until[0]:
                raise ConnectError(
                    f"cannot connect ({request.method} {request.url})",
                    method=request.method,
                    url=request.url,
                    reason="connection refused",
                )
        return await service.handle(request)

    source = write_jsonl(tmp_path / "in.jsonl", requests(3))
    async with (
        client_for(clock, InMemoryTransport(refusing_creates_for_5_minutes, clock=clock)) as client,
        clock.auto_advance(),
    ):
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=config())
        report = await run.run()
    assert (report.state, report.succeeded) == ("done", 3)
    assert clock.monotonic() >= down_until[0]
