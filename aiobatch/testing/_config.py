"""How the fake batch service behaves: timings, limits and per-line error injection."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

import attrs

from .._validators import non_negative, positive
from ._ratelimit import RateLimit

__all__ = ["FakeConfig", "LineErrorRule", "unit_hash"]


def _rules(value: Iterable[LineErrorRule]) -> tuple[LineErrorRule, ...]:
    return tuple(value)


def _frozen_mapping(value: Mapping[str, int] | None) -> Mapping[str, int]:
    return MappingProxyType(dict(value or {}))


def unit_hash(seed: int, text: str) -> float:
    """A deterministic number in [0, 1) for ``(seed, text)``, the same in every process.

    :class:`LineErrorRule` picks a line for its ``ratio`` when ``unit_hash(seed,
    custom_id) < ratio`` (``seed`` the service's); a ``predicate`` can pick its own
    share of lines, repeatably, the same way with another seed.
    """
    digest = hashlib.blake2b(f"{seed}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@attrs.frozen
class LineErrorRule:
    """Make some lines of every batch fail with an HTTP error instead of reaching the responder.

    A line matches when its ``custom_id`` is in ``custom_ids``, or ``predicate(custom_id)``
    is true, or (with ``ratio`` > 0) a hash of the service seed and the ``custom_id``
    falls below ``ratio``, so the same ids fail on every run.

    Attributes:
        status: the HTTP status written to the error file (400, 429, 500...).
        ratio: the share of lines, picked deterministically by ``custom_id``.
        custom_ids: exact ids that fail.
        predicate: a function of ``custom_id``; true means fail.
        message: the error message; a default for the status when None.
        code: the ``error.code`` in the body; a default for the status when None.
    """

    status: int = 500
    ratio: float = attrs.field(default=0.0, validator=non_negative)
    custom_ids: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    predicate: Callable[[str], bool] | None = None
    message: str | None = None
    code: str | None = None

    def matches(self, custom_id: str, *, seed: int = 0) -> bool:
        """Whether the line with this ``custom_id`` fails under this rule.

        Args:
            custom_id: the line's id.
            seed: the service seed (selects which ids a ``ratio`` picks).

        Returns:
            True when the line should fail.
        """
        if custom_id in self.custom_ids:
            return True
        if self.predicate is not None and self.predicate(custom_id):
            return True
        return self.ratio > 0 and unit_hash(seed, custom_id) < self.ratio


@attrs.frozen
class FakeConfig:
    """Timings, limits and switches of :class:`~aiobatch.testing.FakeBatchService`.

    All durations are seconds on the service's clock. The defaults finish a batch of a
    few lines in about two seconds of real time; tests pass a
    :class:`~aiobatch.testing.VirtualClock` and move it instead.

    A batch spends ``validation_seconds`` in ``validating``, then runs its lines at
    ``lines_per_second`` in ``in_progress`` (line *i* is done ``(i + 1) /
    lines_per_second`` seconds after ``in_progress_at``; 0 means lines never finish),
    then spends ``finalizing_seconds`` in ``finalizing`` before it is ``completed``. A
    batch still running ``completion_window_seconds`` after creation expires. A cancel
    holds the batch in ``cancelling`` for ``cancel_seconds``.

    ``processing_seconds`` gives each batch its own speed: when set, a batch that goes
    ``in_progress`` with ``n`` lines spends ``processing_seconds(batch_id, n)`` seconds
    there (its lines evenly spread over that time), whatever ``lines_per_second`` says.
    Batch ids are seeded, so a hook such as ``lambda batch_id, lines:
    random.Random(batch_id).uniform(60, 7200)`` makes batches finish at random times
    that are the same on every run.

    ``rate_limit`` makes the service refuse requests beyond a rate with ``429`` (see
    :class:`~aiobatch.testing.RateLimit`).

    Attributes:
        validation_seconds: time in ``validating``.
        lines_per_second: processing speed in ``in_progress``.
        processing_seconds: ``(batch_id, lines) -> seconds`` in ``in_progress`` for
            that batch, overriding ``lines_per_second``; called once per batch, when it
            starts processing. ``0`` finishes every line at once, ``math.inf`` never
            finishes one; a negative or NaN answer is a ``ValueError``. None (the
            default): every batch runs at ``lines_per_second``.
        finalizing_seconds: time in ``finalizing``.
        cancel_seconds: time in ``cancelling``.
        completion_window_seconds: time from creation to expiry (``expires_at``);
            OpenAI's ``24h`` window is 86,400 s. Shorten it to test expiry.
        max_lines: more lines than this fail validation with ``too_many_tasks``.
        max_embedding_inputs: more embedding inputs (summed over the lines of an
            ``/v1/embeddings`` batch) than this fail with ``too_many_tasks``.
        max_validation_errors: at most this many entries in ``errors.data``.
        enqueued_token_limits: model -> limit of enqueued prompt tokens. A batch whose
            estimated tokens (see :func:`~aiobatch.testing.estimate_tokens`) plus those
            of the validated, unfinished batches of the same model exceed the limit
            fails validation with ``token_limit_exceeded``. Models not listed are
            unlimited.
        organization: the organization named in ``token_limit_exceeded`` messages.
        line_errors: rules that fail some lines with an HTTP error (first match wins).
        shuffle_output: write result lines in a deterministic pseudo-random order, not
            input order, as OpenAI does (clients must join on ``custom_id``).
        max_file_bytes: upload limit for any file (OpenAI: 512 MB).
        max_batch_file_bytes: upload limit for ``purpose=batch`` (OpenAI: 200 MB).
        batch_file_expiry_seconds: lifetime of ``purpose=batch`` uploads (30 days).
        output_file_expiry_seconds: lifetime of result files unless the batch was
            created with ``output_expires_after`` (30 days).
        chunk_size: bytes per chunk of a streamed file download.
        request_log_size: how many requests :attr:`FakeBatchService.requests` keeps
            (oldest dropped first); None keeps all.
        rate_limit: a token-bucket limit on the requests the service receives
            (``429`` beyond it); None (the default) is unlimited.
    """

    validation_seconds: float = attrs.field(default=1.0, validator=non_negative)
    lines_per_second: float = attrs.field(default=100.0, validator=non_negative)
    finalizing_seconds: float = attrs.field(default=1.0, validator=non_negative)
    cancel_seconds: float = attrs.field(default=1.0, validator=non_negative)
    completion_window_seconds: float = attrs.field(default=86_400.0, validator=positive)
    max_lines: int = attrs.field(default=50_000, validator=positive)
    max_embedding_inputs: int = attrs.field(default=50_000, validator=positive)
    max_validation_errors: int = attrs.field(default=100, validator=positive)
    enqueued_token_limits: Mapping[str, int] = attrs.field(factory=dict, converter=_frozen_mapping)
    organization: str = "org-fake"
    line_errors: tuple[LineErrorRule, ...] = attrs.field(default=(), converter=_rules)
    shuffle_output: bool = True
    max_file_bytes: int = attrs.field(default=512 * 1024 * 1024, validator=positive)
    max_batch_file_bytes: int = attrs.field(default=200 * 1024 * 1024, validator=positive)
    batch_file_expiry_seconds: int = attrs.field(default=2_592_000, validator=positive)
    output_file_expiry_seconds: int = attrs.field(default=2_592_000, validator=positive)
    chunk_size: int = attrs.field(default=64 * 1024, validator=positive)
    request_log_size: int | None = 100_000
    processing_seconds: Callable[[str, int], float] | None = None
    rate_limit: RateLimit | None = None
