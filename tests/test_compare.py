"""compare_estimators reports numbers that agree with the theory of the estimators it compares.

Tolerances are Z standard errors. For a mean over R draws the standard error is sd / sqrt(R); for
a sample standard deviation over R draws, sd(log std) ~ 1 / sqrt(2 (R - 1)) (normal theory; the
summed losses here are close to normal, excess kurtosis below 0.6, which widens it by < 15%).
"""

import csv
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread
from torch.distributions import MultivariateNormal, kl_divergence

import pyro_vae.data
from pyro_vae import VAE, ConfigError
from pyro_vae.compare import compare_estimators, format_table, gradient_stats, plot_comparison, write_csv
from pyro_vae.linear_gaussian import linear_gaussian_vae

from .conftest import binary_batch
from .idx_files import write_dataset

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "compare_estimators.py"
Z = 4.0
REPEATS = 200
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def by_key(rows):
    return {(row["estimator"], row["num_particles"]): row for row in rows}


def log_std_se(repeats):
    """Standard error of the log of a sample standard deviation over ``repeats`` draws."""
    return 1 / math.sqrt(2 * (repeats - 1))


@pytest.fixture(scope="module")
def binary_rows():
    """An untrained Bernoulli VAE on 5 binary datapoints, K = 1 and 16."""
    torch.manual_seed(0)
    vae = VAE(x_dim=12, z_dim=3, hidden=(16,))
    return by_key(compare_estimators(vae, binary_batch(5, 12), ("trace", "meanfield", "reference"), (1, 16), REPEATS))


@pytest.fixture(scope="module")
def linear_gaussian():
    """PPCA with a guide off the posterior, and the rows of all four estimators at K = 1..64."""
    vae, x, log_px = linear_gaussian_vae()
    torch.manual_seed(0)
    rows = compare_estimators(vae, x, particles=(1, 4, 16, 64), repeats=100, exact_log_px=log_px)
    return vae, x, log_px, rows


def kl_to_posterior(vae, x):
    """``KL(q(z|x) || p(z|x))`` summed over x, the posterior built from the decoder's W, b:
    ``p(z|x) = N(S W^T (x - b) / s^2, S)`` with ``S = (I + W^T W / s^2)^-1``."""
    with torch.no_grad():
        w, b = vae.decoder.net[0].weight, vae.decoder.net[0].bias
        s2 = vae.likelihood.scale() ** 2
        cov = torch.linalg.inv(torch.eye(w.shape[1], dtype=w.dtype) + w.T @ w / s2)
        posterior = MultivariateNormal((x - b) @ w @ cov / s2, cov)
        loc, scale = vae.encoder(x)
        return kl_divergence(MultivariateNormal(loc, scale_tril=torch.diag_embed(scale)), posterior).sum().item()


def test_rows_hold_every_statistic_and_leave_no_gradients():
    vae, x, log_px = linear_gaussian_vae()
    rows = compare_estimators(vae, x, ("trace", "renyi"), (1, 2), repeats=3)
    assert [(r["estimator"], r["num_particles"]) for r in rows] == [("trace", 1), ("trace", 2), ("renyi", 1), ("renyi", 2)]
    for row in rows:
        assert "gap_to_log_px" not in row
        assert row["repeats"] == 3 and row["seconds_per_step"] > 0
        assert row["bound_per_datapoint"] == pytest.approx(-row["loss_mean"] / 8)
        assert row["encoder_grad_variance"] > 0 and row["decoder_grad_variance"] > 0
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
    assert all(p.grad is None for p in vae.parameters())


def test_bad_arguments_are_refused_before_any_work():
    vae, x, _ = linear_gaussian_vae()
    with pytest.raises(ConfigError, match="unknown estimator 'elbo'"):
        compare_estimators(vae, x, ("trace", "elbo"))
    with pytest.raises(ConfigError, match="repeats"):
        compare_estimators(vae, x, repeats=1)


def test_the_caller_seeds_and_nothing_is_reseeded_inside():
    vae, x, _ = linear_gaussian_vae()
    means = []
    for seed in (3, 3, None):
        if seed is not None:
            torch.manual_seed(seed)
        means.append([r["loss_mean"] for r in compare_estimators(vae, x, ("meanfield", "reference"), (1,), repeats=4)])
    assert means[0] == means[1] != means[2]


