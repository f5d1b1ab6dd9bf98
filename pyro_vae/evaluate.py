"""Per-datapoint marginal log-likelihood by importance sampling, for any model/guide with a data plate.

``log p(x_i) ~= log (1/K) sum_k w_ik``, ``w_ik = p(x_i, z_ik) / q(z_ik | x_i)``, ``z_ik ~ q(z | x_i)``
(Burda et al. 2015, eq. 8; they use K = 5000 for test log-likelihoods). The weights come from
:meth:`~pyro_vae.estimators.DataPlateIWELBO.log_weights`, drawn ``chunk_size`` particles at a time
so memory stays bounded by ``chunk_size x batch`` whatever K is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .estimators import DataPlateIWELBO


@dataclass
class LogLikelihood:
    """Per-datapoint estimates of ``log p(x_i)`` (nats) and their delta-method standard errors."""

    log_px: torch.Tensor
    standard_error: torch.Tensor

    def mean(self) -> float:
        return self.log_px.mean().item()

    def mean_standard_error(self) -> float:
        """Standard error of the mean over datapoints (the spread across images dominates)."""
        return (self.log_px.std() / math.sqrt(self.log_px.numel())).item() if self.log_px.numel() > 1 else float("nan")

    def bits_per_dim(self, dims: int) -> float:
        return -self.mean() / (dims * math.log(2))

    @classmethod
    def from_log_weights(cls, log_w: torch.Tensor) -> "LogLikelihood":
        """``log p(x_i) ~= logsumexp_k log w_ik - log K`` from weights of shape ``(K, N)``. The standard
        error of ``log mean_k w_k`` is ``sd(w) / (sqrt(K) mean(w))`` by the delta method, computed on
        weights rescaled by their maximum (the ratio is scale-free)."""
        k = log_w.shape[0]
        w = torch.exp(log_w - log_w.max(0).values)
        standard_error = w.std(0) / (math.sqrt(k) * w.mean(0)) if k > 1 else torch.full_like(w[0], float("nan"))
        return cls(torch.logsumexp(log_w, 0) - math.log(k), standard_error)

    @classmethod
    def cat(cls, parts: "list[LogLikelihood]") -> "LogLikelihood":
        """The estimates of several batches as one."""
        return cls(torch.cat([p.log_px for p in parts]), torch.cat([p.standard_error for p in parts]))


@torch.no_grad()
def importance_log_weights(model, guide, x: torch.Tensor, num_samples: int, chunk_size: int = 500, plate_name: str = "data", max_plate_nesting: int = 1, **kwargs) -> torch.Tensor:
    """``log w_ik`` of shape ``(num_samples, N)`` in float64 on the CPU, drawn ``chunk_size``
    particles at a time (memory ``chunk_size x N`` whatever ``num_samples``); ``kwargs`` go to
    model and guide. ``logsumexp_k log w_ik - log K`` is the IWAE estimate of ``log p(x_i)``."""
    if num_samples < 1 or chunk_size < 1:
        raise ConfigError(f"num_samples and chunk_size must be positive, got {num_samples} and {chunk_size}")
    chunks = []
    for start in range(0, num_samples, chunk_size):
        elbo = DataPlateIWELBO(num_particles=min(chunk_size, num_samples - start), max_plate_nesting=max_plate_nesting, vectorize_particles=True, plate_name=plate_name)
        chunks.append(elbo.log_weights(model, guide, x, **kwargs)[0].double().cpu())
    return torch.cat(chunks)



@torch.no_grad()
def log_marginal_likelihood(model, guide, x: torch.Tensor, num_samples: int = 5000, chunk_size: int = 500, plate_name: str = "data", max_plate_nesting: int = 1, **kwargs) -> LogLikelihood:
    """Importance-sampled ``log p(x_i)`` for each datapoint of the batch ``x``, with standard errors
    (:meth:`LogLikelihood.from_log_weights`)."""
    return LogLikelihood.from_log_weights(importance_log_weights(model, guide, x, num_samples, chunk_size, plate_name, max_plate_nesting, **kwargs))
