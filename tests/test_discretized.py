"""Discretized likelihoods on the 256 levels k/255, and the uniform-dequantization bound.

Exactness checks run in float64 against references written here, independently of the module:
densities and CDFs by hand (math.erf, 1/(1 + exp)), bin masses by Simpson's rule, extreme cases in
60-digit arithmetic (mpmath, which torch installs through sympy). Statistical checks use seeded
draws and 5 standard errors (a correct implementation fails one comparison with probability 6e-7).
"""

import math

import numpy as np
import pyro
import pytest
import torch

from pyro_vae.discretized import (
    DiscretizedLogistic,
    DiscretizedLogisticMixture,
    DiscretizedNormal,
    dequantized_log_likelihood_bound,
    discretized_scale,
    pixel_levels,
)
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.networks import positive_scale

F64 = torch.float64
LEVELS = torch.arange(256, dtype=F64) / 255
KINDS = ("logistic", "normal", "mixture")

# (loc, scale) pairs at the extremes: point masses (scale 2^-20 = 1e-6) and flat ones (2^20 = 1e6),
# loc far outside [0, 1], exactly on a bin edge (0.5 = 127.5 / 255, between levels 127 and 128) and
# 0.002 levels from one (2^-9 = 0.498 / 255, 511 / 512 = 254.502 / 255). All are dyadic, so float32
# holds them exactly and 255 loc, 255 scale are exact: the checks measure the arithmetic of the
# module, not the rounding of its inputs (at scale 1e-6, rounding 255 loc to float32 alone moves
# the bin edges by 0.02 standard units).
EXTREME = [
    (loc, scale)
    for loc in (-50.0, -1.0, 0.0, 2**-9, 19 / 64, 0.5, 1.0, 511 / 512, 50.0)
    for scale in (2**-20, 2**-13, 2**-7, 0.25, 1.0, 128.0, 2**14, 2**20)
]


def make(kind, loc, scale):
    """A distribution of the given kind; a mixture gets 3 components around (loc, scale)."""
    if kind == "logistic":
        return DiscretizedLogistic(loc, scale)
    if kind == "normal":
        return DiscretizedNormal(loc, scale)
    g = torch.Generator().manual_seed(5)
    loc, scale = torch.as_tensor(loc).unsqueeze(-1), torch.as_tensor(scale).unsqueeze(-1)
    shift = torch.tensor([0.0, 0.125, -0.25], dtype=loc.dtype)  # dyadic: exact in float32
    stretch = torch.tensor([1.0, 0.5, 4.0], dtype=loc.dtype)
    logits = torch.randn(loc.shape[:-1] + (3,), generator=g).to(loc.dtype)  # float32 values
    return DiscretizedLogisticMixture(logits, loc + shift, scale * stretch)


def level_probs(d):
    """P(k) for k = 0..255, on a new last axis: shape (*batch_shape, 256)."""
    levels = LEVELS.to(d.loc.dtype).reshape((256,) + (1,) * len(d.batch_shape))
    return d.log_prob(levels).exp().movedim(0, -1)


def extreme_params(dtype=F64):
    loc, scale = zip(*EXTREME)
    return torch.tensor(loc, dtype=F64).to(dtype), torch.tensor(scale, dtype=F64).to(dtype)


# ---------------------------------------------------------------------------------------------
# Independent references


def logistic_pdf(t):
    e = torch.exp(-t.abs())
    return e / (1 + e) ** 2


def normal_pdf(t):
    return torch.exp(-(t**2) / 2) / math.sqrt(2 * math.pi)


def logistic_cdf(t):
    return 1 / (1 + math.exp(-t))


def normal_cdf(t):
    return 0.5 * math.erfc(-t / math.sqrt(2))


def simpson_bin_masses(pdf, loc, scale, intervals=256):
    """``integral of pdf((y - loc) / scale) / scale`` over each interior bin, Simpson's rule."""
    k = torch.arange(1, 255, dtype=F64).unsqueeze(-1)
    y = (k - 0.5 + torch.linspace(0, 1, intervals + 1, dtype=F64)) / 255
    weights = torch.ones(intervals + 1, dtype=F64)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    return (pdf((y - loc) / scale) / scale * weights).sum(-1) / (3 * intervals * 255)


