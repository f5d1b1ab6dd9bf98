"""Discretized likelihoods for 8-bit pixels: a probability mass on each of the 256 levels.

A density on real values (Normal, ContinuousBernoulli) is not a probability of an image. Pixels
are 8-bit integers ``k = 0..255``, fed to the library as ``k / 255``; here level ``k`` receives the
mass of a continuous variable ``y`` on its bin ``[(k - 0.5) / 255, (k + 0.5) / 255]``, and the
two edge bins take the tails (Salimans et al. 2017, PixelCNN++, eq. 2; Kingma et al. 2016, IAF):

    P(0) = F((0.5 - mu') / s'),   P(255) = 1 - F((254.5 - mu') / s'),
    P(k) = F((k + 0.5 - mu') / s') - F((k - 0.5 - mu') / s')   otherwise,

with ``mu' = 255 loc`` and ``s' = 255 scale`` (``loc`` and ``scale`` are in units of the [0, 1]
pixel scale) and ``F`` the standard logistic or normal CDF. ``-log P(x) / (D log 2)`` is in bits
per dimension, as is the bound of :func:`dequantized_log_likelihood_bound` for a density.
"""

from __future__ import annotations

import math
from typing import Callable

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from torch.distributions.utils import broadcast_all

from .checks import check_count
from .errors import DataError
from .networks import MIN_SCALE, positive_scale

TOP = 255  # the highest level; levels are k / TOP
LEVEL_ATOL = 1e-3  # in levels: far above float32 round-off of k / 255 (3e-5), far below the spacing 1


def discretized_scale(raw: torch.Tensor, min_scale: float = MIN_SCALE) -> torch.Tensor:
    """The ``scale`` of a discretized likelihood from an unconstrained decoder output:
    :func:`~pyro_vae.networks.positive_scale`, ``softplus(raw) + min_scale``.

    The scale is in units of the [0, 1] pixel scale, so the floor 1e-4 is 0.026 of a level: a
    discretized logistic that narrow puts all but ``2 exp(-19.6) = 6e-9`` of its mass on one level.
    Unlike a density, a mass cannot exceed 1, so the floor guards the gradients, not the likelihood.
    """
    return positive_scale(raw, min_scale)


class _PixelLevels(constraints.Constraint):
    """The 256 levels ``k / 255``, ``k = 0..255``: ``255 value`` is an integer in [0, 255] up to
    :data:`LEVEL_ATOL`."""

    is_discrete = True
    event_dim = 0

    def check(self, value):
        if not torch.is_floating_point(value):  # integer arithmetic would wrap 255 * value
            return torch.zeros_like(value, dtype=torch.bool)
        k = value * TOP
        return ((k - k.round()).abs() <= LEVEL_ATOL) & (k > -0.5) & (k < TOP + 0.5)


