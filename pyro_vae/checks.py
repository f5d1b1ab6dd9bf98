"""Checks of counts that the library's functions take (sample sizes, chunk sizes, components)."""

from __future__ import annotations

import numbers
from typing import Any

from .errors import ConfigError


def check_count(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an ``int``; :class:`ConfigError` unless it is an integer (Python's or numpy's,
    not a bool) from ``minimum`` to ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum or (maximum is not None and value > maximum):
        limits = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise ConfigError(f"{name} must be an integer {limits}, got {value!r}")
    return int(value)
