"""Checks of the values the library's functions take (counts, folders), without torch."""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError


def check_count(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an ``int``; :class:`ConfigError` unless it is an integer (Python's or numpy's,
    not a bool) from ``minimum`` to ``maximum``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        limits = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise ConfigError(f"{name} must be an integer {limits}, got {value!r}")
    return int(value)


def plain_value(value: Any) -> Any:
    """A numpy scalar (``np.int64(5)``, ``np.float32(0.5)``) as the Python number it holds; any other value as it is."""
    if isinstance(value, numbers.Number) and not isinstance(value, (int, float, complex)) and hasattr(value, "item"):
        return value.item()
    return value


def data_dir_path(data_dir: Any) -> Path:
    """``data_dir`` as an absolute path (``~`` expanded); :class:`DataError` if it is empty."""
    if not str(data_dir).strip():
        raise DataError("--data-dir is empty; pass the folder that holds the IDX files, or leave it out")
    return Path(data_dir).expanduser().resolve()
