"""A trained VAE's fit to a batch as :class:`arviz.InferenceData` (posterior draws of z, posterior
predictive x, per-datapoint log-likelihood, importance-sampling diagnostics, the training trace),
and its atomic netCDF file (``inference_data.nc`` of ``pyro-vae evaluate``). ArviZ is imported by
the functions that use it (it takes seconds to import)."""

from __future__ import annotations

from os import PathLike
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyro
import torch

from .checkpoint import replace_atomically
from .diagnostics import pareto_k
from .errors import ConfigError, DataError
from .estimators import log_mean_exp

if TYPE_CHECKING:
    import arviz as az


def _numpy(t: torch.Tensor, *shape: int) -> np.ndarray:
    return t.reshape(shape).cpu().numpy()


def _group(data: dict[str, np.ndarray], dims: Sequence[str], coords: dict[str, Any], sampled: bool = True):
    """An ArviZ group: every variable has ``dims`` (after ``chain, draw`` when ``sampled``)."""
    import arviz as az

    return az.dict_to_dataset(
        data,
        library=pyro,
        coords=coords,
        dims={name: list(dims) for name in data},
        default_dims=None if sampled else [],
    )


def training_group(training_metrics: Sequence[dict[str, Any]]):
    """The per-epoch numbers as a Dataset indexed by ``epoch``; a metric missing or null in a row is
    NaN (text, such as the step that ran, stays in ``metrics.jsonl``)."""
    numeric = lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))  # noqa: E731
    keys = dict.fromkeys(key for row in training_metrics for key in row)
    names = [name for name in keys if name != "epoch" and all(numeric(row.get(name)) for row in training_metrics)]
    data = {
        name: np.array([np.nan if row.get(name) is None else row[name] for row in training_metrics], dtype=np.float64)
        for name in names
    }
    return _group(data, ["epoch"], {"epoch": np.array([row["epoch"] for row in training_metrics])}, sampled=False)


def importance_sampling_group(log_weights: torch.Tensor, n: int):
    """PSIS ``pareto_k`` and ``log_px = logsumexp_k log w_ik - log K`` per datapoint."""
    log_weights = torch.as_tensor(log_weights, dtype=torch.float64).cpu()
    if log_weights.dim() != 2 or log_weights.shape[1] != n:
        raise DataError(
            f"log_weights must have shape (num_samples, {n}) for a batch of {n} datapoints, got "
            f"{tuple(log_weights.shape)}"
        )
    log_px = log_mean_exp(log_weights)
    group = _group(
        {"pareto_k": pareto_k(log_weights), "log_px": log_px.numpy()},
        ["datapoint"],
        {"datapoint": np.arange(n)},
        sampled=False,
    )
    group.attrs["num_samples"] = log_weights.shape[0]
    return group


@torch.no_grad()
def to_inference_data(
    vae,
    x: torch.Tensor,
    log_weights: torch.Tensor | None = None,
    num_draws: int = 100,
    training_metrics: Sequence[dict[str, Any]] | None = None,
    attrs: dict[str, Any] | None = None,
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
    z = vae.posterior(x).sample((num_draws,))
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
