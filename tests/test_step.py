"""The traced/compiled training step (issue 15) against the eager Pyro ELBO it is derived from.

Equalities are checked in float64 with rtol 1e-6 under the same draws: the same seed before the
eager ``elbo_loss(...).backward()`` and before ``CompiledStep``. The grid runs the
traced graph (``mode="traced"``, no compile time); the inductor-compiled graph is checked in a
few cases marked slow (a cold inductor compile takes tens of seconds on a small CPU).
"""

from __future__ import annotations

import copy
import re
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae.errors import DataError
from pyro_vae.estimators import make_elbo
from pyro_vae.kl_weight import elbo_loss
from pyro_vae.model import VAE
from pyro_vae.step import FallbackWarning, TrainingStep

from .conftest import binary_batch, continuous_batch, rng_state

LIKELIHOODS = [
    ("bernoulli", "shared"), ("continuous_bernoulli", "shared"), ("normal", 0.5), ("normal", "shared"), ("normal", "pixel"), ("normal", "decoder"),
    ("discretized_logistic", "shared"), ("discretized_normal", "shared"), ("discretized_logistic_mixture", "shared"),
]
ESTIMATORS = ["trace", "meanfield", "iwae"]
KL_WEIGHT = 0.3


def make_vae(architecture="mlp", likelihood="bernoulli", normal_scale="shared", cls=VAE, seed=0):
    torch.manual_seed(seed)
    if architecture == "conv":
        vae = cls(x_dim=784, z_dim=2, hidden=8, architecture="conv", likelihood=likelihood, normal_scale=normal_scale)
    else:
        vae = cls(x_dim=6, z_dim=2, hidden=(5,), likelihood=likelihood, normal_scale=normal_scale)
    return vae.double()


def make_batch(vae, likelihood="bernoulli", n=None, seed=1):
    n = n or (3 if vae.x_shape != (6,) else 4)
    d = vae.x_shape[-1] if len(vae.x_shape) == 1 else 784
    if likelihood.startswith("discretized"):
        x = torch.randint(0, 256, (n, d), generator=torch.Generator().manual_seed(seed)).double() / 255  # 8-bit levels
    else:
        x = (binary_batch if likelihood == "bernoulli" else continuous_batch)(n, d, seed).double()
    return x.view(n, *vae.x_shape)


def eager_loss_and_grads(vae, estimator, particles, x, kl_weight, seed=5, elbo=None):
    """The reference: the eager Pyro ELBO and backward(), from ``seed``; returns the loss, the
    gradients and torch's RNG state afterwards."""
    vae.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with pyro.validation_enabled(False):
        loss = elbo_loss(elbo or make_elbo(estimator, particles), vae.model, vae.guide, x, kl_weight)
    loss.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in vae.parameters()]
    vae.zero_grad(set_to_none=True)
    return loss.detach(), grads, rng_state(x.device)


def graph_loss_and_grads(step, x, kl_weight, seed=5):
    step.vae.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = step(x, kl_weight)
    grads = [None if p.grad is None else p.grad.clone() for p in step.vae.parameters()]
    step.vae.zero_grad(set_to_none=True)
    return loss, grads, rng_state(x.device)


def assert_same(eager, graph, rtol=1e-6, atol=0.0):
    (loss_e, grads_e, rng_e), (loss_g, grads_g, rng_g) = eager, graph
    assert not loss_g.requires_grad
    torch.testing.assert_close(loss_g, loss_e, rtol=rtol, atol=atol)
    assert len(grads_e) == len(grads_g)
    for i, (a, b) in enumerate(zip(grads_g, grads_e)):
        assert (a is None) == (b is None), f"parameter {i}: gradient {a is not None} vs eager {b is not None}"
        if b is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, i=i: f"parameter {i}: {m}")
    assert torch.equal(rng_g, rng_e), "the step left torch's RNG in another state than the eager step"


GRID = (
    [("mlp", est, lik, k) for est in ESTIMATORS for lik in LIKELIHOODS for k in (1, 3)]
    + [("conv", est, LIKELIHOODS[0], k) for est in ESTIMATORS for k in (1, 2)]
    + [("conv", "meanfield", lik, 2) for lik in LIKELIHOODS[1:]]
)
# the fast lane's part of the grid: every estimator x likelihood pair once on the MLP, K = 1 and
# K = 3 in turn, and three conv cases; the whole grid runs with the slow tests
FAST = (
    [("mlp", est, lik, (1, 3)[(i + j) % 2]) for i, est in enumerate(ESTIMATORS) for j, lik in enumerate(LIKELIHOODS)]
    + [("conv", "trace", LIKELIHOODS[0], 1), ("conv", "iwae", LIKELIHOODS[0], 2), ("conv", "meanfield", LIKELIHOODS[-1], 2)]
)


