"""Diagnostics: PSIS k-hat on weights of known tails and on PPCA guides of known quality, active
units, the KL per dimension and ELBO terms against independent formulas, and the ArviZ export.

Every draw is seeded; statistical checks allow Z = 4 standard errors of the difference.
"""

import math

import arviz as az
import numpy as np
import pytest
import torch
from torch.distributions import Normal, Pareto, kl_divergence

from pyro_vae import VAE
from pyro_vae.diagnostics import (
    active_units,
    elbo_terms,
    kl_per_dimension,
    pareto_k,
    pareto_k_summary,
)
from pyro_vae.errors import DataError
from pyro_vae.evaluate import importance_log_weights, log_marginal_likelihood
from pyro_vae.inference_data import save_inference_data, to_inference_data
from pyro_vae.reference import reference_elbo

from .conftest import binary_batch
from .test_linear_gaussian import ppca

Z = 4.0
X_DIM, Z_DIM, BATCH = 20, 3, 6


@pytest.fixture
def vae():
    torch.manual_seed(3)
    return VAE(x_dim=X_DIM, z_dim=Z_DIM, likelihood="bernoulli", hidden=(16,))


@pytest.fixture
def x():
    return binary_batch(BATCH, X_DIM)


def light_log_weights(k, n):
    return 0.1 * torch.randn(k, n, dtype=torch.float64)


def heavy_log_weights(k, n):
    """Logs of Pareto(alpha = 0.5) draws: a tail of shape k = 1 / alpha = 2 (infinite mean)."""
    return Pareto(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)).sample((k, n)).log()


# ---------------------------------------------------------------- PSIS k-hat


def test_light_tailed_weights_have_small_k():
    torch.manual_seed(0)
    k = pareto_k(light_log_weights(1000, 20))
    assert k.shape == (20,)
    assert np.all(k < 0.5), k


def test_heavy_tailed_weights_have_large_k():
    torch.manual_seed(0)
    k = pareto_k(heavy_log_weights(1000, 20))
    assert np.mean(k > 0.7) >= 0.9, k
    summary = pareto_k_summary(k)
    assert summary["good"] + summary["ok"] + summary["bad"] == summary["total"] == 20
    assert summary["bad"] >= 18


def test_pareto_k_fits_each_column_over_the_draws():
    # (K, N): draws along axis 0, datapoints along axis 1, whatever ArviZ's own convention
    torch.manual_seed(0)
    k = pareto_k(torch.cat([light_log_weights(1000, 5), heavy_log_weights(1000, 5)], dim=1))
    assert np.all(k[:5] < 0.5) and np.all(k[5:] > 0.7), k


def test_pareto_k_summary_bins_at_half_and_point_seven():
    summary = pareto_k_summary(np.array([-0.2, 0.5, 0.6, 0.7, 0.71, np.inf, np.nan]))
    assert (summary["good"], summary["ok"], summary["bad"], summary["total"]) == (2, 2, 3, 7)
    assert summary["good_share"] + summary["ok_share"] + summary["bad_share"] == pytest.approx(1.0)
    assert summary["bad_share"] == pytest.approx(3 / 7)


def test_pareto_k_rejects_a_single_vector():
    with pytest.raises(DataError, match="num_samples, N"):
        pareto_k(np.zeros(100))


# ---------------------------------------------------------------- importance weights


def test_importance_log_weights_are_the_ones_log_marginal_likelihood_averages(vae, x, device):
    vae, x = vae.to(device), x.to(device)
    torch.manual_seed(5)
    log_w = importance_log_weights(vae.model, vae.guide, x, num_samples=250, chunk_size=100)
    torch.manual_seed(5)
    estimate = log_marginal_likelihood(vae.model, vae.guide, x, num_samples=250, chunk_size=100)
    assert log_w.shape == (250, BATCH) and log_w.dtype == torch.float64 and log_w.device.type == "cpu"
    torch.testing.assert_close(torch.logsumexp(log_w, 0) - math.log(250), estimate.log_px)


def test_exact_posterior_guide_gives_every_draw_the_weight_p_x():
    vae, x, log_px, _ = ppca()
    log_w = importance_log_weights(vae.model, vae.guide, x, num_samples=50, chunk_size=20)
    torch.testing.assert_close(log_w, log_px.expand(50, -1), rtol=1e-10, atol=1e-8)


