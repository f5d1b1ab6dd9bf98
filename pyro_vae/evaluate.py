"""Evaluation of a model as defined: the test ELBO and the per-datapoint marginal log-likelihood by
importance sampling, for any model/guide with a data plate, and everything ``pyro-vae evaluate``
reports for a saved run.

``log p(x_i) ~= log (1/K) sum_k w_ik``, ``w_ik = p(x_i, z_ik) / q(z_ik | x_i)``, ``z_ik ~ q(z | x_i)``
(Burda et al. 2015, eq. 8; they use K = 5000 for test log-likelihoods). The weights come from
:meth:`~pyro_vae.estimators.DataPlateIWELBO.log_weights` of the unscaled model (whatever handlers
surround it), drawn ``chunk_size`` particles at a time so memory stays bounded by
``chunk_size x batch`` whatever K is; for a VAE's own model and guide, the same weights of the same
draws come from :mod:`pyro_vae.fast_log_weights`, several times faster. The standard error of
such an estimate is itself estimated from the weights, and is trustworthy only when their tail is
light: every result carries the PSIS k-hat of each datapoint (Vehtari et al. 2024) and warns when it exceeds 0.7.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Iterable

import numpy as np
import torch

from .checks import check_count, check_importance_samples
from .diagnostics import K_OK, active_units, elbo_terms, kl_per_dimension, pareto_k, pareto_k_summary
from .discretized import dequantized_log_likelihood_bound
from .estimators import DataPlateIWELBO, log_mean_exp, make_elbo
from .fast_log_weights import draw_noise, fast_path_vae, matches_pyro, vae_log_weights
from .runtime import seeded

# below about this many weights ArviZ cannot fit the Pareto tail (it returns inf)
MIN_SAMPLES_FOR_K_HAT = 25


class ImportanceSamplingWarning(UserWarning):
    """Importance weights too heavy-tailed for the estimate's standard error to be trusted."""


def standard_error_of_mean(values: torch.Tensor) -> float:
    """``sd(values) / sqrt(n)``, the standard error of their mean; NaN for fewer than two values."""
    return (values.std() / math.sqrt(values.numel())).item() if values.numel() > 1 else float("nan")


@dataclasses.dataclass
class LogLikelihood:
    """Per-datapoint estimates of ``log p(x_i)`` (nats), their delta-method standard errors and the
    PSIS k-hat of each datapoint's weights (``k > 0.7``: the estimate is a noisy lower bound there
    and its standard error is too small)."""

    log_px: torch.Tensor
    standard_error: torch.Tensor
    pareto_k: np.ndarray
    num_samples: int

    def mean(self) -> float:
        return self.log_px.mean().item()

    def mean_standard_error(self) -> float:
        """Standard error of the mean over datapoints (the spread across images dominates)."""
        return standard_error_of_mean(self.log_px)

    def bits_per_dim(self, dims: int) -> float:
        """``-mean log p(x) / (D log 2)``: meaningful only where ``p`` is a probability mass on the data."""
        return -self.mean() / (dims * math.log(2))

    def unreliable_share(self) -> float:
        """The share of datapoints whose k-hat exceeds 0.7 (a failed fit counts too)."""
        return float(np.mean(~(self.pareto_k <= K_OK)))

    def warning(self) -> str | None:
        """What a reader must know when some k-hat exceeds 0.7 or cannot be fitted, else None."""
        if self.num_samples < MIN_SAMPLES_FOR_K_HAT:
            return (
                f"K={self.num_samples} importance samples are too few to fit PSIS k-hat (it needs about "
                f"{MIN_SAMPLES_FOR_K_HAT}), "
                "so nothing checks whether the standard error can be trusted; raise num_samples (K)"
            )
        share = self.unreliable_share()
        if share == 0:
            return None
        return (
            f"PSIS k-hat > {K_OK} for {100 * share:.0f}% of the datapoints (K={self.num_samples}): there q(z|x) is "
            "narrower "
            "than the posterior, log p(x) is a noisy lower bound and its standard error is too small; "
            "raise num_samples (K) to tighten it"
        )

    @classmethod
    def from_log_weights(cls, log_w: torch.Tensor) -> "LogLikelihood":
        """``log p(x_i) ~= logsumexp_k log w_ik - log K`` from weights of shape ``(K, N)``. The standard
        error of ``log mean_k w_k`` is ``sd(w) / (sqrt(K) mean(w))`` by the delta method, computed on
        weights rescaled by their maximum (the ratio is scale-free)."""
        k = log_w.shape[0]
        w = torch.exp(log_w - log_w.max(0).values)
        standard_error = w.std(0) / (math.sqrt(k) * w.mean(0)) if k > 1 else torch.full_like(w[0], float("nan"))
        return cls(log_mean_exp(log_w), standard_error, pareto_k(log_w), k)

    @classmethod
    def cat(cls, parts: "list[LogLikelihood]") -> "LogLikelihood":
        """The estimates of several batches as one."""
        return cls(
            torch.cat([p.log_px for p in parts]),
            torch.cat([p.standard_error for p in parts]),
            np.concatenate([p.pareto_k for p in parts]),
            parts[0].num_samples,
        )


