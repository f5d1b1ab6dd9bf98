"""The whole ELBO of every prior x guide x likelihood, Pyro's against the hand-written reference
(pyro_vae.reference, written from the formulas) under the same draws, in float64, for
Trace_ELBO and TraceMeanField_ELBO, with a KL weight and vectorized particles.

Both sides are the same sum of the same float64 terms in a different order, so they agree to
rounding: relative 1e-10 leaves room for about 1e6 roundings of 1e-16 and catches any missing or
mis-scaled term (the smallest, a pixel's log-density or a step's log sigma, is of order 1e-3 of the total).
The fast lane runs each option (prior, guide, likelihood, estimator) at least once; the slow lane the whole grid.
"""

import itertools

import pyro
import pytest
import torch

from pyro_vae import VAE, kl_weighted, make_elbo
from pyro_vae.options import choices
from pyro_vae.reference import reference_elbo

from .conftest import continuous_batch

PRIORS, GUIDES, LIKELIHOODS = choices("prior"), choices("guide"), choices("likelihood")
ESTIMATORS = ("trace", "meanfield")
GRID = list(itertools.product(PRIORS, GUIDES, LIKELIHOODS, ESTIMATORS))
# each option once: walk the likelihoods, turning the other choices with them
FAST = [
    (PRIORS[i % len(PRIORS)], GUIDES[(i // 2) % len(GUIDES)], likelihood, ESTIMATORS[(i + i // 2) % len(ESTIMATORS)])
    for i, likelihood in enumerate(LIKELIHOODS)
]
assert all(
    {case[k] for case in FAST} == set(options) for k, options in enumerate((PRIORS, GUIDES, LIKELIHOODS, ESTIMATORS))
)
CASES = [pytest.param(*case, marks=() if case in FAST else pytest.mark.slow) for case in GRID]

X_DIM, BATCH, PARTICLES, KL_WEIGHT = 12, 4, 3, 0.3


def data(likelihood: str) -> torch.Tensor:
    """A batch in the likelihood's support: binary, continuous in (0, 1), or the 8-bit levels k / 255."""
    x = continuous_batch(BATCH, X_DIM).double()
    if likelihood == "bernoulli":
        return torch.bernoulli(x)
    return (x * 255).round() / 255 if likelihood.startswith("discretized") else x


@pytest.mark.parametrize("prior, guide, likelihood, estimator", CASES)
def test_the_whole_elbo_equals_the_hand_written_one_under_the_same_draws(prior, guide, likelihood, estimator):
    torch.manual_seed(5)
    vae = VAE(
        x_dim=X_DIM,
        z_dim=3,
        hidden=(16,),
        likelihood=likelihood,
        normal_scale="pixel",
        mixture_components=3,
        prior=prior,
        pseudo_inputs=4,
        guide=guide,
        flow_steps=2,
    ).double()
    with torch.no_grad():  # learned scales and flows away from their initial values, so a mix-up would show
        for p in [*vae.likelihood.parameters(), *vae.guide_family.parameters()]:
            p.add_(torch.randn_like(p) * 0.3)
    x = data(likelihood)
    elbo = make_elbo(estimator, PARTICLES)
    pyro.set_rng_seed(7)
    pyro_loss = elbo.loss(kl_weighted(vae.model, KL_WEIGHT), kl_weighted(vae.guide, KL_WEIGHT), x)
    pyro.set_rng_seed(7)
    with torch.no_grad():
        reference = reference_elbo(vae, x, PARTICLES, KL_WEIGHT, analytic_kl=estimator == "meanfield").sum().item()
    assert pyro_loss == pytest.approx(-reference, rel=1e-10, abs=0)


def test_the_reference_kl_is_analytic_only_for_the_standard_prior_and_gaussian_guide():
    """Under the same draws the analytic and Monte Carlo forms differ where the KL is analytic
    (the draw's noise), and are one number where it is not (the fallback is the draw)."""
    x = data("bernoulli")
    for prior, guide in itertools.product(PRIORS, GUIDES):
        vae = VAE(x_dim=X_DIM, z_dim=3, hidden=(16,), prior=prior, pseudo_inputs=4, guide=guide).double()
        values = []
        for analytic in (True, False):
            torch.manual_seed(3)
            values.append(reference_elbo(vae, x, 1, analytic_kl=analytic).detach())
        assert torch.equal(values[0], values[1]) == ((prior, guide) != ("standard", "gaussian"))
