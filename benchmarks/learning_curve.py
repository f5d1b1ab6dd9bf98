"""The curve of a long run: train and test ELBO per epoch, the run's importance-sampled test
log p(x) (from its ``evaluation.json``) and the published anchors on the same data and protocol,
so a reader sees where the run was heading when it stopped.

    python benchmarks/learning_curve.py runs/fmnist-gauss-300x2-z40 --seconds 4278 --out docs/img/fashion-mnist-long-run.png

``--seconds``: the run's wall time, for a second axis in hours (metrics.jsonl keeps no clock).
The test ELBO is the model as defined, one particle, and is reported only: nothing is chosen by it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

from pyro_vae.checkpoint import replace_atomically

ANCHORS = {"Gaussian-prior VAE": -228.70, "VampPrior": -227.35, "Exemplar VAE": -226.75}  # Exemplar VAE paper


def plot_learning_curve(run: Path, out: Path, seconds: float | None = None) -> Path:
    """Train and test ELBO against epochs (and hours, given ``seconds``), the run's log p(x) and the anchors."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [row["epoch"] for row in rows]
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(epochs, [row["train_elbo"] for row in rows], color="tab:gray", lw=1, label="train ELBO (KL-weighted during warm-up)")
    ax.plot(epochs, [row["test_elbo"] for row in rows], color="tab:blue", lw=1.5, label="test ELBO")
    evaluation = run / "evaluation.json"
    if evaluation.exists():
        record = json.loads(evaluation.read_text())
        ll, se = record["test_log_likelihood"], record["test_log_likelihood_se"]
        ax.errorbar([record["epochs"]], [ll], yerr=[2 * se], fmt="o", color="tab:red", capsize=4,
                    label=f"test log p(x), K={record['num_samples']}: {ll:.2f} ± {se:.2f} (bar: 2 SE)")
    for (name, value), style in zip(ANCHORS.items(), ("--", "-.", ":")):
        ax.axhline(value, color="black", ls=style, lw=1, label=f"{name} (published): {value}")
    ax.set_ylim(min(ANCHORS.values()) - 16, max(ANCHORS.values()) + 3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    if seconds:
        hours = seconds / 3600 / epochs[-1]
        top = ax.secondary_xaxis("top", functions=(lambda e: e * hours, lambda h: h / hours))
        top.set_xlabel("hours of training (one CPU thread, machine shared)")
    ax.set_title(f"{run.name}: dynamically binarized Fashion-MNIST")
    replace_atomically(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seconds", type=float, help="the run's wall time in seconds")
    args = p.parse_args(argv)
    print(f"written: {plot_learning_curve(args.run_dir, args.out, args.seconds)}")


if __name__ == "__main__":
    main()
