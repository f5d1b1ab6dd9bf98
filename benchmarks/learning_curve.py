"""The curves of long runs: test (and validation) ELBO per epoch, each run's importance-sampled
test log p(x) (from its ``evaluation.json``) and the published anchors on the same data and
protocol, so a reader sees where each run was heading when it stopped, side by side.

    python benchmarks/learning_curve.py runs/fmnist-gauss-300x2-z40 --seconds 4278 --out docs/img/fashion-mnist-long-run.png
    python benchmarks/learning_curve.py runs/fmnist-gauss-300x2-z40 runs/fmnist-vamp-300x2-z40 --out docs/img/fashion-mnist-priors.png

``--seconds`` (one run): its wall time, for a second axis in hours (metrics.jsonl keeps no clock).
The test ELBO is the model as defined, one particle, and is reported only: nothing is chosen by it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

from pyro_vae.checkpoint import replace_atomically

ANCHORS = {"Gaussian-prior VAE": -228.70, "VampPrior": -227.35, "Exemplar VAE": -226.75}  # Exemplar VAE paper


def plot_learning_curves(runs: list[Path], out: Path, seconds: list[float] | None = None) -> Path:
    """Each run's test ELBO (and validation ELBO, if it has one) against epochs, its log p(x) from
    ``evaluation.json`` and the anchors; with one run, its train ELBO too and, given ``seconds``,
    hours of training on a second axis."""
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    bottom = min(ANCHORS.values()) - 16  # or lower, to show where the lowest run ended
    for run, color in zip(runs, ("tab:blue", "tab:green", "tab:purple", "tab:orange")):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        epochs = [row["epoch"] for row in rows]
        bottom = min(bottom, rows[-1]["test_elbo"] - 5)
        if len(runs) == 1:
            ax.plot(epochs, [row["train_elbo"] for row in rows], color="tab:gray", lw=1, label="train ELBO")
        ax.plot(epochs, [row["test_elbo"] for row in rows], color=color, lw=1.5, label=f"{run.name}: test ELBO")
        if all("val_elbo" in row for row in rows):
            ax.plot(epochs, [row["val_elbo"] for row in rows], color=color, lw=1, ls="--", label=f"{run.name}: validation ELBO")
        evaluation = run / "evaluation.json"
        if evaluation.exists():
            record = json.loads(evaluation.read_text())
            ll, se = record["test_log_likelihood"], record["test_log_likelihood_se"]
            ax.errorbar([record.get("model_epoch", record["epochs"])], [ll], yerr=[2 * se], fmt="o", color=color, capsize=4,
                        label=f"{run.name}: test log p(x), K={record['num_samples']}: {ll:.2f} ± {se:.2f} (bar: 2 SE)")
    for (name, value), style in zip(ANCHORS.items(), ("--", "-.", ":")):
        ax.axhline(value, color="black", ls=style, lw=1, label=f"{name} (published): {value}")
    ax.set_ylim(bottom, max(ANCHORS.values()) + 3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)
    if seconds and len(runs) == 1:
        hours = seconds[0] / 3600 / epochs[-1]
        top = ax.secondary_xaxis("top", functions=(lambda e: e * hours, lambda h: h / hours))
        top.set_xlabel("hours of training (one CPU thread, machine shared)")
    ax.set_title(f"{', '.join(run.name for run in runs)}: dynamically binarized Fashion-MNIST", fontsize=9)
    replace_atomically(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seconds", type=float, nargs="*", help="with one run: its wall time in seconds")
    args = p.parse_args(argv)
    print(f"written: {plot_learning_curves(args.run_dirs, args.out, args.seconds)}")


if __name__ == "__main__":
    main()
