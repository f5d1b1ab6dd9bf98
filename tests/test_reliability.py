"""A run never ends in a silent wrong number or a lost run: bad input, numerical faults, kills,
untrusted checkpoints, extreme values."""

import json
import os
import signal
import subprocess
import sys
import time

import pyro
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer import SVI

from pyro_vae import VAE, ConfigError, DataError, NumericalError, TrainConfig, make_elbo
from pyro_vae.checkpoint import load_checkpoint, save_checkpoint
from pyro_vae.cli import main
from pyro_vae.train import Trainer

from .idx_files import write_dataset

LIKELIHOODS = ["bernoulli", "continuous_bernoulli", "normal"]


def small(likelihood):
    torch.manual_seed(0)
    return VAE(x_dim=6, z_dim=2, likelihood=likelihood, hidden=(8,))


def in_support(likelihood, x):
    if not torch.isfinite(x).all():
        return False
    if likelihood == "bernoulli":
        return bool(((x == 0) | (x == 1)).all())
    if likelihood == "continuous_bernoulli":
        return bool(((x >= 0) & (x <= 1)).all())
    return True


SUPPORT = {"bernoulli": [0.0, 1.0], "continuous_bernoulli": [0.0, 0.3, 1.0], "normal": [-3.0, 0.0, 0.5, 1e3]}

arbitrary_batches = st.tuples(
    st.sampled_from(LIKELIHOODS),
    st.integers(0, 4),  # batch size, 0 included
    st.sampled_from([(6,), (5,), (7,), (2, 3), ()]),  # feature shapes, only (6,) right
    st.sampled_from([torch.float32, torch.float64, torch.uint8, torch.int64]),
    st.lists(st.sampled_from([0.0, 1.0, 0.5, -1.0, 2.0, 255.0, float("nan"), float("inf"), -float("inf")]), min_size=1, max_size=8),
)
supported_batches = st.sampled_from(LIKELIHOODS).flatmap(
    lambda lik: st.tuples(st.just(lik), st.integers(1, 4), st.just((6,)), st.just(torch.float32), st.lists(st.sampled_from(SUPPORT[lik]), min_size=1, max_size=8))
)


def test_any_batch_either_trains_or_is_refused_before_the_step_with_parameters_unchanged():
    tried = {"valid": 0, "refused": 0}

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.one_of(arbitrary_batches, supported_batches))
    def check(case):
        likelihood, n, shape, dtype, values = case
        vae = small(likelihood)
        pyro.clear_param_store()
        numel = n * int(torch.tensor(shape).prod()) if shape else n
        x = torch.tensor((values * (numel // len(values) + 1))[:numel], dtype=torch.float64).reshape(n, *shape)
        x = x.to(dtype) if dtype.is_floating_point else x.nan_to_num(0, 0, 0).clamp(0, 255).to(dtype)
        before = {k: v.clone() for k, v in vae.state_dict().items()}
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.1}), make_elbo("meanfield", 2))
        if shape == (6,) and n > 0 and dtype == torch.float32 and in_support(likelihood, x):
            tried["valid"] += 1
            assert torch.isfinite(torch.tensor(svi.step(x)))
        else:
            tried["refused"] += 1
            with pytest.raises(DataError):
                svi.step(x)
            assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())

    check()
    print(f"cases tried: {tried}")
    assert tried["valid"] >= 50 and tried["refused"] >= 50


def test_data_on_another_device_is_refused(device):
    with pytest.raises(DataError, match=f"meta.*model is on {device}"):
        small("normal").to(device).model(torch.empty(3, 6, device="meta"))


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("estimator", ["trace", "meanfield", "iwae"])
def test_extreme_inputs_and_logits_give_finite_losses_and_gradients(likelihood, estimator, device):
    vae = small(likelihood).to(device)
    for bias in (1e4, -1e4, 0.0):
        with torch.no_grad():
            vae.decoder.net[-1].bias.fill_(bias)  # huge logits / means
            vae.encoder.net[-1].bias[2:].fill_(-bias)  # scales at their floor or huge
        for x in (torch.zeros(3, 6, device=device), torch.ones(3, 6, device=device)):
            vae.zero_grad()
            loss = make_elbo(estimator, 3).differentiable_loss(vae.model, vae.guide, x)
            loss.backward()
            assert torch.isfinite(loss), (bias, x[0, 0])
            assert all(torch.isfinite(p.grad).all() for p in vae.parameters() if p.grad is not None)


@pytest.fixture
def data_dir(tmp_path):
    write_dataset(tmp_path / "data", gz=True, n_train=256, n_test=64)
    return str(tmp_path / "data")


SMALL = dict(dataset="mnist", hidden=(32,), z_dim=2, batch_size=32)


