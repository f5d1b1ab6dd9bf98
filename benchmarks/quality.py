"""Test log-likelihood on Fashion-MNIST for the models of the literature, with their training budgets.

    python benchmarks/quality.py --epochs 50 --test-images 10000 --num-samples 5000
    python benchmarks/quality.py --suite 8bit --epochs 5 --test-images 1000 --num-samples 5000
    python benchmarks/quality.py --suite 8bit --epochs 5 --test-images 1000 --time-training runs/timing

``--suite binarized`` (the default) compares models on dynamically binarized pixels. ``--suite
8bit`` compares likelihoods of the 8-bit pixels with one architecture and budget: the discretized
likelihoods give log P(x) of the 8-bit images directly; the density likelihoods (Normal,
continuous Bernoulli) give a density, and their dequantized bound on log P(x) is the number in the
same units (bits/dim).

Trains each model with ``pyro_vae.train`` (dynamically binarized pixels for Bernoulli models,
continuous pixels otherwise) and estimates the test log-likelihood with K importance samples per
image (Burda et al. 2015 use K = 5000), with its standard error over images. One JSON line per model
is appended to ``--results`` as soon as it is done, so a long run keeps what it finished; rerunning
skips the models already there. ``--models`` picks a subset. ``--time-training`` trains the models
afresh one after another and prints their training times side by side (a resumed or interleaved
run's times do not compare). Published anchors on dynamically
binarized Fashion-MNIST (Exemplar VAE paper): Gaussian-prior VAE -228.70, VampPrior -227.35,
Exemplar VAE -226.75 nats.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from pyro_vae import TrainConfig, evaluate_model
from pyro_vae.train import Trainer

MODELS = {
    "tutorial 784-400-50 softplus, meanfield K=1": dict(hidden=(400,), z_dim=50, activation="softplus"),
    "Burda 784-200-200-50 tanh, trace K=1": dict(hidden=(200, 200), z_dim=50, activation="tanh", estimator="trace"),
    "Burda 784-200-200-50 tanh, trace K=50": dict(hidden=(200, 200), z_dim=50, activation="tanh", estimator="trace", num_particles=50),
    "Burda 784-200-200-50 tanh, iwae K=50": dict(hidden=(200, 200), z_dim=50, activation="tanh", estimator="iwae", num_particles=50),
    "conv, z=50, meanfield K=1": dict(architecture="conv", hidden=(256,), z_dim=50, activation="relu"),
    "continuous pixels: continuous_bernoulli 784-400-50": dict(hidden=(400,), z_dim=50, likelihood="continuous_bernoulli"),
    "continuous pixels: normal, learned shared scale 784-400-50": dict(hidden=(400,), z_dim=50, likelihood="normal", normal_scale="shared"),
}
EIGHT_BIT = dict(hidden=(400,), z_dim=50)
SUITES = {
    "binarized": MODELS,
    "8bit": {
        "discretized logistic": dict(EIGHT_BIT, likelihood="discretized_logistic"),
        "discretized logistic mixture, 3 components": dict(EIGHT_BIT, likelihood="discretized_logistic_mixture", mixture_components=3),
        "discretized normal": dict(EIGHT_BIT, likelihood="discretized_normal"),
        "normal, per-pixel scale, dequantized training": dict(EIGHT_BIT, likelihood="normal", normal_scale="pixel", binarize="dequantize"),
        "continuous Bernoulli, dequantized training": dict(EIGHT_BIT, likelihood="continuous_bernoulli", binarize="dequantize"),
    },
}


def evaluate(trainer: Trainer, num_samples: int, chunk_size: int) -> dict:
    """:func:`pyro_vae.evaluate_model`'s log-likelihoods of the trained model (test ELBO, log p(x), bits/dim)."""
    summary = evaluate_model(trainer.vae.eval(), trainer.test_batches, trainer.config.seed, num_samples, chunk_size, keep_log_weights=0).summary()
    keys = ("test_elbo", "test_log_likelihood", "test_log_likelihood_se", "data_kind", "bits_per_dim", "dequantized_log_likelihood", "dequantized_log_likelihood_se", "dequantized_bits_per_dim")
    return {k: summary[k] for k in keys}


