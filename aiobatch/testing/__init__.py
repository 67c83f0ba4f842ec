"""Test helpers that are part of the product: a virtual clock and a fake batch service.

:class:`FakeBatchService` is an in-memory OpenAI-compatible Batch and Files API with a
simulated lifecycle on an injected clock (:class:`VirtualClock` in tests), a pluggable
:data:`Responder` for the results, :class:`Fault` injection, an optional
server-side :class:`RateLimit`, and a :class:`FakeDialect` per provider (OpenAI,
Portkey, Azure OpenAI: their headers, paths, error shapes and quirks).
:func:`fake_client` builds a service, its virtual clock and a client bound to it in
one call. :func:`make_app` and :func:`run_fake_server` serve it over real HTTP;
:class:`WebhookSender` sends its signed ``batch.*`` webhooks, with faults;
:func:`set_retry_testing` makes every retry wait zero.
"""

from .._retry import set_retry_testing
from ._app import make_app, run_fake_server
from ._clock import VirtualClock
from ._config import FakeConfig, LineErrorRule, unit_hash
from ._dialects import DIALECT_NAMES, FakeDialect
from ._faults import Fault, FaultKind, FaultPlan, FiredFault
from ._ratelimit import Admission, RateLimit, RateLimiter
from ._requests import chat_requests
from ._responder import (
    DefaultResponder,
    Responder,
    ResponderResult,
    current_line_time,
    estimate_tokens,
)
from ._service import FakeBatchService, RecordedRequest
from ._setup import FakeSetup, Front, fake_client
from ._webhooks import WebhookDelivery, WebhookFaults, WebhookSender, WebhookSenderStats

__all__ = [
    "Admission",
    "DIALECT_NAMES",
    "DefaultResponder",
    "FakeBatchService",
    "FakeConfig",
    "FakeDialect",
    "FakeSetup",
    "Fault",
    "FaultKind",
    "FaultPlan",
    "FiredFault",
    "Front",
    "LineErrorRule",
    "RateLimit",
    "RateLimiter",
    "RecordedRequest",
    "Responder",
    "ResponderResult",
    "VirtualClock",
    "WebhookDelivery",
    "WebhookFaults",
    "WebhookSender",
    "WebhookSenderStats",
    "chat_requests",
    "current_line_time",
    "estimate_tokens",
    "fake_client",
    "make_app",
    "run_fake_server",
    "set_retry_testing",
    "unit_hash",
]
