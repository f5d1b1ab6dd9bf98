"""The families of ``q(z|x)`` the guide draws from, built from the encoder's outputs.

* ``"gaussian"``: ``q(z|x) = N(z; loc(x), diag(scale(x)^2))`` (Kingma & Welling 2013, Appendix C.2).
* ``"iaf"``: that Gaussian followed by T steps of inverse autoregressive flow conditioned on a
  context ``h(x)`` from the encoder (Kingma et al. 2016, eq. 10-11)::

      z_0 = loc(x) + scale(x) * eps,  eps ~ N(0, I)
      z_t = mu_t(z_{t-1}, h) + sigma_t(z_{t-1}, h) * z_{t-1},   t = 1..T
      log q(z_T|x) = log N(eps; 0, I) - sum_i log scale_i(x) - sum_t sum_i log sigma_t,i

  where ``(mu_t, sigma_t)_i`` depends on ``z_{t-1}`` only through its dimensions before ``i`` in
  step t's (random, saved) order: the Jacobian is triangular. Each step is Pyro's
  :class:`~pyro.distributions.transforms.ConditionalAffineAutoregressive` (a MADE network of
  ``10 z_dim`` hidden units), the whole a
  :class:`~pyro.distributions.ConditionalTransformedDistribution`. Sampling is one pass per step;
  ``log_prob`` of the guide's own draws reads the transforms' cache (no inversion).

Every family is a module built as ``cls(z_dim=..., context_dim=..., **settings)`` (registered in
:mod:`pyro_vae.options`; its parameters train with the guide) whose ``forward(loc, scale, context)``
returns a distribution of batch shape ``loc.shape[:-1]`` and event shape ``(z_dim,)``;
``needs_context`` says whether the encoder must return a context too, ``context_dim`` how many
values it has (0: none; ``context_dim=None`` at construction: the built-in encoder's ``z_dim``).
"""

from __future__ import annotations

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn

from .checks import check_count
from .errors import ConfigError
from .options import MAX_FLOW_STEPS


class GaussianGuide(nn.Module):
    """``N(loc, diag(scale^2))``; no parameters of its own, any context is ignored."""

    needs_context, context_dim = False, 0

    def __init__(self, z_dim: int | None = None, context_dim: int | None = None):
        super().__init__()

    def forward(
        self, loc: torch.Tensor, scale: torch.Tensor, context: torch.Tensor | None = None
    ) -> dist.TorchDistribution:
        return dist.Normal(loc, scale).to_event(1)


class IAFGuide(nn.Module):
    """The Gaussian followed by ``flow_steps`` conditional affine autoregressive transforms."""

    needs_context = True

    def __init__(self, z_dim: int, flow_steps: int = 2, context_dim: int | None = None):
        super().__init__()
        if z_dim < 2:
            raise ConfigError(
                "the iaf guide needs z_dim >= 2 (an autoregressive flow on one dimension is an affine map); "
                "use guide='gaussian'"
            )
        self.context_dim = z_dim if context_dim is None else check_count("context_dim", context_dim)
        steps = check_count("flow_steps", flow_steps, maximum=MAX_FLOW_STEPS)
        self.flows = nn.ModuleList(T.conditional_affine_autoregressive(z_dim, self.context_dim) for _ in range(steps))

    def forward(
        self, loc: torch.Tensor, scale: torch.Tensor, context: torch.Tensor | None = None
    ) -> dist.TorchDistribution:
        if context is None or context.shape[-1] != self.context_dim:
            got = "none" if context is None else context.shape[-1]
            raise ConfigError(f"the iaf guide needs a context of {self.context_dim} values from the encoder, got {got}")
        base = dist.Normal(loc, scale).to_event(1)
        return dist.ConditionalTransformedDistribution(base, list(self.flows)).condition(context)


def posterior_center(q: dist.TorchDistribution) -> torch.Tensor:
    """The base Gaussian's mean carried through the flow's transforms (``eps = 0``); for the
    Gaussian guide, its mean."""
    if not isinstance(q, torch.distributions.TransformedDistribution):
        return q.mean
    z = q.base_dist.mean
    for transform in q.transforms:
        z = transform(z)
    return z
