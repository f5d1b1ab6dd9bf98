"""Diagnostics of a trained VAE: importance weights, PSIS k-hat, active units, KL per latent
dimension, the ELBO's two terms (the ArviZ export is :mod:`pyro_vae.inference_data`).

* Importance weights ``w_ik = p(x_i, z_ik) / q(z_ik | x_i)``, ``z_ik ~ q(z | x_i)`` (Burda et al.
  2015, eq. 8), from :meth:`~pyro_vae.estimators.DataPlateIWELBO.log_weights`.
* PSIS k-hat (Vehtari et al. 2015/2024): the shape of a generalized Pareto distribution fitted to
  the largest weights of each datapoint. ``k <= 0.5`` good, ``0.5 < k <= 0.7`` ok, ``k > 0.7``: the
  weights' variance is so large that the importance-sampled ``log p(x_i)`` is unreliable.
* Active units (Burda et al. 2015, section 5.2): ``A_d = Cov_x(E_{q(z|x)}[z_d]) > 0.01``.

Every function runs under ``torch.no_grad`` and returns CPU results; draws use torch's global RNG,
so seed with ``torch.manual_seed`` for repeatable numbers. The functions of a batch of datapoints
take ``x`` as one tensor (split ``chunk_size`` rows at a time) or as an iterable of batches, read
one at a time (a split's images, ``x for x, _ in batches.eval_batches()``): only results per
datapoint are kept, so a split streamed from disk is never held whole. ArviZ is imported by the function that
uses it (it takes seconds to import).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pyro.distributions as dist
import torch
from torch.distributions import kl_divergence

from .errors import DataError

if TYPE_CHECKING:
    pass

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
    counts = {
        "good": int(np.sum(k <= K_GOOD)),
        "ok": int(np.sum((k > K_GOOD) & (k <= K_OK))),
        "bad": int(np.sum(~(k <= K_OK))),
    }
    return {
        **counts,
        **{f"{name}_share": count / max(k.size, 1) for name, count in counts.items()},
        "total": int(k.size),
    }


Data = torch.Tensor | Iterable[torch.Tensor]  # datapoints: one tensor, or its batches one at a time


def batches_of(x: Data, chunk_size: int) -> Iterable[torch.Tensor]:
    """``x`` a batch at a time: a tensor ``chunk_size`` rows at a time, an iterable of batches as it comes."""
    if not isinstance(x, torch.Tensor):
        return x
    return x.split(chunk_size) if x.shape[0] else [x]  # an empty tensor is one empty batch


@torch.no_grad()
def encode(vae, x: Data, chunk_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's Gaussian ``loc`` and ``scale``, each ``(N, z_dim)`` on the CPU, ``chunk_size``
    datapoints at a time (for ``guide="iaf"``, the Gaussian before the flow)."""
    parts = [vae.encoder(xb) for xb in batches_of(x, chunk_size)]
    return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()


@torch.no_grad()
def posterior_means(vae, x: Data, chunk_size: int = 1000, num_draws: int = 64) -> tuple[torch.Tensor, ...]:
    """``E_q[z|x_i]``, ``(N, z_dim)`` on the CPU, and the variance of its estimate, ``(N, z_dim)``:
    exact (variance 0) for the Gaussian guide; for a flow, whose mean has no closed form, the
    average of ``num_draws`` draws and their sample variance over ``num_draws``."""
    means, noise = [], []
    for xb in batches_of(x, chunk_size):
        q = vae.posterior(xb)
        try:
            means.append(q.mean)
            noise.append(torch.zeros_like(means[-1]))
        except NotImplementedError:
            z = q.sample((num_draws,))
            means.append(z.mean(0))
            noise.append(z.var(0) / num_draws)
    return torch.cat(means).cpu(), torch.cat(noise).cpu()


def active_units(vae, x: Data, threshold: float = 0.01, chunk_size: int = 1000) -> tuple[int, torch.Tensor]:
    """The number of active latent dimensions and ``Cov_x(E_q[z_d|x])`` per dimension, ``(z_dim,)``:
    the variance over the batch ``x`` of the posterior mean (Burda et al. 2015, section 5.2). For a
    flow the means are Monte Carlo averages (:func:`posterior_means`), whose variance adds
    ``E_x[Var(estimate)]`` to ``Cov_x``: that is subtracted, so the count is not inflated by noise."""
    if isinstance(x, torch.Tensor) and x.shape[0] < 2:  # refused before any work where the count is known
        raise DataError("active_units needs at least two datapoints to measure a variance")
    means, noise = posterior_means(vae, x, chunk_size)
    if means.shape[0] < 2:
        raise DataError("active_units needs at least two datapoints to measure a variance")
    variances = means.var(0) - noise.mean(0)
    return int((variances > threshold).sum()), variances


def kl_per_dimension(vae, x: Data, chunk_size: int = 1000) -> torch.Tensor:
    """``(1/N) sum_i KL(q(z_d|x_i) || p(z_d))`` per latent dimension, shape ``(z_dim,)``; it sums to
    the mean total KL (for the standard-normal prior, ``1/2 (scale^2 + loc^2 - 1 - log scale^2)``).
    Defined where both factorize over dimensions (standard prior, Gaussian guide); NaN otherwise."""
    if vae.prior_name != "standard" or vae.guide_name != "gaussian":
        return torch.full((vae.z_dim,), math.nan)
    loc, scale = encode(vae, x, chunk_size)
    prior = dist.Normal(vae.prior_loc.cpu(), vae.prior_scale.cpu())
    return kl_divergence(dist.Normal(loc, scale), prior).mean(0)


@torch.no_grad()
def elbo_terms(vae, x: Data, num_particles: int = 1, chunk_size: int = 1000) -> dict[str, torch.Tensor]:
    """``ELBO(x_i) = E_q[log p(x_i|z)] - KL(q(z|x_i) || p(z))`` split per datapoint, each ``(N,)`` on
    the CPU, ``chunk_size`` datapoints at a time.

    ``reconstruction`` averages the model's ``log p(x_i|z_l)`` over ``num_particles`` draws
    ``z_l ~ q(z|x_i)``; ``kl`` is analytic where it exists (Kingma & Welling 2013, eq. 10 and
    Appendix B), else the average of ``log q(z_l|x_i) - log p(z_l)`` over the same draws (VampPrior,
    IAF guide). These are the terms of the model as defined (a KL weight belongs to training only).
    """
    prior, terms = vae.prior(), {"reconstruction": [], "kl": []}
    for xb in batches_of(x, chunk_size):
        q = vae.posterior(xb)
        z = q.sample((num_particles,))
        terms["reconstruction"].append(vae.likelihood(vae.decoder(z)).log_prob(xb).mean(0).cpu())
        try:
            kl = kl_divergence(q, prior)
        except NotImplementedError:
            kl = (q.log_prob(z) - prior.log_prob(z)).mean(0)
        terms["kl"].append(kl.cpu())
    reconstruction, kl = torch.cat(terms["reconstruction"]), torch.cat(terms["kl"])
    return {"reconstruction": reconstruction, "kl": kl, "elbo": reconstruction - kl}