@pytest.mark.parametrize(
    "architecture,estimator,likelihood,particles",
    [case if case in FAST else pytest.param(*case, marks=pytest.mark.slow) for case in GRID],
    ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_traced_step_equals_eager_pyro_elbo(architecture, estimator, likelihood, particles, device):
    name, scale = likelihood
    vae = make_vae(architecture, name, scale).to(device)
    x = make_batch(vae, name).to(device)
    eager = eager_loss_and_grads(vae, estimator, particles, x, KL_WEIGHT)
    step = TrainingStep(vae, estimator, particles, mode="traced")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        graph = graph_loss_and_grads(step, x, KL_WEIGHT)
    assert step.fallback is None and not step.fallbacks
    assert [g.mode for g in step.graphs.values()] == ["traced"]
    assert_same(eager, graph)
    # the graph is reused: another weight, another seed, no retrace
    assert_same(eager_loss_and_grads(vae, estimator, particles, x, 1.0, seed=9), graph_loss_and_grads(step, x, 1.0, seed=9))
    assert len(step.graphs) == 1


@pytest.mark.parametrize("prior,guide", [("vamp", "gaussian"), ("standard", "iaf"), ("vamp", "iaf")])
def test_vamp_prior_and_iaf_guide_trace_to_the_eager_elbo_and_shard_by_rows(prior, guide):
    torch.manual_seed(0)
    vae = VAE(x_dim=6, z_dim=2, hidden=(5,), prior=prior, pseudo_inputs=3, guide=guide).double()
    x = make_batch(vae, n=5)
    eager = eager_loss_and_grads(vae, "meanfield", 2, x, KL_WEIGHT)
    step = TrainingStep(vae, "meanfield", 2, mode="traced")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # the flow's noise is a graph input like the Normal's
        assert_same(eager, graph_loss_and_grads(step, x, KL_WEIGHT))
    assert step.describe() == "traced"
    # rows of the global batch: the noise drawn for all 5 rows, so the two shards' losses sum to the batch's
    shards = []
    for rows in [(0, 2), (2, 5)]:
        torch.manual_seed(5)
        shards.append(step(x, KL_WEIGHT, rows=rows))
    torch.testing.assert_close(sum(shards), eager[0], rtol=1e-9, atol=0)


def test_unvectorized_particles_draw_in_the_same_order():
    vae = make_vae()
    x = make_batch(vae)
    elbo = make_elbo("trace", 3, vectorize_particles=False)
    step = TrainingStep(vae, elbo=make_elbo("trace", 3, vectorize_particles=False), mode="traced")
    assert_same(eager_loss_and_grads(vae, "trace", 3, x, KL_WEIGHT, elbo=elbo), graph_loss_and_grads(step, x, KL_WEIGHT))
    assert len(next(iter(step.graphs.values())).noise) == 3


def test_noise_is_drawn_with_the_eager_call_and_shape():
    """The eps the graph gets are bitwise the eager rsample's, for K = 1 (N, z) and K > 1 (K, N, z)."""
    vae = make_vae()
    x = make_batch(vae)
    for particles, shape in ((1, (4, 2)), (4, (4, 4, 2))):
        step = TrainingStep(vae, "meanfield", particles, mode="traced")
        graph_loss_and_grads(step, x, 1.0)
        (spec,) = next(iter(step.graphs.values())).noise
        assert spec.shape == shape and spec.dtype == torch.float64
        # eager guide under the same seed: z = loc + eps * scale with the eps the graph would get
        torch.manual_seed(11)
        elbo = make_elbo("meanfield", particles)
        guide_trace = pyro.poutine.trace(elbo._vectorized_num_particles(vae.guide)).get_trace(x)
        torch.manual_seed(11)
        eps = spec.draw()
        loc, scale = vae.encoder(x)
        assert torch.equal(guide_trace.nodes["z"]["value"], loc + eps * scale)


def trainer_steps(vae, loss_and_grads, batches, lr=1e-2):
    """The trainer's loop: zero_grad, loss and grads, grad norm, finite check, Adam."""
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    losses = []
    for x in batches:
        optimizer.zero_grad(set_to_none=True)
        with pyro.validation_enabled(False):
            loss = loss_and_grads(x)
        grad_norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), float("inf"))
        assert torch.isfinite(loss + grad_norm)
        optimizer.step()
        losses.append(loss.item())
    return losses, optimizer


