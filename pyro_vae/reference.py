"""A hand-written ELBO in plain PyTorch, independent of Pyro and of the library's likelihoods,
priors and guides: the yardstick for tests and benchmarks.

``ELBO(x) = (1/L) sum_l [log p(x | z_l) - beta (log q(z_l|x) - log p(z_l))]`` with
``z_l`` the guide's draw from ``eps_l ~ N(0, I)`` (Kingma & Welling 2013, eq. 10; Trace_ELBO),
or with ``beta KL(q(z|x) || p(z))`` in closed form where it exists, the standard prior and the
Gaussian guide (their Appendix B; TraceMeanField_ELBO, which falls back to the draws elsewhere).
Each term is written out here from its formula for the option of that name in
:mod:`pyro_vae.options`, reading only the networks' outputs and the options' parameters (the
pseudo-inputs, a learned scale, the flows' autoregressive networks), never the library's own
``split``, ``scale``, normalizer or distribution code:

* Standard prior: ``log N(z; 0, I)``. VampPrior (Tomczak & Welling 2018, eq. 9):
  ``logsumexp_k log N(z; loc(u_k), scale(u_k)) - log K`` with the encoder at the pseudo-inputs.
* Gaussian guide: ``z = loc + scale eps``, ``log q = log N(eps; 0, I) - sum log scale``. IAF guide
  (Kingma et al. 2016, eq. 10-11): then ``z_t = mu_t + sigma_t z_{t-1}`` for each step, with
  ``(mu_t, log sigma_t)`` from its autoregressive network of ``(z_{t-1}, context)``,
  ``log sigma_t`` clipped to Pyro's ``[-5, 3]``, and ``log q -= sum_i log sigma_t,i``.

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


def _bernoulli(likelihood, x, blocks):
    return x * blocks[0] - F.softplus(blocks[0])


def _continuous_bernoulli(likelihood, x, blocks):
    return _bernoulli(likelihood, x, blocks) + continuous_bernoulli_log_c(blocks[0])


def _normal(likelihood, x, blocks):
    s = _normal_scale(likelihood, blocks[1] if len(blocks) > 1 else None)
    return -(x - blocks[0]).pow(2) / (2 * s.pow(2)) - s.log() - 0.5 * math.log(2 * math.pi)


def _logistic_cdf(t):
    return torch.sigmoid(t)


def _normal_cdf(t):
    return 0.5 * torch.special.erfc(-t / math.sqrt(2))


def _discretized(cdf):
    return lambda likelihood, x, blocks: _discretized_log_mass(cdf, x, blocks[0], blocks[1])


def _discretized_logistic_mixture(likelihood, x, blocks):
    c = likelihood.components
    logits = torch.stack(blocks[:c], -1).double().log_softmax(-1)
    masses = torch.stack(
        [_discretized_log_mass(_logistic_cdf, x, blocks[c + i], blocks[2 * c + i]) for i in range(c)], -1
    )
    return torch.logsumexp(logits + masses, -1).to(x.dtype)


# likelihood name (pyro_vae.options) -> log p(x_d | its blocks of decoder outputs), per pixel
PIXEL_LOG_LIKELIHOODS = {
    "bernoulli": _bernoulli,
    "continuous_bernoulli": _continuous_bernoulli,
    "normal": _normal,
    "discretized_logistic": _discretized(_logistic_cdf),
    "discretized_normal": _discretized(_normal_cdf),
    "discretized_logistic_mixture": _discretized_logistic_mixture,
}


def reference_log_likelihood(likelihood, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``log p(x|z)`` summed over pixels from the textbook formulas; ``params`` are the decoder's raw
    outputs ``(..., num_params * C, *rest)``; returns shape ``params.shape[:-event_ndim]``."""
    check_formula("likelihood", getattr(likelihood, "name", None), PIXEL_LOG_LIKELIHOODS)
    event_ndim = len(likelihood.x_shape)
    d = math.prod(likelihood.x_shape)
    flat = params.flatten(-event_ndim)  # block i of d outputs: the i-th parameter of every pixel
    blocks = [flat[..., i * d : (i + 1) * d] for i in range(flat.shape[-1] // d)]
    x = x.flatten(-event_ndim).expand_as(blocks[0])
    return PIXEL_LOG_LIKELIHOODS[likelihood.name](likelihood, x, blocks).sum(-1)


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


def normal_log_density(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``log N(z; loc, diag(scale^2))`` summed over the last dimension."""
    return (-0.5 * ((z - loc) / scale).pow(2) - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def _standard_log_prior(vae, z):
    return normal_log_density(z, torch.zeros_like(z), torch.ones_like(z))


def _vamp_log_prior(vae, z):
    loc, scale = vae.encoder(vae.prior_family.pseudo_inputs)[:2]  # (K, z_dim) each
    return torch.logsumexp(normal_log_density(z.unsqueeze(-2), loc, scale), -1) - math.log(loc.shape[0])


# prior name (pyro_vae.options) -> log p(z)
LOG_PRIORS = {"standard": _standard_log_prior, "vamp": _vamp_log_prior}


def _gaussian_draw(vae, encoded, eps):
    loc, scale = encoded[:2]
    log_q = normal_log_density(eps, torch.zeros_like(eps), torch.ones_like(eps)) - scale.log().sum(-1)
    return loc + scale * eps, log_q


def _iaf_draw(vae, encoded, eps):
    z, log_q = _gaussian_draw(vae, encoded, eps)
    for flow in vae.guide_family.flows:
        mu, log_sigma = flow.nn(z, context=encoded[2])
        log_sigma = log_sigma.clamp(-5.0, 3.0)
        z = mu + log_sigma.exp() * z
        log_q = log_q - log_sigma.sum(-1)
    return z, log_q


# guide name (pyro_vae.options) -> (z, log q(z|x)) from the encoder's outputs and the noise eps
POSTERIOR_DRAWS = {"gaussian": _gaussian_draw, "iaf": _iaf_draw}


def check_formula(kind: str, name: str, formulas: dict) -> None:
    """:class:`ConfigError` unless this module writes out the ``kind`` called ``name``."""
    if name not in formulas:
        raise ConfigError(
            f"the reference ELBO has no formula for the {kind} {name!r} (it has {', '.join(formulas)}); "
            "compare the Pyro estimators without 'reference' (--estimators trace meanfield iwae)"
        )


def check_reference_applies(vae) -> None:
    """:class:`ConfigError` unless :func:`reference_elbo` has formulas for ``vae``'s likelihood,
    prior and guide."""
    check_formula("likelihood", getattr(vae.likelihood, "name", None), PIXEL_LOG_LIKELIHOODS)
    check_formula("prior", vae.prior_name, LOG_PRIORS)
    check_formula("guide", vae.guide_name, POSTERIOR_DRAWS)


def reference_elbo(
    vae, x: torch.Tensor, num_particles: int = 1, kl_weight: float = 1.0, analytic_kl: bool = True
) -> torch.Tensor:
    """Per-datapoint ``ELBO_beta``, shape ``(N,)``, differentiable, ``beta = kl_weight``; ``eps`` is
    drawn as one ``(num_particles, N, z_dim)`` standard-normal tensor, as vectorized Pyro particles are.
    ``analytic_kl``: the closed-form KL where it exists (standard prior, Gaussian guide), as
    TraceMeanField_ELBO; else, and everywhere with False (Trace_ELBO), ``log q - log p`` of the draws."""
    check_reference_applies(vae)
    encoded = vae.encoder(x)
    loc = encoded[0]
    eps = torch.empty((num_particles, *loc.shape), dtype=loc.dtype, device=loc.device).normal_()
    z, log_q = POSTERIOR_DRAWS[vae.guide_name](vae, encoded, eps)
    reconstruction = reference_log_likelihood(vae.likelihood, vae.decoder(z), x).mean(0)
    if analytic_kl and (vae.prior_name, vae.guide_name) == ("standard", "gaussian"):
        kl = gaussian_kl(*encoded[:2])
    else:
        kl = (log_q - LOG_PRIORS[vae.prior_name](vae, z)).mean(0)
    return reconstruction - kl_weight * kl
