"""Compare ELBO estimators on one model and batch: loss spread, gradient noise, cost and bias.

For every estimator and number of particles ``K`` the loss and its gradient are drawn ``repeats``
times on the same ``x``. Reported per ``(estimator, K)``:

* ``loss_mean``, ``loss_std``: mean and standard deviation of ``loss = -bound`` summed over the batch
  (an average of ``K`` i.i.d. terms has ``std ~ 1/sqrt(K)``); ``bound_per_datapoint = -loss_mean / N``
  and its standard error ``bound_se = loss_std / sqrt(repeats) / N``.
* ``*_grad_variance``: the per-parameter variance of the gradient across repeats, averaged over
  the parameters of the encoder (or of the decoder and likelihood together).
* ``*_grad_snr``: ``|E[g]| / sd[g]`` per parameter, averaged over parameters, the signal-to-noise
  ratio of Rainforth et al. 2018 ("Tighter variational bounds are not necessarily better"), who
  show the IWAE bound's encoder SNR falls like ``1/sqrt(K)`` while its decoder SNR grows like ``sqrt(K)``.
* ``seconds_per_step``: median wall time of one loss and backward pass.
* ``gap_to_log_px`` (given the exact ``log p(x)``): ``(log p(x) - bound) / N``, which is
  ``KL(q(z|x) || p(z|x))`` per datapoint for the ELBO, whatever ``K``, and shrinks with ``K`` for the
  importance-weighted bound (Burda et al. 2015, Theorem 1).

Estimators are the names of :func:`pyro_vae.estimators.make_elbo` and ``"reference"``, the plain
PyTorch :func:`pyro_vae.reference.reference_elbo`. Randomness comes from torch's global generator:
seed it (``torch.manual_seed``) before calling; set threads (``torch.set_num_threads``) for timings.
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from matplotlib.figure import Figure

from .checkpoint import replace_atomically
from .errors import ConfigError
from .estimators import ESTIMATORS, make_elbo
from .model import VAE
from .reference import check_reference_applies, reference_elbo

COMPARABLE = ESTIMATORS + ("reference",)

# A loss step: computes the loss on x, backpropagates into the VAE's .grad, returns the loss.
LossStep = Callable[[VAE, torch.Tensor], float]


def pyro_step(name: str, num_particles: int) -> LossStep:
    """One Pyro ELBO's ``loss_and_grads`` (the step SVI takes; it works for RenyiELBO too)."""
    elbo = make_elbo(name, num_particles, vectorize_particles=True)
    return lambda vae, x: elbo.loss_and_grads(vae.model, vae.guide, x)


def reference_step(num_particles: int) -> LossStep:
    """Minus :func:`reference_elbo` summed over the batch, backpropagated."""

    def step(vae: VAE, x: torch.Tensor) -> float:
        loss = -reference_elbo(vae, x, num_particles).sum()
        loss.backward()
        return loss.item()

    return step


def loss_step(name: str, num_particles: int) -> LossStep:
    if name not in COMPARABLE:
        raise ConfigError(f"unknown estimator {name!r}; choose from {COMPARABLE}")
    return reference_step(num_particles) if name == "reference" else pyro_step(name, num_particles)


def parameter_groups(vae: VAE) -> dict[str, list[torch.nn.Parameter]]:
    """The encoder's parameters, and the decoder's with the likelihood's (both shape ``p(x|z)``)."""
    return {
        "encoder": list(vae.encoder.parameters()),
        "decoder": [*vae.decoder.parameters(), *vae.likelihood.parameters()],
    }


def flat_grad(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """All gradients as one float64 vector; a parameter the loss does not touch counts as 0."""
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten() for p in params]
    )


def draw(step: LossStep, vae: VAE, x: torch.Tensor, repeats: int):
    """``repeats`` independent losses (R,), gradients per group (R, P) and step times."""
    groups = parameter_groups(vae)
    losses, seconds, grads = [], [], {name: [] for name in groups}
    for _ in range(repeats):
        vae.zero_grad(set_to_none=True)
        start = time.perf_counter()
        losses.append(step(vae, x))
        seconds.append(time.perf_counter() - start)
        for name, params in groups.items():
            grads[name].append(flat_grad(params))
    vae.zero_grad(set_to_none=True)
    return torch.tensor(losses, dtype=torch.float64), seconds, {k: torch.stack(v) for k, v in grads.items()}


def gradient_stats(grads: torch.Tensor) -> tuple[float, float]:
    """Mean over parameters of ``Var[g]`` and of ``|E[g]| / sd[g]`` across the rows of ``grads``.
    Parameters whose gradient is always 0 have an undefined SNR (0/0) and are left out of it."""
    variance = grads.var(0)
    snr = grads.mean(0).abs() / variance.sqrt()
    return variance.mean().item(), torch.nanmean(snr).item()