@torch.no_grad()
def importance_log_weights(
    model,
    guide,
    x: torch.Tensor,
    num_samples: int,
    chunk_size: int = 500,
    plate_name: str = "data",
    max_plate_nesting: int = 1,
    fast_path: bool = True,
    **kwargs,
) -> torch.Tensor:
    """``log w_ik`` of shape ``(num_samples, N)`` in float64 on the CPU, drawn ``chunk_size``
    particles at a time (memory ``chunk_size x N`` whatever ``num_samples``); ``kwargs`` go to
    model and guide. ``logsumexp_k log w_ik - log K`` is the IWAE estimate of ``log p(x_i)``.

    For a :class:`~pyro_vae.model.VAE`'s own ``model`` and ``guide`` (no ``kwargs``, no surrounding
    Pyro handler) the weights come from :func:`~pyro_vae.fast_log_weights.vae_log_weights`: the same
    draws from the same random stream, the same numbers to float rounding (checked against the Pyro
    program on each call, :func:`~pyro_vae.fast_log_weights.matches_pyro`), several times faster.
    ``fast_path=False`` always runs the Pyro program."""
    check_count("num_samples", num_samples)
    check_count("chunk_size", chunk_size)
    vae = fast_path_vae(model, guide, plate_name, max_plate_nesting, kwargs) if fast_path else None
    if vae is not None and not matches_pyro(vae, x, DataPlateIWELBO(num_particles=2, plate_name=plate_name)):
        vae = None
    chunks = []
    for start in range(0, num_samples, chunk_size):
        particles = min(chunk_size, num_samples - start)
        if vae is not None:
            log_w = vae_log_weights(vae, x, draw_noise(vae, x, particles))
        else:
            elbo = DataPlateIWELBO(
                num_particles=particles,
                max_plate_nesting=max_plate_nesting,
                vectorize_particles=True,
                plate_name=plate_name,
            )
            log_w = elbo.log_weights(model, guide, x, weighted=False, **kwargs)[0]
        chunks.append(log_w.double().cpu())
    return torch.cat(chunks)


def log_marginal_likelihood(
    model,
    guide,
    x: torch.Tensor,
    num_samples: int = 5000,
    chunk_size: int = 500,
    plate_name: str = "data",
    max_plate_nesting: int = 1,
    warn: bool = True,
    fast_path: bool = True,
    **kwargs,
) -> LogLikelihood:
    """Importance-sampled ``log p(x_i)`` for each datapoint of the batch ``x``, with standard errors and
    PSIS k-hat (:meth:`LogLikelihood.from_log_weights`); warns (:class:`ImportanceSamplingWarning`)
    when some k-hat exceeds 0.7, unless ``warn=False``. The weights: :func:`importance_log_weights`
    (``fast_path=False``: from the Pyro program even for a VAE's own model and guide)."""
    result = LogLikelihood.from_log_weights(
        importance_log_weights(
            model, guide, x, num_samples, chunk_size, plate_name, max_plate_nesting, fast_path, **kwargs
        )
    )
    message = result.warning()
    if warn and message:
        warnings.warn(message, ImportanceSamplingWarning, stacklevel=2)
    return result


