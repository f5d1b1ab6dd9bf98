"""The training runs of the GPU check (``benchmarks/gpu_check.py``), each runnable alone:

    python benchmarks/training_checks.py readme --device cuda --work /tmp/w --json readme.json
    python benchmarks/training_checks.py torchrun --device cuda --work /tmp/w --json torchrun.json
    python benchmarks/training_checks.py resume --device cuda --work /tmp/w --json resume.json

Every run is the command a user types, ``pyro-vae train`` (``python -m pyro_vae.cli train``), in
its own process:

* ``readme``: the README's default training command (784-400-20, Bernoulli, batch 128, 10 epochs),
  its epoch times and test ELBO.
* ``torchrun``: ``torchrun --standalone --nproc_per_node=1`` (NCCL on a GPU, gloo on the CPU)
  against one plain process, both with the default ``--step traced`` (a job runs the step asked
  for): epoch times, and the two runs compared tensor by tensor.
* ``resume``: a run killed with a real SIGKILL once its first checkpoint is on disk, resumed with
  ``--resume``, and compared with an uninterrupted run of the same command.

Epoch times are read off ``metrics.jsonl`` as it grows: an epoch's line is appended once its
checkpoint and figures are written, so the time between two lines is one whole epoch (the first
also holds the start: imports, data, tracing the step). Two runs are compared on their metrics
(exactly) and on every tensor of their last checkpoints (parameters, Adam's moments, RNG states):
identical, or the differing tensors named with their largest difference relative to the tensor's
largest entry, the tolerance that holds. ``--quick`` runs each at toy sizes (a few hundred images,
2 to 4 epochs).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pyro_vae.checkpoint import load_checkpoint

# (full, quick) sizes of each check's runs: pyro-vae train options
SIZES = {
    "readme": (["--epochs", "10"], ["--epochs", "2", "--max-train", "512", "--max-test", "128"]),
    "torchrun": (["--epochs", "2"], ["--epochs", "2", "--max-train", "256", "--max-test", "64"]),
    "resume": (["--epochs", "3"], ["--epochs", "2", "--max-train", "512", "--max-test", "64"]),
}
POLL_S = 0.02


def metric_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def watch(cmd: list[str], run_dir: Path, env: dict | None = None, kill_after_epochs: int | None = None) -> dict:
    """Run ``cmd`` (which trains in ``run_dir``) to its end, or SIGKILL it once ``kill_after_epochs``
    epochs are saved; returns its exit status, output and the seconds each epoch took."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    start = time.perf_counter()
    stamps: list[float] = []
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            lines = len(metric_lines(run_dir))  # the file is replaced atomically: never half written
            stamps += [time.perf_counter()] * (lines - len(stamps))
            if kill_after_epochs is not None and lines >= kill_after_epochs:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            time.sleep(POLL_S)
    stamps += [time.perf_counter()] * (len(metric_lines(run_dir)) - len(stamps))  # lines written as it ended
    epochs = [b - a for a, b in zip([start, *stamps], stamps)]
    return {
        "command": " ".join(cmd),
        "returncode": proc.returncode,
        "epoch_s": epochs,
        "output_tail": log.read_text()[-2000:],
    }


def timing(epochs: list[float]) -> dict:
    """The first epoch (start included) and the median of the others."""
    return {
        "first_epoch_s": epochs[0] if epochs else None,
        "median_epoch_s": statistics.median(epochs[1:]) if len(epochs) > 1 else None,
    }


