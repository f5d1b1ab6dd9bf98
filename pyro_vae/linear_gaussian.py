"""Probabilistic PCA as a VAE: the one model here whose ``log p(x)`` and posterior are exact, the
oracle that estimators and evaluation are checked against (Tipping & Bishop 1999).

``z ~ N(0, I)``, ``x | z ~ N(W z + b, s^2 I)``, so ``p(x) = N(b, W W^T + s^2 I)`` and
``p(z|x) = N(M^-1 W^T (x - b), s^2 M^-1)`` with ``M = W^T W + s^2 I``.
"""

from __future__ import annotations

import torch
from torch.distributions import MultivariateNormal

from .errors import ConfigError
from .model import VAE
from .networks import inverse_positive_scale


def linear_gaussian_vae(
    x_dim: int = 5,
    z_dim: int = 2,
    sigma: float = 0.5,
    num_data: int = 8,
    guide_loc_factor: float = 0.8,
    guide_scale_factor: float = 1.5,
    seed: int = 0,
) -> tuple[VAE, torch.Tensor, float]:
    """Probabilistic PCA as a float64 VAE with linear networks, with its exact ``log p(x)``.

    ``z ~ N(0, I)``, ``x | z ~ N(W z + b, sigma^2 I)``, so ``p(x) = N(b, W W^T + sigma^2 I)``. W has
    orthogonal columns (norms from 2 down to 0.7), so ``M = W^T W + sigma^2 I`` is diagonal and the
    posterior ``p(z|x) = N(M^-1 W^T (x - b), sigma^2 M^-1)`` is mean-field (Tipping & Bishop 1999).
    The encoder is that posterior with its mean scaled by ``guide_loc_factor`` and its standard
    deviation by ``guide_scale_factor`` (1 and 1 make the guide exact). W, b and the ``num_data``
    datapoints come from a generator seeded with ``seed``; torch's global generator is untouched.

    Returns ``(vae, x, log p(x) summed over x)``.
    """
    if z_dim > x_dim:
        raise ConfigError(f"W needs orthogonal columns, so z_dim ({z_dim}) must not exceed x_dim ({x_dim})")
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(x_dim, z_dim, generator=g, dtype=torch.float64))
    w = q * torch.linspace(2.0, 0.7, z_dim, dtype=torch.float64)
    b = torch.randn(x_dim, generator=g, dtype=torch.float64)
    m_diag = (w**2).sum(0) + sigma**2
    post_map = w.T / m_diag[:, None]  # M^-1 W^T
    post_scale = sigma / m_diag.sqrt()
    vae = VAE(x_dim=x_dim, z_dim=z_dim, likelihood="normal", normal_scale=sigma, hidden=()).double()
    with torch.no_grad():
        decoder, encoder = vae.decoder.net[0], vae.encoder.net[0]
        decoder.weight.copy_(w)
        decoder.bias.copy_(b)
        encoder.weight.zero_()
        encoder.weight[:z_dim] = guide_loc_factor * post_map
        encoder.bias[:z_dim] = -guide_loc_factor * post_map @ b
        encoder.bias[z_dim:] = inverse_positive_scale(guide_scale_factor * post_scale)
    z = torch.randn(num_data, z_dim, generator=g, dtype=torch.float64)
    x = b + z @ w.T + sigma * torch.randn(num_data, x_dim, generator=g, dtype=torch.float64)
    log_px, _ = linear_gaussian_exact(vae, x)
    return vae, x, log_px.sum().item()


@torch.no_grad()
def linear_gaussian_exact(vae: VAE, x: torch.Tensor) -> tuple[torch.Tensor, MultivariateNormal]:
    """Exact ``log p(x_i)`` per datapoint and the exact posterior ``p(z | x_i)`` of a linear VAE with a
    fixed-scale Normal likelihood, from its decoder ``x = W z + b``: ``p(x) = N(b, W W^T + s^2 I)``,
    ``p(z|x) = N(M^-1 W^T (x - b), s^2 M^-1)`` with ``M = W^T W + s^2 I`` (Tipping & Bishop 1999)."""
    (linear,) = vae.decoder.net
    w, b, s2 = linear.weight, linear.bias, vae.likelihood.scale() ** 2
    eye_x, eye_z = torch.eye(w.shape[0], dtype=w.dtype), torch.eye(w.shape[1], dtype=w.dtype)
    m_inv = torch.linalg.inv(w.T @ w + s2 * eye_z)
    posterior = MultivariateNormal((x - b) @ (m_inv @ w.T).T, s2 * m_inv)
    return MultivariateNormal(b, w @ w.T + s2 * eye_x).log_prob(x), posterior
