"""Encoder and decoder networks.

Every network maps inputs with arbitrary extra leading dimensions, such as the particle
dimension that ``vectorize_particles`` adds, to outputs with the same leading dimensions:
``(..., *in_event_shape) -> (..., *out_event_shape)``. Nothing here creates tensors outside the
module, so the networks follow ``module.to(device)``.

Encoders return the mean and standard deviation of the diagonal Gaussian
``q(z|x) = N(z; loc(x), diag(scale(x)^2))`` (Kingma & Welling 2013, Appendix C.2), and, built with
``context_dim > 0``, a third output: the context ``h(x)`` that conditions an inverse autoregressive
flow (Kingma et al. 2016, section 4; :mod:`pyro_vae.guides`).

The conv networks take images ``(C, H, W)`` of any channel count; each stride-2 convolution halves
H and W (kernel 4, padding 1), so H and W must divide by ``2^n``: ``n = 2`` halvings for sides up
to 32 (28x28 -> 7x7, 32x32 -> 8x8), ``n = 3`` above (64x64 -> 8x8), sides 8 to 128.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

ACTIVATION_LAYERS = {"softplus": nn.Softplus, "relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}

# Lower bound on every standard deviation a network emits: keeps log q(z|x) finite.
MIN_SCALE = 1e-4

IMAGE_SHAPE = (1, 28, 28)
MAX_CONV_SIDE = 128


def conv_halvings(image_shape: Sequence[int]) -> int:
    """Stride-2 layers of the conv networks for ``(C, H, W)`` images; :class:`ConfigError` naming the
    sizes that work for any other shape."""
    if len(image_shape) != 3:
        raise ConfigError(f"the conv networks take images of shape (C, H, W), got x_shape {tuple(image_shape)}")
    _, h, w = image_shape
    halvings = 2 if max(h, w) <= 32 else 3
    if not (8 <= min(h, w) and max(h, w) <= MAX_CONV_SIDE and h % 2**halvings == 0 and w % 2**halvings == 0):
        raise ConfigError(
            f"the conv networks cannot take {h}x{w} images; H and W must be multiples of 4 from 8 to 32 "
            f"(28x28, 32x32) or multiples of 8 from 40 to {MAX_CONV_SIDE} (64x64); resize the images or use the mlp"
        )
    return halvings


def positive_scale(raw: torch.Tensor, min_scale: float = MIN_SCALE) -> torch.Tensor:
    """``softplus(raw) + min_scale``: a standard deviation bounded away from 0 that cannot overflow."""
    return F.softplus(raw) + min_scale


def inverse_positive_scale(scale: torch.Tensor | float, min_scale: float = MIN_SCALE) -> torch.Tensor:
    """The ``raw`` for which :func:`positive_scale` gives ``scale``."""
    y = torch.as_tensor(scale) - min_scale  # keeps a tensor's dtype; floats get the default
    if torch.any(torch.as_tensor(scale, device="cpu") <= min_scale):  # on the CPU: y may be on the meta device
        raise ConfigError(f"a scale must exceed {min_scale}, got {scale}")
    return y + torch.log(-torch.expm1(-y))


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATION_LAYERS:
        raise ConfigError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATION_LAYERS)}")
    return ACTIVATION_LAYERS[name]()


def mlp(sizes: Sequence[int], activation_name: str, final_activation: bool) -> nn.Sequential:
    """Fully connected layers ``sizes[0] -> ... -> sizes[-1]`` with an activation between them."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if final_activation or i < len(sizes) - 2:
            layers.append(make_activation(activation_name))
    return nn.Sequential(*layers)


def apply_to_events(net: nn.Module, x: torch.Tensor, event_ndim: int) -> torch.Tensor:
    """Run ``net`` (which takes exactly one batch dimension) over any number of leading dims."""
    batch_shape = x.shape[: x.dim() - event_ndim]
    y = net(x.reshape(-1, *x.shape[x.dim() - event_ndim :]))
    return y.reshape(*batch_shape, *y.shape[1:])


def split_encoder_output(h: torch.Tensor, z_dim: int) -> tuple[torch.Tensor, ...]:
    """``(loc, scale)`` from the first ``2 z_dim`` outputs, plus the context if there are more."""
    loc, raw, context = h.split([z_dim, z_dim, h.shape[-1] - 2 * z_dim], dim=-1)
    return (loc, positive_scale(raw)) + ((context,) if context.shape[-1] else ())


class MLPEncoder(nn.Module):
    """``x (..., x_dim) -> loc, scale (..., z_dim)`` [``, context (..., context_dim)``] through fully
    connected layers."""

    def __init__(
        self, x_dim: int, z_dim: int, hidden: Sequence[int] = (400,), activation: str = "softplus", context_dim: int = 0
    ):
        super().__init__()
        self.z_dim = z_dim
        self.net = mlp([x_dim, *hidden, 2 * z_dim + context_dim], activation, final_activation=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return split_encoder_output(self.net(x), self.z_dim)


class MLPDecoder(nn.Module):
    """``z (..., z_dim) -> params (..., out_dim)``: the likelihood's parameters for every pixel."""

    def __init__(self, z_dim: int, out_dim: int, hidden: Sequence[int] = (400,), activation: str = "softplus"):
        super().__init__()
        self.net = mlp([z_dim, *reversed(tuple(hidden)), out_dim], activation, final_activation=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ConvEncoder(nn.Module):
    """``x (..., C, H, W) -> loc, scale (..., z_dim)`` [``, context``]: stride-2 convolutions (see
    :func:`conv_halvings`), then dense layers."""

    def __init__(
        self,
        z_dim: int,
        hidden: int = 256,
        activation: str = "relu",
        channels: int = 32,
        image_shape: Sequence[int] = IMAGE_SHAPE,
        context_dim: int = 0,
    ):
        super().__init__()
        self.z_dim = z_dim
        halvings = conv_halvings(image_shape)
        widths = [image_shape[0]] + [channels * 2**i for i in range(halvings)]
        layers: list[nn.Module] = []
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(n_in, n_out, 4, stride=2, padding=1), make_activation(activation)]
        h, w = (side // 2**halvings for side in image_shape[1:])
        self.net = nn.Sequential(
            *layers,
            nn.Flatten(),
            nn.Linear(widths[-1] * h * w, hidden),
            make_activation(activation),
            nn.Linear(hidden, 2 * z_dim + context_dim),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return split_encoder_output(apply_to_events(self.net, x, event_ndim=3), self.z_dim)


class ConvDecoder(nn.Module):
    """``z (..., z_dim) -> params (..., out_channels, H, W)``: the mirror image of ConvEncoder."""

    def __init__(
        self,
        z_dim: int,
        out_channels: int,
        hidden: int = 256,
        activation: str = "relu",
        channels: int = 32,
        image_size: Sequence[int] = IMAGE_SHAPE[1:],
    ):
        super().__init__()
        halvings = conv_halvings((out_channels, *image_size))
        widths = [channels * 2**i for i in reversed(range(halvings))]
        h, w = (side // 2**halvings for side in image_size)
        layers: list[nn.Module] = [
            nn.Linear(z_dim, hidden),
            make_activation(activation),
            nn.Linear(hidden, widths[0] * h * w),
            make_activation(activation),
            nn.Unflatten(1, (widths[0], h, w)),
        ]
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(n_in, n_out, 4, stride=2, padding=1), make_activation(activation)]
        layers.append(nn.ConvTranspose2d(widths[-1], out_channels, 4, stride=2, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return apply_to_events(self.net, z, event_ndim=1)