@torch.no_grad()
def mean_elbo(vae, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], seed: int) -> float:
    """ELBO of the model as defined, in nats per image: analytic KL, one particle, a fixed seed and
    the training RNG left untouched, so the number is comparable across epochs and exact across
    resumes. Never weighted: a KL weight belongs to training only."""
    elbo = make_elbo("meanfield", 1)
    total, count = torch.zeros((), dtype=torch.float64), 0
    with seeded(vae.prior_loc.device, seed):
        for x, _ in batches:
            total += elbo.differentiable_loss(vae.model, vae.guide, x).double().cpu()
            count += x.shape[0]
    return -(total / count).item()


@dataclasses.dataclass
class Evaluation:
    """Everything ``pyro-vae evaluate`` reports about a model on a test set."""

    test_images: int
    test_elbo: float
    reconstruction: float
    kl: float
    log_likelihood: LogLikelihood
    active_units: int | None  # None for a single test image: a variance over images needs two
    kl_per_dimension: list[float]
    data_kind: str  # what log p(x) is of: see pyro_vae.likelihoods.Likelihood.data_kind
    pixels: int
    log_weights: torch.Tensor  # (K, n) of the first n test images, for the ArviZ export
    dequantized: torch.Tensor | None = None  # per image, for a density on 8-bit data: a bound on log P(x)
    reading: str = ""  # how the split was read: streamed (Batches.reading), else in memory

    def dequantized_bits_per_dim(self) -> float | None:
        """bits/dim of the dequantized bound: comparable with the discretized likelihoods' bits/dim."""
        return None if self.dequantized is None else -self.dequantized.mean().item() / (self.pixels * math.log(2))

    @property
    def bits_per_dim(self) -> float | None:
        """bits/dim where ``log p(x)`` is a log-probability of the data (binarized or 8-bit pixels);
        None for a density on continuous pixels, whose value is not a probability."""
        return None if self.data_kind == "density" else self.log_likelihood.bits_per_dim(self.pixels)

    def summary(self) -> dict[str, Any]:
        """The JSON-ready record written as ``evaluation.json`` (no NaN: strict JSON)."""
        ll = self.log_likelihood
        return {
            "test_images": self.test_images,
            "test_elbo": self.test_elbo,
            "reconstruction": self.reconstruction,
            "kl": self.kl,
            "num_samples": ll.num_samples,
            "test_log_likelihood": ll.mean(),
            "test_log_likelihood_se": ll.mean_standard_error(),
            "data_kind": self.data_kind,
            "bits_per_dim": self.bits_per_dim,
            "pareto_k": pareto_k_summary(ll.pareto_k),
            "dequantized_log_likelihood": None if self.dequantized is None else self.dequantized.mean().item(),
            "dequantized_log_likelihood_se": None
            if self.dequantized is None
            else standard_error_of_mean(self.dequantized),
            "dequantized_bits_per_dim": self.dequantized_bits_per_dim(),
            "active_units": self.active_units,
            "kl_per_dimension": self.kl_per_dimension,
        }


