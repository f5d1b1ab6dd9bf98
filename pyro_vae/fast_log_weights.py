"""Importance log-weights of the library's own :class:`~pyro_vae.model.VAE` computed directly, block
by block: the fast path of :func:`pyro_vae.evaluate.importance_log_weights`, chosen automatically.

The Pyro program costs a fixed ~1 ms of handler work per call and materializes every decoder output
of a chunk of draws (``K x N x D`` numbers, far beyond the cache) several times over in the
likelihood's elementwise steps. Here the same quantity,

    log w_ik = log p(x_i | z_ik) + log p(z_ik) - log q(z_ik | x_i),   z_ik = loc(x_i) + eps_ik scale(x_i)

(Burda et al. 2015, eq. 8), is computed from the same standard-normal ``eps`` the guide's
``rsample`` draws, over blocks of draws whose decoder outputs fit the CPU's cache, each term the
VAE's own distribution's ``log_prob``. One term is rewritten: a Bernoulli likelihood on a decoder
whose last layer is linear, ``l = W h + b`` (D pixels, H hidden units). With ``y = 2 x - 1``,
``log p(x_d | l_d) = log sigmoid(y_d l_d) = (y_d l_d - |l_d|) / 2 + log sigmoid(|l_d|)``, so

    log p(x | z) = (h . W^T y + b . y) / 2 - sum_d |l_d| / 2 + sum_g log prod_{d in g} sigmoid(|l_d|)

The first term is one matrix-vector product per image (``W^T y``, H numbers) and H multiply-adds per
draw instead of D elementwise products; the last takes one sigmoid per pixel and one log per group g
of 2^m <= 16 pixels (each factor lies in [1/2, 1), so a group's product stays above 2^-16).

The prior is scored by its own ``log_prob``; the VampPrior's expands its quadratic forms into two
matrix products (:func:`pyro_vae.priors.gaussian_mixture_log_prob`). A guide with a flow (the IAF,
:mod:`pyro_vae.guides`) carries each block's ``z_0`` through its transforms, ``z_T = f_T(...f_1(z_0))``,
and adds their log-Jacobians, read from the transforms' cache as the Pyro program reads them:

    -log q(z_T | x) = -log N(eps; 0, I) + sum_j log scale_j(x) + sum_t log |det df_t / dz_{t-1}|

Before the first chunk, :func:`matches_pyro` checks the fast path against the Pyro program itself
on two draws of supplied noise (:class:`~pyro_vae.noise.SuppliedNoise`); a model whose program
computes something else (a changed prior or guide) gets the Pyro path, with a warning.
"""

from __future__ import annotations

import math
import warnings

import pyro
import torch
from pyro.poutine.runtime import am_i_wrapped
from torch import nn

from .likelihoods import BernoulliLikelihood
from .model import VAE
from .networks import MLPDecoder

# decoder outputs per block of draws on a CPU: 4 MiB of float32, within a CPU's last-level cache
CPU_BLOCK_NUMBERS = 1 << 20
# pixels whose factors sigmoid(|l|) in [1/2, 1) are multiplied before one log
MAX_GROUP = 16


class FastPathWarning(UserWarning):
    """The fast path disagreed with the Pyro program; the Pyro path computes the log-weights."""


def fast_path_vae(model, guide, plate_name: str, max_plate_nesting: int, kwargs: dict) -> VAE | None:
    """The :class:`~pyro_vae.model.VAE` whose own ``model`` and ``guide`` these are, with a built-in
    prior and guide (the standard or the VampPrior, the Gaussian or the IAF guide), called
    with ``x`` alone, outside any Pyro handler, on the ``"data"`` plate; else None (the Pyro path)."""
    vae = getattr(model, "__self__", None)
    if not isinstance(vae, VAE) or getattr(guide, "__self__", None) is not vae:
        return None
    if model.__func__ is not VAE.model or guide.__func__ is not VAE.guide:
        return None
    if vae.prior_name not in ("standard", "vamp") or vae.guide_name not in ("gaussian", "iaf"):
        return None
    if kwargs or plate_name != "data" or max_plate_nesting != 1 or am_i_wrapped():
        return None
    return vae


def draw_noise(vae: VAE, x: torch.Tensor, num_particles: int) -> torch.Tensor:
    """The standard-normal draws ``(num_particles, N, z_dim)`` that the guide's vectorized
    ``rsample`` makes: torch's ``_standard_normal``, same shape, same stream."""
    return torch.empty((num_particles, x.shape[0], vae.z_dim), dtype=x.dtype, device=x.device).normal_()