def ppca_pareto_k(guide_loc_factor, guide_scale_factor):
    vae, x, _, _ = ppca(guide_loc_factor=guide_loc_factor, guide_scale_factor=guide_scale_factor)
    torch.manual_seed(0)
    return pareto_k(importance_log_weights(vae.model, vae.guide, x, num_samples=2000))


def test_pareto_k_tells_a_slightly_wide_guide_from_a_too_narrow_one():
    # q wider than p(z|x): bounded weights. q at 0.3x the posterior scale: log w grows like
    # (1/0.09 - 1) z^2 / 2, a tail of shape k = 1 - 0.3^2 = 0.91 (Vehtari et al.)
    good, bad = ppca_pareto_k(0.9, 1.2), ppca_pareto_k(1.0, 0.3)
    assert np.all(good < 0.7), good
    assert np.all(bad > good), (good, bad)
    assert pareto_k_summary(bad)["bad"] > len(bad) / 2, bad


# ---------------------------------------------------------------- active units, KL, ELBO terms


def test_active_units_counts_the_dims_the_encoder_mean_uses():
    torch.manual_seed(0)
    vae = VAE(x_dim=X_DIM, z_dim=5, hidden=(16,))
    last = vae.encoder.net[-1]  # rows 0..z_dim-1 give loc, the rest the scale
    with torch.no_grad():
        last.weight[:5] *= 20  # the used dims vary clearly more than the 0.01 threshold
        last.weight[[1, 3]] = 0.0
        last.bias[[1, 3]] = 0.0
    x = binary_batch(200, X_DIM)
    count, variances = active_units(vae, x, chunk_size=64)
    assert count == 3
    assert variances.shape == (5,) and torch.all(variances[[1, 3]] == 0) and torch.all(variances[[0, 2, 4]] > 0.01)
    torch.testing.assert_close(variances, vae.encoder(x)[0].detach().var(0))  # chunking changes nothing


def test_kl_per_dimension_sums_to_the_mean_total_kl(vae, x):
    loc, scale = vae.encoder(x)
    kl = kl_divergence(Normal(loc, scale), Normal(0.0, 1.0)).detach()
    per_dim = kl_per_dimension(vae, x, chunk_size=4)
    assert per_dim.shape == (Z_DIM,)
    torch.testing.assert_close(per_dim, kl.mean(0))
    torch.testing.assert_close(per_dim.sum(), kl.sum(-1).mean())


def chunk_means(draw, chunks=20):
    """Mean and standard error per datapoint over ``chunks`` independent chunk averages."""
    draws = torch.stack([draw() for _ in range(chunks)]).double()
    return draws.mean(0), draws.std(0) / math.sqrt(chunks)


def test_elbo_terms_add_up_and_agree_with_the_reference_elbo(vae, x):
    torch.manual_seed(0)
    terms = elbo_terms(vae, x, num_particles=4)
    assert all(t.shape == (BATCH,) and not t.requires_grad for t in terms.values())
    torch.testing.assert_close(terms["reconstruction"] - terms["kl"], terms["elbo"])
    loc, scale = vae.encoder(x)
    torch.testing.assert_close(terms["kl"], kl_divergence(Normal(loc, scale), Normal(0.0, 1.0)).sum(-1).detach())

    mean, se = chunk_means(lambda: elbo_terms(vae, x, num_particles=1000)["elbo"])
    with torch.no_grad():
        ref_mean, ref_se = chunk_means(lambda: reference_elbo(vae, x, num_particles=1000))
    assert torch.all((mean - ref_mean).abs() <= Z * torch.sqrt(se**2 + ref_se**2)), (mean, ref_mean)


def test_elbo_terms_average_to_log_px_under_the_exact_posterior():
    # q = p(z|x): KL(q || p(z|x)) = 0, so E_q[ELBO terms] = log p(x) exactly
    vae, x, log_px, _ = ppca()
    torch.manual_seed(0)
    mean, se = chunk_means(lambda: elbo_terms(vae, x, num_particles=500)["elbo"])
    assert torch.all((mean - log_px).abs() <= Z * se), (mean, log_px)


# ---------------------------------------------------------------- ArviZ export


METRICS = [
    {"epoch": 1, "train_elbo": -14.0, "test_elbo": -14.5, "skipped_steps": 0, "kl_weight": 0.5},
    {"epoch": 2, "train_elbo": -12.0, "test_elbo": -12.8, "skipped_steps": 1, "kl_weight": 1.0},
    {"epoch": 3, "train_elbo": -11.5, "test_elbo": -12.1, "skipped_steps": 0, "kl_weight": 1.0},
]
DRAWS, K = 40, 200


