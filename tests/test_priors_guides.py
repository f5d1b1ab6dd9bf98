"""The VampPrior, the IAF guide, your own networks and any image shape: the math against formulas
written here, and the composition with Pyro (ELBOs, particles, Predictive, traces, SVI)."""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from pyro_vae import VAE, ConfigError, log_marginal_likelihood, make_elbo
from pyro_vae.evaluate import importance_log_weights
from pyro_vae.inference_data import to_inference_data
from pyro_vae.kl_weight import elbo_loss
from pyro_vae.networks import positive_scale
from pyro_vae.priors import GaussianMixture

from .conftest import binary_batch

LOG_2PI = math.log(2 * math.pi)


def normal_log_density(z, loc, scale):
    """``log N(z; loc, diag(scale^2))`` summed over the last dimension, from the formula."""
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * LOG_2PI).sum(-1)


def vamp_vae(**kwargs):
    return VAE(x_dim=12, z_dim=3, hidden=(16,), prior="vamp", pseudo_inputs=5, **kwargs).double()


def test_vamp_prior_log_prob_is_the_logsumexp_over_the_pseudo_inputs_minus_log_k():
    vae = vamp_vae()
    z = torch.randn(7, 3, dtype=torch.float64) * 2
    loc, scale = vae.encoder(vae.prior_family.pseudo_inputs)  # (K, z_dim) each
    by_hand = torch.logsumexp(normal_log_density(z.unsqueeze(-2), loc, scale), -1) - math.log(5)
    assert torch.allclose(vae.prior().log_prob(z), by_hand, rtol=1e-12, atol=0)


def far_narrow_mixture(dtype=torch.float64, seed=1):
    """5 components in 4 dimensions, far apart and narrow (scales down to 0.01, where the expanded
    quadratic forms cancel most), unequal weights; 11 points near them and far away."""
    g = torch.Generator().manual_seed(seed)
    loc = 3 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    scale = torch.exp(torch.empty(5, 4, dtype=torch.float64).uniform_(-4.6, 0.5, generator=g))
    logits = torch.randn(5, generator=g, dtype=torch.float64)
    near = loc + scale * torch.randn(5, 4, generator=g, dtype=torch.float64)
    z = torch.cat([near, 4 * torch.randn(6, 4, generator=g, dtype=torch.float64)])
    return [t.to(dtype) for t in (logits, loc, scale, z)]


def test_the_gaussian_mixture_density_is_the_mixture_density_by_the_formula():
    logits, loc, scale, z = far_narrow_mixture()
    by_hand = torch.logsumexp(torch.log_softmax(logits, -1) + normal_log_density(z.unsqueeze(-2), loc, scale), -1)
    mixture = GaussianMixture(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))
    torch.testing.assert_close(mixture.log_prob(z.view(11, 1, 4)), by_hand.view(11, 1), rtol=1e-10, atol=1e-9)
    # in float32 as well, against Pyro's MixtureSameFamily: the float64 expansion loses nothing
    logits, loc, scale, z = far_narrow_mixture(torch.float32)
    ours = GaussianMixture(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))
    pyros = dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))
    torch.testing.assert_close(ours.log_prob(z), pyros.log_prob(z), rtol=1e-5, atol=1e-4)


def test_the_gaussian_mixture_gradients_are_the_mixture_densitys():
    """The gradients SVI takes (the draw, the locations, the scales) equal autograd's through Pyro's
    MixtureSameFamily, in float64 to 1e-9."""
    logits, loc, scale, z = far_narrow_mixture(seed=2)
    grads = []
    for family in (GaussianMixture, dist.MixtureSameFamily):
        inputs = [t.clone().requires_grad_() for t in (loc, scale, z)]
        mixture = family(dist.Categorical(logits=logits), dist.Normal(*inputs[:2]).to_event(1))
        grads.append(torch.autograd.grad(mixture.log_prob(inputs[2]).sum(), inputs))
    for ours, pyros in zip(*grads):
        torch.testing.assert_close(ours, pyros, rtol=1e-9, atol=1e-9)


