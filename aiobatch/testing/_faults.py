"""Fault injection for the fake batch service: rules that break matching requests.

A :class:`Fault` names what to break (method and path pattern), how (an HTTP error, a
dropped connection before or after the request took effect, a slow answer, a
truncated JSON body) and how often (``times`` uses, each firing with ``probability``
drawn from a seeded generator). A :class:`FaultPlan` holds the rules in order; the
first one that matches and fires wins.

Example::

    service.faults.add(Fault.http(429, retry_after=2, method="POST", path="/batches"))
    service.faults.add(Fault.drop(after=True, method="POST", path="/batches"))
    service.faults.add(Fault.slow(30, path="/files/*/content", times=None))
    service.faults.add(Fault.slow(30, act_after_delay=True, method="POST", path="/batches"))
"""

from __future__ import annotations

import enum
import random
from fnmatch import fnmatchcase
from typing import Any

import attrs

__all__ = ["Fault", "FaultKind", "FaultPlan", "FiredFault"]


class FaultKind(str, enum.Enum):
    """How a fault breaks a request."""

    #: Answer with an HTTP error status; the request has no effect.
    HTTP = "http"
    #: Drop the connection before the request is processed (no effect).
    DROP_BEFORE = "drop_before"
    #: Process the request, then drop the connection: it took effect, the answer is lost.
    DROP_AFTER = "drop_after"
    #: Answer normally, ``delay`` seconds late: processed on arrival, or only after the
    #: delay when ``act_after_delay`` is set (a late commit).
    SLOW = "slow"
    #: Process the request, then answer 200 with the body cut in half (invalid JSON).
    MALFORMED = "malformed"
    #: Not an injected fault: the service's rate limit (``FakeConfig.rate_limit``)
    #: answered 429 and the request had no effect. Only seen in
    #: :attr:`RecordedRequest.fault <aiobatch.testing.RecordedRequest.fault>`; a
    #: :class:`Fault` cannot have this kind.
    RATE_LIMITED = "rate_limited"


def _injectable(_: object, attribute: attrs.Attribute[Any], value: FaultKind) -> None:
    if value is FaultKind.RATE_LIMITED:
        raise ValueError(
            "FaultKind.RATE_LIMITED marks requests refused by FakeConfig.rate_limit; "
            "inject a 429 with Fault.http(429, ...) instead"
        )


def _upper(method: str | None) -> str | None:
    return method.upper() if method is not None else None


def _normalise_path(pattern: str) -> str:
    if pattern.startswith("/v1/"):
        return pattern[3:]
    return pattern


