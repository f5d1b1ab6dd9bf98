"""A hand-written ELBO in plain PyTorch, independent of Pyro and of :mod:`pyro_vae.likelihoods`:
the yardstick for tests and benchmarks.

``ELBO(x) = (1/L) sum_l log p(x | z_l) - beta KL(q(z|x) || p(z))``, ``z_l = loc + scale * eps_l``
(Kingma & Welling 2013, eq. 10), with the Gaussian KL of their Appendix B. Each log-likelihood is
written out here from its formula, reading only the decoder's raw outputs and the likelihood's
parameters, never the library's own ``split``, ``scale`` or normalizer code:

* Bernoulli: ``x eta - softplus(eta)`` per pixel.
* Continuous Bernoulli: that plus ``log C``, ``1/C = int_0^1 lam^x (1 - lam)^(1-x) dx =
  (2 lam - 1) / eta`` (Loaiza-Ganem & Cunningham 2019, eq. 3, integrated directly).
* Normal: ``-(x - mu)^2 / (2 s^2) - log s - log(2 pi) / 2``, ``s = softplus(raw) + MIN_SCALE`` when learned.
* Discretized logistic / normal on the levels ``k / 255``: ``log(F(hi) - F(lo))`` (as
  ``S(lo) - S(hi)`` above the location) with the bin
  ``[(k - 1/2) / 255, (k + 1/2) / 255]``, ``F(0-) = 0`` and ``F(1+) = 1`` at the edges, F the
  logistic CDF ``sigmoid`` or the normal CDF ``erfc(-t / sqrt 2) / 2``, in float64; the
  mixture: ``logsumexp_c(log_softmax(logits)_c + log P_c)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .networks import MIN_SCALE


def gaussian_kl(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``KL(N(loc, diag scale^2) || N(0, I)) = 1/2 sum_d (scale^2 + loc^2 - 1 - log scale^2)``."""
    return 0.5 * (scale.pow(2) + loc.pow(2) - 1 - 2 * scale.log()).sum(-1)


def continuous_bernoulli_log_c(eta: torch.Tensor) -> torch.Tensor:
    """``log C(eta) = log(eta / (2 sigmoid(eta) - 1))``, evaluated in float64; ``C -> 2`` as ``eta -> 0``
    (second-order Taylor term ``eta^2 / 12`` below ``|eta| = 1e-3``)."""
    e = eta.double()
    small = e.abs() < 1e-3
    safe = torch.where(small, torch.ones_like(e), e)
    exact = torch.log(safe / (2 * torch.sigmoid(safe) - 1))
    return torch.where(small, math.log(2.0) + e.pow(2) / 12, exact).to(eta.dtype)


def _normal_scale(likelihood, raw: torch.Tensor) -> torch.Tensor:
    mode = likelihood.scale_mode
    if mode == "fixed":
        return likelihood.fixed_scale
    if mode == "decoder":
        return F.softplus(raw) + MIN_SCALE
    return (F.softplus(likelihood.raw_scale) + MIN_SCALE).flatten()  # shared: one value; pixel: (d,)


def reference_log_likelihood(likelihood, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``log p(x|z)`` summed over pixels from the textbook formulas; ``params`` are the decoder's raw
    outputs ``(..., num_params * C, *rest)``; returns shape ``params.shape[:-event_ndim]``."""
    kind = type(likelihood).__name__
    event_ndim = len(likelihood.x_shape)
    d = math.prod(likelihood.x_shape)
    flat = params.flatten(-event_ndim)  # the first d outputs parametrize the pixels, the next d the scale
    first, second = flat[..., :d], flat[..., d : 2 * d]
    x = x.flatten(-event_ndim).expand_as(first)
    if kind in ("BernoulliLikelihood", "ContinuousBernoulliLikelihood"):
        per_pixel = x * first - F.softplus(first)
        if kind == "ContinuousBernoulliLikelihood":
            per_pixel = per_pixel + continuous_bernoulli_log_c(first)
    elif kind == "NormalLikelihood":
        s = _normal_scale(likelihood, second)
        per_pixel = -(x - first).pow(2) / (2 * s.pow(2)) - s.log() - 0.5 * math.log(2 * math.pi)
    elif kind.startswith("Discretized"):
        components = getattr(likelihood, "components", 1)
        blocks = [flat[..., i * d : (i + 1) * d] for i in range(flat.shape[-1] // d)]
        cdf = torch.sigmoid if "Logistic" in kind else lambda t: 0.5 * torch.special.erfc(-t / math.sqrt(2))
        if components == 1 and "Mixture" not in kind:
            per_pixel = _discretized_log_mass(cdf, x, blocks[0], blocks[1])
        else:
            c = components
            logits = torch.stack(blocks[:c], -1).double().log_softmax(-1)
            masses = torch.stack(
                [_discretized_log_mass(cdf, x, blocks[c + i], blocks[2 * c + i]) for i in range(c)], -1
            )
            per_pixel = torch.logsumexp(logits + masses, -1).to(x.dtype)
    else:
        raise TypeError(f"no reference formula for {kind}")
    return per_pixel.sum(-1)


def _discretized_log_mass(cdf, x: torch.Tensor, loc: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """``log P(k)`` of a continuous ``(loc, softplus(raw) + MIN_SCALE)`` variable binned onto ``k / 255``."""
    x, loc, scale = x.double(), loc.double(), F.softplus(raw.double()) + MIN_SCALE
    k = (x * 255).round()
    lo, hi = ((k - 0.5) / 255 - loc) / scale, ((k + 0.5) / 255 - loc) / scale
    lo = torch.where(k <= 0, torch.full_like(lo, -math.inf), lo)
    hi = torch.where(k >= 255, torch.full_like(hi, math.inf), hi)
    # F(hi) - F(lo), or for a bin above the location the same mass as S(lo) - S(hi), S(t) = F(-t),
    # so that neither difference is of two numbers close to 1
    above = lo + hi > 0
    mass = torch.where(above, cdf(-lo) - cdf(-hi), cdf(hi) - cdf(lo))
    return torch.log(mass).to(raw.dtype)


def check_reference_applies(vae) -> None:
    """:class:`ConfigError` unless ``vae`` has the standard prior and the Gaussian guide, the model
    :func:`reference_elbo` is written for."""
    if vae.prior_name != "standard" or vae.guide_name != "gaussian":
        chosen = f"prior {vae.prior_name!r} and guide {vae.guide_name!r}"
        raise ConfigError(
            f"the reference ELBO is written for prior 'standard' and guide 'gaussian', not {chosen}; "
            "compare the Pyro estimators without 'reference' (--estimators trace meanfield iwae)"
        )


def reference_elbo(vae, x: torch.Tensor, num_particles: int = 1, kl_weight: float = 1.0) -> torch.Tensor:
    """Per-datapoint ``ELBO_beta``, shape ``(N,)``, differentiable, ``beta = kl_weight``; ``eps`` is
    drawn as one ``(num_particles, N, z_dim)`` standard-normal tensor, as vectorized Pyro particles are.
    Written for the standard prior and the Gaussian guide (:func:`check_reference_applies`)."""
    check_reference_applies(vae)
    loc, scale = vae.encoder(x)
    eps = torch.empty((num_particles, *loc.shape), dtype=loc.dtype, device=loc.device).normal_()
    z = loc + scale * eps
    reconstruction = reference_log_likelihood(vae.likelihood, vae.decoder(z), x).mean(0)
    return reconstruction - kl_weight * gaussian_kl(loc, scale)
