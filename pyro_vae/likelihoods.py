"""Observation models ``p(x|z)``: the distribution the decoder's output parametrizes.

Each likelihood knows how many decoder outputs it needs per pixel (``num_params``) and builds a
Pyro distribution whose ``log_prob`` is the reconstruction term of the ELBO. The familiar losses
fall out of these log-densities rather than being written by hand:

* ``bernoulli``: ``-log p(x|z) = BCE_with_logits(logits, x)`` summed over pixels, for binary x.
* ``continuous_bernoulli``: ``log p(x|z) = -BCE(logits, x) + log C(lambda)``, a normalized density
  on [0, 1] (Loaiza-Ganem & Cunningham 2019, eq. 2-3).
* ``normal``: ``-log p(x|z) = ||x - mu||^2 / (2 s^2) + sum log s + D/2 log(2 pi)``: squared error
  weighted by the scale ``s``, fixed, learned and shared, learned per pixel, or predicted by the
  decoder.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import pyro.distributions as dist
import torch
from torch import nn

from . import discretized
from .checks import check_count
from .errors import DataError
from .networks import inverse_positive_scale, positive_scale
from .options import MAX_MIXTURE_COMPONENTS, check_normal_scale, data_kind, default, option


def continuous_bernoulli_log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    """``log C(lambda)`` with ``lambda = sigmoid(eta)``: ``C = 2 atanh(1 - 2 lambda) / (1 - 2 lambda)``
    (Loaiza-Ganem & Cunningham 2019, eq. 3), which in logits is ``eta / tanh(eta / 2)``; near
    ``eta = 0`` its Taylor series ``log 2 + eta^2 / 12`` avoids 0/0."""
    a = logits.abs()
    safe = a.clamp_min(1e-2)
    exact = safe.log() - torch.tanh(safe / 2).log()
    return torch.where(a < 1e-2, math.log(2.0) + a.pow(2) / 12, exact)


class StableContinuousBernoulli(dist.ContinuousBernoulli):
    """ContinuousBernoulli whose log-normalizer is :func:`continuous_bernoulli_log_normalizer`.

    torch's probability-space formula loses precision as sigmoid(logits) -> 1: at logits = +30 it
    is 3e-5 nats off per pixel in float64 and 0.63 nats off in float32 (0.01 at +15), while -30 is
    exact; the logit form is symmetric and exact.
    """

    def _cont_bern_log_norm(self):
        return continuous_bernoulli_log_normalizer(self.logits)


class Likelihood(nn.Module):
    """Base class: maps decoder outputs of shape ``(..., num_params * C, *rest)`` to ``p(x|z)``.

    A likelihood checks its data (:meth:`check_support`) and says what its ``log p(x)`` is of,
    ``data_kind`` (its entry's in :mod:`pyro_vae.options`, with the pixel preparations each accepts).
    """

    name: str  # its name in the registry, pyro_vae.options
    num_params = 1
    log_prob_numbers = 4  # numbers per pixel and draw that scoring x keeps alive (for memory estimates)

    def __init__(self, x_shape: Sequence[int]):
        super().__init__()
        self.x_shape = tuple(x_shape)

    @property
    def event_ndim(self) -> int:
        return len(self.x_shape)

    def split(self, params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split decoder outputs into ``num_params`` tensors of shape ``(..., *x_shape)``."""
        return params.chunk(self.num_params, dim=-self.event_ndim)

    def forward(self, params: torch.Tensor) -> dist.TorchDistribution:
        return self.pixel_distribution(*self.split(params)).to_event(self.event_ndim)

    def pixel_distribution(self, *params: torch.Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    @property
    def data_kind(self) -> str:
        """``"binary"``, ``"8bit"`` or ``"density"``: what ``log p(x)`` is of."""
        return data_kind(self.name)

    def check_support(self, x: torch.Tensor) -> None:
        """Raise :class:`DataError` naming the fix if ``x`` lies outside this likelihood's support."""


class BernoulliLikelihood(Likelihood):
    """``x_d ~ Bernoulli(sigmoid(logits_d))``: binary data only."""

    name = "bernoulli"

    def pixel_distribution(self, logits):
        return dist.Bernoulli(logits=logits)

    def check_support(self, x):
        if not torch.all((x == 0) | (x == 1)):
            raise DataError(
                "the bernoulli likelihood needs binary data (every pixel 0 or 1), but x has values "
                "strictly between 0 and 1. Binarize the data (binarization 'dynamic', 'static' or "
                "'threshold'), or use likelihood 'continuous_bernoulli' or 'normal' for continuous pixels."
            )


class ContinuousBernoulliLikelihood(Likelihood):
    """``x_d ~ ContinuousBernoulli(sigmoid(logits_d))``: a proper density on [0, 1]."""

    name = "continuous_bernoulli"

    def pixel_distribution(self, logits):
        return StableContinuousBernoulli(logits=logits)

    def check_support(self, x):
        if not torch.all((x >= 0) & (x <= 1)):
            raise DataError(
                "the continuous_bernoulli likelihood needs data in [0, 1], but x has values outside "
                "it. Rescale the pixels to [0, 1] (divide uint8 images by 255), or use likelihood "
                "'normal' for unbounded data."
            )


class NormalLikelihood(Likelihood):
    """``x_d ~ Normal(mu_d, s_d)`` with ``mu`` from the decoder and ``s`` set by ``scale``.

    ``scale`` is a positive float (fixed), ``"shared"`` (one learned scalar), ``"pixel"`` (one
    learned scale per pixel, independent of z) or ``"decoder"`` (predicted from z, two decoder
    outputs per pixel). Learned scales start at ``init_scale`` and stay above ``MIN_SCALE``.
    """

    name = "normal"

    def __init__(self, x_shape: Sequence[int], scale: str | float = "shared", init_scale: float = 1.0):
        super().__init__(x_shape)
        scale = check_normal_scale(scale)
        self.scale_mode = scale if isinstance(scale, str) else "fixed"
        self.num_params = 2 if self.scale_mode == "decoder" else 1
        if self.scale_mode == "fixed":
            self.register_buffer("fixed_scale", torch.tensor(float(scale)))
        elif self.scale_mode in ("shared", "pixel"):
            shape = () if self.scale_mode == "shared" else self.x_shape
            self.raw_scale = nn.Parameter(inverse_positive_scale(init_scale).expand(shape).clone())

    def scale(self, raw: torch.Tensor | None = None) -> torch.Tensor:
        """The standard deviation ``s``; ``raw`` is the decoder's second output in ``"decoder"`` mode."""
        if self.scale_mode == "fixed":
            return self.fixed_scale
        if self.scale_mode == "decoder":
            return positive_scale(raw)
        return positive_scale(self.raw_scale)

    def pixel_distribution(self, loc, raw=None):
        return dist.Normal(loc, self.scale(raw).expand_as(loc))

    def check_support(self, x):
        if not torch.all(torch.isfinite(x)):
            raise DataError("the normal likelihood needs finite data, but x has NaN or infinite values.")


class DiscretizedLikelihood(Likelihood):
    """``x_d`` on the 256 levels ``k / 255``, the mass of a continuous ``(loc_d, scale_d)`` density
    on level k's bin (:mod:`pyro_vae.discretized`); the decoder emits ``loc`` and a raw scale per
    pixel. Its log-likelihood is a log-probability of the 8-bit image: bits/dim are meaningful."""

    num_params = 2
    distribution: type = discretized.DiscretizedLogistic

    def pixel_distribution(self, loc, raw):
        return self.distribution(loc, discretized.discretized_scale(raw))

    def check_support(self, x):
        if not torch.all(discretized.pixel_levels.check(x)):
            raise DataError(
                f"the {self.name} likelihood needs 8-bit pixels k / 255 (k = 0..255), but x has other values. "
                "Feed uint8 images as x.float() / 255 without dequantizing (--binarize none), or use a density "
                "likelihood "
                "('normal', 'continuous_bernoulli') for continuous data."
            )


class DiscretizedLogisticLikelihood(DiscretizedLikelihood):
    """Discretized logistic per pixel (Salimans et al. 2017, eq. 2, one component)."""

    name = "discretized_logistic"
    log_prob_numbers = 8


class DiscretizedNormalLikelihood(DiscretizedLikelihood):
    """Discretized normal per pixel."""

    name = "discretized_normal"
    distribution = discretized.DiscretizedNormal
    log_prob_numbers = 24  # the erfcx tail, the Simpson fallback and their where-branches


class DiscretizedLogisticMixtureLikelihood(DiscretizedLikelihood):
    """A mixture of ``components`` discretized logistics per pixel (Salimans et al. 2017, eq. 2):
    the decoder emits ``3 C`` values per pixel, mixture logits, locations and raw scales."""

    name = "discretized_logistic_mixture"

    def __init__(self, x_shape: Sequence[int], components: int = 5):
        super().__init__(x_shape)
        self.components = check_count("mixture_components", components, maximum=MAX_MIXTURE_COMPONENTS)
        self.num_params = 3 * self.components
        self.log_prob_numbers = 12 * self.components

    def pixel_distribution(self, *parts):
        c = self.components
        logits, loc, raw = (torch.stack(parts[i * c : (i + 1) * c], dim=-1) for i in range(3))
        return discretized.DiscretizedLogisticMixture(logits, loc, discretized.discretized_scale(raw))


def make_likelihood(
    name: str | Likelihood,
    x_shape: Sequence[int],
    normal_scale: str | float = default("normal_scale"),
    mixture_components: int = default("mixture_components"),
    **settings: Any,
) -> Likelihood:
    """Build the likelihood registered as ``name`` (:mod:`pyro_vae.options`) for data of shape
    ``x_shape``, with the settings it reads (those of other likelihoods are ignored); an instance
    passes through."""
    if isinstance(name, Likelihood):
        return name
    settings |= {"normal_scale": normal_scale, "mixture_components": mixture_components}
    return option("likelihood", name).build(settings, x_shape=tuple(x_shape))
