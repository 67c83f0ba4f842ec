"""``aiobatch watch`` against the fake over HTTP: it follows the batches named, or every
open one, until each has ended, and its exit status says how they ended."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import pytest
from conftest import Cli, create

from aiobatch import BatchClient
from aiobatch.testing import FakeBatchService, LineErrorRule, VirtualClock, run_fake_server
from aiobatch.testing.pytest_plugin import DEFAULT_API_KEY, FakeServer, _marker_options, _service
from aiobatch.transport import Request, Response

#: A batch of 3 lines takes 0.3 s of the service's time: open when the watch starts.
STEADY = {"validation_seconds": 0.0, "lines_per_second": 10.0}
#: Polls fast enough for those batches.
FAST_POLLS = ("--poll-min", "0.05s", "--poll-max", "0.1s")
#: How far the service's clock moves after each GET it answers.
STEP = 0.1


class TimeMovesOnReads:
    """The service, its clock moved ``STEP`` on after each GET it answers: a batch stands
    still until the watch has read it, whatever the machine's speed, then moves as it polls."""

    def __init__(self, service: FakeBatchService, clock: VirtualClock) -> None:
        self.service = service
        self.clock = clock

    async def handle(self, request: Request) -> Response:
        """Answer as the service does, then move its clock if the request read."""
        response = await self.service.handle(request)
        if request.method == "GET":
            self.clock.advance(STEP)
        return response


@pytest.fixture
async def aiobatch_server(request: pytest.FixtureRequest) -> AsyncIterator[FakeServer]:
    """The fake over HTTP, configured by the test's ``aiobatch`` marker, on a virtual
    clock that moves only when the service answers a read (``TimeMovesOnReads``)."""
    options = _marker_options(request)
    clock = VirtualClock()
    service = _service(options, {"finalizing_seconds": 0.0}, clock)
    async with run_fake_server(TimeMovesOnReads(service, clock)) as base_url:
        yield FakeServer(base_url, options.get("api_key") or DEFAULT_API_KEY, service)


@pytest.mark.aiobatch(**STEADY)
async def test_watch_follows_the_open_batches_until_they_end(
    cli: Cli, aiobatch_server_client: BatchClient, caplog: pytest.LogCaptureFixture
) -> None:
    """With no id, ``watch --metadata`` follows every open batch that matches until each
    has ended, logs their moves and progress, prints them as they ended, and exits 0."""
    caplog.set_level(logging.INFO, logger="aiobatch.watch")
    mine = [await create(aiobatch_server_client, 3, project="a") for _ in range(2)]
    other = await create(aiobatch_server_client, 2, project="b")
    code, text, err = await cli("watch", "--metadata", "project=a", "--json", *FAST_POLLS)
    assert code == 0, err
    ended = json.loads(text)
    assert sorted(item["id"] for item in ended) == sorted(b.id for b in mine)
    assert all(item["reason"] == "finished" for item in ended)
    assert all(item["batch"]["status"] == "completed" for item in ended)
    assert all(item["batch"]["request_counts"]["completed"] == 3 for item in ended)
    logged = [r.getMessage() for r in caplog.records if r.name == "aiobatch.watch"]
    assert any(f"{mine[0].id}: " in m and m.endswith("-> completed") for m in logged)
    assert not any(other.id in m for m in logged)
    assert logged[-1].startswith("6/6 requests (6 ok, 0 failed")
    assert "batches: 2 completed" in logged[-1]


@pytest.mark.aiobatch(**STEADY, line_errors=[LineErrorRule(status=400, ratio=0.5)])
async def test_watch_exits_1_when_requests_failed(
    cli: Cli, aiobatch_server_client: BatchClient
) -> None:
    """A watched batch that ended with failed requests: the table shows them and the
    exit status is 1; ``--allow-failures`` makes it 0."""
    batch = await create(aiobatch_server_client, 6)
    code, text, err = await cli("watch", batch.id, *FAST_POLLS)
    assert code == 1, err
    header, row = text.splitlines()
    assert header.split()[:3] == ["ID", "STATUS", "PROGRESS"]
    assert row.split()[:2] == [batch.id, "completed"]
    assert "failed)" in row
    code, text, err = await cli("watch", batch.id, "--allow-failures", *FAST_POLLS)
    assert code == 0, err
    assert batch.id in text


@pytest.mark.aiobatch(validation_seconds=0.0, lines_per_second=0.001, cancel_seconds=0.3)
async def test_watch_exits_1_for_a_cancelled_batch(
    cli: Cli, aiobatch_server_client: BatchClient
) -> None:
    """A batch still cancelling is open: the watch follows it until it is cancelled,
    and exits 1 (it did not complete)."""
    batch = await create(aiobatch_server_client, 2)
    await aiobatch_server_client.cancel_batch(batch.id)
    code, text, err = await cli("watch", "--json", *FAST_POLLS)
    assert code == 1, err
    assert [item["id"] for item in json.loads(text)] == [batch.id]
    assert [item["batch"]["status"] for item in json.loads(text)] == ["cancelled"]


async def test_watch_with_nothing_open(cli: Cli) -> None:
    """No open batch in the account: nothing to watch, exit 0."""
    code, text, err = await cli("watch")
    assert code == 0, err
    assert "no open batch" in text


async def test_watch_an_unknown_batch_exits_4(cli: Cli) -> None:
    """A batch the provider does not know: exit 4 with its id in the error."""
    code, _, err = await cli("watch", "batch_nope")
    assert code == 4
    assert "aiobatch watch" in err and "batch_nope" in err
