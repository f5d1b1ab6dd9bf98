"""The fast path of the importance log-weights: the same draws give the Pyro program's log-weights,
for every likelihood and architecture, block boundaries included; the linear-Bernoulli identity
against torch's Bernoulli in float64; the path is chosen only for a VAE's own model and guide, and a
program that computes something else is caught by the check against Pyro.

Float32 tolerance: a log-weight is a sum of D ~ 800 terms rounded at ~6e-8 relative each, and the
fast path sums them in another order (and through ``W^T y``), so the two differ by some 1e-6 of the
terms' size; ``rtol = 1e-5`` of ``1 + |log w|`` leaves that a margin of ten and is still ~1e4 times
smaller than a change of model (a wrong prior or guide moves log w by nats).
"""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from pyro_vae import VAE, fast_log_weights, kl_weighted
from pyro_vae.estimators import DataPlateIWELBO
from pyro_vae.evaluate import importance_log_weights
from pyro_vae.fast_log_weights import (
    FastPathWarning,
    bernoulli_linear_log_prob,
    draw_noise,
    fast_path_vae,
    matches_pyro,
    vae_log_weights,
)

from .conftest import binary_batch, continuous_batch

RTOL = 1e-5
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def both_paths(vae, x, num_samples=30, chunk_size=12):
    """(fast, Pyro) log-weights from one seed, and whether both left torch's RNG at the same place."""
    results, next_draws = [], []
    for fast in (True, False):
        torch.manual_seed(7)
        results.append(importance_log_weights(vae.model, vae.guide, x, num_samples, chunk_size, fast_path=fast))
        next_draws.append(torch.rand(3, device=x.device))
    return results, torch.equal(*next_draws)


