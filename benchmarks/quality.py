"""Test log-likelihood on Fashion-MNIST for the models of the literature, with their training budgets.

    python benchmarks/quality.py --epochs 50 --test-images 10000 --num-samples 5000

Trains each model with ``pyro_vae.train`` (dynamically binarized pixels for Bernoulli models,
continuous pixels otherwise) and estimates the test log-likelihood with K importance samples per
image (Burda et al. 2015 use K = 5000), with its standard error over images. One JSON line per model
is appended to ``--results`` as soon as it is done, so a long run keeps what it finished; rerunning
skips the models already there. ``--models`` picks a subset. Published anchors on dynamically
binarized Fashion-MNIST (Exemplar VAE paper): Gaussian-prior VAE -228.70, VampPrior -227.35,
Exemplar VAE -226.75 nats.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pyro_vae.evaluate import LogLikelihood, log_marginal_likelihood
from pyro_vae import TrainConfig
from pyro_vae.evaluate import mean_elbo
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


def evaluate(trainer: Trainer, num_samples: int, chunk_size: int) -> dict:
    vae, test = trainer.vae.eval(), trainer.test_batches
    torch.manual_seed(trainer.config.seed)
    log_px = LogLikelihood.cat([log_marginal_likelihood(vae.model, vae.guide, x, num_samples, chunk_size) for x, _ in test.eval_batches()])
    return {
        "test_elbo": mean_elbo(vae, test.eval_batches(), trainer.config.seed),
        "test_log_likelihood": log_px.mean(),
        "test_log_likelihood_se": log_px.mean_standard_error(),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--chunk-size", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), metavar="MODEL")
    p.add_argument("--results", type=Path, default=Path("runs/quality/results.jsonl"))
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["model"] for line in args.results.read_text().splitlines()} if args.results.exists() else set()
    for name in args.models:
        if name in done:
            continue
        config = TrainConfig(epochs=args.epochs, max_test=args.test_images, device=args.device, data_dir=args.data_dir, **MODELS[name])
        run_dir = args.results.parent / name.split(",")[0].replace(" ", "_").replace(":", "") / f"{config.estimator}-K{config.num_particles}-{config.likelihood}"
        trainer = Trainer(config, run_dir, resume=(run_dir / "checkpoint.pt").exists(), progress=False)
        start = time.perf_counter()
        trainer.run()
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        row = {"model": name, **evaluate(trainer, args.num_samples, args.chunk_size), "epochs": args.epochs, "train_seconds": round(train_seconds),
               "eval_seconds": round(time.perf_counter() - start), "num_samples": args.num_samples, "test_images": trainer.test_batches.labels.numel(),
               "device": str(trainer.device), "threads": args.threads, "binarization": config.binarize}
        with args.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: test log p(x) {row['test_log_likelihood']:.2f} +- {row['test_log_likelihood_se']:.2f}, test ELBO {row['test_elbo']:.2f} "
              f"({args.epochs} epochs, {train_seconds:.0f} s training, {row['eval_seconds']} s evaluation)", flush=True)


if __name__ == "__main__":
    main()
