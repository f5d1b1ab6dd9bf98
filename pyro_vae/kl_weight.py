"""The training objective: the ELBO, with an optional weight on its KL term.

``ELBO_beta(x) = E_q(z|x)[log p(x|z)] - beta KL(q(z|x) || p(z))``: beta = 1 is the ELBO; beta > 1
is a beta-VAE (Higgins et al. 2017); beta rising from 0 to 1 over the first epochs is KL annealing
(Bowman et al. 2016, section 3.1). The weight belongs to the *objective*, not to the model: it is a
handler (:class:`LatentWeight`) put around model and guide for one loss evaluation, as Pyro's
``examples/dmm.py`` anneals with ``poutine.scale``. The model itself always defines the unweighted
``p(x, z)``, so every evaluation (test ELBO, ``log p(x)``, diagnostics) is of the model as defined.

Weighting the latent site's log-densities in model *and* guide by beta turns
``log p(x|z) + log p(z) - log q(z|x)`` into ``log p(x|z) + beta (log p(z) - log q(z|x))``, whose
expectation under q is ``ELBO_beta`` for every estimator (Monte Carlo KL in ``Trace_ELBO``, analytic
KL in ``TraceMeanField_ELBO``, which scales it by the guide site's scale).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
from pyro.infer import ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .checks import plain_value
from .errors import ConfigError


def check_kl_weight(weight: float | torch.Tensor) -> None:
    """Raise :class:`ConfigError` unless ``weight`` is a finite non-negative number (or a scalar tensor)."""
    if isinstance(weight, torch.Tensor):
        if weight.dim() != 0 or not weight.dtype.is_floating_point:
            raise ConfigError(
                f"a KL weight tensor must be a floating-point scalar, got {weight.dtype} of shape {tuple(weight.shape)}"
            )
        return  # a tensor weight is a graph input (compiled step): its value is checked by whoever sets it
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):  # numpy's scalars too
        raise ConfigError(f"the KL weight must be a number, got {type(weight).__name__}")
    if not (math.isfinite(weight) and weight >= 0):
        raise ConfigError(f"the KL weight must be a finite number >= 0, got {weight}")


class LatentWeight(Messenger):
    """Multiply the log-density of every latent (unobserved) sample site by ``weight``.

    Around the model it weights ``log p(z)``, around the guide ``log q(z|x)``; observed sites and
    plate subsample sites are left alone. It sets the sites' ``scale`` (0 included, which
    ``poutine.scale`` refuses), never their ``mask``, which belongs to the model: so evaluation,
    which reads unscaled log-densities, sees the model as defined. A tensor weight is a graph
    input, so one traced graph serves every weight.
    """

    def __init__(self, weight: float | torch.Tensor):
        check_kl_weight(weight)
        super().__init__()
        self.weight = plain_value(weight)

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = self.weight * msg["scale"]


def kl_weighted(fn: Callable, weight: float | torch.Tensor) -> Callable:
    """``fn`` (a model or a guide) with its latent sites weighted by ``weight``; ``fn`` itself at weight 1.

    Wrap model and guide alike: ``SVI(kl_weighted(vae.model, b), kl_weighted(vae.guide, b), ...)``
    optimizes ``E_q[log p(x|z)] - b KL(q(z|x) || p(z))``.
    """
    check_kl_weight(weight)
    if not isinstance(weight, torch.Tensor) and weight == 1:
        return fn  # the plain ELBO: no handler on the hot path
    return LatentWeight(weight)(fn)


def elbo_loss(
    elbo: ELBO, model: Callable, guide: Callable, x: torch.Tensor, kl_weight: float | torch.Tensor = 1.0, **kwargs
) -> torch.Tensor:
    """``-ELBO_beta`` of the batch ``x`` summed over datapoints, differentiable, with ``beta = kl_weight``."""
    return elbo.differentiable_loss(kl_weighted(model, kl_weight), kl_weighted(guide, kl_weight), x, **kwargs)