def test_gradient_stats_are_the_mean_variance_and_rainforth_snr():
    grads = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, -2.0]], dtype=torch.float64)
    variance, snr = gradient_stats(grads)
    assert variance == pytest.approx((2.0 + 0.0 + 8.0) / 3)
    assert snr == pytest.approx((2.0 / math.sqrt(2.0) + 0.0) / 2)  # the always-zero parameter is left out


def test_meanfield_loss_varies_less_than_trace(binary_rows):
    # same expectation; the analytic KL removes the Monte Carlo noise of log p(z) - log q(z|x)
    ratio = binary_rows["trace", 1]["loss_std"] / binary_rows["meanfield", 1]["loss_std"]
    assert math.log(ratio) > Z * math.sqrt(2) * log_std_se(REPEATS), ratio


@pytest.mark.parametrize("name", ["trace", "meanfield", "reference"])
def test_loss_std_falls_like_one_over_sqrt_k(binary_rows, name):
    # an average of K i.i.d. draws: std(K=16) / std(K=1) = 1/4; the log of a ratio of two
    # independent sample stds has standard error sqrt(2) * log_std_se
    ratio = binary_rows[name, 16]["loss_std"] / binary_rows[name, 1]["loss_std"]
    assert abs(math.log(ratio / 0.25)) <= Z * math.sqrt(2) * log_std_se(REPEATS), ratio


@pytest.mark.parametrize("k", [1, 16])
def test_meanfield_and_reference_are_the_same_estimator(binary_rows, k):
    a, b = binary_rows["meanfield", k], binary_rows["reference", k]
    se = math.hypot(a["loss_std"], b["loss_std"]) / math.sqrt(REPEATS)
    assert abs(a["loss_mean"] - b["loss_mean"]) <= Z * se


def test_every_bound_is_below_log_px(linear_gaussian):
    *_, rows = linear_gaussian
    for row in rows:
        assert row["gap_to_log_px"] >= -Z * row["bound_se"], row


def test_importance_weighted_gap_shrinks_as_k_grows(linear_gaussian):
    # Burda et al. 2015, Theorem 1: the IWAE bound is non-decreasing in K
    *_, rows = linear_gaussian
    iwae = [r for r in rows if r["estimator"] == "iwae"]
    for a, b in zip(iwae, iwae[1:]):
        assert a["gap_to_log_px"] - b["gap_to_log_px"] >= -Z * math.hypot(a["bound_se"], b["bound_se"])
    first, last = iwae[0], iwae[-1]
    assert first["gap_to_log_px"] - last["gap_to_log_px"] > Z * math.hypot(first["bound_se"], last["bound_se"])


@pytest.mark.parametrize("name", ["trace", "meanfield", "reference"])
def test_elbo_gap_is_the_kl_to_the_posterior_whatever_k(linear_gaussian, name):
    # log p(x) - ELBO = KL(q(z|x) || p(z|x)); more particles only reduce the noise
    vae, x, _, rows = linear_gaussian
    kl = kl_to_posterior(vae, x) / x.shape[0]
    assert kl > 0.5
    for row in rows:
        if row["estimator"] == name:
            assert abs(row["gap_to_log_px"] - kl) <= Z * row["bound_se"], row


def test_tighter_bound_starves_the_encoder_gradient(linear_gaussian):
    # Rainforth et al. 2018: with K importance samples the encoder's gradient SNR falls like
    # 1/sqrt(K) and the decoder's rises like sqrt(K); averaging K ELBO draws raises both
    *_, rows = linear_gaussian
    row = by_key(rows)
    assert row["iwae", 64]["encoder_grad_snr"] < row["iwae", 1]["encoder_grad_snr"] / 2
    assert row["iwae", 64]["decoder_grad_snr"] > row["iwae", 1]["decoder_grad_snr"] * 2
    assert row["trace", 64]["encoder_grad_snr"] > row["trace", 1]["encoder_grad_snr"] * 2


def test_exact_guide_makes_the_log_weight_bounds_exact_and_noiseless():
    vae, x, log_px = linear_gaussian_vae(guide_loc_factor=1.0, guide_scale_factor=1.0)
    row = by_key(compare_estimators(vae, x, ("trace", "iwae", "meanfield"), (1, 4), repeats=20, exact_log_px=log_px))
    for key in [("trace", 1), ("trace", 4), ("iwae", 4)]:
        assert row[key]["loss_std"] < 1e-8 and abs(row[key]["gap_to_log_px"]) < 1e-10
    assert row["meanfield", 1]["loss_std"] > 0.1  # its Monte Carlo reconstruction term stays noisy