pixel_levels = _PixelLevels()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(-x))`` for ``x > 0`` (Maechler 2012): ``expm1`` below ``log 2``, ``log1p``
    above. Each branch sees only inputs where it is finite, so gradients stay finite too; the
    inputs are masked with ``where``, not ``clamp``, whose gradient vanishes at the boundary."""
    small = x < math.log(2)
    return torch.where(
        small,
        torch.log(-torch.expm1(-torch.where(small, x, 1.0))),
        torch.log1p(-torch.exp(-torch.where(small, 1.0, x))),
    )


def _log_ndtr(x: torch.Tensor) -> torch.Tensor:
    """``log Phi(x)``; for ``x < 0`` as ``log(erfcx(-x / sqrt 2) / 2) - x^2 / 2``, because the
    gradient torch derives for ``log_ndtr``, ``exp(-x^2 / 2 - log_ndtr(x)) / sqrt(2 pi)``, cancels
    catastrophically in the lower tail (0.4 instead of 5e7 at x = -5e7 in float32)."""
    lower = x < 0
    neg, pos = torch.where(lower, x, 0.0), torch.where(lower, 0.0, x)
    tail = torch.log(torch.special.erfcx(-neg / math.sqrt(2)) / 2) - neg.square() / 2
    return torch.where(lower, tail, torch.special.log_ndtr(pos))


class _Discretized(dist.TorchDistribution):
    """A symmetric location-scale density ``continuous(loc, scale)`` binned onto the 256 levels.

    Subclasses give the standard CDF ``_cdf(t)`` and log-CDF ``_log_cdf(t)`` (the log-survival is
    ``_log_cdf(-t)`` by symmetry) and ``_log_interior(a, b, width)``, the log mass of the bin ``[a, b]`` in standard
    units, ``width = b - a`` computed without cancellation. The edges are computed in levels,
    ``a = (k - 0.5 - 255 loc) / (255 scale)``, where ``k +- 0.5`` is exact: a bin edge near ``loc``
    keeps its relative precision however narrow the scale. ``sample`` draws ``y`` from the density
    and rounds it to the nearest level, clamped to [0, 1]; ``mean`` sums the survival function and
    ``variance`` the squared deviations of the levels times their masses.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = pixel_levels
    has_rsample = False
    continuous: type[dist.TorchDistribution]

    def __init__(self, loc, scale, validate_args=None):
        self.loc, self.scale = broadcast_all(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(_Discretized, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        super(_Discretized, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        k = (value * TOP).round()
        loc, scale = TOP * self.loc, TOP * self.scale  # in levels
        a, b = (k - 0.5 - loc) / scale, (k + 0.5 - loc) / scale
        return torch.where(
            k <= 0,
            self._log_cdf(b),
            torch.where(k >= TOP, self._log_cdf(-a), self._log_interior(a, b, 1 / scale)),
        )

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            y = self.continuous(self.loc, self.scale).sample(sample_shape)
            return (y * TOP).round().clamp(0, TOP) / TOP

    @property
    def mean(self):
        """``E[X] = (1/255) sum_{k=1}^{255} P(X >= k/255)``, the survival function at each level's
        lower edge, summed one level at a time: memory stays that of the batch (scoring all 256
        levels at once took 256 times that, gigabytes for a figure's worth of images)."""
        inverse = 1 / (TOP * self.scale)
        centre = TOP * self.loc * inverse  # loc / scale, in levels
        total = torch.zeros_like(centre)
        for k in range(1, TOP + 1):  # P(X >= k) = 1 - F((k - 0.5 - loc) / scale) = F((loc - k + 0.5) / scale)
            total += self._cdf(torch.add(centre, inverse, alpha=0.5 - k))
        return total / TOP

    @property
    def variance(self):
        """``Var X = sum_k (k/255 - E[X])^2 P(X = k/255)``, one level at a time as for :attr:`mean`.
        Every term is >= 0 and every ``P(k)`` is ``exp(log_prob)``, accurate to round-off, so the
        variance of a scale far below a level's width stays accurate, where ``E[X^2] - E[X]^2``
        would cancel to round-off noise."""
        mean = self.mean
        total = torch.zeros_like(mean)
        for k in range(TOP + 1):
            level = torch.full_like(mean, k / TOP)
            total += (level - mean).square() * self.log_prob(level).exp()
        return total

    def _log_cdf(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _cdf(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _log_interior(self, a: torch.Tensor, b: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DiscretizedLogistic(_Discretized):
    """The logistic density discretized onto the 256 levels (Kingma et al. 2016; Salimans et al. 2017).

    The interior mass needs no CDF difference:
    ``sigmoid(b) - sigmoid(a) = sigmoid(b) sigmoid(-a) (1 - exp(-(b - a)))``, so
    ``log P = log sigmoid(b) + log sigmoid(-a) + log(1 - exp(-(b - a)))``: every term is accurate to
    round-off for any ``loc`` and any ``scale``, with no cancellation and no fallback. The edges
    are ``log sigmoid(t) = -softplus(-t)``, computed as ``F.logsigmoid``: ``F.softplus`` returns
    its input above 20 and so drops up to ``exp(-20) = 2e-9`` nats.
    """

    continuous = dist.Logistic

    def _log_cdf(self, t):
        return F.logsigmoid(t)

    def _cdf(self, t):
        return torch.sigmoid(t)

    def _log_interior(self, a, b, width):
        return F.logsigmoid(b) + F.logsigmoid(-a) + _log1mexp(width)


class DiscretizedNormal(_Discretized):
    """The normal density discretized onto the 256 levels.

    Interior bins are reflected to the lower tail (``Phi(b) - Phi(a) = Phi(-a) - Phi(-b)``), where
    ``log Phi`` keeps its relative precision: ``log P = log Phi(b) + log(1 - exp(-g))`` with
    ``g = log Phi(b) - log Phi(a)``. Its round-off, ``eps |log Phi(b)| / g`` relative, grows as the
    bin narrows, so below ``g = (1000 eps)^(1/5)`` (0.16 in float32, 3e-3 in float64) Simpson's rule
    takes over, ``log P = log[((b - a) / 6)(phi(a) + 4 phi(m) + phi(b))]`` with ``m = (a + b) / 2``,
    whose relative error ``(b - a)^4 |m^4 - 6m^2 + 3| / 2880`` is there of the same order: PixelCNN++'s
    ``log density x bin width`` fallback, one order higher. The edges are :func:`_log_ndtr`.
    """

    continuous = dist.Normal

    def _log_cdf(self, t):
        return _log_ndtr(t)

    def _cdf(self, t):
        return torch.special.ndtr(t)

    def _log_interior(self, a, b, width):
        lower = a + b < 0
        a, b = torch.where(lower, a, -b), torch.where(lower, b, -a)
        log_b, log_a = _log_ndtr(b), _log_ndtr(a)
        exact = (log_b - log_a) > (1000 * torch.finfo(a.dtype).eps) ** (1 / 5)
        gap = torch.where(exact, log_b - log_a, torch.ones_like(a))
        log_phi = torch.stack([-a.square() / 2, -((a + b) / 2).square() / 2 + math.log(4), -b.square() / 2])
        simpson = torch.logsumexp(log_phi, 0) + torch.log(width / 6) - 0.5 * math.log(2 * math.pi)
        return torch.where(exact, log_b + _log1mexp(gap), simpson)


class DiscretizedLogisticMixture(dist.MixtureSameFamily):
    """A mixture of ``C`` discretized logistics per pixel (Salimans et al. 2017, eq. 2):
    ``log P(x) = logsumexp_c [log softmax(logits)_c + log P_c(x)]``.

    ``logits``, ``loc`` and ``scale`` have shape ``(..., C)``, the components on the last axis;
    the batch shape is ``(...)``. ``sample`` picks a component and samples it; ``mean`` is the
    mixture of the components' means, ``variance`` the law of total variance over the components.
    """

    def __init__(self, logits, loc, scale, validate_args=None):
        logits, loc, scale = broadcast_all(logits, loc, scale)
        super().__init__(
            dist.Categorical(logits=logits, validate_args=validate_args),
            DiscretizedLogistic(loc, scale, validate_args=validate_args),
            validate_args=validate_args,
        )

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedLogisticMixture, _instance)
        return super().expand(batch_shape, _instance=new)

    @property
    def logits(self):
        return self.mixture_distribution.logits

    @property
    def loc(self):
        return self.component_distribution.loc

    @property
    def scale(self):
        return self.component_distribution.scale


def dequantized_log_likelihood_bound(
    log_density_fn: Callable[[torch.Tensor], torch.Tensor],
    x_levels: torch.Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A lower bound on ``log P(x)`` of the 8-bit data under a density ``p`` on [0, 1]^D, by
    uniform dequantization (Theis, van den Oord & Bethge 2016, section 3.1).

    ``p`` induces the discrete distribution ``P(x) = integral of p over the cell of x``, the cell
    of level ``k`` being ``[k / 256, (k + 1) / 256)`` per pixel, of volume ``256^-D``. With
    ``y = (255 x + u) / 256``, ``u ~ U[0, 1)^D``, ``P(x) = 256^-D E_u[p(y)]`` and by Jensen's
    inequality (log is concave)

        log P(x) = log E_u[p(y)] - D log 256  >=  E_u[log p(y)] - D log 256,

    with equality when ``p`` is constant on the cell. The result is in nats per datapoint, a
    log-probability of the same discrete data as the discretized likelihoods (a different binning
    of [0, 1] into 256 cells), so the two compare in bits per dimension, ``-log P / (D log 2)``.

    ``x_levels`` has shape ``(N, *pixel_shape)`` with values ``k / 255``; ``log_density_fn(y)``
    takes ``y`` of shape ``(S, N, *pixel_shape)`` and returns ``log p(y)`` summed over pixels,
    shape ``(S, N)``. Returns the ``S = num_samples`` Monte Carlo estimate of the bound and its
    standard error (NaN for ``S = 1``), each of shape ``(N,)``.
    """
    num_samples = check_count("num_samples", num_samples)
    if x_levels.dim() < 2 or x_levels.shape[0] == 0:
        raise DataError(f"x_levels must have shape (N, *pixel_shape) with N >= 1, got {tuple(x_levels.shape)}")
    if not torch.all(pixel_levels.check(x_levels)):
        raise DataError(
            "x_levels must be 8-bit pixels k / 255 (k = 0..255), as floats: pass uint8 images as x.float() / 255, "
            "not dequantized or 0..255 values"
        )
    k = (x_levels * TOP).round()
    u = torch.rand((num_samples, *k.shape), generator=generator, dtype=k.dtype, device=k.device)
    num_pixels = k[0].numel()
    log_p = log_density_fn((k + u) / (TOP + 1))
    if log_p.shape != u.shape[:2]:
        raise DataError(
            f"log_density_fn must return log p(y) summed over pixels, shape {tuple(u.shape[:2])}; it returned "
            f"{tuple(log_p.shape)}"
        )
    bound = log_p - num_pixels * math.log(TOP + 1)
    standard_error = bound.std(0) / math.sqrt(num_samples) if num_samples > 1 else torch.full_like(bound[0], math.nan)
    return bound.mean(0), standard_error
