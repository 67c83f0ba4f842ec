"""Small asyncio helpers shared by the fleet and the runner."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["first_of"]


async def first_of(*futures: asyncio.Future[Any]) -> None:
    """Wait until one of ``futures`` is done; cancel the others and wait for them to end
    (also when this wait itself is cancelled), so none is left running."""
    try:
        await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in futures:
            if not future.done():
                future.cancel()
        for future in futures:
            with contextlib.suppress(asyncio.CancelledError):
                await future
