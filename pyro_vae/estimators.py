"""ELBO estimators for SVI, built by name.

* ``"trace"``: :class:`pyro.infer.Trace_ELBO`, Monte Carlo in both terms:
  ``(1/L) sum_l [log p(x, z_l) - log q(z_l|x)]`` (Kingma & Welling 2013, eq. 6, estimator A).
* ``"meanfield"``: :class:`pyro.infer.TraceMeanField_ELBO`, analytic KL:
  ``(1/L) sum_l log p(x|z_l) - KL(q(z|x) || p(z))`` (Kingma & Welling 2013, eq. 7, estimator B;
  eq. 10 for the Gaussian case).
  Same expectation as ``"trace"``; lower variance while q is far from the posterior, but at
  ``q = p(z|x)`` the full log-weight is constant and only ``"trace"`` reaches zero variance.
* ``"iwae"``: :class:`DataPlateIWELBO`, the importance-weighted bound *per datapoint*:
  ``sum_i log (1/K) sum_k w_ik``, ``w_ik = p(x_i, z_ik) / q(z_ik|x_i)`` (Burda et al. 2015, eq. 8).
* ``"renyi"``: :class:`pyro.infer.RenyiELBO` with ``alpha=0``. It sums log-weights over the plates
  that are *not* shared by all sites, so for this VAE (every site in ``"data"``) its weights are
  per datapoint too, and equal ``"iwae"`` on a full batch. Under minibatch scaling (``num_data``
  or plate subsampling) it takes ``logsumexp`` of the N/B-scaled log-weights, which tempers the
  weights and overstates the bound (by 150 nats for a small untrained model, a batch of 5 scaled to
  100 datapoints; ``test_minibatch_scaling_multiplies_iwae_but_tempers_renyi``); with a
  global latent outside the plate its weights become whole-trace. ``"iwae"`` has neither problem.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.poutine.util import site_is_subsample

from .checks import check_count
from .errors import ConfigError
from .names import ESTIMATORS


def log_mean_exp(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``log((1/K) sum_k exp(log_w_k))`` over ``dim`` (of size K): the importance-weighted estimate of
    ``log p(x)`` from K log-weights (Burda et al. 2015, eq. 8), computed stably."""
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])


def make_elbo(
    name: str = "meanfield", num_particles: int = 1, vectorize_particles: bool = True, max_plate_nesting: int = 1
) -> ELBO:
    """An ELBO estimator with ``num_particles`` samples per datapoint, vectorized by default."""
    num_particles = check_count("num_particles", num_particles)
    kwargs = dict(
        num_particles=num_particles, vectorize_particles=vectorize_particles, max_plate_nesting=max_plate_nesting
    )
    if name == "trace":
        return Trace_ELBO(**kwargs)
    if name == "meanfield":
        return TraceMeanField_ELBO(**kwargs)
    if name == "iwae":
        return DataPlateIWELBO(**kwargs)
    if name == "renyi":
        return RenyiELBO(alpha=0.0, **kwargs)
    raise ConfigError(f"unknown estimator {name!r}; choose one of {ESTIMATORS}")


class DataPlateIWELBO(ELBO):
    """Importance-weighted bound with weights per datapoint of the plate ``plate_name``.

    Works for any model/guide whose sample sites all live in that plate. Under plate subsampling
    (``size`` N, batch B) each datapoint's log-weight is unscaled and the batch sum is scaled by
    N / B, so the estimate stays unbiased for the full-data bound. Gradients use the
    reparameterization trick, so every guide site must be reparameterizable.
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: int = 1,
        vectorize_particles: bool = True,
        plate_name: str = "data",
    ):
        super().__init__(
            num_particles=num_particles, max_plate_nesting=max_plate_nesting, vectorize_particles=vectorize_particles
        )
        self.plate_name = plate_name

    def _get_trace(self, model, guide, args, kwargs):
        return get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)

    def log_weights(self, model, guide, *args, weighted: bool = True, **kwargs) -> tuple[torch.Tensor, float]:
        """``log w_ik`` of shape ``(num_particles, batch)`` and the plate's scale ``N / batch``.

        ``weighted``: each site's log-density keeps the scale handlers put on it other than the data
        plate's (a KL weight of the training objective); ``False`` gives the log-weights of the
        model as defined, whatever handlers surround it (evaluation)."""
        vectorized = self.vectorize_particles and self.num_particles > 1
        per_trace, data_scale = [], None
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            log_w = 0.0
            for trace, sign, observed_too in ((model_trace, 1.0, True), (guide_trace, -1.0, False)):
                for site in trace.nodes.values():
                    if (
                        site["type"] != "sample"
                        or site_is_subsample(site)
                        or (site["is_observed"] and not observed_too)
                    ):
                        continue
                    if sign < 0 and not site["fn"].has_rsample:
                        raise NotImplementedError(
                            f"guide site {site['name']!r} is not reparameterizable; the iwae estimator needs rsample"
                        )
                    log_p, data_scale = self._datapoint_log_prob(site, vectorized, weighted)
                    log_w = log_w + sign * log_p
            per_trace.append(log_w)
        log_w = per_trace[0] if vectorized else torch.stack(per_trace)
        return log_w, data_scale

    def _datapoint_log_prob(self, site, keep_particle_dim: bool, weighted: bool) -> tuple[torch.Tensor, float]:
        frame = next((f for f in site["cond_indep_stack"] if f.name == self.plate_name), None)
        if frame is None:
            raise ValueError(
                f"site {site['name']!r} is outside the {self.plate_name!r} plate; per-datapoint weights need every "
                "sample site inside it"
            )
        data_scale = (frame.full_size or frame.size) / frame.size
        if weighted:
            log_p = site["log_prob"] / data_scale
        else:
            log_p = scale_and_mask(site["unscaled_log_prob"], mask=site["mask"])
        log_p = log_p.movedim(frame.dim, -1)
        lead = log_p.shape[:1] if keep_particle_dim else ()
        return log_p.reshape(*lead, -1, log_p.shape[-1]).sum(-2), data_scale  # sum any nested plates

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        log_w, data_scale = self.log_weights(model, guide, *args, **kwargs)
        bound = log_mean_exp(log_w)
        return -data_scale * bound.sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward(retain_graph=self.retain_graph)
        return loss.item()
