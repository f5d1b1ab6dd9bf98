"""The priors ``p(z)``: ``N(0, I)``, and the VampPrior, made of the encoder's own posteriors
(Tomczak & Welling 2018).

Every prior is a module built as ``cls(x_shape=..., z_dim=..., **settings)`` whose
``forward(encoder)`` returns a distribution of event shape ``(z_dim,)`` (registered in
:mod:`pyro_vae.options`). The standard prior is ``N(0, I)`` (Kingma & Welling 2013, section 3).

``p(z) = (1/K) sum_k q(z|u_k)`` (their eq. 9), a uniform mixture over K learned pseudo-inputs
``u_k`` (images of the data's shape, trained with everything else by SVI), each component the
encoder's Gaussian ``N(z; loc(u_k), diag(scale(u_k)^2))``. So::

    log p(z) = logsumexp_k log N(z; loc(u_k), scale(u_k)) - log K

The components are the encoder's Gaussian even when the guide adds a flow (:mod:`pyro_vae.guides`):
a mixture of flows could only be scored by inverting each flow. The pseudo-inputs are free
parameters, started at ``U(0, 1)`` draws (the pixel range).

The distribution is :class:`GaussianMixture`, Pyro's :class:`~pyro.distributions.MixtureSameFamily`
whose ``log_prob`` expands the K quadratic forms into two matrix products
(:func:`gaussian_mixture_log_prob`): ``K`` numbers per draw instead of the ``K z_dim`` differences,
squares and quotients (and their gradients) that dominated a VampPrior training step. The model
samples it, ``log_prob`` scores it, and no analytic KL exists against it, so
``TraceMeanField_ELBO`` estimates that term by Monte Carlo (Pyro's fallback when
``kl_divergence`` is not implemented).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import pyro.distributions as dist
import torch
from torch import nn

from .checks import check_count
from .options import MAX_PSEUDO_INPUTS


def gaussian_mixture_log_prob(
    z: torch.Tensor, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``log sum_k pi_k N(z; m_k, diag(s_k^2))``, ``pi = softmax(logits)``, for ``z`` of shape
    ``(..., D)`` and ``K`` components (``loc`` and ``scale`` of shape ``(K, D)``). The quadratic
    forms are two matrix products,

        sum_j (z_j - m_kj)^2 / s_kj^2 = (z * z) . (1 / s_k^2) - 2 z . (m_k / s_k^2) + sum_j m_kj^2 / s_kj^2,

    computed in float64, where the expansion's cancellation (terms of size (z / s)^2 whose
    difference is of order one) costs nothing at float32's precision; differentiable in every input."""
    loc, scale = loc.double(), scale.double()
    precision = scale.pow(-2)  # (K, D)
    log_norm = 2 * scale.log().sum(-1) + loc.shape[-1] * math.log(2 * math.pi)
    offset = (loc.pow(2) * precision).sum(-1) + log_norm  # (K,)
    flat = z.reshape(-1, z.shape[-1]).double()
    quadratic = torch.addmm(offset, flat.pow(2), precision.t()).addmm(flat, (loc * precision).t(), alpha=-2)
    log_p = torch.logsumexp(quadratic * -0.5 + torch.log_softmax(logits.double(), -1), -1)
    return log_p.to(z.dtype).reshape(z.shape[:-1])


class GaussianMixture(dist.MixtureSameFamily):
    """A mixture of diagonal Gaussians (``Independent(Normal, 1)`` components of batch shape ``(K,)``)
    scored by :func:`gaussian_mixture_log_prob`; sampled as Pyro's ``MixtureSameFamily``. Expanded
    (a plate), it stays one mixture broadcast over the batch (:class:`~pyro.distributions.ExpandedDistribution`)."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        component = self.component_distribution.base_dist
        return gaussian_mixture_log_prob(value, self.mixture_distribution.logits, component.loc, component.scale)

    def expand(self, batch_shape, _instance=None) -> dist.TorchDistribution:
        return dist.ExpandedDistribution(self, batch_shape)


class StandardPrior(nn.Module):
    """``N(0, I)``, built from buffers (it follows the module's device and dtype) that are not saved:
    the checkpoint of a run is the same with it as without it."""

    def __init__(self, x_shape: Sequence[int], z_dim: int):
        super().__init__()
        self.register_buffer("loc", torch.zeros(z_dim), persistent=False)
        self.register_buffer("scale", torch.ones(z_dim), persistent=False)

    def forward(self, encoder: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]) -> dist.TorchDistribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


class VampPrior(nn.Module):
    """``p(z) = (1/K) sum_k q(z|u_k)`` with ``K = pseudo_inputs`` learned inputs of shape ``x_shape``."""

    def __init__(self, x_shape: Sequence[int], z_dim: int, pseudo_inputs: int = 500):
        super().__init__()
        k = check_count("pseudo_inputs", pseudo_inputs, maximum=MAX_PSEUDO_INPUTS)
        self.pseudo_inputs = nn.Parameter(torch.rand(k, *x_shape))
        self.log_prob_numbers = 4 * k  # (draws, K) quadratic forms and their exponentials, float64 (8 bytes each)

    def forward(self, encoder: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]) -> GaussianMixture:
        loc, scale = encoder(self.pseudo_inputs)[:2]
        mixing = dist.Categorical(logits=loc.new_zeros(loc.shape[0]))
        return GaussianMixture(mixing, dist.Normal(loc, scale).to_event(1))