def plot_bits_per_dim(rows: list[dict], path: Path) -> Path:
    """Bars of bits/dim on 8-bit pixels (the dequantized bound for densities), 2 standard errors,
    best first."""
    from matplotlib.figure import Figure

    from pyro_vae.checkpoint import replace_atomically

    bars = []
    for row in rows:
        dequantized = row["bits_per_dim"] is None
        nats, se = (row["dequantized_log_likelihood"], row["dequantized_log_likelihood_se"]) if dequantized else (row["test_log_likelihood"], row["test_log_likelihood_se"])
        label = row["model"] + ("\n(dequantized bound)" if dequantized else "")
        bars.append((-nats / (784 * math.log(2)), 2 * se / (784 * math.log(2)), label, "tab:orange" if dequantized else "tab:blue"))
    bits, errors, names, colors = zip(*sorted(bars))
    fig = Figure(figsize=(8, 0.7 * len(rows) + 1.5), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(range(len(rows)), bits, xerr=errors, color=colors)
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    for i, (b, e) in enumerate(zip(bits, errors)):
        ax.text(b + e, i, f"  {b:.3f}", va="center")
    ax.set_xlabel("test bits/dim on 8-bit Fashion-MNIST (lower is better; bars: 2 s.e.)")
    ax.set_xlim(0, max(bits) * 1.2)
    replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path


def folder_name(model: str) -> str:
    """The run folder of a model: its name up to the first comma, with underscores."""
    return model.split(",")[0].replace(" ", "_").replace(":", "")


def time_training(models: dict[str, dict], args) -> None:
    """Train each model afresh, one after another in this process, and print its training time, its
    ratio to the first model's, and whether its test ELBO is the one ``--results`` recorded (same
    seed and data: the same model, so the recorded row's evaluation belongs to this training)."""
    recorded = {}
    if args.results.exists():
        recorded = {row["model"]: row for row in map(json.loads, args.results.read_text().splitlines())}
    first = None
    for name, options in models.items():
        config = TrainConfig(epochs=args.epochs, max_test=args.test_images, device=args.device, data_dir=args.data_dir, **options)
        trainer = Trainer(config, args.time_training / folder_name(name), progress=False)
        start = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - start
        first = first or seconds
        test_elbo, row = trainer.metrics[-1]["test_elbo"], recorded.get(name)
        if row is None or (row["epochs"], row["test_images"]) != (args.epochs, trainer.test_batches.labels.numel()):
            same = "no recorded row with these epochs and test images"
        else:
            same = "the recorded one" if test_elbo == row["test_elbo"] else f"NOT the recorded {row['test_elbo']}"
        print(f"{name}: {seconds:.0f} s training ({seconds / first:.2f}x the first), test ELBO {test_elbo} ({same})", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--chunk-size", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--suite", choices=list(SUITES), default="binarized")
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL", help="a subset of the suite's models (default: all)")
    p.add_argument("--results", type=Path, default=None, help="JSON lines, one per model (default runs/quality/<suite>.jsonl)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--figure", type=Path, default=None, help="8bit suite: draw the results' bits/dim as a PNG here and stop")
    p.add_argument("--time-training", type=Path, default=None, metavar="DIR",
                   help="train the models afresh in DIR, one after another in this process, print their training times side by side, and stop")
    args = p.parse_args(argv)
    if args.figure:
        results = args.results or Path(f"runs/quality/{args.suite}.jsonl")
        rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
        if args.suite != "8bit" or not rows:
            p.error(f"--figure draws the 8bit suite's results; {results} holds none: run python benchmarks/quality.py --suite 8bit first")
        print(plot_bits_per_dim(rows, args.figure))
        return
    torch.set_num_threads(args.threads)
    models = SUITES[args.suite]
    args.results = args.results or Path(f"runs/quality/{args.suite}.jsonl")
    unknown = set(args.models or ()) - set(models)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; the {args.suite} suite has {list(models)}")
    if args.time_training:
        if args.time_training.exists():
            p.error(f"--time-training {args.time_training} exists; name a new folder")
        time_training({name: models[name] for name in args.models or models}, args)
        return
    args.results.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["model"] for line in args.results.read_text().splitlines()} if args.results.exists() else set()
    for name in args.models or list(models):
        if name in done:
            continue
        config = TrainConfig(epochs=args.epochs, max_test=args.test_images, device=args.device, data_dir=args.data_dir, **models[name])
        run_dir = args.results.parent / args.suite / folder_name(name) / f"{config.estimator}-K{config.num_particles}-{config.likelihood}"
        trainer = Trainer(config, run_dir, resume=(run_dir / "checkpoint.pt").exists(), progress=False)
        epochs_before, start = trainer.epochs_done, time.perf_counter()
        trainer.fit()
        # the training time is reported only when this call trained every epoch
        train_seconds = round(time.perf_counter() - start) if epochs_before == 0 else None
        start = time.perf_counter()
        row = {"model": name, **evaluate(trainer, args.num_samples, args.chunk_size), "epochs": args.epochs, "train_seconds": train_seconds,
               "eval_seconds": round(time.perf_counter() - start), "num_samples": args.num_samples, "test_images": trainer.test_batches.labels.numel(),
               "device": str(trainer.device), "threads": args.threads, "binarization": config.binarize}
        with args.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        bits = row["bits_per_dim"] if row["bits_per_dim"] is not None else row["dequantized_bits_per_dim"]
        print(f"{name}: test log p(x) {row['test_log_likelihood']:.2f} +- {row['test_log_likelihood_se']:.2f} ({row['data_kind']}), "
              f"bits/dim {'-' if bits is None else f'{bits:.4f}'}, test ELBO {row['test_elbo']:.2f} "
              f"({args.epochs} epochs, {'resumed, not timed' if train_seconds is None else f'{train_seconds} s'} training, {row['eval_seconds']} s evaluation)", flush=True)


if __name__ == "__main__":
    main()
