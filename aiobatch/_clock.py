"""Time, injected: every wait and every timestamp in aiobatch goes through a Clock.

Tests pass :class:`aiobatch.testing.VirtualClock`, so nothing ever waits on wall time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """The time source and sleeper used by clients, pollers and the fake service."""

    def now(self) -> float:
        """Seconds since the Unix epoch (for wire timestamps and deadlines)."""
        ...

    def monotonic(self) -> float:
        """A clock that never goes backwards (for measuring intervals)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait for ``seconds``."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        """Seconds since the Unix epoch."""
        return time.time()

    def monotonic(self) -> float:
        """The system's monotonic clock."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """Sleep on the event loop."""
        await asyncio.sleep(max(0.0, seconds))

    def __repr__(self) -> str:
        return "SystemClock()"
