"""The model and guide are real Pyro programs: traces, Predictive, plates, particles, handlers."""

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Predictive

from pyro_vae import VAE, ConfigError, DataError, kl_weighted, make_elbo
from pyro_vae.networks import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder

from .conftest import binary_batch, continuous_batch

B, Z_DIM = 6, 4


def small_vae(architecture="mlp", device="cpu", **kwargs):
    return VAE(z_dim=Z_DIM, architecture=architecture, hidden=(32,), **kwargs).to(device)


def batch(architecture="mlp", n=B, device="cpu"):
    x = binary_batch(n, 784).to(device)
    return x.reshape(n, 1, 28, 28) if architecture == "conv" else x


@pytest.mark.parametrize("architecture", ["mlp", "conv"])
def test_trace_has_the_contracted_sites_plate_and_shapes(architecture, device):
    vae, x = small_vae(architecture, device), batch(architecture, device=device)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    z, obs = model_trace.nodes["z"], model_trace.nodes["x"]
    assert z["value"].shape == (B, Z_DIM) and z["fn"].event_dim == 1
    assert obs["is_observed"] and torch.equal(obs["value"], x)
    assert obs["fn"].batch_shape == (B,) and obs["fn"].event_shape == x.shape[1:]
    for site in (z, obs, guide_trace.nodes["z"]):
        (frame,) = site["cond_indep_stack"]
        assert (frame.name, frame.dim, frame.size) == ("data", -1, B)
    assert torch.equal(guide_trace.nodes["z"]["value"], z["value"])
    params = set(pyro.get_param_store().keys())
    assert any(p.startswith(f"{vae.name}.encoder$$$") for p in params) and any(p.startswith(f"{vae.name}.decoder$$$") for p in params)


@pytest.mark.parametrize("architecture", ["mlp", "conv"])
def test_vectorized_particles_add_a_leading_dimension(architecture, device):
    vae, x = small_vae(architecture, device), batch(architecture, device=device)
    particles = pyro.plate("particles", 3, dim=-2)
    guide_trace = poutine.trace(particles(vae.guide)).get_trace(x)
    model_trace = poutine.trace(poutine.replay(particles(vae.model), trace=guide_trace)).get_trace(x)
    assert model_trace.nodes["z"]["value"].shape == (3, B, Z_DIM)
    assert model_trace.nodes["x"]["fn"].batch_shape == (3, B)
    model_trace.compute_log_prob()
    assert model_trace.nodes["x"]["log_prob"].shape == (3, B)


def test_predictive_posterior_and_prior_predictive_shapes(device):
    vae, x = small_vae(device=device), batch(device=device)
    posterior = Predictive(vae.model, guide=vae.guide, num_samples=5, return_sites=["z"])(x)
    assert posterior["z"].shape == (5, B, Z_DIM)
    parallel = Predictive(vae.model, guide=vae.guide, num_samples=5, parallel=True, return_sites=["z", "x"])(x)
    assert parallel["z"].shape == (5, B, Z_DIM)
    prior = Predictive(vae.model, num_samples=7, return_sites=["z", "x"])(batch_size=3)
    assert prior["x"].shape == (7, 3, 784) and set(prior["x"].unique().tolist()) <= {0.0, 1.0}
    assert prior["x"].device == posterior["z"].device == x.device


def test_plate_subsampling_scales_the_likelihood_and_indexes_the_data():
    vae, x = small_vae(), batch(n=20)
    guide_trace = poutine.trace(vae.guide).get_trace(x, subsample_size=5)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x, subsample_size=5)
    idx = model_trace.nodes["data"]["value"]
    assert idx.shape == (5,) and torch.equal(idx, guide_trace.nodes["data"]["value"])
    assert torch.equal(model_trace.nodes["x"]["value"], x[idx])
    assert model_trace.nodes["x"]["scale"] == 4.0 and model_trace.nodes["z"]["scale"] == 4.0


def test_subsampled_elbo_is_unbiased_for_the_full_batch_elbo():
    vae, x = small_vae(), batch(n=20)
    elbo = make_elbo("meanfield", 50)
    full = torch.tensor([elbo.loss(vae.model, vae.guide, x) for _ in range(20)])
    sub = torch.tensor([elbo.loss(vae.model, vae.guide, x, subsample_size=5) for _ in range(400)])
    se = (full.var() / 20 + sub.var() / 400).sqrt()
    assert (full.mean() - sub.mean()).abs() <= 4 * se


def test_num_data_scales_a_minibatch_to_the_dataset_size():
    vae, x = small_vae(), batch()
    pyro.set_rng_seed(1)
    batch_loss = make_elbo("meanfield", 1).loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(1)
    data_loss = make_elbo("meanfield", 1).loss(vae.model, vae.guide, x, num_data=10 * B)
    assert data_loss == pytest.approx(10 * batch_loss, rel=1e-6)