def reference_masses(kind, loc, scale):
    """All 256 masses: Simpson inside, the closed-form CDF on the two tails."""
    pdf, cdf = (logistic_pdf, logistic_cdf) if kind == "logistic" else (normal_pdf, normal_cdf)
    first = cdf((0.5 / 255 - loc) / scale)
    last = cdf(-(254.5 / 255 - loc) / scale)  # the survival function, by symmetry of the density
    inner = simpson_bin_masses(pdf, loc, scale)
    return torch.cat([torch.tensor([first], dtype=F64), inner, torch.tensor([last], dtype=F64)])


# ---------------------------------------------------------------------------------------------
# Normalization and exactness


@pytest.mark.parametrize("kind", KINDS)
def test_the_256_probabilities_sum_to_one(kind):
    g = torch.Generator().manual_seed(0)
    rand_loc = torch.rand(50, generator=g, dtype=F64) * 3 - 1
    rand_scale = torch.exp(torch.rand(50, generator=g, dtype=F64) * 12 - 9)  # 1e-4 .. 20
    loc, scale = extreme_params()
    p = level_probs(make(kind, torch.cat([loc, rand_loc]), torch.cat([scale, rand_scale])))
    # Each mass is accurate to ~1e-13 relative (the normal's Simpson branch; the logistic is exact
    # to round-off): the sum of 256 of them is 1 to far better than 1e-12.
    assert (p.sum(-1) - 1).abs().max() < 1e-12


@pytest.mark.parametrize("kind", ["logistic", "normal"])
@pytest.mark.parametrize("loc", [-0.2, 0.3, 0.7, 1.1])
@pytest.mark.parametrize("scale", [0.05, 0.2, 1.0])
def test_bin_masses_are_integrals_of_the_density(kind, loc, scale):
    d = make(kind, torch.tensor(loc, dtype=F64), torch.tensor(scale, dtype=F64))
    # Simpson's error with 256 subintervals of a bin of width 1/255 is below
    # (w / 256)^4 max|f''''/f| / 180 <= 1e-13 relative for these scales (|u| <= 26); edges are exact.
    torch.testing.assert_close(level_probs(d), reference_masses(kind, loc, scale), rtol=1e-10, atol=0)


