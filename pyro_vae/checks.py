"""Checks of the values the library's functions take (counts, folders), without torch."""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError

# importance samples per datapoint that an evaluation needs: the delta-method standard error of
# log (1/K) sum_k w_k is sd(w) / (sqrt(K) mean(w)), and sd needs two weights
MIN_IMPORTANCE_SAMPLES = 2


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


def check_importance_samples(num_samples: Any) -> int:
    """``num_samples`` as an ``int``; :class:`ConfigError` below :data:`MIN_IMPORTANCE_SAMPLES`, with why:
    one importance sample estimates ``log p(x)`` by a one-sample ELBO, and one weight has no spread
    from which to estimate the standard error ``sd(w) / (sqrt(K) mean(w))``."""
    if isinstance(num_samples, numbers.Integral) and not isinstance(num_samples, bool):
        if num_samples < MIN_IMPORTANCE_SAMPLES:
            raise ConfigError(
                f"num_samples (--num-samples) must be at least {MIN_IMPORTANCE_SAMPLES}, got {num_samples}: with one "
                "importance sample the estimate of log p(x) is a one-sample ELBO, which the test ELBO already "
                "reports, and one weight has no spread to estimate its standard error from; pass "
                f"{MIN_IMPORTANCE_SAMPLES} or more (Burda et al. use 5000)"
            )
    return check_count("num_samples", num_samples, MIN_IMPORTANCE_SAMPLES)


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