def test_training_matches_eager_and_resume_is_bit_exact():
    batches = [make_batch(make_vae(), seed=s) for s in range(8)]

    def eager(vae):
        elbo = make_elbo("meanfield", 2)

        def loss_and_grads(x):
            loss = elbo_loss(elbo, vae.model, vae.guide, x, KL_WEIGHT)
            loss.backward()
            return loss.detach()

        return loss_and_grads

    vae_e, vae_c = make_vae(seed=2), make_vae(seed=2)
    torch.manual_seed(7)
    losses_e, _ = trainer_steps(vae_e, eager(vae_e), batches)
    torch.manual_seed(7)
    step = TrainingStep(vae_c, "meanfield", 2, mode="traced")
    losses_c, _ = trainer_steps(vae_c, lambda x: step(x, KL_WEIGHT), batches)
    torch.testing.assert_close(torch.tensor(losses_c), torch.tensor(losses_e), rtol=1e-6, atol=0)
    for a, b in zip(vae_c.parameters(), vae_e.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)

    # resume: 4 steps, save model + optimizer + RNG, 4 more; vs a fresh process-like restart
    full = make_vae(seed=2)
    torch.manual_seed(7)
    full_step = TrainingStep(full, "meanfield", 2, mode="traced")
    _, optimizer = trainer_steps(full, lambda x: full_step(x, KL_WEIGHT), batches[:4])
    saved = copy.deepcopy(full.state_dict()), copy.deepcopy(optimizer.state_dict()), torch.get_rng_state()
    # continue with the same optimizer object
    opt_losses = []
    for x in batches[4:]:
        optimizer.zero_grad(set_to_none=True)
        opt_losses.append(full_step(x, KL_WEIGHT).item())
        optimizer.step()
    pyro.clear_param_store()
    resumed = make_vae(seed=99)
    resumed.load_state_dict(saved[0])
    resumed_opt = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    resumed_opt.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    resumed_step = TrainingStep(resumed, "meanfield", 2, mode="traced")
    resumed_losses = []
    for x in batches[4:]:
        resumed_opt.zero_grad(set_to_none=True)
        resumed_losses.append(resumed_step(x, KL_WEIGHT).item())
        resumed_opt.step()
    assert resumed_losses == opt_losses
    for a, b in zip(resumed.parameters(), full.parameters()):
        assert torch.equal(a, b)


def test_new_batch_shape_gets_its_own_graph():
    vae = make_vae()
    step = TrainingStep(vae, "iwae", 2, mode="traced")
    for n in (4, 7, 4):
        x = make_batch(vae, n=n, seed=n)
        assert_same(eager_loss_and_grads(vae, "iwae", 2, x, KL_WEIGHT), graph_loss_and_grads(step, x, KL_WEIGHT))
    assert len(step.graphs) == 2 and step.fallback is None


def test_gradients_accumulate_into_existing_grad():
    vae = make_vae()
    x = make_batch(vae)
    _, grads, _ = eager_loss_and_grads(vae, "meanfield", 1, x, 1.0)
    step = TrainingStep(vae, "meanfield", 1, mode="traced")
    for p in vae.parameters():
        p.grad = torch.ones_like(p)
    torch.manual_seed(5)
    step(x)
    for p, g in zip(vae.parameters(), grads):
        torch.testing.assert_close(p.grad, g + 1, rtol=1e-6, atol=0)


def test_dtype_change_retraces():
    vae = make_vae()
    step = TrainingStep(vae, "trace", 1, mode="traced")
    x = make_batch(vae)
    step(x)
    vae.float()
    assert_same(eager_loss_and_grads(vae, "trace", 1, x.float(), 1.0), graph_loss_and_grads(step, x.float(), 1.0), rtol=1e-5)
    assert len(step.graphs) == 2


class GrowingVAE(VAE):
    """From its ``grow_at``-th model call on, the model has an extra observed site."""

    grow_at = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_calls = 0
        self.extra = torch.nn.Parameter(torch.tensor(3.0))

    def model(self, x=None, **kwargs):
        self.model_calls += 1
        result = super().model(x, **kwargs)
        if self.model_calls >= self.grow_at:
            pyro.module(f"{self.name}.extra", torch.nn.ParameterList([self.extra]))
            pyro.sample("extra", dist.Normal(self.extra, 1.0), obs=torch.zeros((), dtype=self.extra.dtype))
        return result