def test_the_gaussian_mixture_in_a_plate_is_one_mixture_broadcast_over_the_data_and_particles():
    logits, loc, scale, z = far_narrow_mixture()
    mixture = GaussianMixture(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))
    expanded = mixture.expand((6,))
    assert expanded.batch_shape == (6,) and expanded.event_shape == (4,)
    draws = expanded.sample((3,))
    assert draws.shape == (3, 6, 4)
    torch.testing.assert_close(expanded.log_prob(draws), mixture.log_prob(draws))
    with pytest.raises(ValueError):  # the sample's event shape is checked, as Pyro's distributions do
        GaussianMixture(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1), validate_args=True).log_prob(z[:, :3])


def wide_normalization(log_density, center, draws=20000, width=4.0):
    """``int p(z) dz`` in 2 dimensions by importance sampling from ``N(center, width^2 I)``: the
    mean of ``p / r`` and its standard error."""
    r = torch.distributions.Independent(torch.distributions.Normal(center, torch.full_like(center, width)), 1)
    z = r.sample((draws,))
    ratio = (log_density(z) - r.log_prob(z)).exp()
    return ratio.mean().item(), (ratio.std() / math.sqrt(draws)).item()


def test_vamp_prior_and_iaf_posterior_each_integrate_to_one():
    torch.manual_seed(3)
    vae = VAE(x_dim=12, z_dim=2, hidden=(16,), prior="vamp", pseudo_inputs=4, guide="iaf", flow_steps=2).double()
    x = binary_batch(1, 12).double()
    with torch.no_grad():
        prior, posterior = vae.prior(), vae.posterior(x)
        center = vae.encoder(x)[0][0]
        for log_density, c in (
            (prior.log_prob, torch.zeros(2, dtype=torch.float64)),
            (lambda z: posterior.log_prob(z.unsqueeze(1)).squeeze(1), center),
        ):
            mean, se = wide_normalization(log_density, c)
            assert abs(mean - 1) < 4 * se and se < 0.05


def iaf_by_hand(vae, x, eps):
    """z_T and log q(z_T|x) from Kingma et al. 2016, eq. 10-11, with the flow's own MADE networks:
    ``z_t = mu_t + sigma_t z_{t-1}``, ``log q = log N(eps) - sum log scale - sum_t sum_i log sigma_t,i``."""
    loc, scale, context = vae.encoder(x)
    z = loc + scale * eps
    log_q = normal_log_density(eps, torch.zeros_like(eps), torch.ones_like(eps)) - scale.log().sum(-1)
    for flow in vae.guide_family.flows:
        mu, log_sigma = flow.nn(z, context=context)
        log_sigma = log_sigma.clamp(-5.0, 3.0)  # Pyro's default clip of log sigma
        z = mu + log_sigma.exp() * z
        log_q = log_q - log_sigma.sum(-1)
    return z, log_q


def test_iaf_log_q_is_the_change_of_variables_formula_for_its_own_draws_and_for_any_z():
    vae = VAE(x_dim=12, z_dim=3, hidden=(16,), guide="iaf", flow_steps=3).double()
    x = binary_batch(4, 12).double()
    torch.manual_seed(5)
    q = vae.posterior(x)
    z = q.rsample()
    torch.manual_seed(5)
    z_hand, log_q_hand = iaf_by_hand(vae, x, torch.empty(4, 3, dtype=torch.float64).normal_())
    assert torch.allclose(z, z_hand, rtol=1e-12, atol=1e-12)
    assert torch.allclose(q.log_prob(z), log_q_hand, rtol=1e-10, atol=0)  # the guide's draws: cached inverse
    fresh = z_hand.detach().clone()  # a z the flow never produced: log_prob inverts the flow
    assert torch.allclose(vae.posterior(x).log_prob(fresh), log_q_hand, rtol=1e-8, atol=0)


@pytest.mark.parametrize("prior, guide", [("vamp", "gaussian"), ("standard", "iaf"), ("vamp", "iaf")])
def test_meanfield_falls_back_to_the_monte_carlo_kl_where_no_analytic_kl_exists(prior, guide):
    """No ``kl_divergence`` for a mixture prior or a flow guide: Pyro's TraceMeanField_ELBO
    estimates ``log p(z) - log q(z|x)`` from the same draw, so it equals Trace_ELBO draw for draw."""
    vae = VAE(x_dim=12, z_dim=3, hidden=(16,), prior=prior, pseudo_inputs=5, guide=guide).double()
    x = binary_batch(6, 12).double()
    losses = []
    for estimator in (Trace_ELBO, TraceMeanField_ELBO):
        pyro.set_rng_seed(9)
        losses.append(
            estimator(num_particles=3, vectorize_particles=True, max_plate_nesting=1).loss(vae.model, vae.guide, x)
        )
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)


