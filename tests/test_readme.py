"""The README's Python snippet and shell lines work as written."""

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .idx_files import write_dataset

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_snippet_runs(tmp_path):
    (snippet,) = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    # the snippet finds its data in $PYRO_VAE_DATA before Debian's folder: give it small real files
    write_dataset(tmp_path / "data", gz=True, n_train=256, n_test=32)
    env = {"PYRO_VAE_DATA": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(r"ELBO of the last batch: -\d+\.\d nats per image", done.stdout)
    assert "posterior draws of z: (10, 128, 20)" in done.stdout


def test_the_newest_run_line_picks_a_training_run_not_compares_folder(tmp_path):
    line = next(t for t in README.read_text().splitlines() if t.startswith("RUN=$("))
    run, other = tmp_path / "runs" / "fashion_mnist-bernoulli-mlp-20260101-120000", tmp_path / "runs" / "compare"
    run.mkdir(parents=True)
    other.mkdir()  # written after the run, by pyro-vae compare or examples/compare_estimators.py
    os.utime(run, (1, 1))
    done = subprocess.run(["bash", "-c", f'{line} && echo "$RUN"'], capture_output=True, text=True, cwd=tmp_path,
                          check=True)
    assert done.stdout.strip() == "runs/fashion_mnist-bernoulli-mlp-20260101-120000/"


def test_the_train_function_is_imported_as_the_readme_says():
    assert "`from pyro_vae.train import train`" in README.read_text()
    from pyro_vae.train import train

    assert callable(train) and inspect.signature(train).parameters.keys() >= {"config", "run_dir", "resume"}