def test_model_that_changes_between_calls_falls_back_and_trains():
    vae = make_vae(cls=GrowingVAE)  # changes on its 2nd call: recording and traced runs differ
    step = TrainingStep(vae, "meanfield", 1, mode="traced")
    batches = [make_batch(vae, seed=s) for s in range(40)]
    with pytest.warns(FallbackWarning, match="different sites"):
        losses, _ = trainer_steps(vae, step, batches, lr=3e-2)
    assert step.fallback is not None and "different sites" in step.fallback
    assert len(step.fallbacks) == 1
    assert sum(losses[-5:]) < sum(losses[:5])
    assert vae.extra.item() < 3.0  # the extra site's parameter trained too (eagerly)


class DataDependentVAE(VAE):
    def model(self, x=None, **kwargs):
        if x is not None and x.sum() > 0:  # Python control flow on a tensor's value: not traceable
            return super().model(x, **kwargs)
        return super().model(x, **kwargs)


class ForeignParamVAE(VAE):
    def model(self, x=None, **kwargs):
        shift = pyro.param("shift", torch.zeros((), dtype=torch.float64))  # not a module parameter
        with pyro.plate("extra_data", x.shape[0], dim=-1):
            pyro.sample("shift_obs", dist.Normal(shift, 1.0), obs=torch.ones(x.shape[0], dtype=torch.float64))
        return super().model(x, **kwargs)


class DiscreteLatentVAE(VAE):
    def model(self, x=None, **kwargs):
        with pyro.plate("extra_data", x.shape[0], dim=-1):
            pyro.sample("c", dist.Bernoulli(torch.full((x.shape[0],), 0.5, dtype=torch.float64)))
        return super().model(x, **kwargs)

    def guide(self, x, **kwargs):
        with pyro.plate("extra_data", x.shape[0], dim=-1):
            pyro.sample("c", dist.Bernoulli(torch.full((x.shape[0],), 0.5, dtype=torch.float64)))
        return super().guide(x, **kwargs)


@pytest.mark.parametrize("cls,reason", [(DataDependentVAE, "data-dependent|value out of a tracing tensor|_local_scalar_dense"), (ForeignParamVAE, "not a parameter of the VAE"), (DiscreteLatentVAE, "cannot be supplied")])
def test_untraceable_programs_fall_back_to_the_eager_elbo(cls, reason):
    vae = make_vae(cls=cls)
    x = make_batch(vae)
    eager = eager_loss_and_grads(vae, "trace", 1, x, KL_WEIGHT)
    step = TrainingStep(vae, "trace", 1, mode="inductor")
    with pytest.warns(FallbackWarning, match="eager Pyro ELBO") as record:
        graph = graph_loss_and_grads(step, x, KL_WEIGHT)
    assert len(record) == 1
    assert step.fallback is not None and len(step.fallbacks) == 1
    assert re.search(reason, step.fallback), step.fallback
    assert_same(eager, graph)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # the notice comes once
        graph_loss_and_grads(step, x, KL_WEIGHT)


def test_bad_data_raises_the_eager_error_and_caches_nothing():
    vae = make_vae()
    step = TrainingStep(vae, "meanfield", 1, mode="traced")
    with pytest.raises(DataError, match="shape"):
        step(torch.zeros(4, 5, dtype=torch.float64))
    assert not step.graphs


def test_eager_mode_is_the_plain_elbo():
    vae = make_vae()
    x = make_batch(vae)
    step = TrainingStep(vae, "iwae", 3, mode="eager")
    assert_same(eager_loss_and_grads(vae, "iwae", 3, x, KL_WEIGHT), graph_loss_and_grads(step, x, KL_WEIGHT))
    assert not step.graphs


@pytest.mark.slow
@pytest.mark.parametrize("architecture,estimator,particles", [("mlp", "meanfield", 1), ("conv", "iwae", 2)])
def test_inductor_compiled_step_equals_eager(architecture, estimator, particles):
    vae = make_vae(architecture, "normal", "pixel")
    x = make_batch(vae, "normal")
    step = TrainingStep(vae, estimator, particles, mode="inductor")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        graph = graph_loss_and_grads(step, x, KL_WEIGHT)
    (built,) = step.graphs.values()
    assert built.mode == "inductor" and built.seconds > 0
    # inductor may reorder float64 sums: elementwise 1e-6 with a floor far below the gradients' scale
    assert_same(eager_loss_and_grads(vae, estimator, particles, x, KL_WEIGHT), graph, rtol=1e-6, atol=1e-9)
    assert_same(eager_loss_and_grads(vae, estimator, particles, x, 2.0, seed=8), graph_loss_and_grads(step, x, 2.0, seed=8), rtol=1e-6, atol=1e-9)