def test_meanfield_keeps_the_analytic_kl_for_the_standard_prior_and_gaussian_guide():
    vae = VAE(x_dim=12, z_dim=3, hidden=(16,)).double()
    x = binary_batch(6, 12).double()
    losses = []
    for estimator in (Trace_ELBO, TraceMeanField_ELBO):
        pyro.set_rng_seed(9)
        losses.append(estimator(num_particles=1, max_plate_nesting=1).loss(vae.model, vae.guide, x))
    assert abs(losses[0] - losses[1]) > 1e-3  # same draw, but an analytic KL instead of its one-draw estimate


def test_importance_weights_of_vamp_with_iaf_are_the_formula_per_datapoint():
    """``log w_ik = log p(x_i|z_ik) + log p(z_ik) - log q(z_ik|x_i)`` with the prior and the flow written
    out here; the IWAE bound with one particle is the ELBO of the same draw."""
    vae = VAE(x_dim=12, z_dim=3, hidden=(16,), prior="vamp", pseudo_inputs=5, guide="iaf").double()
    x = binary_batch(6, 12).double()
    pyro.set_rng_seed(2)
    log_w = importance_log_weights(vae.model, vae.guide, x, num_samples=40, chunk_size=40)
    pyro.set_rng_seed(2)
    z, log_q = iaf_by_hand(vae, x, torch.empty(40, 6, 3, dtype=torch.float64).normal_())
    loc, scale = vae.encoder(vae.prior_family.pseudo_inputs)[:2]
    log_prior = torch.logsumexp(normal_log_density(z.unsqueeze(-2), loc, scale), -1) - math.log(5)
    logits = vae.decoder(z)
    log_lik = (x * logits - F.softplus(logits)).sum(-1)
    assert torch.allclose(log_w, log_lik + log_prior - log_q, rtol=1e-10, atol=0)
    ll = log_marginal_likelihood(vae.model, vae.guide, x, num_samples=40, chunk_size=40, warn=False)
    assert ll.log_px.shape == (6,)
    idata = to_inference_data(vae, x, log_weights=log_w.detach(), num_draws=3)
    assert idata.posterior["z"].shape == (1, 3, 6, 3) and idata.importance_sampling["pareto_k"].shape == (6,)
    pyro.set_rng_seed(2)
    one = make_elbo("iwae", 1).loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(2)
    assert one == pytest.approx(Trace_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, x), rel=1e-12)


def test_a_kl_weight_scales_the_monte_carlo_kl_term_of_vamp_with_iaf():
    """``-ELBO_beta = -E[log p(x|z)] - beta E[log p(z) - log q(z|x)]`` is linear in beta draw for draw."""
    vae = VAE(x_dim=12, z_dim=3, hidden=(16,), prior="vamp", pseudo_inputs=5, guide="iaf").double()
    x = binary_batch(6, 12).double()
    losses = []
    for beta in (0.0, 1.0, 2.0):
        pyro.set_rng_seed(4)
        losses.append(elbo_loss(make_elbo("meanfield", 2), vae.model, vae.guide, x, beta).item())
    assert losses[2] - losses[1] == pytest.approx(losses[1] - losses[0], rel=1e-10)
    assert losses[1] != pytest.approx(losses[0], rel=1e-3)


