"""The pyro-vae command and the example scripts, run for real on small IDX files."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import arviz
import matplotlib.image
import pytest

from pyro_vae.cli import main

from .idx_files import write_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "mnist", "--hidden", "32", "--batch-size", "32", "--no-progress"]


@pytest.fixture
def data_dir(tmp_path):
    write_dataset(tmp_path / "data", gz=False, n_train=256, n_test=64)
    return str(tmp_path / "data")


@pytest.mark.slow
def test_train_evaluate_and_sample(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--data-dir", data_dir, "--epochs", "2", "--z-dim", "2", "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"run folder: {run}" in out and "test ELBO" in out
    for figure in ("elbo.png", "reconstructions.png", "samples.png", "manifold.png", "latent_scatter.png"):
        assert matplotlib.image.imread(run / figure).shape[0] > 100

    assert main(["evaluate", str(run), "--num-samples", "50", "--device", "cpu", "--idata-points", "10", "--no-progress"]) == 0
    result = json.loads((run / "evaluation.json").read_text())
    assert result["test_images"] == 64 and result["num_samples"] == 50
    # the importance-sampled estimate is a tighter bound than the ELBO, and the ELBO the one training logged
    assert result["test_log_likelihood"] > result["test_elbo"]
    assert result["test_elbo"] == json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["test_elbo"]
    assert result["pareto_k"]["total"] == 64 and 0 <= result["active_units"] <= 2 and len(result["kl_per_dimension"]) == 2
    idata = arviz.from_netcdf(run / "inference_data.nc")
    assert idata.posterior["z"].shape == (1, 100, 10, 2) and "training" in idata.groups()

    assert main(["sample", str(run), "--num", "16", "--out", str(tmp_path / "s.png")]) == 0
    assert matplotlib.image.imread(tmp_path / "s.png").shape[0] > 100


def test_compare_on_the_linear_gaussian_model_writes_table_csv_and_figure(tmp_path, capsys):
    assert main(["compare", "--repeats", "4", "--particles", "1", "4", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "gap_to_log_px" in out and "iwae" in out
    rows = (tmp_path / "linear_gaussian.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 2  # header, 4 estimators x 2 particle counts
    assert rows[0].startswith("estimator,num_particles,") and rows[0].endswith(",model,num_data,seed,threads")
    assert all(row.endswith(",linear_gaussian,32,0,1") for row in rows[1:])  # what was compared: the defaults
    assert matplotlib.image.imread(tmp_path / "linear_gaussian.png").shape[1] > 500


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint_with_more_epochs(tmp_path, data_dir):
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--data-dir", data_dir, "--epochs", "1", "--run-dir", run]) == 0
    assert main(["train", "--resume", "--run-dir", run, "--epochs", "2", "--no-progress", "--data-dir", data_dir]) == 0
    assert [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--z-dim", "0"], "argument --z-dim: 0 is out of range"),
        (["--lr", "-0.1"], "argument --lr: -0.1 is out of range"),
        (["--lr", "nan"], "is not a finite number"),
        (["--likelihood", "bernoulli", "--binarize", "none"], "--binarize dynamic"),
        (["--data-dir", "/nonexistent/folder"], "not found. Looked in"),
    ],
)
def test_bad_settings_give_one_clear_line_and_exit_2(tmp_path, data_dir, capsys, args, message):
    argv = ["train", *TINY, "--data-dir", data_dir, "--run-dir", str(tmp_path / "run"), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-vae: error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_corrupt_idx_file_names_the_file(tmp_path, data_dir, capsys):
    victim = Path(data_dir) / "train-images-idx3-ubyte"
    victim.write_bytes(victim.read_bytes()[:1000])
    assert main(["train", *TINY, "--data-dir", data_dir, "--run-dir", str(tmp_path / "run")]) == 2
    assert "train-images-idx3-ubyte" in capsys.readouterr().err


def test_unknown_dataset_is_refused_by_the_parser(capsys):
    assert main(["train", "--dataset", "imagenet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pyro-vae: error: ") and "unknown dataset 'imagenet'" in err


@pytest.mark.slow
def test_console_script_is_installed():
    exe = shutil.which("pyro-vae") or str(Path(sys.executable).parent / "pyro-vae")
    done = subprocess.run([exe, "train", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--likelihood" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", ["binarized_bernoulli.py", "continuous_likelihoods.py"])
def test_example_scripts_run(tmp_path, script):
    # like Pyro's own tests/test_examples.py: every example runs with tiny arguments
    write_dataset(tmp_path, gz=True, n_train=128, n_test=32)
    args = [sys.executable, str(REPO / "examples" / script), "--epochs", "1", "--data-dir", str(tmp_path), "--max-train", "128"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "test ELBO" in done.stdout
