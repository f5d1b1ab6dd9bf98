"""The curves of long runs: test (and validation) ELBO against epochs and against hours of
training, each run's importance-sampled test log p(x) (from its ``evaluation.json``, at the epoch of
the model it evaluated) and, where every run is on their protocol (dynamically binarized
Fashion-MNIST, Bernoulli likelihood), the published anchors, so a reader sees where each run was
heading when it stopped, side by side.

    python benchmarks/learning_curve.py runs/fmnist-gauss-300x2-z40 runs/fmnist-vamp-300x2-z40 runs/fmnist-vampiaf-300x2-z40 \
        --out docs/img/fashion-mnist-recipes.png

The hours come from each run's ``times.jsonl`` (the wall-clock seconds of every epoch); a run that
lacks some epochs' times (trained before they were kept) is left out of that panel and named there.
The test ELBO is the model as defined, one particle, and is reported only: nothing is chosen by it.
"""

from __future__ import annotations

import argparse
import json
import math
from itertools import accumulate
from pathlib import Path

from matplotlib.figure import Figure

from pyro_vae.checkpoint import replace_atomically

ANCHORS = {"Gaussian-prior VAE": -228.70, "VampPrior": -227.35, "Exemplar VAE": -226.75}  # Exemplar VAE paper


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def on_the_published_protocol(config: dict) -> bool:
    """Whether the anchors apply: dynamically binarized Fashion-MNIST scored by a Bernoulli likelihood."""
    return (config.get("dataset"), config.get("likelihood"), config.get("binarize")) == ("fashion_mnist", "bernoulli", "dynamic")


def check_runs(runs: list[Path]) -> None:
    """Refuse, naming the folder, a run without epochs to draw."""
    for run in runs:
        if not read_lines(run / "metrics.jsonl"):
            raise SystemExit(f"learning_curve.py: error: {run} has no epochs in metrics.jsonl; pass a run folder pyro-vae train wrote")


def plot_learning_curves(runs: list[Path], out: Path) -> Path:
    """:func:`learning_curves_figure` written to ``out`` as a PNG (atomically)."""
    fig = learning_curves_figure(runs)
    replace_atomically(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return out


def learning_curves_figure(runs: list[Path]) -> Figure:
    """Two panels: each run's test ELBO (and validation ELBO, if it has one) against epochs, with
    its log p(x) from ``evaluation.json`` at the epoch of the model evaluated, then the same curves
    against cumulative hours of training where ``times.jsonl`` covers every epoch; the anchors in
    both when every run is on the published protocol."""
    check_runs(runs)
    fig = Figure(figsize=(12, 5.6), layout="constrained")
    by_epoch, by_hour = fig.subplots(1, 2, sharey=True)
    configs = [json.loads((run / "config.json").read_text()) for run in runs]
    anchors = ANCHORS if all(map(on_the_published_protocol, configs)) else {}
    low, high, untimed = [v - 16 for v in anchors.values()], [v + 3 for v in anchors.values()], []
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        rows = read_lines(run / "metrics.jsonl")
        epochs = [row["epoch"] for row in rows]
        times = {row["epoch"]: row["seconds"] for row in read_lines(run / "times.jsonl")}
        hours = [seconds / 3600 for seconds in accumulate(times.get(epoch, math.nan) for epoch in epochs)]  # 1, 2, ...
        curves = [("test ELBO", "test_elbo", 1.5, "-")]
        if all("val_elbo" in row for row in rows):
            curves.append(("validation ELBO", "val_elbo", 1, "--"))
        for name, key, width, style in curves:
            values = [row[key] for row in rows]
            low.append(values[-1] - 5)  # the curves' tails: where each run was heading
            high.append(max(values) + 3)
            by_epoch.plot(epochs, values, color=color, lw=width, ls=style, label=f"{run.name}: {name}")
            if not math.isnan(hours[-1]):
                by_hour.plot(hours, values, color=color, lw=width, ls=style)
        if math.isnan(hours[-1]):
            untimed.append(run.name)
        if (run / "evaluation.json").exists():
            record = json.loads((run / "evaluation.json").read_text())
            ll, se = record["test_log_likelihood"], record["test_log_likelihood_se"]
            epoch = record.get("model_epoch", record["epochs"])
            label = f"{run.name}: test log p(x) at epoch {epoch}, K={record['num_samples']}: {ll:.2f} ± {se:.2f} (bar: 2 SE)"
            low.append(ll - 2 * se - 2)
            high.append(ll + 2 * se + 2)
            by_epoch.errorbar([epoch], [ll], yerr=[2 * se], fmt="o", color=color, capsize=4, label=label)
            if epoch <= len(hours) and not math.isnan(hours[epoch - 1]):
                by_hour.errorbar([hours[epoch - 1]], [ll], yerr=[2 * se], fmt="o", color=color, capsize=4)
    for ax in (by_epoch, by_hour):
        for (name, value), style in zip(anchors.items(), ("--", "-.", ":")):
            ax.axhline(value, color="black", ls=style, lw=1, label=f"{name} (published): {value}" if ax is by_epoch else None)
        ax.grid(alpha=0.3)
    by_epoch.set_ylim(min(low), max(high))
    by_epoch.set_xlabel("epoch")
    by_epoch.set_ylabel("nats per image")
    by_hour.set_xlabel("hours of training (wall clock, times.jsonl)")
    if untimed:
        by_hour.set_title("no epoch times kept for: " + ", ".join(untimed), fontsize=8)
    fig.legend(loc="outside lower center", ncols=2, fontsize=7)
    data = "dynamically binarized Fashion-MNIST" if anchors else "; ".join(
        f"{run.name}: {c.get('dataset')}, {c.get('likelihood')}" for run, c in zip(runs, configs)
    )
    fig.suptitle(data, fontsize=9)
    return fig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    print(f"written: {plot_learning_curves(args.run_dirs, args.out)}")


if __name__ == "__main__":
    main()