def test_vamp_and_iaf_compose_with_predictive_traces_and_vectorized_particles():
    vae = VAE(x_dim=12, z_dim=3, hidden=(16,), prior="vamp", pseudo_inputs=5, guide="iaf", name="composed")
    x = binary_batch(6, 12)
    prior_draws = Predictive(vae.model, num_samples=4)(None, batch_size=5)
    assert prior_draws["z"].shape == (4, 5, 3) and prior_draws["x"].shape == (4, 5, 12)
    posterior = Predictive(vae.model, guide=vae.guide, num_samples=4, return_sites=["z"])(x)
    assert posterior["z"].shape == (4, 6, 3)
    model_trace = poutine.trace(vae.model).get_trace(x)
    assert (
        "composed.prior$$$pseudo_inputs" in model_trace.nodes
        and "composed.encoder$$$net.0.weight" in model_trace.nodes
    )
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    assert any(name.startswith("composed.guide$$$flows.") for name in guide_trace.nodes)
    elbo = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    model_tr, guide_tr = next(elbo._get_traces(vae.model, vae.guide, (x,), {}))
    assert guide_tr.nodes["z"]["value"].shape == (3, 6, 3) and model_tr.nodes["x"]["log_prob"].shape == (3, 6)


def two_patterns(n=64, x_dim=12, flip=0.05):
    """Binary data with structure a VAE can learn: one of two random patterns, each pixel flipped
    with probability ``flip``."""
    g = torch.Generator().manual_seed(4)
    patterns = torch.bernoulli(torch.full((2, x_dim), 0.5), generator=g)
    x = patterns[torch.randint(0, 2, (n,), generator=g)]
    return (x + torch.bernoulli(torch.full_like(x, flip), generator=g)) % 2


def test_svi_trains_vamp_with_iaf_and_the_pseudo_inputs_move():
    torch.manual_seed(0)
    vae = VAE(x_dim=12, z_dim=2, hidden=(32,), prior="vamp", pseudo_inputs=4, guide="iaf")
    x = two_patterns()
    start = vae.prior_family.pseudo_inputs.detach().clone()
    elbo = make_elbo("meanfield", 4)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    pyro.set_rng_seed(1)
    before = sum(elbo.loss(vae.model, vae.guide, x) for _ in range(5)) / 5
    for _ in range(60):
        svi.step(x)
    pyro.set_rng_seed(1)
    after = sum(elbo.loss(vae.model, vae.guide, x) for _ in range(5)) / 5
    assert after < before - 100  # nats over 64 datapoints: from about 8 nats per image towards 2
    assert not torch.equal(vae.prior_family.pseudo_inputs.detach(), start)


class ThreeLayerEncoder(nn.Module):
    def __init__(self, x_dim, z_dim, context_dim=0):
        super().__init__()
        self.z_dim = z_dim
        self.net = nn.Sequential(
            nn.Linear(x_dim, 24), nn.GELU(), nn.Linear(24, 24), nn.GELU(), nn.Linear(24, 2 * z_dim + context_dim)
        )

    def forward(self, x):
        h = self.net(x)
        loc, raw, context = h.split([self.z_dim, self.z_dim, h.shape[-1] - 2 * self.z_dim], -1)
        return (loc, positive_scale(raw)) + ((context,) if context.shape[-1] else ())


def three_layer_decoder(z_dim, out):
    return nn.Sequential(nn.Linear(z_dim, 24), nn.GELU(), nn.Linear(24, 24), nn.GELU(), nn.Linear(24, out))


def test_your_own_networks_train_under_plain_svi_beside_a_built_in_vae():
    torch.manual_seed(0)
    x = two_patterns()
    own = VAE(
        x_dim=12,
        z_dim=2,
        encoder=ThreeLayerEncoder(12, 2, context_dim=5),
        decoder=three_layer_decoder(2, 12),
        guide="iaf",
    )
    built_in = VAE(x_dim=12, z_dim=2, hidden=(24,))
    assert own.guide_family.context_dim == 5
    elbo = make_elbo("trace", 4)
    for vae in (own, built_in):
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.01}), elbo)
        first = sum(svi.step(x) for _ in range(5)) / 5
        for _ in range(60):
            svi.step(x)
        assert sum(svi.step(x) for _ in range(5)) / 5 < first - 100
    names = set(pyro.get_param_store().keys())
    assert {f"{own.name}.encoder$$$net.4.weight", f"{built_in.name}.encoder$$$net.0.weight"} <= names


