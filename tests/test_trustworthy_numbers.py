"""Numbers a user reads: the KL weight stays in the training objective, several VAEs share one
process, importance-sampled log p(x) carries its own reliability check, and evaluation is a
library call that reports bits/dim only where log p(x) is a probability."""

import json
import math
import warnings

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyro_vae import (
    VAE,
    ImportanceSamplingWarning,
    TrainConfig,
    evaluate_model,
    kl_weighted,
    load_run,
    log_marginal_likelihood,
    make_elbo,
)
from pyro_vae.cli import main
from pyro_vae.evaluate import mean_elbo
from pyro_vae.linear_gaussian import linear_gaussian_exact, linear_gaussian_vae
from pyro_vae.reference import reference_elbo
from pyro_vae.train import Trainer

from .conftest import binary_batch, continuous_batch
from .idx_files import write_dataset

TINY = dict(dataset="mnist", hidden=(32,), batch_size=32, z_dim=2, max_test=64)


@pytest.fixture
def data_dir(tmp_path):
    write_dataset(tmp_path / "data", gz=False, n_train=256, n_test=64)
    return str(tmp_path / "data")


# --- 1. the KL weight belongs to the objective --------------------------------------------


def test_log_px_is_that_of_the_model_whatever_weight_surrounds_it():
    # the linear-Gaussian model's exact log p(x) is the yardstick; a KL weight of 0.5 or 0 around
    # model and guide must not change the estimate (it used to move it, even above the exact value)
    vae, x, exact = linear_gaussian_vae(seed=2)
    estimates = []
    for weight in (1.0, 0.5, 0.0):
        torch.manual_seed(0)
        ll = log_marginal_likelihood(kl_weighted(vae.model, weight), kl_weighted(vae.guide, weight), x, num_samples=2000, warn=False)
        estimates.append(ll.log_px.sum().item())
    assert estimates[0] == estimates[1] == estimates[2]
    assert estimates[0] <= exact + 4 * math.sqrt(x.shape[0]) * 0.01  # a lower bound in expectation; 0.01 >> its s.e. per point


def test_the_logged_test_elbo_during_annealing_is_the_elbo_of_the_saved_model(tmp_path, data_dir, device):
    config = TrainConfig(**TINY, data_dir=data_dir, epochs=1, kl_anneal_epochs=4, device=str(device))
    trainer = Trainer(config, tmp_path / "run", progress=False)
    metrics = trainer.fit()
    assert metrics[-1]["kl_weight"] == pytest.approx(0.25)  # training ended mid-anneal
    run = load_run(tmp_path / "run", str(device))
    fresh = mean_elbo(run.vae, run.test_split().eval_batches(), config.seed)
    assert metrics[-1]["test_elbo"] == fresh  # the same model, the same draws: the same number
    # and the unweighted ELBO really differs from the weighted one the old code logged
    with torch.no_grad():
        x = next(run.test_split().eval_batches())[0]
        torch.manual_seed(0)
        weighted = reference_elbo(run.vae, x, 64, kl_weight=0.25).mean().item()
        torch.manual_seed(0)
        unweighted = reference_elbo(run.vae, x, 64).mean().item()
    assert weighted > unweighted


def test_pyro_vae_evaluate_reproduces_the_last_logged_test_elbo_of_a_run_ended_mid_anneal(tmp_path, data_dir):
    run = tmp_path / "run"
    argv = ["train", "--dataset", "mnist", "--hidden", "32", "--batch-size", "32", "--z-dim", "2", "--epochs", "2", "--kl-anneal-epochs", "5", "--data-dir", data_dir, "--run-dir", str(run), "--no-progress"]
    assert main(argv) == 0
    assert main(["evaluate", str(run), "--num-samples", "30", "--device", "cpu", "--no-progress", "--idata-points", "80"]) == 0
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert logged["kl_weight"] == pytest.approx(0.4) and evaluation["test_elbo"] == logged["test_elbo"]


def test_the_model_is_never_weighted_and_a_nan_weight_is_refused():
    vae = VAE(x_dim=6, z_dim=2, hidden=(5,))
    x = binary_batch(4, 6)
    assert poutine.trace(vae.model).get_trace(x).nodes["z"]["scale"] == 1.0
    assert not hasattr(vae, "kl_scale")
    for bad in (float("nan"), -0.5, float("inf"), True, "0.5"):
        with pytest.raises(ValueError, match="KL weight"):
            kl_weighted(vae.model, bad)


# --- 2. several VAEs in one process ----------------------------------------------------------


def test_two_vaes_each_train_with_plain_svi_and_no_clear_param_store():
    torch.manual_seed(0)
    first, second = VAE(x_dim=10, z_dim=2, hidden=(8,)), VAE(x_dim=10, z_dim=2, hidden=(8,))
    assert first.name != second.name
    x = binary_batch(16, 10)
    for vae in (first, second):
        before = [p.detach().clone() for p in vae.parameters()]
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        for _ in range(5):
            svi.step(x)
        assert all(not torch.equal(b, p) for b, p in zip(before, vae.parameters())), f"{vae.name} did not train"


