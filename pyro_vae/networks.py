"""Encoder and decoder networks.

Every network maps inputs with arbitrary extra leading dimensions, such as the particle
dimension that ``vectorize_particles`` adds, to outputs with the same leading dimensions:
``(..., *in_event_shape) -> (..., *out_event_shape)``. Nothing here creates tensors outside the
module, so the networks follow ``module.to(device)``.

Encoders return the mean and standard deviation of the diagonal Gaussian
``q(z|x) = N(z; loc(x), diag(scale(x)^2))`` (Kingma & Welling 2013, Appendix C.2).
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


def split_loc_scale(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    loc, raw = h.chunk(2, dim=-1)
    return loc, positive_scale(raw)


class MLPEncoder(nn.Module):
    """``x (..., x_dim) -> loc, scale (..., z_dim)`` through fully connected layers."""

    def __init__(self, x_dim: int, z_dim: int, hidden: Sequence[int] = (400,), activation: str = "softplus"):
        super().__init__()
        self.net = mlp([x_dim, *hidden, 2 * z_dim], activation, final_activation=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_loc_scale(self.net(x))


class MLPDecoder(nn.Module):
    """``z (..., z_dim) -> params (..., out_dim)``: the likelihood's parameters for every pixel."""

    def __init__(self, z_dim: int, out_dim: int, hidden: Sequence[int] = (400,), activation: str = "softplus"):
        super().__init__()
        self.net = mlp([z_dim, *reversed(tuple(hidden)), out_dim], activation, final_activation=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ConvEncoder(nn.Module):
    """``x (..., 1, 28, 28) -> loc, scale (..., z_dim)``: two stride-2 convolutions, then dense layers."""

    def __init__(self, z_dim: int, hidden: int = 256, activation: str = "relu", channels: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(IMAGE_SHAPE[0], channels, 4, stride=2, padding=1),  # 14x14
            make_activation(activation),
            nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1),  # 7x7
            make_activation(activation),
            nn.Flatten(),
            nn.Linear(2 * channels * 7 * 7, hidden),
            make_activation(activation),
            nn.Linear(hidden, 2 * z_dim),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_loc_scale(apply_to_events(self.net, x, event_ndim=3))


class ConvDecoder(nn.Module):
    """``z (..., z_dim) -> params (..., out_channels, 28, 28)``: the mirror image of ConvEncoder."""

    def __init__(self, z_dim: int, out_channels: int, hidden: int = 256, activation: str = "relu", channels: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(z_dim, hidden),
            make_activation(activation),
            nn.Linear(hidden, 2 * channels * 7 * 7),
            make_activation(activation),
            nn.Unflatten(1, (2 * channels, 7, 7)),
            nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1),  # 14x14
            make_activation(activation),
            nn.ConvTranspose2d(channels, out_channels, 4, stride=2, padding=1),  # 28x28
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return apply_to_events(self.net, z, event_ndim=1)
