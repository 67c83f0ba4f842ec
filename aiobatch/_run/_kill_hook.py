"""Test-only: SIGKILL a worker process at a named point of its work, for the kill trials
(``tests/run/test_workers_killed.py``), which run ``aiobatch worker`` processes and so
cannot inject it in Python. Never set it otherwise.

It is armed only when *both* variables are set: ``AIOBATCH_TESTING=1`` (declaring a test
process) and ``AIOBATCH_TEST_KILL_AT``; either alone does nothing.
``AIOBATCH_TEST_KILL_AT=POINT[:N]`` kills the process (``os.kill(os.getpid(), SIGKILL)``,
no cleanup, as a crash) the ``N``-th time (default the first) it reaches ``POINT``:

- ``after_claim``: it took the leases of some shards, before acting on them;
- ``after_upload``: the provider answered an upload, before its file id was recorded;
- ``mid_create``: the provider made a batch, before its id was recorded;
- ``mid_collection``: a result file's download was answered, before its results were
  recorded.
"""

from __future__ import annotations

import os
import re
import signal

from ..transport._base import Request, Response, Transport

__all__ = ["KILL_POINTS", "KillSwitch", "KillingTransport"]

KILL_POINTS = ("after_claim", "after_upload", "mid_create", "mid_collection")
ENV = "AIOBATCH_TEST_KILL_AT"
#: must be ``1`` too for :data:`ENV` to arm anything
TESTING_ENV = "AIOBATCH_TESTING"


class KillSwitch:
    """The process's kill point, read from :data:`ENV` (None when unset, or when
    :data:`TESTING_ENV` is not ``1``)."""

    def __init__(self, point: str, nth: int) -> None:
        self.point = point
        self._left = nth

    @classmethod
    def from_env(cls) -> KillSwitch | None:
        spec = os.environ.get(ENV)
        if not spec or os.environ.get(TESTING_ENV) != "1":
            return None
        point, _, nth = spec.partition(":")
        if point not in KILL_POINTS:
            raise ValueError(f"{ENV}={spec!r}: the point is one of {', '.join(KILL_POINTS)}")
        return cls(point, int(nth or 1))

    def reached(self, point: str) -> None:
        """Kill the process when this is its kill point, the N-th time."""
        if point == self.point:
            self._left -= 1
            if self._left <= 0:
                os.kill(os.getpid(), signal.SIGKILL)


def _point(request: Request) -> str | None:
    if request.method == "POST" and request.url.endswith("/files"):
        return "after_upload"
    if request.method == "POST" and request.url.endswith("/batches"):
        return "mid_create"
    if request.method == "GET" and re.search(r"/files/[^/]+/content$", request.url):
        return "mid_collection"
    return None


class KillingTransport:
    """A transport that reaches its switch's point once an answer to such a request came."""

    def __init__(self, inner: Transport, switch: KillSwitch) -> None:
        self._inner = inner
        self._switch = switch

    async def send(self, request: Request, *, stream: bool = False) -> Response:
        response = await self._inner.send(request, stream=stream)
        point = _point(request)
        if point is not None and response.status < 300:
            self._switch.reached(point)
        return response

    async def aclose(self) -> None:
        """Nothing to release: the wrapped transport stays open."""
