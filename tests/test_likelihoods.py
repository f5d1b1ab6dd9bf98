"""The identities that make "BCE" and "MSE" log-likelihoods (design questions 2-4)."""

import math

import pytest
import torch
import torch.nn.functional as F

from pyro_vae import DataError
from pyro_vae.likelihoods import NormalLikelihood as Normal
from pyro_vae.likelihoods import continuous_bernoulli_log_normalizer, make_likelihood

D = 50


def test_bernoulli_log_prob_is_minus_summed_bce_with_logits():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(7, D, generator=g, dtype=torch.float64)
    x = torch.bernoulli(torch.full((7, D), 0.3, dtype=torch.float64), generator=g)
    log_p = make_likelihood("bernoulli", (D,))(logits).log_prob(x)
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    assert log_p.shape == (7,)
    torch.testing.assert_close(log_p, -bce, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("scale", [1.0, 0.1, "shared", "pixel", "decoder"])
def test_normal_log_prob_is_scaled_squared_error_plus_constant(scale):
    lik = Normal((D,), scale=scale, init_scale=0.3).double()
    g = torch.Generator().manual_seed(1)
    params = torch.randn(6, lik.num_params * D, generator=g, dtype=torch.float64)
    x = torch.randn(6, D, generator=g, dtype=torch.float64)
    mu = params[:, :D]
    s = lik.scale(params[:, D:] if scale == "decoder" else None).expand(6, D)
    # -log p = ||x - mu||^2 / (2 s^2) + sum log s + D/2 log 2 pi, pixel by pixel
    expected = -((x - mu) ** 2 / (2 * s**2)).sum(-1) - s.log().sum(-1) - D / 2 * math.log(2 * math.pi)
    torch.testing.assert_close(lik(params).log_prob(x), expected, rtol=1e-12, atol=1e-9)
    if not isinstance(scale, str):  # fixed s: exactly a scaled sum of squared errors plus a constant
        s = lik.fixed_scale.item()  # the float32-rounded value the buffer was created with
        sse = ((x - mu) ** 2).sum(-1)
        const = D * math.log(s) + D / 2 * math.log(2 * math.pi)
        torch.testing.assert_close(-lik(params).log_prob(x), sse / (2 * s**2) + const, rtol=1e-12, atol=1e-9)


def test_normal_learned_scales_have_expected_parameter_shapes():
    assert Normal((D,), "shared").raw_scale.shape == ()
    assert Normal((1, 28, 28), "pixel").raw_scale.shape == (1, 28, 28)
    assert Normal((D,), "decoder").num_params == 2
    assert not list(Normal((D,), 0.5).parameters())


def test_continuous_bernoulli_differs_from_bce_by_exactly_its_log_normalizer():
    g = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(9, D, generator=g, dtype=torch.float64)
    logits[0, :5] = torch.tensor([0.0, 1e-4, -1e-3, 30.0, -30.0], dtype=torch.float64)  # the delicate points
    x = torch.rand(9, D, generator=g, dtype=torch.float64)
    log_p = make_likelihood("continuous_bernoulli", (D,))(logits).log_prob(x)
    minus_bce = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    # log C(eta) from the closed form eta / tanh(eta / 2), written independently of torch's code
    log_norm = continuous_bernoulli_log_normalizer(logits).sum(-1)
    torch.testing.assert_close(log_p - minus_bce, log_norm, rtol=1e-7, atol=1e-7)
    assert torch.all(log_norm > 0), "C(lambda) >= 2 > 1: the BCE number is not a log-density"


def test_continuous_bernoulli_normalizer_matches_numerical_integral():
    # C(lambda)^-1 = integral_0^1 lambda^x (1-lambda)^(1-x) dx, checked by the trapezoid rule
    logits = torch.tensor([-5.0, -0.7, 0.0, 0.02, 2.5], dtype=torch.float64)
    grid = torch.linspace(0, 1, 200001, dtype=torch.float64)
    lam = torch.sigmoid(logits)[:, None]
    integral = torch.trapezoid(lam**grid * (1 - lam) ** (1 - grid), grid, dim=-1)
    torch.testing.assert_close(continuous_bernoulli_log_normalizer(logits), -integral.log(), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_continuous_bernoulli_normalizer_is_symmetric_and_accurate_at_extreme_logits(dtype):
    # C(eta) = C(-eta), and for |eta| >> 1, tanh(eta/2) -> 1 so log C -> log |eta|
    logits = torch.tensor([8.0, 15.0, 30.0, 80.0], dtype=dtype)
    lik = make_likelihood("continuous_bernoulli", (4,))
    x = torch.full((4,), 0.5, dtype=dtype)  # at x = 1/2 the unnormalized part is symmetric too
    # equal up to rounding (torch.testing defaults per dtype: a few ulps), not 3e-5 nats apart
    torch.testing.assert_close(lik(logits).log_prob(x), lik(-logits).log_prob(x))
    torch.testing.assert_close(continuous_bernoulli_log_normalizer(logits[1:]), logits[1:].log(), rtol=1e-6, atol=1e-6)


def test_bernoulli_refuses_continuous_data_and_names_the_fix():
    lik = make_likelihood("bernoulli", (D,))
    with pytest.raises(DataError, match="(?s)binar.*continuous_bernoulli.*normal"):
        lik.check_support(torch.full((2, D), 0.5))
    lik.check_support(torch.ones(2, D))


def test_continuous_bernoulli_refuses_data_outside_unit_interval():
    lik = make_likelihood("continuous_bernoulli", (D,))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        lik.check_support(torch.full((2, D), 255.0))
    lik.check_support(torch.rand(2, D))
