"""Issue 24, items 7 to 9: a closed stdout, Ctrl-C and a run still in progress, met by real
processes with real pipes and real signals.

A command whose reader has gone (``| head``) goes on to the end and loses nothing; Ctrl-C ends a
command with exit status 130 and one line that says what was kept; a run whose first epoch is
still going is reported as in progress, not as stopped.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_vae.cli import main

from .idx_files import write_dataset

TINY = ["--dataset", "mnist", "--hidden", "16", "--z-dim", "2", "--batch-size", "32", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
CLI = [sys.executable, "-m", "pyro_vae.cli"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "idx"
    write_dataset(root, gz=True, n_train=128, n_test=32)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> Path:
    """A one-epoch run (in this process)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *TINY, "--no-progress", "--epochs", "1", "--data-dir", str(data), "--run-dir", str(run)]) == 0
    return run


def start(argv) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def epochs_saved(run: Path) -> int:
    return len(torch.load(run / "checkpoint.pt", weights_only=True)["metrics"])


# ----------------------------------------------------------------- 7: a reader that goes away


@pytest.mark.slow
def test_train_piped_into_head_goes_on_to_its_last_epoch(tmp_path, data):
    run = tmp_path / "run"
    train = start(["train", *TINY, "--epochs", 3, "--data-dir", data, "--run-dir", run])
    first = [train.stdout.readline() for _ in range(3)]  # head -3: the run folder, the data, the device
    train.stdout.close()  # the reader is gone: the step and epoch lines meet a closed pipe
    err = train.stderr.read()
    assert train.wait(timeout=300) == 0, err
    assert first[0] == f"run folder: {run}\n"
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert epochs_saved(run) == 3
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_evaluate_with_its_reader_gone_writes_its_results_without_a_traceback(tmp_path, trained):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained), str(run)], check=True)
    evaluate = start(["evaluate", run, "--num-samples", 4, "--idata-points", 2, "--no-progress"])
    evaluate.stdout.close()  # gone before the first line is printed
    err = evaluate.stderr.read()
    assert evaluate.wait(timeout=300) == 0, err
    assert err == ""
    assert json.loads((run / "evaluation.json").read_text())["epochs"] == 1