def poison_decoder(trainer, bad_calls):
    """Make the decoder's output NaN on the given calls (counted from 0), like an overflow would."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] - 1 in bad_calls else output

    return trainer.vae.decoder.register_forward_hook(hook)


@pytest.mark.filterwarnings("ignore:Encountered NaN")  # Pyro's warning for the NaNs this test makes
def test_transient_nan_steps_are_skipped_counted_and_leave_parameters_finite(tmp_path, data_dir, device):
    # the eager step: a forward hook runs on every call there (a traced graph runs it once, when traced)
    config = TrainConfig(epochs=1, data_dir=data_dir, device=str(device), **SMALL, step="eager")
    trainer = Trainer(config, tmp_path / "run", progress=False)
    poison_decoder(trainer, bad_calls={2, 3, 5})
    (row,) = trainer.fit()
    assert row["skipped_steps"] == 3 and row["train_elbo"] == row["train_elbo"]  # counted, not NaN
    assert all(torch.isfinite(p).all() for p in trainer.vae.parameters())
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["skipped_steps"] == 3


@pytest.mark.filterwarnings("ignore:Encountered NaN")  # Pyro's warning for the NaNs this test makes
def test_persistent_nan_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    trainer = Trainer(TrainConfig(epochs=3, data_dir=data_dir, **{**SMALL, "batch_size": 8}, step="eager"), tmp_path / "run", progress=False)
    # decoder calls in epoch 1: its 32 steps, the test ELBO's batches, one reconstruction, one sample
    first_epoch_calls = len(trainer.train_batches) + len(trainer.test_batches) + 2
    poison_decoder(trainer, bad_calls=set(range(first_epoch_calls + 5, 10**6)))  # broken from epoch 2, step 6
    with pytest.raises(NumericalError, match="non-finite.*last good checkpoint"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert len(state["metrics"]) == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.slow
def test_a_kill_during_the_checkpoint_write_leaves_the_previous_checkpoint_and_resume_matches(tmp_path, data_dir):
    # a wide network makes the checkpoint large enough (~30 MB) to catch the write in the act
    args = ["train", "--dataset", "mnist", "--data-dir", data_dir, "--hidden", "2000", "--z-dim", "2", "--batch-size", "64", "--epochs", "2", "--no-progress", "--max-test", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "killed"
    victim = subprocess.Popen([sys.executable, "-m", "pyro_vae.cli", *args, "--run-dir", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    # wait for the second epoch's checkpoint to be half-written: a first one exists, a temp file appears
    while not ((run / "checkpoint.pt").exists() and list(run.glob(".checkpoint.pt.*.tmp"))):
        assert time.monotonic() < deadline and victim.poll() is None, "never caught a checkpoint write"
        time.sleep(0.001)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    state = load_checkpoint(run / "checkpoint.pt")  # complete and loadable, never half-written
    assert len(state["metrics"]) in (1, 2)
    subprocess.run([sys.executable, "-m", "pyro_vae.cli", "train", "--resume", "--run-dir", str(run), "--data-dir", data_dir, "--no-progress"], env=env, check=True, capture_output=True, timeout=300)
    assert not list(run.glob(".*.tmp"))
    subprocess.run([sys.executable, "-m", "pyro_vae.cli", *args, "--run-dir", str(tmp_path / "straight")], env=env, check=True, capture_output=True, timeout=300)
    read = lambda p: (p / "metrics.jsonl").read_text()
    assert read(run) == read(tmp_path / "straight")


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    torch.save({"model": RunsACommand(marker)}, path)  # torch.save pickles: a real malicious file
    with pytest.raises(ConfigError, match="not a safe pyro-vae checkpoint"):
        load_checkpoint(path)
    assert main(["evaluate", str(path.parent)]) == 2 and main(["sample", str(path.parent)]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists()
    torch.load(path, weights_only=False)  # unsafe loading does run the command: the test is real
    assert marker.exists()


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    save_checkpoint({"x": torch.ones(1000)}, tmp_path / "c.pt")
    (tmp_path / "c.pt").write_bytes((tmp_path / "c.pt").read_bytes()[:500])
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "c.pt")


def test_cli_resume_with_an_incompatible_configuration_exits_2_and_keeps_the_run(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "mnist", "--data-dir", data_dir, "--hidden", "32", "--z-dim", "2", "--epochs", "1", "--no-progress", "--run-dir", str(run)]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["train", "--resume", "--run-dir", str(run), "--z-dim", "5", "--data-dir", data_dir, "--no-progress"]) == 2
    assert "different configuration" in capsys.readouterr().err
    assert main(["train", "--resume", "--run-dir", str(run), "--normal-scale", "pixel", "--data-dir", data_dir, "--no-progress"]) == 2
    assert "--normal-scale is for --likelihood normal; this run's likelihood is bernoulli" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
