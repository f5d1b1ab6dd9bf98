"""Diagnostics of a trained VAE: importance weights, PSIS k-hat, active units, KL per latent
dimension, the ELBO's two terms, and an :class:`arviz.InferenceData` export.

* Importance weights ``w_ik = p(x_i, z_ik) / q(z_ik | x_i)``, ``z_ik ~ q(z | x_i)`` (Burda et al.
  2015, eq. 8), from :meth:`~pyro_vae.estimators.DataPlateIWELBO.log_weights`.
* PSIS k-hat (Vehtari et al. 2015/2024): the shape of a generalized Pareto distribution fitted to
  the largest weights of each datapoint. ``k <= 0.5`` good, ``0.5 < k <= 0.7`` ok, ``k > 0.7``: the
  weights' variance is so large that the importance-sampled ``log p(x_i)`` is unreliable.
* Active units (Burda et al. 2015, section 5.2): ``A_d = Cov_x(E_{q(z|x)}[z_d]) > 0.01``.

Every function runs under ``torch.no_grad`` and returns CPU results; draws use torch's global RNG,
so seed with ``torch.manual_seed`` for repeatable numbers. ArviZ is imported by the functions that
use it (it takes seconds to import).
"""

from __future__ import annotations

import math
from os import PathLike
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch.distributions import kl_divergence

from .checkpoint import replace_atomically
from .errors import ConfigError, DataError

if TYPE_CHECKING:
    import arviz as az

# Pareto k-hat thresholds of Vehtari et al.: above K_OK the importance-sampled estimate is unreliable.
K_GOOD, K_OK = 0.5, 0.7


def pareto_k(log_weights: torch.Tensor | np.ndarray) -> np.ndarray:
    """PSIS k-hat of each datapoint's weights, shape ``(N,)``, from ``log_weights`` of shape ``(K, N)``.

    :func:`arviz.psislw` smooths over the *last* axis of a numpy array, so the weights go in
    transposed, ``(N, K)``; ``reff=1`` because the draws are independent, not MCMC. The fit uses the
    largest ``ceil(min(K / 5, 3 sqrt(K)))`` weights: with fewer than 5 of them above the cutoff
    (K below about 25, or all weights exactly equal) ArviZ returns ``inf``. When q is the exact
    posterior the weights are equal up to rounding and k-hat, fitted to that noise, means nothing.
    """
    import arviz as az

    lw = torch.as_tensor(log_weights, dtype=torch.float64).cpu().numpy()
    if lw.ndim != 2:
        raise DataError(f"log_weights must have shape (num_samples, N), got {lw.shape}")
    if lw.shape[0] < 2:  # no tail to fit (ArviZ fails on one draw): unreliable, like any failed fit
        return np.full(lw.shape[1], np.inf)
    return np.asarray(az.psislw(lw.T, reff=1.0)[1])


def pareto_k_summary(k: np.ndarray) -> dict[str, Any]:
    """Counts and shares of datapoints with ``k <= 0.5`` (good), ``0.5 < k <= 0.7`` (ok) and
    ``k > 0.7`` (bad: unreliable; a failed fit, ``inf`` or ``nan``, counts as bad). These are the
    fixed thresholds of Vehtari et al. 2015; ``arviz.loo`` uses ``min(1 - 1 / log10 K, 0.7)``."""
    k = np.asarray(k, dtype=np.float64)
    counts = {"good": int(np.sum(k <= K_GOOD)), "ok": int(np.sum((k > K_GOOD) & (k <= K_OK))), "bad": int(np.sum(~(k <= K_OK)))}
    return {**counts, **{f"{name}_share": count / max(k.size, 1) for name, count in counts.items()}, "total": int(k.size)}