def named_tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a checkpoint's nested dicts and lists, by its path (``model.encoder...``)."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    found: dict[str, torch.Tensor] = {}
    for key, value in items:
        found.update(named_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


def compare_runs(reference: Path, other: Path) -> dict:
    """``other``'s metrics and last checkpoint against ``reference``'s: identical, or what differs.

    For a float tensor the difference is ``max |a - b| / max |b|`` (relative to the tensor's largest
    entry); ``tolerance`` is the largest of them, the bound that holds for every tensor."""
    a, b = (load_checkpoint(run / "checkpoint.pt") for run in (other, reference))
    ta, tb = (
        {k: v for k, v in named_tensors(s).items() if k.split(".")[0] in ("model", "optimizer", "rng")} for s in (a, b)
    )
    differing = []
    for name in sorted(ta.keys() & tb.keys()):
        x, y = ta[name], tb[name]
        if x.shape == y.shape and torch.equal(x, y):
            continue
        entry = {"tensor": name}
        if x.shape == y.shape and x.is_floating_point():
            diff = (x.double() - y.double()).abs().max().item()
            entry.update(max_abs=diff, relative=diff / max(y.double().abs().max().item(), 1e-300))
        differing.append(entry)
    ma, mb = metric_lines(other), metric_lines(reference)
    return {
        "identical": not differing and ma == mb,
        "metrics_identical": ma == mb,
        "epochs": [len(ma), len(mb)],
        "metrics_relative_difference": relative_differences(ma, mb),
        "tensors_compared": len(ta.keys() & tb.keys()),
        "only_in_one": sorted(ta.keys() ^ tb.keys()),
        "differing": differing,
        "tolerance": max((d.get("relative", float("inf")) for d in differing), default=0.0),
    }


def relative_differences(rows: list[dict], reference: list[dict]) -> dict[str, float]:
    """The largest relative difference of the train and test ELBO over the epochs of two runs."""
    if not rows or len(rows) != len(reference):
        return {}
    largest = lambda k: max(abs(r[k] - s[k]) / max(abs(s[k]), 1e-300) for r, s in zip(rows, reference))  # noqa: E731
    return {k: largest(k) for k in ("train_elbo", "test_elbo")}


def describe_comparison(c: dict) -> str:
    if c["identical"]:
        return f"bit for bit identical ({c['tensors_compared']} tensors and every metric)"
    names = ", ".join(d["tensor"] for d in c["differing"][:4]) + (", ..." if len(c["differing"]) > 4 else "")
    within = f"within {c['tolerance']:.1e} of each tensor's largest entry"
    metrics = f"metrics (relative) {c['metrics_relative_difference']}"
    return f"differ: {len(c['differing'])} of {c['tensors_compared']} tensors ({names}), {within}; {metrics}"


class Runs:
    """The ``pyro-vae train`` command lines of one check, in folders under ``work``."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.work = args, args.work
        self.sizes = SIZES[args.check][1 if args.quick else 0]
        self.epochs = int(self.sizes[self.sizes.index("--epochs") + 1])

    def options(self, run: str, *extra: str) -> list[str]:
        data = ["--data-dir", self.args.data_dir] if self.args.data_dir else []
        where = ["--run-dir", str(self.work / run), "--device", self.args.device]
        return ["train", *where, "--no-progress", *data, *self.sizes, *extra]

    def cli(self, run: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "pyro_vae.cli", *self.options(run, *extra)]

    def torchrun(self, run: str, *extra: str) -> list[str]:
        job = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        return [sys.executable, *job, "-m", "pyro_vae.cli", *self.options(run, *extra)]


def check_readme(runs: Runs) -> dict:
    done = watch(runs.cli("readme"), runs.work / "readme")
    metrics = metric_lines(runs.work / "readme")
    elbo, seconds = metrics[-1]["test_elbo"] if metrics else None, timing(done["epoch_s"])
    passed = (
        done["returncode"] == 0
        and len(metrics) == runs.epochs
        and elbo is not None
        and all(m["skipped_steps"] == 0 for m in metrics)
    )
    summary = f"{len(metrics)} of {runs.epochs} epochs, test ELBO {elbo}"
    if passed:
        median = f"{seconds['median_epoch_s']:.2f} s an epoch (median after the first)"
        summary = f"{runs.epochs} epochs, test ELBO {elbo:.2f} nats/image, {median}"
    command = " ".join(["pyro-vae train", *runs.sizes, "--device", runs.args.device])
    return {
        "passed": passed,
        "summary": summary,
        "user_command": command,
        "test_elbo": elbo,
        "metrics": metrics,
        **seconds,
        "run": done,
    }


def check_torchrun(runs: Runs) -> dict:
    backend = "nccl" if runs.args.device.startswith("cuda") else "gloo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun sets 1 thread per worker: the same for the single process
    single = watch(runs.cli("single"), runs.work / "single", env)
    job = watch(runs.torchrun("torchrun", "--backend", backend), runs.work / "torchrun", env)
    ran = single["returncode"] == 0 and job["returncode"] == 0
    comparison = compare_runs(runs.work / "single", runs.work / "torchrun") if ran else None
    t_single, t_job = timing(single["epoch_s"]), timing(job["epoch_s"])
    ratio = t_job["median_epoch_s"] / t_single["median_epoch_s"] if ran and t_single["median_epoch_s"] else None
    summary = (
        f"{backend}, 1 process: {describe_comparison(comparison)}; epoch time {ratio:.2f}x one process"
        if ran
        else "a run failed"
    )
    return {
        "passed": ran and comparison["identical"],
        "summary": summary,
        "backend": backend,
        "single": {**t_single, "run": single},
        "torchrun": {**t_job, "run": job},
        "epoch_time_ratio": ratio,
        "comparison": comparison,
    }


def check_resume(runs: Runs) -> dict:
    epochs = runs.epochs
    straight = watch(runs.cli("straight"), runs.work / "straight")
    killed = watch(runs.cli("killed"), runs.work / "killed", kill_after_epochs=1)
    done_before_kill = len(metric_lines(runs.work / "killed"))
    resumed = watch(runs.cli("killed", "--resume"), runs.work / "killed")
    mid_run = killed["returncode"] == -signal.SIGKILL and 1 <= done_before_kill < epochs
    ran = straight["returncode"] == 0 and resumed["returncode"] == 0 and mid_run
    comparison = compare_runs(runs.work / "straight", runs.work / "killed") if ran else None
    if ran:
        summary = (
            f"killed by SIGKILL after epoch {done_before_kill} of {epochs}, resumed: {describe_comparison(comparison)}"
        )
    else:
        summary = "the kill did not land mid-run" if not mid_run else "a run failed"
    return {
        "passed": ran and comparison["identical"],
        "summary": summary,
        "epochs": epochs,
        "killed_after_epochs": done_before_kill,
        "comparison": comparison,
        "runs": {"straight": straight, "killed": killed, "resumed": resumed},
    }


CHECKS = {"readme": check_readme, "torchrun": check_torchrun, "resume": check_resume}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", choices=CHECKS)
    p.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N (default cuda)")
    p.add_argument("--work", type=Path, required=True, help="an empty folder for the run folders")
    p.add_argument("--json", type=Path, default=None, help="write the result there")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files (default: the usual places)")
    p.add_argument("--quick", action="store_true", help="toy sizes")
    args = p.parse_args(argv)
    result = CHECKS[args.check](Runs(args))
    print(f"{args.check}: {'passed' if result['passed'] else 'FAILED'}: {result['summary']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
