"""Exceptions raised by the native engine and the key loader (the native module imports these by name)."""

from __future__ import annotations


class InvalidPoint(ValueError):
    """A client's point is not a valid P-521 point (off the curve, a coordinate >= p, or infinity)."""


class InvalidKey(ValueError):
    """A key's private scalar is out of range or does not belong to its public point."""