def block_shape(num_particles: int, batch: int, pixels: int, device: torch.device) -> tuple[int, int]:
    """``(particles, images)`` per block: decoder outputs within ``CPU_BLOCK_NUMBERS`` on a CPU, the
    whole chunk on an accelerator (where one large launch beats many small ones)."""
    if device.type != "cpu":
        return num_particles, batch
    rows = max(1, CPU_BLOCK_NUMBERS // pixels)
    images = min(batch, rows)
    return min(num_particles, max(1, rows // images)), images


def group_size(pixels: int) -> int:
    """The largest power of two dividing ``pixels``, at most :data:`MAX_GROUP`."""
    size = 1
    while size < MAX_GROUP and pixels % (2 * size) == 0:
        size *= 2
    return size


def bernoulli_linear_log_prob(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, wy: torch.Tensor, by: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """``sum_d log Bernoulli(x_d | logits = W h + b)`` for ``h`` of shape ``(..., n, H)`` and its n
    images' ``wy = W^T y`` ``(n, H)`` and ``by = b . y`` ``(n,)``, ``y = 2 x - 1``, by the identity
    of the module docstring; ``out`` is scratch room for at least ``rows x D`` numbers."""
    rows = h.shape[:-1].numel()
    a = torch.addmm(bias, h.reshape(rows, -1), weight.t(), out=out[:rows]).abs_()  # |l|
    log_p = torch.linalg.vecdot(h, wy).add_(by).reshape(rows).sub_(a.sum(-1)).mul_(0.5)
    a.sigmoid_()
    for _ in range(group_size(weight.shape[0]).bit_length() - 1):  # multiply halves: (rows, 2 n) -> (rows, n)
        pairs = a.view(rows, 2, -1)
        a = torch.mul(pairs[:, 0], pairs[:, 1], out=pairs[:, 0])
    return log_p.add_(a.log().sum(-1)).reshape(h.shape[:-1])


class _Observation:
    """``log p(x | z)`` of a block of draws of the VAE's decoder and likelihood: the linear-Bernoulli
    identity where it applies, else the likelihood's own distribution."""

    def __init__(self, vae: VAE, x: torch.Tensor, block_rows: int):
        self.vae, self.x = vae, x
        decoder = vae.decoder
        bernoulli = type(vae.likelihood) is BernoulliLikelihood
        self.linear = bernoulli and type(decoder) is MLPDecoder and isinstance(decoder.net[-1], nn.Linear)
        if self.linear:
            self.hidden, head = decoder.net[:-1], decoder.net[-1]
            self.weight, self.bias = head.weight, head.bias
            y = 2 * x - 1
            self.wy, self.by = y @ self.weight, y @ self.bias
            self.scratch = x.new_empty(block_rows * self.weight.shape[0])

    def log_prob(self, z: torch.Tensor, images: slice) -> torch.Tensor:
        if self.linear:
            out = self.scratch.view(-1, self.weight.shape[0])
            h = self.hidden(z)
            return bernoulli_linear_log_prob(h, self.weight, self.bias, self.wy[images], self.by[images], out)
        return self.vae.likelihood(self.vae.decoder(z)).log_prob(self.x[images])


@torch.no_grad()
def vae_log_weights(vae: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``log w_ik`` of shape ``(K, N)`` for the draws ``z_ik = loc(x_i) + eps_ik scale(x_i)`` (carried
    through the guide's flow, if it has one), ``eps`` of shape ``(K, N, z_dim)``, computed block by
    block (:func:`block_shape`)."""
    vae.check_data(x)
    num_particles, batch = eps.shape[:2]
    per_block, images_per_block = block_shape(num_particles, batch, x[0].numel(), x.device)
    encoded = vae.encoder(x)
    loc, scale = encoded[:2]
    z = loc + eps * scale
    observation = _Observation(vae, x, per_block * images_per_block)
    with pyro.validation_enabled(False):  # x was checked once above
        # -log q(z_0|x) = -log N(eps; 0, I) + sum_j log scale_j (the change of variables z_0 = loc + eps scale),
        # then the flow's log-Jacobians, log p(x|z_T) and log p(z_T) block by block
        log_w = eps.pow(2).sum(-1).mul_(0.5).add_(scale.log().sum(-1) + 0.5 * vae.z_dim * math.log(2 * math.pi))
        prior = vae.prior()
        for i in range(0, batch, images_per_block):
            images = slice(i, i + images_per_block)
            transforms = getattr(vae.guide_family(*(part[images] for part in encoded)), "transforms", [])
            for k in range(0, num_particles, per_block):
                block, rows = z[k : k + per_block, images], log_w[k : k + per_block, images]
                for transform in transforms:
                    block, previous = transform(block), block
                    rows += transform.log_abs_det_jacobian(previous, block)
                rows += observation.log_prob(block, images) + prior.log_prob(block)
    return log_w


def matches_pyro(vae: VAE, x: torch.Tensor, estimator) -> bool:
    """Whether :func:`vae_log_weights` equals the log-weights of the Pyro program ``estimator``
    (:class:`~pyro_vae.estimators.DataPlateIWELBO`) computes from two supplied draws, to float
    rounding: within ``D eps (1 + |log w|)``, the worst-case rounding of a sum of D per-pixel terms
    in the dtype's precision ``eps`` (float32, D = 784: 1e-4 relative; float64: 2e-13). Warns
    (:class:`FastPathWarning`) when not. Leaves torch's RNG as it was."""
    from .noise import SuppliedNoise
    from .runtime import preserved_rng

    with preserved_rng(x.device):
        eps = draw_noise(vae, x, 2)
    fast = vae_log_weights(vae, x, eps)
    try:
        with torch.no_grad(), SuppliedNoise([eps]):
            pyro_log_w = estimator.log_weights(vae.model, vae.guide, x, weighted=False)[0]
    except Exception as error:  # noqa: BLE001 - a program whose draws cannot be supplied is not this one
        message = f"the fast path of the log-weights cannot be checked ({error}); using the Pyro path"
        warnings.warn(message, FastPathWarning, stacklevel=3)
        return False
    tolerance = torch.finfo(fast.dtype).eps * x[0].numel() * (1 + pyro_log_w.abs())
    if not ((fast - pyro_log_w).abs() <= tolerance).all():
        worst = (fast - pyro_log_w).abs().max().item()
        message = (
            f"the fast path of the log-weights differs from the Pyro program by up to {worst:.3g} nats; "
            "using the Pyro path"
        )
        warnings.warn(message, FastPathWarning, stacklevel=3)
        return False
    return True