CASES = {
    "bernoulli": (dict(likelihood="bernoulli"), binary_batch),
    "bernoulli, odd pixel count": (dict(x_dim=21, likelihood="bernoulli"), binary_batch),
    "bernoulli, two hidden layers": (dict(likelihood="bernoulli", hidden=(24, 16), activation="elu"), binary_batch),
    "continuous_bernoulli": (dict(likelihood="continuous_bernoulli"), continuous_batch),
    "normal": (dict(likelihood="normal", normal_scale="pixel"), continuous_batch),
    "discretized_logistic": (dict(likelihood="discretized_logistic"), lambda n, d: (255 * continuous_batch(n, d)).round() / 255),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_same_draws_give_the_pyro_programs_log_weights(case, device):
    kwargs, data = CASES[case]
    torch.manual_seed(0)
    vae = VAE(**{"x_dim": 32, "z_dim": 3, "hidden": (24,), **kwargs}).to(device)
    x = data(9, vae.x_shape[0]).to(device)
    assert fast_path_vae(vae.model, vae.guide, "data", 1, {}) is vae
    (fast, pyro_w), same_stream = both_paths(vae, x)
    assert fast.shape == (30, 9) and fast.dtype == torch.float64
    torch.testing.assert_close(fast, pyro_w, rtol=RTOL, atol=RTOL)
    assert same_stream, "the fast path must draw exactly what the Pyro program draws"


def test_conv_vae_and_the_full_image_size_match_too():
    torch.manual_seed(0)
    conv = VAE(architecture="conv", z_dim=4, hidden=32), binary_batch(3, 784).view(3, 1, 28, 28)
    for vae, x in (conv, (VAE(z_dim=5, hidden=(64,)), binary_batch(4, 784))):
        (fast, pyro_w), same_stream = both_paths(vae, x, num_samples=6, chunk_size=4)
        torch.testing.assert_close(fast, pyro_w, rtol=RTOL, atol=RTOL)
        assert same_stream


@pytest.mark.parametrize("latent", [{}, dict(prior="vamp", pseudo_inputs=4, guide="iaf")], ids=["gaussian", "vamp+iaf"])
@pytest.mark.parametrize("block_numbers", [32 * 5, 32 * 7 * 3, 32 * 1000])
def test_blocks_of_any_size_give_the_same_weights(monkeypatch, block_numbers, latent):
    # 5 rows: blocks of one particle x 5 images (a partial last image block; the flow's context is
    # sliced with them); 21 rows: 2 particles x 9 images, a partial last particle block; 1000 rows:
    # the whole chunk at once
    torch.manual_seed(0)
    vae, x = VAE(x_dim=32, z_dim=3, hidden=(24,), **latent), binary_batch(9, 32)
    eps = draw_noise(vae, x, 11)
    whole = vae_log_weights(vae, x, eps)
    monkeypatch.setattr(fast_log_weights, "CPU_BLOCK_NUMBERS", block_numbers)
    torch.testing.assert_close(vae_log_weights(vae, x, eps), whole, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("pixels", [784, 21, 2])
def test_linear_bernoulli_identity_is_the_bernoulli_log_density(pixels):
    # float64: the identity is exact, so only rounding separates it from torch's formula
    g = torch.Generator().manual_seed(pixels)
    h = torch.rand(4, 3, 10, generator=g, dtype=torch.float64)
    weight = 8 * torch.randn(pixels, 10, generator=g, dtype=torch.float64)  # logits up to ~|50|
    bias = torch.randn(pixels, generator=g, dtype=torch.float64)
    x = torch.bernoulli(torch.full((3, pixels), 0.4, dtype=torch.float64), generator=g)
    y = 2 * x - 1
    out = torch.empty(12 * pixels, dtype=torch.float64).view(-1, pixels)
    fast = bernoulli_linear_log_prob(h, weight, bias, y @ weight, y @ bias, out)
    expected = dist.Bernoulli(logits=h @ weight.T + bias).log_prob(x).sum(-1)
    torch.testing.assert_close(fast, expected, rtol=1e-12, atol=1e-10)


def test_only_a_vaes_own_program_outside_handlers_takes_the_fast_path():
    vae, other = VAE(x_dim=8, z_dim=2, hidden=(4,)), VAE(x_dim=8, z_dim=2, hidden=(4,))
    assert fast_path_vae(vae.model, vae.guide, "data", 1, {}) is vae
    assert fast_path_vae(vae.model, other.guide, "data", 1, {}) is None
    assert fast_path_vae(kl_weighted(vae.model, 0.5), kl_weighted(vae.guide, 0.5), "data", 1, {}) is None
    assert fast_path_vae(vae.model, vae.guide, "data", 1, {"num_data": 100}) is None
    assert fast_path_vae(vae.model, vae.guide, "data", 2, {}) is None
    with poutine.scale(scale=2.0):
        assert fast_path_vae(vae.model, vae.guide, "data", 1, {}) is None


class WideGuideVAE(VAE):
    """A VAE whose guide doubles the encoder's scale: a program the fast path does not compute."""

    def guide(self, x):
        pyro.module(f"{self.name}.encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(x)
            return pyro.sample("z", dist.Normal(loc, 2 * scale).to_event(1))


def test_a_program_that_computes_something_else_fails_the_check_and_keeps_the_rng():
    torch.manual_seed(0)
    vae, x = WideGuideVAE(x_dim=16, z_dim=2, hidden=(8,)), binary_batch(5, 16)
    assert fast_path_vae(vae.model, vae.guide, "data", 1, {}) is None  # another guide: never chosen
    state = torch.get_rng_state()
    with pytest.warns(FastPathWarning, match="differs from the Pyro program"):
        assert not matches_pyro(vae, x, DataPlateIWELBO(num_particles=2))
    assert torch.equal(torch.get_rng_state(), state)
    plain = VAE(x_dim=16, z_dim=2, hidden=(8,))
    assert matches_pyro(plain, x, DataPlateIWELBO(num_particles=2))


@pytest.mark.parametrize("prior", ["standard", "vamp"])
@pytest.mark.parametrize("guide", ["gaussian", "iaf"])
def test_every_built_in_prior_and_guide_takes_the_fast_path_with_the_pyro_programs_log_weights(prior, guide):
    """The VampPrior's expanded quadratic forms and the IAF's transforms with their cached
    log-Jacobians give the Pyro program's log-weights under the same draws, to float32 rounding,
    and leave torch's RNG where the Pyro program leaves it."""
    torch.manual_seed(0)
    vae = VAE(x_dim=32, z_dim=3, hidden=(24,), prior=prior, pseudo_inputs=7, guide=guide, flow_steps=2)
    x = binary_batch(9, 32)
    assert fast_path_vae(vae.model, vae.guide, "data", 1, {}) is vae
    (fast, pyro_w), same_stream = both_paths(vae, x)
    torch.testing.assert_close(fast, pyro_w, rtol=RTOL, atol=RTOL)
    assert same_stream
