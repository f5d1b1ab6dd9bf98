"""Training runs: outputs, exact resume (in process and after a real SIGKILL), bad settings."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyro_vae import ConfigError, TrainConfig, load_run
from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.train import Trainer, train

from .idx_files import write_dataset

SMALL = dict(dataset="mnist", hidden=(32,), z_dim=2, batch_size=32, max_test=64)


@pytest.fixture
def data_dir(tmp_path):
    write_dataset(tmp_path / "data", gz=True, n_train=320, n_test=64)
    return str(tmp_path / "data")


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_run_leaves_config_metrics_checkpoint_and_figures(tmp_path, data_dir, device):
    config = TrainConfig(epochs=2, data_dir=data_dir, device=str(device), **SMALL)
    metrics = train(config, tmp_path / "run", progress=False)
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "elbo.png", "reconstructions.png", "samples.png", "manifold.png", "latent_scatter.png"} <= files
    assert read_metrics(tmp_path / "run") == metrics and [m["epoch"] for m in metrics] == [1, 2]
    assert all(m["skipped_steps"] == 0 and m["test_elbo"] < 0 for m in metrics)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["z_dim"] == 2
    run = load_run(tmp_path / "run", str(device))
    config, vae, saved = run.config, run.vae, run.metrics
    assert config.z_dim == 2 and saved == metrics and not vae.training and vae.prior_loc.device == device


def read_times(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "times.jsonl").read_text().splitlines()]


def test_each_epochs_wall_time_is_kept_beside_the_metrics_and_survives_a_resume(tmp_path, data_dir):
    """``times.jsonl`` holds one line per saved epoch (seconds between the epoch's start and the end of
    its save, as a clock outside the trainer bounds them); ``metrics.jsonl`` stays free of the clock;
    a resume keeps the earlier lines and drops any past the checkpoint's epochs."""
    config = dict(data_dir=data_dir, **SMALL)
    before = time.perf_counter()
    train(TrainConfig(epochs=1, **config), tmp_path / "run", progress=False)
    outside = time.perf_counter() - before
    (first,) = read_times(tmp_path / "run")
    assert first["epoch"] == 1 and 0 < first["seconds"] <= outside
    assert (first["threads"], first["device"]) == (torch.get_num_threads(), "cpu")
    assert all(set(row) & {"seconds", "threads", "device"} == set() for row in read_metrics(tmp_path / "run"))
    with (tmp_path / "run" / "times.jsonl").open("a") as f:  # a line for an epoch the checkpoint does not hold
        f.write(json.dumps({"epoch": 2, "seconds": 1e9, "threads": 1, "device": "cpu"}) + "\n")
    train(TrainConfig(epochs=3, **config), tmp_path / "run", resume=True, progress=False)
    times = read_times(tmp_path / "run")
    assert times[0] == first and [row["epoch"] for row in times] == [1, 2, 3]
    assert all(0 < row["seconds"] < 1e9 for row in times)


