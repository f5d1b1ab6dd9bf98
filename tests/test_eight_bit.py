"""8-bit pixels: the discretized likelihoods train on real images and report log P(x) in bits/dim;
density likelihoods report a dequantized bound in the same units; the command line does both."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from pyro_vae import VAE, TrainConfig, evaluate_model, log_marginal_likelihood
from pyro_vae.cli import main
from pyro_vae.data import SYSTEM_DATA_DIRS, DeviceBatches, load_dataset
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.train import Trainer

from .idx_files import write_dataset

DEBIAN = SYSTEM_DATA_DIRS["fashion_mnist"][0]


@pytest.mark.slow
@pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(), reason="Debian's dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("likelihood", ["discretized_logistic", "discretized_normal", "discretized_logistic_mixture"])
def test_training_a_discretized_likelihood_improves_its_test_log_probability_on_fashion_mnist(tmp_path, likelihood):
    torch.manual_seed(0)
    config = TrainConfig(likelihood=likelihood, mixture_components=2, hidden=(64,), z_dim=8, epochs=1, max_train=2048, max_test=64, batch_size=64, lr=3e-3)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    x = trainer.test_batches.full()

    def log_p():
        torch.manual_seed(1)
        return log_marginal_likelihood(trainer.vae.model, trainer.vae.guide, x, num_samples=50, warn=False)

    before = log_p()
    trainer.fit()
    after = log_p()
    gain = (after.log_px - before.log_px).mean().item()
    se = (after.log_px - before.log_px).std().item() / math.sqrt(x.shape[0])
    assert gain > 5 * se and gain > 100, (before.mean(), after.mean())  # nats per image
    assert -after.mean() / (784 * math.log(2)) < 8  # fewer bits per pixel than storing the raw byte


def test_density_likelihoods_get_a_dequantized_bound_and_no_raw_bits_per_dim(tmp_path):
    write_dataset(tmp_path, gz=False, n_train=64, n_test=32)
    data = load_dataset("mnist", tmp_path)
    test = DeviceBatches(data.test_images, data.test_labels, 16, binarization="none", shuffle=False)
    torch.manual_seed(0)
    result = evaluate_model(VAE(likelihood="normal", normal_scale="pixel", hidden=(16,), z_dim=2), test, seed=0, num_samples=20)
    summary = result.summary()
    assert summary["data_kind"] == "density" and summary["bits_per_dim"] is None
    assert result.dequantized.shape == (32,)
    assert summary["dequantized_bits_per_dim"] == pytest.approx(-summary["dequantized_log_likelihood"] / (784 * math.log(2)))
    # a log-probability of 8-bit data: never above 0 nats
    assert summary["dequantized_log_likelihood"] < 0
    discrete = evaluate_model(VAE(likelihood="discretized_logistic", hidden=(16,), z_dim=2), test, seed=0, num_samples=20).summary()
    assert discrete["data_kind"] == "8bit" and discrete["dequantized_log_likelihood"] is None
    assert discrete["bits_per_dim"] == pytest.approx(-discrete["test_log_likelihood"] / (784 * math.log(2)))


def test_dequantized_training_batches_lie_inside_their_cells():
    images = torch.tensor([[[0, 255], [7, 128]]], dtype=torch.uint8).expand(50, 2, 2).contiguous()
    batches = DeviceBatches(images, torch.zeros(50, dtype=torch.int64), 50, binarization="dequantize", flatten=True)
    (x, _), = list(batches.epoch(0))
    k = images.flatten(1).float()
    assert torch.all((x >= k / 256) & (x < (k + 1) / 256))
    assert torch.equal(batches.levels(), k / 255)
    (again, _), = list(batches.epoch(0))
    assert torch.equal(x, again)  # a function of (seed, epoch)


@pytest.mark.slow
def test_cli_trains_and_evaluates_a_discretized_likelihood(tmp_path, capsys):
    write_dataset(tmp_path / "data", gz=False, n_train=128, n_test=32)
    run = tmp_path / "run"
    base = ["--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--hidden", "16", "--z-dim", "2", "--batch-size", "32", "--no-progress"]
    assert main(["train", *base, "--likelihood", "discretized_logistic_mixture", "--mixture-components", "2", "--epochs", "1", "--run-dir", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["binarize"] == "none"
    assert main(["evaluate", str(run), "--num-samples", "10", "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "bits/dim on 8-bit pixels" in out
    assert main(["train", *base, "--likelihood", "discretized_normal", "--binarize", "dequantize", "--run-dir", str(tmp_path / "bad")]) == 2
    assert "--binarize none" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("binarization", ["dynamic", "static", "threshold", "dequantize"])
@pytest.mark.parametrize("likelihood", ["discretized_logistic", "discretized_normal", "discretized_logistic_mixture"])
def test_discretized_likelihoods_refuse_pixels_that_are_not_8_bit_levels(likelihood, binarization):
    # binarized pixels are levels 0 and 255 of no 8-bit image: scoring them would label a
    # binary-data number "bits/dim on 8-bit pixels"
    with pytest.raises(DataError, match="--binarize none"):
        TrainConfig(likelihood=likelihood, binarize=binarization).validate()


@pytest.mark.parametrize("components", [0, -1, 101, 10**20, True, 2.5, "3"])
def test_mixture_components_out_of_range_are_refused_before_any_network_is_built(components):
    with pytest.raises(ConfigError, match="from 1 to 100"):
        VAE(likelihood="discretized_logistic_mixture", mixture_components=components)


def test_mixture_components_accept_numpy_and_python_integers():
    assert VAE(likelihood="discretized_logistic_mixture", mixture_components=np.int64(3), hidden=(8,)).likelihood.components == 3


MEASURE_STEP = """
import resource, sys, torch
torch.set_num_threads(1)
from pyro_vae import VAE, make_elbo
from pyro_vae.memory import step_memory_bytes
likelihood, components, particles, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
vae = VAE(likelihood=likelihood, mixture_components=components, hidden=(16,), z_dim=2)
x = torch.randint(0, 256, (batch, 784), generator=torch.Generator().manual_seed(0)).float() / 255
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
make_elbo("meanfield", particles).differentiable_loss(vae.model, vae.guide, x).backward()
print(step_memory_bytes(vae, particles, batch), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.slow
@pytest.mark.parametrize("likelihood,components", [("discretized_logistic", 1), ("discretized_normal", 1), ("discretized_logistic_mixture", 10)])
def test_the_step_memory_estimate_covers_what_a_discretized_step_takes(likelihood, components):
    # the guard that refuses a step too large for the machine must not undercount: measured as the
    # peak resident memory a real process adds over one loss and backward (32 draws x 64 images)
    done = subprocess.run([sys.executable, "-c", MEASURE_STEP, likelihood, str(components), "32", "64"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    estimate, measured = map(int, done.stdout.split())
    assert measured < 1.5 * estimate, (measured / 2**20, estimate / 2**20)