@torch.no_grad()
def encode(vae, x: torch.Tensor, chunk_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """``q(z|x)``'s ``loc`` and ``scale``, each ``(N, z_dim)`` on the CPU, ``chunk_size`` datapoints at a time."""
    parts = [vae.encoder(xb) for xb in x.split(chunk_size)]
    return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()


def active_units(vae, x: torch.Tensor, threshold: float = 0.01, chunk_size: int = 1000) -> tuple[int, torch.Tensor]:
    """The number of active latent dimensions and ``Cov_x(E_q[z_d|x])`` per dimension, ``(z_dim,)``:
    the variance over the batch ``x`` of the encoder mean (Burda et al. 2015, section 5.2)."""
    if x.shape[0] < 2:
        raise DataError("active_units needs at least two datapoints to measure a variance")
    variances = encode(vae, x, chunk_size)[0].var(0)
    return int((variances > threshold).sum()), variances


def kl_per_dimension(vae, x: torch.Tensor, chunk_size: int = 1000) -> torch.Tensor:
    """``(1/N) sum_i KL(q(z_d|x_i) || p(z_d))`` per latent dimension, shape ``(z_dim,)``; it sums to
    the mean total KL (for the standard-normal prior, ``1/2 (scale^2 + loc^2 - 1 - log scale^2)``)."""
    loc, scale = encode(vae, x, chunk_size)
    prior = dist.Normal(vae.prior_loc.cpu(), vae.prior_scale.cpu())
    return kl_divergence(dist.Normal(loc, scale), prior).mean(0)


@torch.no_grad()
def elbo_terms(vae, x: torch.Tensor, num_particles: int = 1, chunk_size: int = 1000) -> dict[str, torch.Tensor]:
    """``ELBO(x_i) = E_q[log p(x_i|z)] - KL(q(z|x_i) || p(z))`` split per datapoint, each ``(N,)`` on
    the CPU, ``chunk_size`` datapoints at a time.

    ``reconstruction`` averages the model's ``log p(x_i|z_l)`` over ``num_particles`` draws
    ``z_l ~ q(z|x_i)``; ``kl`` is analytic (Kingma & Welling 2013, eq. 10 and Appendix B). These are
    the terms of the model as defined (a KL weight belongs to training only).
    """
    reconstruction, kl = [], []
    for xb in x.split(chunk_size) if x.shape[0] else [x]:
        loc, scale = vae.encoder(xb)
        q = dist.Normal(loc, scale).to_event(1)
        z = q.sample((num_particles,))
        reconstruction.append(vae.likelihood(vae.decoder(z)).log_prob(xb).mean(0).cpu())
        kl.append(kl_divergence(q, vae.prior()).cpu())
    reconstruction, kl = torch.cat(reconstruction), torch.cat(kl)
    return {"reconstruction": reconstruction, "kl": kl, "elbo": reconstruction - kl}


def _numpy(t: torch.Tensor, *shape: int) -> np.ndarray:
    return t.reshape(shape).cpu().numpy()


def _group(data: dict[str, np.ndarray], dims: Sequence[str], coords: dict[str, Any], sampled: bool = True):
    """An ArviZ group: every variable has ``dims`` (after ``chain, draw`` when ``sampled``)."""
    import arviz as az

    return az.dict_to_dataset(data, library=pyro, coords=coords, dims={name: list(dims) for name in data}, default_dims=None if sampled else [])


def training_group(training_metrics: Sequence[dict[str, Any]]):
    """The per-epoch trace as a Dataset indexed by ``epoch``; a metric missing or null in a row is NaN."""
    names = [name for name in dict.fromkeys(key for row in training_metrics for key in row) if name != "epoch"]
    data = {name: np.array([np.nan if row.get(name) is None else row[name] for row in training_metrics], dtype=np.float64) for name in names}
    return _group(data, ["epoch"], {"epoch": np.array([row["epoch"] for row in training_metrics])}, sampled=False)


def importance_sampling_group(log_weights: torch.Tensor, n: int):
    """PSIS ``pareto_k`` and ``log_px = logsumexp_k log w_ik - log K`` per datapoint."""
    log_weights = torch.as_tensor(log_weights, dtype=torch.float64).cpu()
    if log_weights.dim() != 2 or log_weights.shape[1] != n:
        raise DataError(f"log_weights must have shape (num_samples, {n}) for a batch of {n} datapoints, got {tuple(log_weights.shape)}")
    log_px = torch.logsumexp(log_weights, 0) - math.log(log_weights.shape[0])
    group = _group({"pareto_k": pareto_k(log_weights), "log_px": log_px.numpy()}, ["datapoint"], {"datapoint": np.arange(n)}, sampled=False)
    group.attrs["num_samples"] = log_weights.shape[0]
    return group


@torch.no_grad()
def to_inference_data(
    vae, x: torch.Tensor, log_weights: torch.Tensor | None = None, num_draws: int = 100,
    training_metrics: Sequence[dict[str, Any]] | None = None, attrs: dict[str, Any] | None = None,
    max_draws: int | None = None,
) -> "az.InferenceData":
    """The VAE's fit to the batch ``x`` as :class:`arviz.InferenceData` (one chain).

    Groups, with coordinates ``chain = [0]``, ``draw``, ``datapoint``, ``latent_dim``, ``pixel``
    (images flattened) all ``0..n-1``:

    * ``posterior``: ``z`` (chain, draw, datapoint, latent_dim), independent draws from the guide
      ``q(z|x)``, not from the exact posterior (ArviZ's ``loo``/``waic`` would treat them as such).
    * ``posterior_predictive``: ``x`` (chain, draw, datapoint, pixel), one draw of ``p(x|z)`` per z.
    * ``log_likelihood``: ``x`` (chain, draw, datapoint), ``log p(x_i|z)`` summed over pixels.
    * ``observed_data``: ``x`` (datapoint, pixel).
    * ``importance_sampling`` (when ``log_weights`` of shape ``(K, N)`` is given, e.g. from
      :func:`importance_log_weights`): ``pareto_k`` and ``log_px``, each (datapoint,). A custom
      group, because ``sample_stats`` holds per-draw sampler statistics with dims (chain, draw).
    * ``training`` (when ``training_metrics``, a list of per-epoch dicts with an ``"epoch"`` key, is
      given): every other key as a variable over ``epoch``. A custom group too: the trace is per
      epoch of optimization, not per posterior draw, so it does not belong in ``sample_stats``.

    ``attrs``: attributes of the whole object (``pyro-vae evaluate`` records the data's source and
    fingerprint), kept by :func:`save_inference_data`. ``max_draws``: decode at most this many
    draws of z at a time (whole datapoints, so at least ``num_draws``; None: all at once).
    """
    if num_draws < 1:
        raise ConfigError(f"num_draws must be positive, got {num_draws}")
    if x.shape[0] == 0:
        raise DataError("x is an empty batch; export at least one datapoint")
    n = x.shape[0]
    loc, scale = vae.encoder(x)
    z = dist.Normal(loc, scale).sample((num_draws,))
    step = n if max_draws is None else max(1, max_draws // num_draws)  # datapoints decoded at a time
    predictive, log_likelihood = [], []
    for zc, xc in zip(z.split(step, dim=1), x.split(step)):
        likelihood = vae.likelihood(vae.decoder(zc))
        predictive.append(likelihood.sample().reshape(num_draws, xc.shape[0], -1).cpu())
        log_likelihood.append(likelihood.log_prob(xc).cpu())
    coords = {"datapoint": np.arange(n), "latent_dim": np.arange(vae.z_dim), "pixel": np.arange(x[0].numel())}
    groups = {
        "posterior": _group({"z": _numpy(z, 1, num_draws, n, -1)}, ["datapoint", "latent_dim"], coords),
        "posterior_predictive": _group(
            {"x": _numpy(torch.cat(predictive, 1), 1, num_draws, n, -1)}, ["datapoint", "pixel"], coords
        ),
        "log_likelihood": _group({"x": _numpy(torch.cat(log_likelihood, 1), 1, num_draws, n)}, ["datapoint"], coords),
        "observed_data": _group({"x": _numpy(x, n, -1)}, ["datapoint", "pixel"], coords, sampled=False),
    }
    if log_weights is not None:
        groups["importance_sampling"] = importance_sampling_group(log_weights, n)
    if training_metrics:
        groups["training"] = training_group(training_metrics)
    import arviz as az

    return az.InferenceData(attrs=attrs, **groups)


def save_inference_data(idata: "az.InferenceData", path: str | PathLike) -> str:
    """Write ``idata`` with all its groups, custom ones included, to netCDF; read it back with
    ``arviz.from_netcdf(path)``. Atomic: a kill or a full disk leaves any previous file intact. The
    file is made in memory and written by plain file I/O: HDF5 writing to a full disk fails in ways
    that can crash the process later, when its half-closed file is collected."""
    replace_atomically(path, lambda tmp: tmp.write_bytes(netcdf_bytes(idata)))
    return str(path)


def netcdf_bytes(idata: "az.InferenceData") -> bytes:
    """The netCDF-4 file ``InferenceData.to_netcdf`` writes (every group, numeric data compressed), as bytes."""
    import io

    import h5netcdf
    import xarray as xr

    buffer, mode = io.BytesIO(), "w"
    if getattr(idata, "attrs", None):
        xr.Dataset(attrs=idata.attrs).to_netcdf(buffer, mode=mode, engine="h5netcdf", group="/")
        mode = "a"
    for group in idata.groups():
        data = getattr(idata, group)
        encoding = {name: {"zlib": True} for name, values in data.variables.items() if values.dtype.kind in "biufcS"}
        data.to_netcdf(buffer, mode=mode, group=f"/{group}", engine="h5netcdf", encoding=encoding)
        mode = "a"
    if mode == "w":  # nothing in it: still a valid, empty file
        h5netcdf.File(buffer, mode="w").close()
    return buffer.getvalue()
