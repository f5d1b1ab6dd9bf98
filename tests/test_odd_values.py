"""Issue 24, item 12: an odd value (zero, negative, fractional, a string, None, a truthy string) is
refused by the library with its own one-line error naming the argument; numpy scalars are
accepted everywhere a Python number is."""

import json

import numpy as np
import pytest
import torch

from pyro_vae import VAE, ConfigError, TrainConfig, kl_weighted, make_elbo
from pyro_vae.data import DeviceBatches
from pyro_vae.evaluate import evaluate_model
from pyro_vae.kl_weight import elbo_loss

from .conftest import binary_batch


@pytest.fixture
def vae():
    return VAE(x_dim=6, z_dim=2, hidden=(4,))


def images(n=4):
    return torch.zeros(n, 28, 28, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64)


@pytest.mark.parametrize("kwargs, named", [
    (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
    (dict(batch_size=-1), "batch_size must be an integer >= 1, got -1"),
    (dict(batch_size=2.5), "batch_size must be an integer >= 1, got 2.5"),
])
def test_the_model_refuses_an_odd_number_of_draws(vae, kwargs, named):
    with pytest.raises(ConfigError, match=named):
        vae.model(**kwargs)


@pytest.mark.parametrize("kwargs, named", [
    (dict(subsample_size=0), "subsample_size must be an integer from 1 to 5, got 0"),
    (dict(subsample_size=6), "subsample_size must be an integer from 1 to 5, got 6"),
    (dict(num_data=4.5), r"num_data must be an integer >= 1, got 4.5"),
    (dict(num_data="9"), "num_data must be an integer >= 1, got '9'"),
])
@pytest.mark.parametrize("site", ["model", "guide"])
def test_the_data_plate_refuses_odd_sizes(vae, kwargs, named, site):
    with pytest.raises(ConfigError, match=named):
        getattr(vae, site)(binary_batch(5, 6), **kwargs)


@pytest.mark.parametrize("particles", ["2", 2.5, 0, True])
def test_make_elbo_refuses_a_particle_count_that_is_not_a_whole_number(particles):
    with pytest.raises(ConfigError, match=f"num_particles must be an integer >= 1, got {particles!r}"):
        make_elbo("trace", particles)


@pytest.mark.parametrize("kwargs, named", [
    (dict(device=None), "device must be a name .* got None"),
    (dict(download="no"), "download must be True or False, got 'no'"),
])
def test_train_config_refuses_a_setting_of_the_wrong_type(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        TrainConfig(**kwargs).validate()


@pytest.mark.parametrize("seed", [2**64, -1, 1.5])
def test_evaluate_refuses_a_seed_torch_cannot_take_or_would_wrap(vae, seed):
    batches = DeviceBatches(*images(), 2)
    with pytest.raises(ConfigError, match=f"seed must be an integer from 0 to {2**63 - 1}, got {seed!r}"):
        evaluate_model(VAE(z_dim=2, hidden=(4,)), batches, seed, num_samples=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_device_batches_refuse_a_gpu_this_machine_lacks():
    with pytest.raises(ConfigError, match="no CUDA GPU is available"):
        DeviceBatches(*images(), 2, device="cuda")


def test_numpy_scalars_are_accepted_wherever_python_numbers_are(vae):
    config = TrainConfig(z_dim=np.int64(5), hidden=[np.int64(3)], lr=np.float32(0.5), kl_anneal_epochs=np.float64(2),
                         seed=np.uint8(7))
    config.validate()
    saved = json.loads(json.dumps(config.to_dict()))  # config.json holds them as plain numbers
    assert (saved["z_dim"], saved["hidden"], saved["lr"], saved["seed"]) == (5, [3], 0.5, 7)
    assert type(config.z_dim) is int and type(config.lr) is float
    batches = DeviceBatches(*images(), np.int64(2), seed=np.int64(1))
    assert len(batches) == 2
    x = binary_batch(5, 6)
    elbo = make_elbo("trace", np.int64(2))
    half = elbo_loss(elbo, vae.model, vae.guide, x, np.float32(0.5), num_data=np.int64(10))
    assert torch.isfinite(half)
    assert kl_weighted(vae.model, np.float64(1.0)) == vae.model  # weight 1: the model itself
    assert vae.model(x, subsample_size=np.int64(2)).shape == (2, 6)