def test_a_damaged_times_file_is_refused_at_resume_with_the_fix_and_nothing_changed(tmp_path, data_dir):
    config = dict(data_dir=data_dir, **SMALL)
    train(TrainConfig(epochs=1, **config), tmp_path / "run", progress=False)
    times = tmp_path / "run" / "times.jsonl"
    times.write_text("not json\n")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="times.jsonl is damaged .*put the original back, or delete it to go on"):
        train(TrainConfig(epochs=2, **config), tmp_path / "run", resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before
    times.unlink()  # the way out it names
    train(TrainConfig(epochs=2, **config), tmp_path / "run", resume=True, progress=False)
    assert [row["epoch"] for row in read_times(tmp_path / "run")] == [2]


@pytest.mark.slow
def test_training_improves_the_elbo(tmp_path, data_dir):
    metrics = train(TrainConfig(epochs=4, data_dir=data_dir, **SMALL), tmp_path / "run", progress=False)
    assert metrics[-1]["train_elbo"] > metrics[0]["train_elbo"] + 10


@pytest.mark.slow
def test_resumed_run_repeats_the_uninterrupted_run_exactly(tmp_path, data_dir):
    config = dict(data_dir=data_dir, estimator="trace", num_particles=2, kl_anneal_epochs=2, **SMALL)
    straight = train(TrainConfig(epochs=3, **config), tmp_path / "straight", progress=False)
    train(TrainConfig(epochs=1, **config), tmp_path / "resumed", progress=False)
    resumed = train(TrainConfig(epochs=3, **config), tmp_path / "resumed", resume=True, progress=False)
    assert resumed == straight  # every float, to the last bit, on CPU
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt")["model"] for name in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def cli(*args, env=None):
    return [sys.executable, "-m", "pyro_vae.cli", *args]


@pytest.mark.slow
def test_training_killed_by_sigkill_resumes_to_the_same_metrics(tmp_path, data_dir):
    args = ["train", "--dataset", "mnist", "--data-dir", data_dir, "--hidden", "64", "--z-dim", "4", "--batch-size", "16", "--epochs", "4", "--no-progress", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cli(*args, "--run-dir", str(tmp_path / "straight")), env=env, check=True, capture_output=True, timeout=300)
    victim = subprocess.Popen(cli(*args, "--run-dir", str(tmp_path / "killed")), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics_file = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 1):
        assert time.monotonic() < deadline and victim.poll() is None, "the run never wrote its first epoch"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    done_before_kill = len(read_metrics(tmp_path / "killed"))
    assert 1 <= done_before_kill < 4, "the kill must land mid-run for this test to mean anything"
    subprocess.run(cli("train", "--resume", "--run-dir", str(tmp_path / "killed"), "--data-dir", data_dir, "--no-progress"), env=env, check=True, capture_output=True, timeout=300)
    assert read_metrics(tmp_path / "killed") == read_metrics(tmp_path / "straight")


def test_an_existing_run_folder_is_never_overwritten(tmp_path, data_dir):
    train(TrainConfig(epochs=1, data_dir=data_dir, **SMALL), tmp_path / "run", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(ConfigError, match="already exists.*--resume"):
        Trainer(TrainConfig(epochs=1, data_dir=data_dir, **SMALL), tmp_path / "run", progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_resume_refuses_a_different_model_configuration(tmp_path, data_dir):
    train(TrainConfig(epochs=1, data_dir=data_dir, **SMALL), tmp_path / "run", progress=False)
    changed = {**SMALL, "z_dim": 3}
    with pytest.raises(ConfigError, match="z_dim: 2 in the checkpoint, 3 now"):
        Trainer(TrainConfig(epochs=2, data_dir=data_dir, **changed), tmp_path / "run", resume=True, progress=False)


def test_a_likelihood_setting_is_part_of_the_run_only_for_the_likelihood_that_reads_it():
    identity = lambda **settings: TrainConfig(**settings).identity()  # noqa: E731
    assert identity(likelihood="bernoulli", mixture_components=3, normal_scale=0.5) == identity(likelihood="bernoulli")
    assert identity(likelihood="normal", mixture_components=3) == identity(likelihood="normal")
    assert identity(likelihood="normal", normal_scale=0.5) != identity(likelihood="normal")
    assert identity(likelihood="discretized_logistic_mixture", mixture_components=3) != identity(likelihood="discretized_logistic_mixture")
    assert identity(likelihood="discretized_logistic_mixture", normal_scale="pixel") == identity(likelihood="discretized_logistic_mixture")


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"z_dim": 0}, "z_dim"),
        ({"lr": -1.0}, "learning rate"),
        ({"epochs": 0}, "epochs"),
        ({"estimator": "renyi"}, "cannot train"),
        ({"likelihood": "bernoulli", "binarize": "none"}, "binarize"),
        ({"likelihood": "normal", "normal_scale": "sometimes"}, "normal scale"),
    ],
)
def test_impossible_settings_are_refused_before_anything_is_written(tmp_path, settings, match):
    with pytest.raises(ValueError, match=match):
        Trainer(TrainConfig(**settings), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_run_killed_before_its_first_checkpoint_can_be_started_again(tmp_path, data_dir):
    config = TrainConfig(epochs=1, data_dir=data_dir, **SMALL)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config.to_dict()))  # all such a run leaves behind
    with pytest.raises(ConfigError, match="no checkpoint yet.*without --resume"):
        Trainer(config, run, resume=True, progress=False)
    assert len(train(config, run, progress=False)) == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config.to_dict(), "z_dim": 3}))  # a different run's
    with pytest.raises(ConfigError, match="already exists"):
        Trainer(config, other, progress=False)
