"""Probabilistic PCA as a VAE with linear networks, where log p(x) and the posterior are exact.

Model: z ~ N(0, I_2), x | z ~ N(W z + b, sigma^2 I_5), so p(x) = N(b, W W^T + sigma^2 I). With
orthogonal columns of W, M = W^T W + sigma^2 I is diagonal and the exact posterior
p(z|x) = N(M^-1 W^T (x - b), sigma^2 M^-1) is mean-field: a linear encoder can represent it.
"""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from pyro_vae import make_elbo
from pyro_vae.linear_gaussian import linear_gaussian_exact, linear_gaussian_vae

X_DIM, Z_DIM, SIGMA = 5, 2, 0.5
Z = 4.0


def ppca(guide_loc_factor=1.0, guide_scale_factor=1.0):
    """PPCA as a linear VAE whose guide is the exact posterior scaled by the factors; with its exact
    per-datapoint log p(x) and exact posterior (both from the decoder's weights)."""
    vae, x, _ = linear_gaussian_vae(X_DIM, Z_DIM, SIGMA, 8, guide_loc_factor, guide_scale_factor)
    log_px, posterior = linear_gaussian_exact(vae, x)
    return vae, x, log_px, posterior


def bound_draws(name, k, vae, x, repeats):
    elbo = make_elbo(name, k)
    return torch.tensor([-elbo.loss(vae.model, vae.guide, x) for _ in range(repeats)], dtype=torch.float64)


@pytest.mark.parametrize("name", ["trace", "iwae"])
def test_exact_posterior_guide_makes_the_log_weight_estimators_exact(name):
    vae, x, log_px, _ = ppca()
    draws = bound_draws(name, 3, vae, x, 5)
    # q = p(z|x): the log-weight log p(x,z) - log q(z|x) = log p(x) for every z, zero variance
    torch.testing.assert_close(draws, torch.full_like(draws, log_px.sum().item()), rtol=1e-10, atol=1e-8)


def test_exact_posterior_guide_leaves_meanfield_unbiased_but_noisy():
    # the analytic KL is exact, but E_q[log p(x|z)] is still a Monte Carlo average: at the optimum
    # Trace_ELBO has zero variance and TraceMeanField_ELBO does not
    vae, x, log_px, _ = ppca()
    draws = bound_draws("meanfield", 1, vae, x, 400)
    mean, se = draws.mean().item(), draws.std().item() / math.sqrt(400)
    assert abs(mean - log_px.sum().item()) <= Z * se
    assert draws.std() > 0.1


def test_elbo_is_below_log_px_by_the_kl_to_the_posterior():
    vae, x, log_px, posterior = ppca(guide_loc_factor=0.8, guide_scale_factor=1.5)
    loc, scale = vae.encoder(x)
    q = MultivariateNormal(loc, scale_tril=torch.diag_embed(scale))
    gap = kl_divergence(q, posterior).sum().item()  # log p(x) - ELBO = KL(q || p(z|x))
    draws = bound_draws("meanfield", 50, vae, x, 200)
    mean, se = draws.mean().item(), draws.std().item() / math.sqrt(200)
    assert mean < log_px.sum().item() - 1.0
    assert abs((log_px.sum().item() - mean) - gap) <= Z * se


def test_importance_weighted_bound_approaches_log_px():
    vae, x, log_px, _ = ppca(guide_loc_factor=0.8, guide_scale_factor=1.5)
    truth = log_px.sum().item()
    gaps, ses = [], []
    for k in (1, 10, 100, 1000):
        draws = bound_draws("iwae", k, vae, x, 50)
        mean, se = draws.mean().item(), draws.std().item() / math.sqrt(50)
        assert mean <= truth + Z * se  # a lower bound in expectation
        gaps.append(truth - mean)
        ses.append(se)
    # never grows beyond noise, shrinks significantly at first, and K=1000 closes > 95% of the gap
    assert all(b <= a + Z * math.hypot(sa, sb) for a, b, sa, sb in zip(gaps, gaps[1:], ses, ses[1:])), (gaps, ses)
    assert gaps[0] - gaps[1] > Z * math.hypot(ses[0], ses[1]), (gaps, ses)
    assert gaps[-1] < 0.05 * gaps[0], gaps