def test_the_trainer_leaves_the_users_param_store_alone(tmp_path, data_dir):
    pyro.param("users_own", torch.tensor(3.0))
    Trainer(TrainConfig(**TINY, data_dir=data_dir, epochs=1), tmp_path / "run", progress=False).fit()
    assert pyro.param("users_own").item() == 3.0


def test_a_name_clash_in_the_param_store_is_refused_with_the_fix():
    x = binary_batch(4, 6)
    VAE(x_dim=6, z_dim=2, hidden=(5,), name="mine").guide(x)
    with pytest.raises(ValueError, match="another name=.*clear_param_store"):
        VAE(x_dim=6, z_dim=2, hidden=(5,), name="mine").guide(x)


# --- 3. log p(x) says when it cannot be trusted ---------------------------------------------


def test_a_poor_proposal_comes_with_k_hat_and_a_warning():
    vae, x, exact = linear_gaussian_vae(guide_scale_factor=0.35, guide_loc_factor=0.6, seed=1, num_data=8)
    torch.manual_seed(0)
    with pytest.warns(ImportanceSamplingWarning, match="k-hat"):
        ll = log_marginal_likelihood(vae.model, vae.guide, x, num_samples=1000)
    assert ll.pareto_k.shape == (8,) and ll.unreliable_share() > 0.5
    # the reported standard errors are too small: the truth is several of them away
    exact_per_point, _ = linear_gaussian_exact(vae, x)
    z = ((exact_per_point - ll.log_px) / ll.standard_error).abs()
    assert z.max() > 3
    # a good proposal gives no warning
    good, x, _ = linear_gaussian_vae(guide_scale_factor=1.2, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImportanceSamplingWarning)
        assert log_marginal_likelihood(good.model, good.guide, x, num_samples=1000).unreliable_share() == 0


# --- 4. evaluation as a library --------------------------------------------------------------


def test_evaluate_model_reports_bits_per_dim_only_for_a_probability(tmp_path, data_dir, device):
    from pyro_vae.data import DeviceBatches, load_dataset

    data = load_dataset("mnist", data_dir)
    for likelihood, binarize, kind in (("bernoulli", "dynamic", "binary"), ("normal", "none", "density")):
        torch.manual_seed(0)
        vae = VAE(likelihood=likelihood, hidden=(16,), z_dim=2).to(device)
        test = DeviceBatches(data.test_images, data.test_labels, 16, binarization=binarize, shuffle=False,
                             device=device)
        result = evaluate_model(vae, test, seed=0, num_samples=20, chunk_size=7, keep_log_weights=40)
        assert result.data_kind == kind and result.test_images == 64
        assert result.log_weights.shape == (20, 40)  # beyond the first batch of 16
        summary = result.summary()
        if kind == "binary":
            assert summary["bits_per_dim"] == pytest.approx(-summary["test_log_likelihood"] / (784 * math.log(2)))
        else:
            assert summary["bits_per_dim"] is None
        json.dumps(summary, allow_nan=False)


# --- 9. the reference ELBO is independent and covers every likelihood -----------------------


@pytest.mark.parametrize("architecture", ["mlp", "conv"])
@pytest.mark.parametrize("likelihood,scale", [("bernoulli", None), ("continuous_bernoulli", None), ("normal", 0.7), ("normal", "shared"), ("normal", "pixel"), ("normal", "decoder"),
                                              ("discretized_logistic", None), ("discretized_normal", None), ("discretized_logistic_mixture", None)])
def test_the_pyro_elbo_equals_the_hand_written_one_under_the_same_draws(architecture, likelihood, scale, device):
    torch.manual_seed(4)
    kwargs = dict(normal_scale=scale) if scale is not None else dict(mixture_components=3)
    hidden = (8,) if architecture == "conv" else (12,)
    vae = VAE(x_dim=784, z_dim=3, likelihood=likelihood, architecture=architecture, hidden=hidden, **kwargs)
    vae = vae.double().to(device)
    with torch.no_grad():  # learned scales away from their initial value, so a mix-up would show
        for p in vae.likelihood.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = continuous_batch(3, 784).double().to(device)
    if likelihood == "bernoulli":
        x = torch.bernoulli(x)
    if likelihood.startswith("discretized"):
        x = (x * 255).round() / 255
    if architecture == "conv":
        x = x.reshape(3, 1, 28, 28)
    elbo = make_elbo("meanfield", 5)
    pyro.set_rng_seed(7)
    ours = elbo.loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(7)
    theirs = -reference_elbo(vae, x, 5).sum().item()
    assert ours == pytest.approx(theirs, rel=1e-10)
