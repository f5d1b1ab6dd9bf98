"""A hand-written ELBO in plain PyTorch, independent of Pyro: the yardstick for tests and benchmarks.

``ELBO(x) = (1/L) sum_l log p(x | z_l) - KL(q(z|x) || p(z))``, ``z_l = loc + scale * eps_l``
(Kingma & Welling 2013, eq. 10), with the Gaussian KL of their Appendix B and each
log-likelihood written out from its formula.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .likelihoods import Bernoulli, ContinuousBernoulli, Likelihood, Normal, continuous_bernoulli_log_normalizer


def gaussian_kl(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``KL(N(loc, diag scale^2) || N(0, I)) = 1/2 sum_d (scale^2 + loc^2 - 1 - log scale^2)``."""
    return 0.5 * (scale.pow(2) + loc.pow(2) - 1 - 2 * scale.log()).sum(-1)


def reference_log_likelihood(likelihood: Likelihood, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``log p(x|z)`` summed over pixels, from the textbook formulas; shape ``params.shape[:-event_ndim]``."""
    parts = likelihood.split(params)
    x = x.expand_as(parts[0])
    if isinstance(likelihood, (Bernoulli, ContinuousBernoulli)):
        per_pixel = -F.binary_cross_entropy_with_logits(parts[0], x, reduction="none")
        if isinstance(likelihood, ContinuousBernoulli):
            per_pixel = per_pixel + continuous_bernoulli_log_normalizer(parts[0])
    elif isinstance(likelihood, Normal):
        loc, s = parts[0], likelihood.scale(*parts[1:])
        per_pixel = -(x - loc).pow(2) / (2 * s.pow(2)) - s.log() - 0.5 * math.log(2 * math.pi)
    else:
        raise TypeError(f"no reference formula for {type(likelihood).__name__}")
    return per_pixel.flatten(-likelihood.event_ndim).sum(-1)


def reference_elbo(vae, x: torch.Tensor, num_particles: int = 1) -> torch.Tensor:
    """Per-datapoint ELBO, shape ``(N,)``, differentiable; ``eps`` is drawn as one
    ``(num_particles, N, z_dim)`` standard-normal tensor, as vectorized Pyro particles are."""
    loc, scale = vae.encoder(x)
    eps = torch.empty((num_particles, *loc.shape), dtype=loc.dtype, device=loc.device).normal_()
    z = loc + scale * eps
    reconstruction = reference_log_likelihood(vae.likelihood, vae.decoder(z), x).mean(0)
    return reconstruction - vae.kl_scale * gaussian_kl(loc, scale)
