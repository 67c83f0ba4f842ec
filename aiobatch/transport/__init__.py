"""Transports: the seam between aiobatch and the network.

A transport sends a :class:`Request` and returns a :class:`Response`. aiobatch ships
:class:`AiohttpTransport` (real HTTP) and :class:`InMemoryTransport` (no sockets; hands
requests to a handler such as the fake batch service).
"""

from ._aiohttp import AiohttpTransport
from ._base import FilePart, Multipart, Request, Response, Transport
from ._memory import InMemoryTransport

__all__ = [
    "AiohttpTransport",
    "FilePart",
    "InMemoryTransport",
    "Multipart",
    "Request",
    "Response",
    "Transport",
]