@pytest.fixture
def idata_and_inputs(vae, x):
    torch.manual_seed(0)
    log_w = importance_log_weights(vae.model, vae.guide, x, num_samples=K)
    return to_inference_data(vae, x, log_weights=log_w, num_draws=DRAWS, training_metrics=METRICS), log_w


def test_inference_data_has_the_documented_groups_dims_and_values(vae, x, idata_and_inputs):
    idata, log_w = idata_and_inputs
    assert idata.groups() == ["posterior", "posterior_predictive", "log_likelihood", "observed_data", "importance_sampling", "training"]
    expected = {
        ("posterior", "z"): (("chain", "draw", "datapoint", "latent_dim"), (1, DRAWS, BATCH, Z_DIM)),
        ("posterior_predictive", "x"): (("chain", "draw", "datapoint", "pixel"), (1, DRAWS, BATCH, X_DIM)),
        ("log_likelihood", "x"): (("chain", "draw", "datapoint"), (1, DRAWS, BATCH)),
        ("observed_data", "x"): (("datapoint", "pixel"), (BATCH, X_DIM)),
        ("importance_sampling", "pareto_k"): (("datapoint",), (BATCH,)),
        ("importance_sampling", "log_px"): (("datapoint",), (BATCH,)),
        ("training", "test_elbo"): (("epoch",), (3,)),
    }
    for (group, name), (dims, shape) in expected.items():
        var = idata[group][name]
        assert (var.dims, var.shape) == (dims, shape), (group, name)

    np.testing.assert_array_equal(idata.observed_data["x"].values, x.numpy())
    assert set(np.unique(idata.posterior_predictive["x"].values)) <= {0.0, 1.0}
    z = torch.from_numpy(idata.posterior["z"].values[0])
    with torch.no_grad():
        log_lik = vae.likelihood(vae.decoder(z)).log_prob(x)
    np.testing.assert_allclose(idata.log_likelihood["x"].values[0], log_lik.numpy(), rtol=1e-5)
    np.testing.assert_allclose(idata.importance_sampling["log_px"].values, (torch.logsumexp(log_w, 0) - math.log(K)).numpy())
    np.testing.assert_array_equal(idata.importance_sampling["pareto_k"].values, pareto_k(log_w))
    assert idata.importance_sampling.attrs["num_samples"] == K
    np.testing.assert_array_equal(idata.training["epoch"].values, [1, 2, 3])
    assert list(idata.training.data_vars) == ["train_elbo", "test_elbo", "skipped_steps", "kl_weight"]
    np.testing.assert_array_equal(idata.training["train_elbo"].values, [-14.0, -12.0, -11.5])


def test_inference_data_without_weights_or_metrics_has_the_four_standard_groups(vae, x):
    idata = to_inference_data(vae, x, num_draws=5)
    assert idata.groups() == ["posterior", "posterior_predictive", "log_likelihood", "observed_data"]


def test_inference_data_flattens_images_to_pixels():
    torch.manual_seed(0)
    vae = VAE(architecture="conv", z_dim=2, hidden=32)
    x = binary_batch(2, 784).reshape(2, 1, 28, 28)
    idata = to_inference_data(vae, x, num_draws=3)
    assert idata.posterior_predictive["x"].shape == (1, 3, 2, 784)
    np.testing.assert_array_equal(idata.observed_data["x"].values, x.reshape(2, 784).numpy())


def test_inference_data_rejects_weights_for_another_batch(vae, x):
    with pytest.raises(DataError, match="num_samples, 6"):
        to_inference_data(vae, x, log_weights=torch.zeros(100, 5), num_draws=2)


def test_netcdf_round_trip_keeps_every_group_and_value(idata_and_inputs, tmp_path):
    idata, _ = idata_and_inputs
    path = tmp_path / "vae.nc"
    save_inference_data(idata, path)
    back = az.from_netcdf(path)
    assert back.groups() == idata.groups()
    for group in idata.groups():
        before, after = idata[group], back[group].load()
        assert list(after.data_vars) == list(before.data_vars), group
        for name in before.data_vars:
            assert after[name].dims == before[name].dims, (group, name)
            np.testing.assert_array_equal(after[name].values, before[name].values)
        for coord in before.coords:
            np.testing.assert_array_equal(after[coord].values, before[coord].values)
    assert back.importance_sampling.attrs["num_samples"] == K
    back.close()