def test_csv_round_trip_png_and_table(tmp_path, linear_gaussian):
    *_, rows = linear_gaussian
    path = write_csv(rows, tmp_path / "sub" / "rows.csv")
    with path.open(newline="") as f:
        read = list(csv.DictReader(f))
    assert len(read) == len(rows) and list(read[0]) == list(rows[0])
    for got, want in zip(read, rows):
        assert got["estimator"] == want["estimator"] and int(got["num_particles"]) == want["num_particles"]
        assert float(got["gap_to_log_px"]) == want["gap_to_log_px"]

    widths = []
    for name, subset in (("gap", rows), ("no_gap", [{k: v for k, v in r.items() if k != "gap_to_log_px"} for r in rows])):
        png = plot_comparison(subset, tmp_path / f"{name}.png")
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        pixels = imread(png)
        assert pixels.ndim == 3 and 200 < pixels.shape[0] < pixels.shape[1] < 4000
        widths.append(pixels.shape[1])
    assert widths[0] > widths[1]  # the gap panel is drawn only when the rows have the gap

    lines = format_table(rows).splitlines()
    assert len(lines) == len(rows) + 1 and len({len(line) for line in lines}) == 1
    assert lines[0].split() == list(rows[0])


def test_the_csv_of_a_run_says_which_model_and_epoch_it_compared_and_each_model_has_its_own(tmp_path, capsys):
    from pyro_vae import TrainConfig, load_run
    from pyro_vae.cli import main
    from pyro_vae.schedule import best_epoch
    from pyro_vae.train import train

    write_dataset(tmp_path / "data", gz=True, n_train=320, n_test=64)
    small = dict(dataset="mnist", hidden=(32,), z_dim=3, batch_size=32, max_test=64, step="eager")
    config = TrainConfig(epochs=4, data_dir=str(tmp_path / "data"), validation_size=64, lr=0.3, seed=1, **small)
    metrics = train(config, tmp_path / "run", progress=False)
    assert best_epoch(metrics) < len(metrics), "the best epoch must not be the last for this test to mean anything"
    fingerprint = load_run(tmp_path / "run", "cpu").data["fingerprint"]
    args = ["--estimators", "trace", "iwae", "--particles", "1", "2", "--repeats", "2", "--num-data", "5", "--seed", "3"]
    read = {}
    for model, name in (("best", "run"), ("last", "run-last")):  # the default model's file keeps its name
        assert main(["compare", str(tmp_path / "run"), "--model", model, *args, "--no-progress"]) == 0
        assert f"{name}.csv, " in capsys.readouterr().out
        with (tmp_path / "run" / "compare" / f"{name}.csv").open(newline="") as f:
            read[model] = list(csv.DictReader(f))
    assert sorted(p.name for p in (tmp_path / "run" / "compare").iterdir()) == ["run-last.csv", "run-last.png", "run.csv", "run.png"]
    for model, epoch in (("best", best_epoch(metrics)), ("last", len(metrics))):
        rows = read[model]
        assert len(rows) == 4 and list(rows[0])[0] == "estimator"  # the statistics first, as before
        assert [(r["estimator"], r["num_particles"]) for r in rows] == [("trace", "1"), ("trace", "2"), ("iwae", "1"), ("iwae", "2")]
        about = {"run": str(tmp_path / "run"), "model": model, "model_epoch": str(epoch), "epochs": str(len(metrics)),
                 "data_fingerprint": fingerprint, "num_data": "5", "seed": "3", "threads": "1"}
        assert all({k: r[k] for k in about} == about for r in rows)
        assert list(rows[0])[-len(about):] == list(about)


@pytest.mark.slow
def test_example_runs_with_tiny_arguments(tmp_path):
    write_dataset(tmp_path / "data", gz=True, n_train=64, n_test=16)
    args = ["--repeats", "5", "--particles", "1", "4", "--out", "tmp", "--data-dir", "data", "--train-steps", "2", "--num-data", "8"]
    done = subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("estimator  num_particles") == 2
    for name in ("linear_gaussian", "fashion_mnist"):
        assert (tmp_path / "tmp" / f"{name}.csv").is_file() and (tmp_path / "tmp" / f"{name}.png").is_file()


def test_example_falls_back_to_the_linear_gaussian_model_without_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(pyro_vae.data.SYSTEM_DATA_DIRS, "fashion_mnist", ())
    main = runpy.run_path(str(EXAMPLE))["main"]
    main(["--repeats", "3", "--particles", "1", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "empty")])
    assert "note: Fashion-MNIST not found" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["linear_gaussian.csv", "linear_gaussian.png"]
