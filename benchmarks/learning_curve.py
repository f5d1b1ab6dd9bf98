"""The curves of long runs: test (and validation) ELBO against epochs and against hours of
training, each run's importance-sampled test log p(x) (from its ``evaluation.json``) and the
published anchors on the same data and protocol, so a reader sees where each run was heading when it
stopped, side by side.

    python benchmarks/learning_curve.py runs/fmnist-gauss-300x2-z40 runs/fmnist-vamp-300x2-z40 --out docs/img/fashion-mnist-priors.png

The hours come from each run's ``times.jsonl`` (the wall-clock seconds of every epoch); a run that
lacks some epochs' times (trained before they were kept) is left out of that panel and named there.
The test ELBO is the model as defined, one particle, and is reported only: nothing is chosen by it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from matplotlib.figure import Figure

from pyro_vae.checkpoint import replace_atomically

ANCHORS = {"Gaussian-prior VAE": -228.70, "VampPrior": -227.35, "Exemplar VAE": -226.75}  # Exemplar VAE paper


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plot_learning_curves(runs: list[Path], out: Path) -> Path:
    """Two panels: each run's test ELBO (and validation ELBO, if it has one) against epochs, with
    its log p(x) from ``evaluation.json`` at the epoch of the model evaluated, then the same curves
    against cumulative hours of training where ``times.jsonl`` covers every epoch; the anchors in both."""
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    by_epoch, by_hour = fig.subplots(1, 2, sharey=True)
    bottom, untimed = min(ANCHORS.values()) - 16, []  # or lower, to show where the lowest run ended
    for run, color in zip(runs, ("tab:blue", "tab:green", "tab:purple", "tab:orange")):
        rows = read_lines(run / "metrics.jsonl")
        epochs = [row["epoch"] for row in rows]
        times = {row["epoch"]: row["seconds"] for row in read_lines(run / "times.jsonl")}
        hours = [sum(times.get(e, math.nan) for e in range(1, epoch + 1)) / 3600 for epoch in epochs]
        bottom = min(bottom, rows[-1]["test_elbo"] - 5)
        curves = [("test ELBO", "test_elbo", 1.5, "-")]
        if all("val_elbo" in row for row in rows):
            curves.append(("validation ELBO", "val_elbo", 1, "--"))
        for name, key, width, style in curves:
            values = [row[key] for row in rows]
            by_epoch.plot(epochs, values, color=color, lw=width, ls=style, label=f"{run.name}: {name}")
            if not math.isnan(hours[-1]):
                by_hour.plot(hours, values, color=color, lw=width, ls=style)
        if math.isnan(hours[-1]):
            untimed.append(run.name)
        if (run / "evaluation.json").exists():
            record = json.loads((run / "evaluation.json").read_text())
            ll, se, epoch = record["test_log_likelihood"], record["test_log_likelihood_se"], record.get("model_epoch", record["epochs"])
            label = f"{run.name}: test log p(x), K={record['num_samples']}: {ll:.2f} ± {se:.2f} (bar: 2 SE)"
            by_epoch.errorbar([epoch], [ll], yerr=[2 * se], fmt="o", color=color, capsize=4, label=label)
            if not math.isnan(hours[epoch - 1]):
                by_hour.errorbar([hours[epoch - 1]], [ll], yerr=[2 * se], fmt="o", color=color, capsize=4)
    for ax in (by_epoch, by_hour):
        for (name, value), style in zip(ANCHORS.items(), ("--", "-.", ":")):
            ax.axhline(value, color="black", ls=style, lw=1, label=f"{name} (published): {value}" if ax is by_epoch else None)
        ax.grid(alpha=0.3)
    by_epoch.set_ylim(bottom, max(ANCHORS.values()) + 3)
    by_epoch.set_xlabel("epoch")
    by_epoch.set_ylabel("nats per image")
    by_epoch.legend(loc="lower right", fontsize=7)
    by_hour.set_xlabel("hours of training (wall clock, times.jsonl)")
    if untimed:
        by_hour.text(0.98, 0.02, "no epoch times kept for: " + ", ".join(untimed), transform=by_hour.transAxes,
                     ha="right", va="bottom", fontsize=7)
    fig.suptitle(f"{', '.join(run.name for run in runs)}: dynamically binarized Fashion-MNIST", fontsize=9)
    replace_atomically(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    print(f"written: {plot_learning_curves(args.run_dirs, args.out)}")


if __name__ == "__main__":
    main()
