"""attrs validators shared by the settings classes (``RunConfig``, ``FleetConfig``,
``RetryPolicy``, the fake's ``FakeConfig`` and ``RateLimit``).

Each names the class and the field in its message (``RunConfig.max_rounds must be >= 0,
got -1``) and refuses ``bool`` (a ``True`` is not a count) and NaN; the ``_or_none``
forms also let an unset optional setting (None) through.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

__all__ = [
    "at_least_one",
    "non_negative",
    "non_negative_or_none",
    "positive",
    "positive_finite",
    "positive_or_none",
]


def _where(instance: object, attribute: attrs.Attribute[Any]) -> str:
    return f"{type(instance).__name__}.{attribute.name}"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def positive(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    """A number > 0."""
    if not (_number(value) and value > 0):
        raise ValueError(f"{_where(instance, attribute)} must be > 0, got {value!r}")


def non_negative(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    """A number >= 0."""
    if not (_number(value) and value >= 0):
        raise ValueError(f"{_where(instance, attribute)} must be >= 0, got {value!r}")


def positive_finite(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    """A finite number > 0."""
    if not (_number(value) and value > 0 and math.isfinite(value)):
        raise ValueError(
            f"{_where(instance, attribute)} must be a finite number > 0, got {value!r}"
        )


def at_least_one(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    """A whole number >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{_where(instance, attribute)} must be an integer >= 1, got {value!r}")


def positive_or_none(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    """None (an unset optional setting), or a number > 0."""
    if value is not None:
        positive(instance, attribute, value)


def non_negative_or_none(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    """None (an unset optional setting), or a number >= 0."""
    if value is not None:
        non_negative(instance, attribute, value)