@pytest.mark.parametrize(
    "encoder, decoder, guide, match",
    [
        (
            ThreeLayerEncoder(12, 2),
            three_layer_decoder(2, 11),
            "gaussian",
            r"decoder must map z of shape \(2, 3, 2\) to \(2, 3, 12\).*returned \(2, 3, 11\)",
        ),
        (
            ThreeLayerEncoder(12, 3),
            three_layer_decoder(2, 12),
            "gaussian",
            r"encoder must map x of shape \(2, 3, 12\) to \(loc, scale\) of shape \(2, 3, 2\)",
        ),
        (
            ThreeLayerEncoder(12, 2),
            three_layer_decoder(2, 12),
            "iaf",
            r"and a context of shape \(2, 3, context_dim\); it returned \(\(2, 3, 2\), \(2, 3, 2\)\)",
        ),
        (
            nn.Linear(5, 4),
            three_layer_decoder(2, 12),
            "gaussian",
            r"the encoder fails on a batch of shape \(2, 3, 12\)",
        ),
    ],
)
def test_networks_that_break_the_contract_are_refused_in_one_line(encoder, decoder, guide, match):
    with pytest.raises(ConfigError, match=match) as info:
        VAE(x_dim=12, z_dim=2, encoder=encoder, decoder=decoder, guide=guide)
    assert "\n" not in str(info.value)


def test_the_contract_check_leaves_batch_norm_statistics_alone():
    encoder = ThreeLayerEncoder(12, 2)
    encoder.net.insert(1, nn.BatchNorm1d(24))
    with pytest.raises(ConfigError, match="encoder fails"):  # BatchNorm1d takes (N, C) only: no particle dimension
        VAE(x_dim=12, z_dim=2, encoder=encoder, decoder=three_layer_decoder(2, 12))
    assert encoder.training and encoder.net[1].num_batches_tracked == 0


LIKELIHOODS = [
    "bernoulli",
    "continuous_bernoulli",
    "normal",
    "discretized_logistic",
    "discretized_normal",
    "discretized_logistic_mixture",
]


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_conv_on_8_bit_colour_images_scores_every_likelihood_with_particles(likelihood):
    torch.manual_seed(0)
    vae = VAE(
        x_shape=(3, 32, 32), z_dim=4, architecture="conv", hidden=32, likelihood=likelihood, mixture_components=2
    )
    x = torch.randint(0, 256, (5, 3, 32, 32)).float() / 255
    x = x.round() if likelihood == "bernoulli" else x
    model_tr, guide_tr = next(
        Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)._get_traces(
            vae.model, vae.guide, (x,), {}
        )
    )
    assert guide_tr.nodes["z"]["value"].shape == (2, 5, 4)
    assert model_tr.nodes["x"]["fn"].event_shape == (3, 32, 32) and model_tr.nodes["x"]["log_prob"].shape == (2, 5)
    ll = log_marginal_likelihood(vae.model, vae.guide, x, num_samples=8, warn=False)
    assert ll.log_px.shape == (5,) and torch.isfinite(ll.log_px).all()
    assert ll.bits_per_dim(3 * 32 * 32) == pytest.approx(-ll.mean() / (3 * 32 * 32 * math.log(2)))


@pytest.mark.parametrize("shape", [(1, 28, 28), (2, 64, 64)])
def test_conv_networks_take_other_sizes_and_channel_counts(shape):
    vae = VAE(x_shape=shape, z_dim=4, architecture="conv", hidden=16, likelihood="normal", normal_scale="decoder")
    z = torch.zeros(2, 3, 4)
    assert vae.decoder(z).shape == (2, 3, 2 * shape[0], *shape[1:]) and vae.encoder(torch.zeros(2, 3, *shape))[
        0
    ].shape == (2, 3, 4)


def test_conv_refuses_a_size_it_cannot_halve_naming_the_sizes_that_work():
    with pytest.raises(ConfigError, match=r"cannot take 30x30 images.*28x28, 32x32.*64x64"):
        VAE(x_shape=(3, 30, 30), architecture="conv")
    with pytest.raises(ConfigError, match="mlp networks take flat vectors"):
        VAE(x_shape=(3, 32, 32))
    with pytest.raises(ConfigError, match="does not match x_shape"):
        VAE(x_dim=100, x_shape=(3, 32, 32), architecture="conv")


