"""The learning rate of each epoch and when training stops, as functions of the run's history
(its metrics rows, each with the epoch's ``val_elbo``), so that a resumed run continues exactly:
the checkpoint keeps nothing more than the metrics it already has.

- ``constant``: ``lr`` every epoch.
- ``exponential``: ``lr * decay**e`` in epoch ``e + 1`` (``e`` epochs done).
- ``plateau``: ``lr`` multiplied by ``decay`` each time ``patience`` epochs in a row have not
  raised the best validation ELBO (the rule of torch's ``ReduceLROnPlateau``, on the ELBO, with
  no threshold and no cooldown).

Early stopping (Prechelt 1998; the VampPrior paper's "look-ahead"): stop once ``patience``
epochs in a row have not raised the best validation ELBO; the model kept is the best one.
"""

from __future__ import annotations

from typing import Any, Sequence

LR_SCHEDULES = ("constant", "exponential", "plateau")
DEFAULT_LR_DECAY = {"exponential": 0.99, "plateau": 0.5}  # per epoch; per plateau


def validation_elbos(metrics: Sequence[dict[str, Any]]) -> list[float]:
    """The validation ELBO of each epoch; :class:`ValueError` if an epoch has none."""
    try:
        return [float(row["val_elbo"]) for row in metrics]
    except KeyError:
        raise ValueError("the run has no validation ELBO for every epoch: it was trained without a validation split")


def best_epoch(metrics: Sequence[dict[str, Any]]) -> int | None:
    """The epoch (from 1) of the highest validation ELBO, the first of ties; None before any epoch."""
    values = validation_elbos(metrics)
    if not values:
        return None
    return max(range(len(values)), key=lambda i: (values[i], -i)) + 1


def epochs_without_improvement(metrics: Sequence[dict[str, Any]]) -> int:
    """How many epochs since the best validation ELBO (0 when the last epoch is the best)."""
    best = best_epoch(metrics)
    return 0 if best is None else len(metrics) - best


def learning_rate(
    schedule: str, lr: float, decay: float | None, patience: int, metrics: Sequence[dict[str, Any]]
) -> float:
    """The learning rate of the epoch after those in ``metrics`` (see the module's docstring)."""
    if schedule == "constant":
        return lr
    if schedule == "exponential":
        return lr * decay ** len(metrics)
    if schedule != "plateau":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    rate, best, stale = lr, float("-inf"), 0
    for value in validation_elbos(metrics):
        if value > best:
            best, stale = value, 0
            continue
        stale += 1
        if stale == patience:
            rate, stale = rate * decay, 0
    return rate
