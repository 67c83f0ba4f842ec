"""Test helpers that are part of the product: a virtual clock and a fake batch service."""

from ._clock import VirtualClock

__all__ = ["VirtualClock"]