def evaluate_model(
    vae,
    batches,
    seed: int,
    num_samples: int = 1000,
    chunk_size: int = 250,
    keep_log_weights: int = 100,
    progress: bool = False,
) -> Evaluation:
    """Evaluate ``vae`` on the test split ``batches`` (:class:`~pyro_vae.data.Batches`, in memory or
    streamed from disk, read a batch at a time: only results per image are kept, never the split's
    float32 pixels):
    test ELBO (:func:`mean_elbo`), its two terms, importance-sampled ``log p(x)`` with ``num_samples``
    samples per image and k-hat, active units and KL per latent dimension. The first
    ``keep_log_weights`` images' log-weights are kept for the ArviZ export. ``num_samples`` is at
    least :data:`~pyro_vae.checks.MIN_IMPORTANCE_SAMPLES` (:func:`~pyro_vae.checks.check_importance_samples`
    says why).

    For a density likelihood on 8-bit data (``batches.eight_bit``), also the dequantized bound on the
    probability of the 8-bit images, ``log p((255 x + u) / 256) - D log 256 <= log P(x)``, one
    ``u ~ U[0, 1)^D`` per image and ``log p`` importance-sampled with the same K
    (:func:`~pyro_vae.discretized.dequantized_log_likelihood_bound`; Theis et al. 2016): a bound in
    expectation, in the units of the discretized likelihoods."""
    from tqdm.auto import tqdm

    check_importance_samples(num_samples)
    check_count("chunk_size", chunk_size)
    check_count("keep_log_weights", keep_log_weights, minimum=0)
    from .memory import check_step_memory  # refused before allocating: a chunk's draws, and the log-weights kept

    check_step_memory(
        vae,
        min(chunk_size, num_samples),
        batches.batch_size,
        vae.prior_loc.device,
        "--chunk-size or --num-samples",
        training=False,
        extra_bytes=8 * num_samples * (min(keep_log_weights, batches.size) + batches.batch_size),
    )

    def images():  # the split's images a batch at a time; each pass reads the split anew
        return (x for x, _ in batches.eval_batches())

    with seeded(vae.prior_loc.device, seed):
        parts, kept = [], []
        for x in tqdm(
            images(), total=len(batches), desc="importance sampling", disable=None if progress else True, leave=False
        ):
            log_w = importance_log_weights(vae.model, vae.guide, x, num_samples, chunk_size)
            parts.append(LogLikelihood.from_log_weights(log_w))
            kept.append(log_w[:, : keep_log_weights - sum(w.shape[1] for w in kept)])
        terms = elbo_terms(vae, images())  # a batch at a time, as the memory check counts
        dequantized = None
        if vae.likelihood.data_kind == "density" and batches.eight_bit:
            log_p = lambda y: LogLikelihood.from_log_weights(
                importance_log_weights(vae.model, vae.guide, y[0], num_samples, chunk_size)
            ).log_px.unsqueeze(0)
            dequantized = torch.cat([dequantized_log_likelihood_bound(log_p, x, 1)[0] for x in batches.level_batches()])
        active = active_units(vae, images())[0] if batches.size > 1 else None
    ll = LogLikelihood.cat(parts)
    return Evaluation(
        test_images=ll.log_px.numel(),
        test_elbo=mean_elbo(vae, batches.eval_batches(), seed),
        reconstruction=terms["reconstruction"].mean().item(),
        kl=terms["kl"].mean().item(),
        log_likelihood=ll,
        active_units=active,
        kl_per_dimension=kl_per_dimension(vae, images()).tolist(),
        data_kind=vae.likelihood.data_kind,
        pixels=math.prod(vae.x_shape),
        log_weights=torch.cat(kept, dim=1),
        dequantized=dequantized,
        reading=batches.reading,
    )


def export_inference_data(vae, batches, evaluation: Evaluation, chunk_size: int = 250, **kwargs):
    """:func:`~pyro_vae.inference_data.to_inference_data` of the first test images whose log-weights
    ``evaluation`` kept (``kwargs`` go to it), decoding no more draws at a time than
    :func:`evaluate_model` with this ``chunk_size`` did (``chunk_size x batch``), so that its memory
    check covers the export too."""
    from .inference_data import to_inference_data

    n = evaluation.log_weights.shape[1]
    max_draws = min(chunk_size, evaluation.log_likelihood.num_samples) * batches.batch_size
    return to_inference_data(vae, batches.first(n), log_weights=evaluation.log_weights, max_draws=max_draws, **kwargs)