def test_poutine_scale_and_kl_weight_compose():
    vae, x = small_vae(), batch()
    elbo = make_elbo("meanfield", 1)
    pyro.set_rng_seed(2)
    base = elbo.loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(2)
    doubled = elbo.loss(poutine.scale(vae.model, 2.0), poutine.scale(vae.guide, 2.0), x)
    assert doubled == pytest.approx(2 * base, rel=1e-6)
    # a KL weight b moves the loss by (b - 1) * KL: zero KL weight leaves the reconstruction
    loc, scale = vae.encoder(x)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(loc, scale), torch.distributions.Normal(0, 1)).sum().item()
    pyro.set_rng_seed(2)
    assert elbo.loss(kl_weighted(vae.model, 0.0), kl_weighted(vae.guide, 0.0), x) == pytest.approx(base - kl, rel=1e-5)
    trace = poutine.trace(kl_weighted(vae.model, 0.0)).get_trace(x)
    assert trace.nodes["z"]["scale"] == 0.0 and trace.nodes["z"]["mask"] is None and trace.nodes["x"]["scale"] == 1.0
    assert poutine.trace(kl_weighted(vae.model, 0.5)).get_trace(x).nodes["z"]["scale"] == 0.5
    # the model itself is never weighted
    assert poutine.trace(vae.model).get_trace(x).nodes["z"]["scale"] == 1.0


@pytest.mark.parametrize("estimator", ["trace", "meanfield", "iwae"])
@pytest.mark.parametrize("architecture", ["mlp", "conv"])
def test_svi_learns_with_vectorized_particles(estimator, architecture, device):
    vae, x = small_vae(architecture, device), batch(architecture, device=device)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}), make_elbo(estimator, 4))
    first = svi.evaluate_loss(x)
    for _ in range(60):
        svi.step(x)
    assert svi.evaluate_loss(x) < first - 50  # 6 images x 784 pixels: the loss drops by hundreds


def test_networks_accept_extra_leading_dimensions():
    z = torch.randn(2, 3, 5, Z_DIM)
    assert MLPDecoder(Z_DIM, 784, (16,))(z).shape == (2, 3, 5, 784)
    assert ConvDecoder(Z_DIM, 2, hidden=16)(z).shape == (2, 3, 5, 2, 28, 28)
    loc, scale = MLPEncoder(784, Z_DIM, (16,))(torch.rand(2, 3, 5, 784))
    assert loc.shape == scale.shape == (2, 3, 5, Z_DIM) and torch.all(scale > 0)
    loc, scale = ConvEncoder(Z_DIM, hidden=16)(torch.rand(2, 3, 5, 1, 28, 28))
    assert loc.shape == scale.shape == (2, 3, 5, Z_DIM) and torch.all(scale > 0)


def test_prior_lives_in_buffers_and_follows_the_module():
    vae = small_vae()
    assert {"prior_loc", "prior_scale"} <= set(dict(vae.named_buffers()))
    vae = vae.double()
    assert vae.prior().mean.dtype == torch.float64
    trace = poutine.trace(vae.model).get_trace(batch().double())
    assert trace.nodes["z"]["value"].dtype == torch.float64


@pytest.mark.parametrize("likelihood,decoder_outputs", [("bernoulli", 784), ("continuous_bernoulli", 784), ("normal", 784)])
def test_decoder_size_follows_the_likelihood(likelihood, decoder_outputs):
    assert small_vae(likelihood=likelihood).decoder.net[-1].out_features == decoder_outputs
    assert small_vae(likelihood="normal", normal_scale="decoder").decoder.net[-1].out_features == 2 * 784


@pytest.mark.parametrize(
    "x,match",
    [
        (continuous_batch(B, 784), "binar"),
        (torch.ones(B, 783), r"shape \(6, 783\).*\(N, 784\)"),
        (torch.ones(B, 784, dtype=torch.uint8), "uint8.*255"),
        (torch.ones(0, 784), "empty"),
        (torch.full((B, 784), float("nan")), "NaN"),
        (torch.ones(B, 784, dtype=torch.float64), "float64"),
    ],
)
def test_bad_batches_raise_a_data_error_naming_the_problem(x, match):
    with pytest.raises(DataError, match=match):
        small_vae().model(x)


def test_bad_configurations_raise_config_errors():
    for kwargs in ({"z_dim": 0}, {"likelihood": "poisson"}, {"architecture": "rnn"}, {"architecture": "conv", "x_dim": 100}, {"likelihood": "normal", "normal_scale": -1.0}):
        with pytest.raises(ConfigError):
            VAE(**kwargs)
