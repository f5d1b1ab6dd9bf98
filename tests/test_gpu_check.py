"""The GPU check (benchmarks/gpu_check.py) at toy sizes on the CPU: CI keeps the one command that
a GPU machine runs working, every part of it, in real processes on real (small) IDX files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .idx_files import write_dataset

GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
PARTS = ["tests", "step_time", "loglik", "readme", "torchrun", "resume"]

pytestmark = pytest.mark.slow  # every part in its own processes: minutes


def gpu_check(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(GPU_CHECK), "--out", str(tmp_path / "out"), *args],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=tmp_path,
    )


def test_the_quick_check_runs_every_part_on_the_cpu_and_each_passes(tmp_path):
    write_dataset(tmp_path / "data", gz=True, n_train=600, n_test=128)
    done = gpu_check(tmp_path, "--device", "cpu", "--quick", "--data-dir", str(tmp_path / "data"))
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["preflight"]["missing"] == [] and list(report["parts"]) == PARTS
    failed = {
        name: part["summary"] + part.get("output_tail", "")[-1500:]
        for name, part in report["parts"].items()
        if not part["passed"]
    }
    assert not failed, failed
    assert done.returncode == 0, done.stderr[-3000:]
    verdicts = [line.split()[:2] for line in done.stdout.splitlines()[1 : 1 + len(PARTS)]]
    assert verdicts == [[name, "pass"] for name in PARTS]
    # what each verdict rests on
    parts = report["parts"]
    assert parts["tests"]["tests"] > 0 and parts["tests"]["failures"] == parts["tests"]["errors"] == 0
    assert [(t["batch"], t["particles"]) for t in parts["step_time"]["tables"]] == [(16, 1), (16, 2)]
    assert 0 < parts["loglik"]["fraction_of_matmul"] and parts["loglik"]["image_samples_per_s"] > 0
    assert len(parts["readme"]["metrics"]) == 2 and parts["readme"]["test_elbo"] < 0
    assert parts["torchrun"]["backend"] == "gloo" and parts["torchrun"]["comparison"]["identical"]
    resume = parts["resume"]
    assert resume["comparison"]["identical"] and 1 <= resume["killed_after_epochs"] < resume["epochs"]
    assert resume["comparison"]["tensors_compared"] > 0 and resume["comparison"]["only_in_one"] == []
    tables = (tmp_path / "out" / "gpu_check.md").read_text()
    assert all(f"| {name} | pass |" in tables for name in PARTS) and "| 16 | 2 | pyro-vae traced |" in tables


def test_what_is_missing_is_named_on_one_line_before_anything_runs(tmp_path):
    done = gpu_check(tmp_path, "--device", "cuda:99", "--data-dir", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("preflight")]
    assert (
        line.startswith("preflight: missing ")
        and "device cuda:99" in line
        and "Fashion-MNIST" in line
        and "README.md" in line
    )
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["parts"] == {} and len(report["preflight"]["missing"]) == 2 and not report["passed"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.json"]