def compare_estimators(
    vae: VAE,
    x: torch.Tensor,
    estimators: Sequence[str] = ("trace", "meanfield", "iwae", "reference"),
    particles: Sequence[int] = (1, 4, 16, 64),
    repeats: int = 50,
    exact_log_px: float | None = None,
    progress: bool = False,
) -> list[dict]:
    """One row per ``(estimator, K)`` with the statistics listed in the module docstring.

    ``exact_log_px`` is the exact ``log p(x)`` summed over the batch, when known. ``progress``
    prints each finished row to stderr.
    """
    if repeats < 2:
        raise ConfigError(f"repeats must be at least 2 to estimate a variance, got {repeats}")
    steps = [(name, k, loss_step(name, k)) for name in estimators for k in particles]
    if "reference" in estimators:
        check_reference_applies(vae)  # before any row is drawn
    n = x.shape[0]
    rows = []
    for name, k, step in steps:
        losses, seconds, grads = draw(step, vae, x, repeats)
        row = dict(
            estimator=name,
            num_particles=k,
            repeats=repeats,
            loss_mean=losses.mean().item(),
            loss_std=losses.std().item(),
        )
        row["bound_per_datapoint"] = -row["loss_mean"] / n
        row["bound_se"] = row["loss_std"] / math.sqrt(repeats) / n
        if exact_log_px is not None:
            row["gap_to_log_px"] = (exact_log_px + row["loss_mean"]) / n
        for group, g in grads.items():
            row[f"{group}_grad_variance"], row[f"{group}_grad_snr"] = gradient_stats(g)
        row["seconds_per_step"] = statistics.median(seconds)
        rows.append(row)
        if progress:
            print(f"{name} K={k}: loss {row['loss_mean']:.4g} +- {row['loss_std']:.3g}", file=sys.stderr)
    return rows


def _fields(rows: Sequence[dict]) -> list[str]:
    """Every key of the rows, in order of first appearance."""
    return list(dict.fromkeys(key for row in rows for key in row))


def write_csv(rows: Sequence[dict], path: str | Path, about: dict | None = None) -> Path:
    """Write the rows of :func:`compare_estimators` as CSV, atomically (making parent directories).
    ``about``: what was compared (the model and its epoch, the data, the seed...), the same in every
    row, as columns after the statistics, so that the file says what it describes."""
    rows = [{**row, **(about or {})} for row in rows]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=_fields(rows))
            writer.writeheader()
            writer.writerows(rows)

    replace_atomically(path, write)
    return Path(path)


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table: a header line, then one line per row."""
    fields = _fields(rows)
    cells = [fields] + [[_cell(row.get(field, "")) for field in fields] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(fields))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def table_units(num_data: int) -> str:
    """One line giving the units of :func:`format_table`'s columns for a batch of ``num_data`` datapoints."""
    return (
        f"units: loss_mean and loss_std are nats summed over the batch of {num_data} (loss = -bound); "
        "bound_per_datapoint, bound_se and gap_to_log_px are nats per datapoint"
    )


def _series(rows: Sequence[dict], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """``estimator -> (Ks, values of key)`` in row order."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        ks, values = out.setdefault(row["estimator"], ([], []))
        ks.append(row["num_particles"])
        values.append(row[key])
    return out


def _k_axis(ax, ks: Sequence[int], title: str, ylabel: str) -> None:
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks], minor=False)
    ax.set_xticks([], minor=True)
    ax.set(title=title, xlabel="particles K", ylabel=ylabel)


def _plot_lines(ax, rows, key, ks, title, ylabel):
    for name, (ks_, values) in _series(rows, key).items():
        ax.plot(ks_, values, marker="o", label=name)
    ax.set_yscale("log")
    _k_axis(ax, ks, title, ylabel)


def plot_comparison(rows: Sequence[dict], path: str | Path, title: str | None = None) -> Path:
    """PNG panels against K: loss std (log-log, dashed ``1/sqrt(K)`` slope through the largest std
    at the smallest K), encoder and decoder gradient SNR (log-log), and the gap to ``log p(x)`` with
    standard-error bars when the rows have it."""
    with_gap = "gap_to_log_px" in rows[0]
    ks = sorted({row["num_particles"] for row in rows})
    fig = Figure(figsize=(4.2 * (3 + with_gap), 3.8), layout="constrained")
    if title:
        fig.suptitle(title)
    axes = fig.subplots(1, 3 + with_gap)
    _plot_lines(axes[0], rows, "loss_std", ks, "loss spread over repeats", "std of the loss (nats)")
    anchor = max(row["loss_std"] for row in rows if row["num_particles"] == ks[0])
    axes[0].plot(ks, [anchor * math.sqrt(ks[0] / k) for k in ks], "k--", lw=1, label=r"$\propto 1/\sqrt{K}$")
    axes[0].legend(fontsize="small")
    snr_label = r"mean $|E g| / \mathrm{sd}\, g$"
    _plot_lines(axes[1], rows, "encoder_grad_snr", ks, "encoder gradient SNR", snr_label)
    _plot_lines(axes[2], rows, "decoder_grad_snr", ks, "decoder gradient SNR", snr_label)
    if with_gap:
        errors = _series(rows, "bound_se")
        for name, (ks_, gaps) in _series(rows, "gap_to_log_px").items():
            axes[3].errorbar(ks_, gaps, yerr=errors[name][1], marker="o", capsize=3, label=name)
        axes[3].axhline(0.0, color="k", lw=0.8)
        _k_axis(axes[3], ks, r"gap to $\log p(x)$ per datapoint", "nats")
    try:
        replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        fig.clear()
    return Path(path)