def test_mixture_masses_are_the_weighted_component_masses():
    logits = torch.tensor([0.3, -1.0, 2.0], dtype=F64)
    loc = torch.tensor([0.2, 0.55, 0.9], dtype=F64)
    scale = torch.tensor([0.05, 0.2, 0.02], dtype=F64)
    expected = sum(
        w * reference_masses("logistic", m, s)
        for w, m, s in zip(logits.softmax(-1).tolist(), loc.tolist(), scale.tolist())
    )
    torch.testing.assert_close(level_probs(DiscretizedLogisticMixture(logits, loc, scale)), expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("kind", ["logistic", "normal"])
def test_extreme_log_masses_match_60_digit_arithmetic(kind):
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60
    cdf = mpmath.ncdf if kind == "normal" else (lambda t: 1 / (1 + mpmath.exp(-t)))
    loc, scale = extreme_params()
    k = torch.tensor([0, 1, 100, 127, 128, 254, 255])
    got = make(kind, loc.unsqueeze(-1), scale.unsqueeze(-1)).log_prob(k.to(F64) / 255)
    for i, (m, s) in enumerate(EXTREME):
        m, s = mpmath.mpf(m), mpmath.mpf(s)  # the float64 values, exactly
        for j, level in enumerate(k.tolist()):
            a, b = (level - mpmath.mpf(0.5) - 255 * m) / (255 * s), (level + mpmath.mpf(0.5) - 255 * m) / (255 * s)
            mass = cdf(b) if level == 0 else cdf(-a) if level == 255 else cdf(-a) - cdf(-b) if a + b > 0 else cdf(b) - cdf(a)
            ref = float(mpmath.log(mass))
            # measured worst: 4e-16 (logistic), 5e-14 (normal, near Simpson's switch-over)
            assert abs(got[i, j].item() - ref) <= 1e-12 * max(1.0, abs(ref)), (m, s, level, got[i, j].item(), ref)


def test_point_masses_and_flat_limits():
    for cls in (DiscretizedLogistic, DiscretizedNormal):
        for dtype in (torch.float32, F64):
            t = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
            # scale 1e-6 = 2.6e-4 levels: all mass on the nearest level, or split evenly on an edge
            assert cls(t(-50.0), t(1e-6)).log_prob(t(0.0)).item() == 0.0
            assert cls(t(50.0), t(1e-6)).log_prob(t(1.0)).item() == 0.0
            assert cls(t(77 / 255), t(1e-6)).log_prob(t(77 / 255)).item() == 0.0
            edge = cls(t(0.5), t(1e-6)).log_prob(t([127 / 255, 128 / 255]))
            torch.testing.assert_close(edge, t([-math.log(2)] * 2), rtol=0, atol=1e-6)
    # scale 1e6 and loc 0: the tails P(0) = Phi(0.5 / 255e6), P(255) = 1 - Phi(254.5 / 255e6), and each
    # interior bin the density at 0 times the bin width, to 1e-12 relative (the density varies by
    # 1e-12 over [0, 1]).
    p = level_probs(DiscretizedNormal(torch.tensor(0.0, dtype=F64), torch.tensor(1e6, dtype=F64)))
    tails = torch.tensor([normal_cdf(0.5 / 255e6), normal_cdf(-254.5 / 255e6)], dtype=F64)
    torch.testing.assert_close(p[[0, -1]], tails, rtol=1e-14, atol=0)
    torch.testing.assert_close(p[1:-1], torch.full((254,), 1 / (255e6 * math.sqrt(2 * math.pi)), dtype=F64), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------
# Stability: finite values and gradients, float32 agreeing with float64


def log_probs_and_grads(kind, dtype):
    """log P(k) for every (extreme parameter, level) pair and its gradients, one element each."""
    loc, scale = extreme_params(dtype)
    loc = loc.unsqueeze(-1).expand(-1, 256).clone().requires_grad_()
    scale = scale.unsqueeze(-1).expand(-1, 256).clone().requires_grad_()
    lp = make(kind, loc, scale).log_prob(LEVELS.to(dtype))
    lp.sum().backward()
    return lp.detach(), loc.grad, scale.grad * scale.detach()  # d/d log scale: scale-free units


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_log_prob_and_gradients_are_finite_at_extremes(kind, dtype):
    for t in log_probs_and_grads(kind, dtype):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("kind", KINDS)
def test_float32_agrees_with_float64(kind):
    eps = torch.finfo(torch.float32).eps
    (lp32, *grads32), (lp64, *grads64) = log_probs_and_grads(kind, torch.float32), log_probs_and_grads(kind, F64)
    # log P: each float32 operation rounds by eps = 1.2e-7 relative; measured worst 1.1e-6 of
    # max(1, |log P|) (the normal near its Simpson switch-over), allowed 1e-5.
    assert ((lp32.double() - lp64).abs() <= 1e-5 * lp64.abs().clamp_min(1)).all()
    # gradients: the absolute error ~eps |log P| of a component's log mass is a relative error of
    # that size in the mixture's responsibilities, so they are allowed 1e-5 + 8 eps |log P|
    # relative (measured 2.3e-5 for the mixture at |log P| = 880, 2e-6 otherwise).
    for g32, g64 in zip(grads32, grads64):
        assert ((g32.double() - g64).abs() <= (1e-5 + 8 * eps * lp64.abs()) * g64.abs().clamp_min(1)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_finite_differences(kind):
    # loc = 0.5 puts a bin edge exactly at the standardized 0, where a clamp-based branch
    # selection once zeroed the gradient; scale 3 takes the normal's Simpson branch in float64.
    loc = torch.tensor([0.5, 0.3, -0.2, 1.1, 0.5], dtype=F64, requires_grad=True)
    scale = torch.tensor([0.3, 0.01, 0.1, 3.0, 1e-3], dtype=F64, requires_grad=True)
    x = torch.tensor([127, 80, 0, 255, 128], dtype=F64) / 255
    assert torch.autograd.gradcheck(lambda m, s: make(kind, m, s).log_prob(x), (loc, scale))


# ---------------------------------------------------------------------------------------------
# Support, sampling, mean


def test_support_is_the_256_levels():
    assert pixel_levels.check(LEVELS).all()
    assert pixel_levels.check(LEVELS.float()).all()
    assert pixel_levels.check(LEVELS + 5e-4 / 255).all()  # within the tolerance of 1e-3 levels
    off = torch.tensor([0.5 / 255, 0.25, -1 / 255, 256 / 255, 3 / 255 + 2e-3 / 255], dtype=F64)
    assert not pixel_levels.check(off).any()
    for kind in KINDS:
        with pytest.raises(ValueError, match="support"):
            make(kind, torch.tensor(0.3), torch.tensor(0.1)).log_prob(torch.tensor(0.25))


def sample_cases():
    loc = torch.tensor([0.2, 0.01, 0.97, 0.5], dtype=F64)
    scale = torch.tensor([0.02, 0.03, 0.01, 0.3], dtype=F64)
    return [make(kind, loc, scale) for kind in KINDS]


@pytest.mark.parametrize("d", sample_cases(), ids=KINDS)
def test_samples_are_levels_with_the_right_frequencies(d):
    n = 20000
    x = d.sample((n,))
    assert x.shape == (n, 4)
    assert torch.isin(x, LEVELS).all()  # exactly k / 255, not merely close
    counts = torch.stack([torch.bincount((x[:, j] * 255).round().long(), minlength=256) for j in range(4)])
    freq, p = counts.double() / n, level_probs(d)
    # levels expected fewer than 20 times are pooled into one cell, so that every compared count is
    # close to normal and the 5-standard-error bound means what it says.
    rare = p * n < 20
    freq = torch.cat([freq * ~rare, (freq * rare).sum(-1, keepdim=True)], -1)
    p = torch.cat([p * ~rare, (p * rare).sum(-1, keepdim=True)], -1)
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all()


def test_degenerate_samples():
    x = DiscretizedLogistic(torch.tensor([-50.0, 50.0, 77 / 255]), 1e-6).sample((100,))
    assert (x == torch.tensor([0.0, 1.0, 77 / 255])).all()


@pytest.mark.parametrize("kind", KINDS)
def test_mean(kind):
    t = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    # point masses at 0 and 1; loc = 0.5 gives P(k) = P(255 - k) by symmetry, so mean 0.5.
    mean = make(kind, t([-50.0, 50.0, 0.5, 0.5, 0.5]), t([1e-6, 1e-6, 1e-6, 0.3, 1e6])).mean
    torch.testing.assert_close(mean[:2], t([0.0, 1.0]), rtol=0, atol=1e-12)
    if kind != "mixture":  # the mixture's components sit around 0.5, not on it
        torch.testing.assert_close(mean[2:], t([0.5] * 3), rtol=0, atol=1e-12)
    # well inside [0, 1] with a few levels of spread: the tails beyond 0 and 1 are < 1e-15 and the
    # rounding bias of a smooth symmetric density is ~exp(-2 pi^2 (255 scale)) < 1e-15, so mean = loc.
    if kind != "mixture":
        torch.testing.assert_close(make(kind, t(0.37), t(0.01)).mean, t(0.37), rtol=0, atol=1e-12)
    else:  # the mixture's mean is the weighted mean of the components' means, and sum k/255 P(k)
        d = make(kind, t([0.37, 0.6]), t([0.01, 0.05]))
        torch.testing.assert_close(d.mean, (level_probs(d) * LEVELS).sum(-1), rtol=0, atol=1e-12)
        weights = d.mixture_distribution.probs
        torch.testing.assert_close(d.mean, (weights * d.component_distribution.mean).sum(-1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_mean_is_the_sum_of_levels_times_their_masses(kind):
    # E[X] = sum_k k/255 P(k), over locations inside and beyond [0, 1] and scales from a fraction
    # of a level to many times the range; the mean sums survival probabilities instead
    g = torch.Generator().manual_seed(8)
    loc = torch.empty(200, dtype=F64).uniform_(-0.5, 1.5, generator=g)
    scale = 10 ** torch.empty(200, dtype=F64).uniform_(-5, 1, generator=g)
    d = make(kind, loc, scale)
    torch.testing.assert_close(d.mean, (level_probs(d) * LEVELS).sum(-1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind,scale,variance", [("logistic", 0.02, math.pi**2 * 0.02**2 / 3), ("normal", 0.08, 0.08**2)])
def test_variance_is_the_density_variance_plus_sheppards_correction(kind, scale, variance):
    # binning a smooth density onto levels h = 1/255 apart adds h^2/12 to its variance (Sheppard's
    # correction; the remainder is of the order of the density's characteristic function at
    # 2 pi / h: exp(-2 pi^2 scale / h) = 1e-44 for the logistic, far less for the normal). At
    # loc = 0.5, the mass beyond 0 and 1 (clamped onto the edge levels) changes the variance by
    # 4 e^(-d/s) (d s + s^2) = 6e-13 for the logistic (d = 0.5, 25 scales) and less for the normal
    # (6.25 scales): < 1e-9 of the variance. (At 0.03, 16.7 scales, it is 3.7e-9, 1.2e-6 of it.)
    d = make(kind, torch.tensor(0.5, dtype=F64), torch.tensor(scale, dtype=F64))
    assert d.variance.item() == pytest.approx(variance + 1 / (12 * 255**2), rel=1e-8)


@pytest.mark.parametrize("kind", KINDS)
def test_variance_is_the_spread_of_the_levels_and_stays_accurate_below_a_level(kind):
    t = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    d = make(kind, t([0.37, 0.5, -3.0, 2.0]), t([0.01, 0.3, 0.2, 5.0]))
    p = level_probs(d)
    mean = (p * LEVELS).sum(-1, keepdim=True)
    torch.testing.assert_close(d.variance, (p * (LEVELS - mean).square()).sum(-1), rtol=1e-10, atol=0)
    if kind != "mixture":
        # a scale of 1e-4 levels around level 100: only the two neighbours k = 99, 101 hold mass
        # off the level, 2 sigmoid(-h) or 2 Phi(-h) with h = 0.5 / 1e-4 standard units, so the
        # variance is ~1e-2000: below float64's range, it must come out 0 and never round-off noise
        tiny = make(kind, t(100 / 255), t(1e-4 / 255))
        assert tiny.variance.item() == 0.0 and tiny.mean.item() == pytest.approx(100 / 255, rel=1e-15)
    # samples: their variance agrees within 4 standard errors (the variance of a sample variance
    # is (mu4 - sigma^4) / n; mu4 from the same level probabilities)
    torch.manual_seed(3)
    draws = d.sample((20000,))
    mu4 = (p * (LEVELS - mean) ** 4).sum(-1)
    se = ((mu4 - d.variance**2) / 20000).sqrt()
    assert ((draws.var(0) - d.variance).abs() <= 4 * se).all(), (draws.var(0), d.variance, se)


def test_discretized_scale_is_the_library_positive_scale():
    raw = torch.linspace(-30, 30, 61, dtype=F64)
    torch.testing.assert_close(discretized_scale(raw), positive_scale(raw), rtol=0, atol=0)
    # at the floor 1e-4 (0.026 levels) all but 2 sigmoid(-h) = 6e-9 of the mass is on one level,
    # h = 0.5 / (255 * 1e-4) the half-bin in standard units (softplus(-50) = 2e-22 is negligible)
    d = DiscretizedLogistic(torch.tensor(100 / 255, dtype=F64), discretized_scale(torch.tensor(-50.0, dtype=F64)))
    off_level = -torch.expm1(d.log_prob(torch.tensor(100 / 255, dtype=F64))).item()
    assert off_level == pytest.approx(2 / (1 + math.exp(0.5 / 0.0255)), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Inside Pyro


N, D, P = 4, 5, 3


def pixels(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (N, D), generator=g).to(F64) / 255


@pytest.mark.parametrize("kind", KINDS)
def test_pyro_trace_and_vectorized_particles(kind):
    x = pixels()
    g = torch.Generator().manual_seed(1)
    loc, scale = torch.rand(D, generator=g, dtype=F64), 0.05 + torch.rand(D, generator=g, dtype=F64) / 5

    def model(x):
        with pyro.plate("data", N):
            pyro.sample("x", make(kind, loc, scale).to_event(1), obs=x)

    hand = make(kind, loc, scale).log_prob(x).sum()
    trace = pyro.poutine.trace(model).get_trace(x)
    assert trace.nodes["x"]["fn"].batch_shape == (N,)  # the plate expanded the distribution
    torch.testing.assert_close(trace.log_prob_sum(), hand, rtol=1e-12, atol=0)
    # Vectorized particles add a leading plate, expanding the distribution to (P, N); with no
    # latent variables the ELBO is log p(x) exactly.
    elbo = pyro.infer.Trace_ELBO(num_particles=P, vectorize_particles=True, max_plate_nesting=1)
    assert elbo.loss(model, lambda x: None, x) == pytest.approx(-hand.item(), rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_expand_adds_batch_dims(kind):
    d = make(kind, torch.rand(D, dtype=F64), torch.full((D,), 0.1, dtype=F64))
    e = d.expand((P, N, D))
    assert type(e) is type(d) and e.batch_shape == (P, N, D) and e.event_shape == ()
    x = pixels()
    torch.testing.assert_close(e.log_prob(x), d.log_prob(x).expand(P, N, D), rtol=0, atol=0)
    assert e.sample().shape == (P, N, D)
    assert e.mean.shape == (P, N, D)


# ---------------------------------------------------------------------------------------------
# Uniform dequantization


def test_dequantization_bound_is_exact_for_a_density_constant_on_the_cells():
    g = torch.Generator().manual_seed(2)
    d = DiscretizedNormal(torch.rand(D, generator=g, dtype=F64), 0.05 + torch.rand(D, generator=g, dtype=F64) / 5)
    log_p_table = d.log_prob(LEVELS.unsqueeze(-1)).T  # (D, 256): log P_j(k)

    def log_density(y):  # p(y) = 256 P(k) on the cell [k/256, (k+1)/256) of each pixel
        cell = (256 * y).floor().long().clamp(0, 255)
        return (math.log(256) + log_p_table[torch.arange(D), cell]).sum(-1)

    x = pixels()
    bound, se = dequantized_log_likelihood_bound(log_density, x, 16, torch.Generator().manual_seed(3))
    assert bound.shape == se.shape == (N,)
    torch.testing.assert_close(bound, d.log_prob(x).sum(-1), rtol=1e-12, atol=1e-12)
    assert (se < 1e-12).all()  # every draw gives the same value


def test_dequantization_bound_lies_below_the_exact_log_probability():
    g = torch.Generator().manual_seed(4)
    m = 0.2 + 0.6 * torch.rand(D, generator=g, dtype=F64)
    s = 0.1 + 0.2 * torch.rand(D, generator=g, dtype=F64)
    # a normal density truncated to [0, 1]; its cell masses in closed form (math.erf, float64)
    cdf = lambda y, j: 0.5 * (1 + math.erf((y - m[j].item()) / (s[j].item() * math.sqrt(2))))  # noqa: E731
    z = [cdf(1.0, j) - cdf(0.0, j) for j in range(D)]
    log_z = torch.tensor(z, dtype=F64).log()

    def log_density(y):
        return (-(((y - m) / s) ** 2) / 2 - s.log() - 0.5 * math.log(2 * math.pi) - log_z).sum(-1)

    x = pixels()
    k = (x * 255).round().long()
    exact = torch.tensor(
        [sum(math.log((cdf((k[i, j] + 1) / 256, j) - cdf(k[i, j] / 256, j)) / z[j]) for j in range(D)) for i in range(N)],
        dtype=F64,
    )
    bound, se = dequantized_log_likelihood_bound(log_density, x, 256, torch.Generator().manual_seed(5))
    gap = exact - bound
    assert (se > 0).all()
    assert (gap >= -3 * se).all()  # Jensen: the bound is below log P(x)
    # Hoeffding's lemma: log E e^X - E X <= R^2 / 8 for X with range R; over a cell, log p varies by
    # at most (1/256) max|y - m| / s^2 <= 1 / (256 * 0.01), so the gap is at most D * 0.39^2 / 8.
    assert (gap <= D * (1 / (256 * 0.01)) ** 2 / 8 + 3 * se).all()


def test_dequantization_with_one_sample_has_no_standard_error_and_zero_is_refused():
    bound, se = dequantized_log_likelihood_bound(lambda y: y.sum(-1), pixels(), 1)
    assert torch.isfinite(bound).all() and torch.isnan(se).all()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="num_samples"):
            dequantized_log_likelihood_bound(lambda y: y.sum(-1), pixels(), bad)
    assert dequantized_log_likelihood_bound(lambda y: y.sum(-1), pixels(), np.int64(2))[0].shape == bound.shape


def test_dequantization_refuses_data_that_are_not_8_bit_levels_and_densities_of_the_wrong_shape():
    x = pixels()
    total = lambda y: y.sum(-1)  # noqa: E731
    for bad in (x * 255, x + 0.5 / 256, (x * 255).to(torch.uint8), x[:0], x[0]):
        with pytest.raises(DataError, match="x_levels"):
            dequantized_log_likelihood_bound(total, bad, 4)
    with pytest.raises(DataError, match="summed over pixels"):
        dequantized_log_likelihood_bound(lambda y: y, x, 4)