@pytest.mark.slow
@pytest.mark.filterwarnings("error::pyro_vae.step.FallbackWarning")  # the flow's noise is a graph input too
def test_a_vamp_iaf_run_saves_its_new_parameters_records_its_choices_and_resumes_exactly(tmp_path):
    from pyro_vae import TrainConfig, load_run
    from pyro_vae.train import train

    from .idx_files import write_dataset

    write_dataset(tmp_path / "data", gz=True, n_train=64, n_test=32)
    settings = dict(
        dataset="mnist",
        data_dir=str(tmp_path / "data"),
        hidden=(16,),
        z_dim=2,
        batch_size=32,
        prior="vamp",
        pseudo_inputs=3,
        guide="iaf",
        flow_steps=2,
        estimator="trace",
        step="traced",
    )
    straight = train(TrainConfig(epochs=2, **settings), tmp_path / "straight", progress=False)
    assert {row["step"] for row in straight} == {"traced"}
    train(TrainConfig(epochs=1, **settings), tmp_path / "run", progress=False)
    assert train(TrainConfig(epochs=2, **settings), tmp_path / "run", resume=True, progress=False) == straight
    run = load_run(tmp_path / "run", "cpu")
    assert (run.config.prior, run.config.pseudo_inputs, run.config.guide, run.config.flow_steps) == (
        "vamp",
        3,
        "iaf",
        2,
    )
    assert run.vae.prior_family.pseudo_inputs.shape == (3, 784) and len(run.vae.guide_family.flows) == 2
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    state = run.vae.state_dict()
    assert {"prior_family.pseudo_inputs", "guide_family.flows.1.nn.permutation"} <= set(saved)
    assert all(torch.equal(saved[k], state[k]) for k in saved)


def test_identity_counts_pseudo_inputs_and_flow_steps_only_where_they_are_read():
    from pyro_vae import TrainConfig

    assert "pseudo_inputs" not in TrainConfig().identity() and "flow_steps" not in TrainConfig().identity()
    identity = TrainConfig(prior="vamp", guide="iaf").identity()
    assert identity["pseudo_inputs"] == 500 and identity["flow_steps"] == 2 and identity["prior"] == "vamp"
    with pytest.raises(ConfigError, match="unknown prior 'gauss'; choose one of standard, vamp"):
        TrainConfig(prior="gauss").validate()


def test_the_cli_refuses_a_flow_setting_without_the_iaf_guide(tmp_path, capsys):
    from pyro_vae.cli import main

    assert main(["train", "--flow-steps", "3", "--run-dir", str(tmp_path / "run")]) == 2
    assert "--flow-steps is for --guide iaf; this run's guide is gaussian" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_saved_with_the_vamp_prior_under_its_old_name_loads():
    """Runs trained before the prior became ``prior_family`` saved ``vamp_prior.pseudo_inputs``."""
    saved = vamp_vae(guide="iaf")
    old = {k.replace("prior_family.", "vamp_prior."): v for k, v in saved.state_dict().items()}
    assert "vamp_prior.pseudo_inputs" in old
    loaded = vamp_vae(guide="iaf")
    loaded.load_state_dict(old)
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_compare_refuses_the_reference_elbo_for_a_likelihood_it_has_no_formula_for_before_drawing():
    from pyro_vae.compare import compare_estimators
    from pyro_vae.likelihoods import Likelihood

    class Laplace(Likelihood):
        name = "laplace"

        def pixel_distribution(self, loc):
            return pyro.distributions.Laplace(loc, 1.0)

    vae = VAE(x_dim=12, z_dim=3, hidden=(16,), likelihood=Laplace((12,))).double()
    state = torch.random.get_rng_state()
    with pytest.raises(ConfigError, match="the reference ELBO has no formula for the likelihood 'laplace'"):
        compare_estimators(vae, binary_batch(4, 12).double(), ["trace", "reference"], [1], repeats=2)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_active_units_of_a_flow_do_not_count_the_noise_of_its_monte_carlo_means():
    """An IAF guide that ignores x: Cov_x E[z|x] = 0, but 64-draw means vary by Var_q / 64 ~ 0.016."""
    from pyro_vae.diagnostics import active_units

    torch.manual_seed(0)
    vae = VAE(x_dim=12, z_dim=3, hidden=(16,), guide="iaf")
    last = vae.encoder.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[3:6] = 0.5413  # softplus: scale 1
    count, variances = active_units(vae, binary_batch(400, 12))
    assert count == 0 and variances.abs().max() < 0.005