def _probability(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be within [0, 1], got {value!r}")


def _times(_: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be >= 1 or None (unlimited), got {value!r}")


@attrs.frozen
class Fault:
    """One fault-injection rule. Build it with :meth:`http`, :meth:`drop`, :meth:`slow`
    or :meth:`malformed`.

    Attributes:
        kind: how the request is broken.
        method: the HTTP method to match (``"POST"``), or None for any.
        path: a shell-style pattern for the path after ``/v1`` (``"/batches"``,
            ``"/batches/*/cancel"``, ``"/files/*/content"``); ``*`` also matches ``/``.
            A leading ``/v1`` is ignored.
        times: how many requests the rule breaks before it is used up; None = forever.
        probability: the chance that a matching request is broken (a miss does not
            use up the rule); drawn from the service's seeded generator.
        status: the HTTP status of an ``HTTP`` fault.
        retry_after: seconds for the ``retry-after`` header of an ``HTTP`` fault.
        retry_after_ms: milliseconds for the ``retry-after-ms`` header.
        should_retry: value of the ``x-should-retry`` header, when not None.
        delay: seconds on the service clock between the request's arrival and its
            answer (or dropped connection), for every kind.
        act_after_delay: when the delay is spent, for the kinds whose request takes
            effect (``SLOW``, ``MALFORMED``, ``DROP_AFTER``). False (the default): the
            request is processed on arrival and only its answer waits, so a client that
            times out during the delay has *already* changed the server's state. True:
            the service waits first and processes the request only then, the way a
            loaded server commits late, so the effect appears ``delay`` seconds after
            arrival, possibly long after the client gave up (and after the client
            looked for it).
        message: the error message of an ``HTTP`` fault (a default when None).
    """

    kind: FaultKind = attrs.field(validator=_injectable)
    method: str | None = attrs.field(default=None, converter=_upper)
    path: str = attrs.field(default="*", converter=_normalise_path)
    times: int | None = attrs.field(default=1, validator=_times)
    probability: float = attrs.field(default=1.0, validator=_probability)
    status: int = 500
    retry_after: float | None = None
    retry_after_ms: float | None = None
    should_retry: bool | None = None
    delay: float = 0.0
    message: str | None = None
    act_after_delay: bool = False

    def matches(self, method: str, path: str) -> bool:
        """Whether a request with this method and path (after ``/v1``) is targeted.

        Args:
            method: the request method.
            path: the request path after ``/v1``.

        Returns:
            True when the rule applies to the request.
        """
        if self.method is not None and self.method != method.upper():
            return False
        return fnmatchcase(path, self.path)

    @classmethod
    def http(
        cls,
        status: int,
        *,
        retry_after: float | None = None,
        retry_after_ms: float | None = None,
        should_retry: bool | None = None,
        message: str | None = None,
        method: str | None = None,
        path: str = "*",
        times: int | None = 1,
        probability: float = 1.0,
        delay: float = 0.0,
    ) -> Fault:
        """Answer matching requests with an HTTP error (the request has no effect).

        Args:
            status: the status to answer (429, 500, 502, 503...).
            retry_after: seconds for ``retry-after``.
            retry_after_ms: milliseconds for ``retry-after-ms``.
            should_retry: value of ``x-should-retry``.
            message: the error message (a default for the status when None).
            method: the method to match, or None for any.
            path: the path pattern to match.
            times: how many requests to break; None for every one.
            probability: the chance that a matching request is broken.
            delay: seconds to wait before answering.

        Returns:
            The rule.
        """
        if status < 400:
            raise ValueError(f"an HTTP fault needs an error status (>= 400), got {status}")
        return cls(
            FaultKind.HTTP,
            method=method,
            path=path,
            times=times,
            probability=probability,
            status=status,
            retry_after=retry_after,
            retry_after_ms=retry_after_ms,
            should_retry=should_retry,
            delay=delay,
            message=message,
        )

    @classmethod
    def drop(
        cls,
        *,
        after: bool = False,
        method: str | None = None,
        path: str = "*",
        times: int | None = 1,
        probability: float = 1.0,
        delay: float = 0.0,
        act_after_delay: bool = False,
    ) -> Fault:
        """Drop the connection: ``handle`` raises :class:`~aiobatch.errors.TransportError`.

        Args:
            after: False drops it before the request is processed (no effect); True
                processes the request first, so it took effect but its answer is lost.
            method: the method to match, or None for any.
            path: the path pattern to match.
            times: how many requests to break; None for every one.
            probability: the chance that a matching request is broken.
            delay: seconds to wait before dropping.
            act_after_delay: with ``after``, process the request at the end of the
                delay rather than on arrival.

        Returns:
            The rule.
        """
        kind = FaultKind.DROP_AFTER if after else FaultKind.DROP_BEFORE
        return cls(
            kind,
            method=method,
            path=path,
            times=times,
            probability=probability,
            delay=delay,
            act_after_delay=act_after_delay,
        )

    @classmethod
    def slow(
        cls,
        delay: float,
        *,
        act_after_delay: bool = False,
        method: str | None = None,
        path: str = "*",
        times: int | None = 1,
        probability: float = 1.0,
    ) -> Fault:
        """Answer the request ``delay`` seconds late.

        By default the request is processed on arrival and only the answer waits: a
        client whose timeout is shorter gives up, but the request has already taken
        effect (a slow ``POST /batches`` has created its batch by the time the client
        sees the timeout). With ``act_after_delay=True`` the service waits first and
        processes the request at the end of the delay (a late commit): the batch
        appears ``delay`` seconds after the request arrived, whether or not the client
        is still waiting, like a loaded server that keeps working on a request whose
        client hung up.

        Args:
            delay: seconds on the service clock before the answer.
            act_after_delay: process the request after the delay instead of on arrival.
            method: the method to match, or None for any.
            path: the path pattern to match.
            times: how many requests to slow; None for every one.
            probability: the chance that a matching request is slowed.

        Returns:
            The rule.
        """
        return cls(
            FaultKind.SLOW,
            method=method,
            path=path,
            times=times,
            probability=probability,
            delay=delay,
            act_after_delay=act_after_delay,
        )

    @classmethod
    def malformed(
        cls,
        *,
        method: str | None = None,
        path: str = "*",
        times: int | None = 1,
        probability: float = 1.0,
        delay: float = 0.0,
        act_after_delay: bool = False,
    ) -> Fault:
        """Process the request, then answer 200 with a truncated (invalid) JSON body.

        Args:
            method: the method to match, or None for any.
            path: the path pattern to match.
            times: how many requests to break; None for every one.
            probability: the chance that a matching request is broken.
            delay: seconds to wait before answering.
            act_after_delay: process the request at the end of the delay rather than
                on arrival.

        Returns:
            The rule.
        """
        return cls(
            FaultKind.MALFORMED,
            method=method,
            path=path,
            times=times,
            probability=probability,
            delay=delay,
            act_after_delay=act_after_delay,
        )


@attrs.frozen
class FiredFault:
    """A record of one request a fault broke."""

    fault: Fault
    method: str
    path: str


@attrs.define
class _Armed:
    fault: Fault
    remaining: int | None


class FaultPlan:
    """The fault rules of a fake service, checked in order for every request.

    Args:
        seed: seeds the generator behind ``probability``.
    """

    def __init__(self, *, seed: int = 0) -> None:
        self._armed: list[_Armed] = []
        self._rng = random.Random(seed)
        #: Every request a fault broke, oldest first.
        self.fired: list[FiredFault] = []

    def add(self, fault: Fault) -> Fault:
        """Arm a rule after the ones already armed.

        Args:
            fault: the rule.

        Returns:
            The same rule (handy for inline construction).
        """
        self._armed.append(_Armed(fault, fault.times))
        return fault

    def clear(self) -> None:
        """Disarm every rule (the :attr:`fired` record is kept)."""
        self._armed.clear()

    @property
    def pending(self) -> tuple[Fault, ...]:
        """The rules not used up yet, in the order they are checked."""
        return tuple(armed.fault for armed in self._armed)

    def take(self, method: str, path: str) -> Fault | None:
        """Find the fault for a request, using up one of its ``times``.

        Args:
            method: the request method.
            path: the request path after ``/v1``.

        Returns:
            The first matching rule that fires, or None.
        """
        for index, armed in enumerate(self._armed):
            fault = armed.fault
            if not fault.matches(method, path):
                continue
            if fault.probability < 1.0 and self._rng.random() >= fault.probability:
                continue
            if armed.remaining is not None:
                armed.remaining -= 1
                if armed.remaining <= 0:
                    del self._armed[index]
            self.fired.append(FiredFault(fault, method.upper(), path))
            return fault
        return None

    def __len__(self) -> int:
        return len(self._armed)

    def __repr__(self) -> str:
        return f"FaultPlan(pending={len(self._armed)}, fired={len(self.fired)})"
