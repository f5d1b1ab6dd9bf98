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

The distribution is Pyro's :class:`~pyro.distributions.MixtureSameFamily`: the model samples it,
``log_prob`` scores it, and no analytic KL exists against it, so ``TraceMeanField_ELBO`` estimates
that term by Monte Carlo (Pyro's fallback when ``kl_divergence`` is not implemented).
Scoring z keeps ``K z_dim`` numbers per draw alive (:attr:`VampPrior.log_prob_numbers`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import pyro.distributions as dist
import torch
from torch import nn

from .checks import check_count
from .options import MAX_PSEUDO_INPUTS


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
        self.log_prob_numbers = 4 * k * z_dim  # (draws, K, z_dim) differences, squares and their sums

    def forward(self, encoder: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]) -> dist.MixtureSameFamily:
        loc, scale = encoder(self.pseudo_inputs)[:2]
        mixing = dist.Categorical(logits=loc.new_zeros(loc.shape[0]))
        return dist.MixtureSameFamily(mixing, dist.Normal(loc, scale).to_event(1))
