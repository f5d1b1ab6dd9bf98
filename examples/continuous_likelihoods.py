"""Continuous pixels in [0, 1]: ContinuousBernoulli against a Normal with a learned scale, in nats.

Both are proper densities on the pixel values, so their test ELBOs are comparable lower bounds on
log p(x). A Normal with its scale fixed at 1 is the "MSE loss": far worse in nats, because the
reconstruction term barely weighs against the KL. The Bernoulli likelihood is refused on these
pixels: it is not a density on [0, 1].

    python examples/continuous_likelihoods.py --epochs 5
"""

import argparse

import pyro
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.optim import Adam

from pyro_vae import VAE
from pyro_vae.cli import Formatter  # no (default: ...) where the help says it
from pyro_vae.data import DeviceBatches, load_dataset

LIKELIHOODS = {
    "continuous_bernoulli": dict(likelihood="continuous_bernoulli"),
    "normal, learned shared scale": dict(likelihood="normal", normal_scale="shared"),
    "normal, scale fixed at 1 (MSE)": dict(likelihood="normal", normal_scale=1.0),
}


def train_and_test(settings, train, test, epochs, seed, device):
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()  # each model gets its own parameters in Pyro's param store
    vae = VAE(x_dim=784, z_dim=20, **settings).to(device)
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), TraceMeanField_ELBO(max_plate_nesting=1))
    for epoch in range(epochs):
        for x, _ in train.epoch(epoch):
            svi.step(x)
    return -sum(svi.evaluate_loss(x) for x, _ in test.eval_batches()) / len(test.labels)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=type("Help", (argparse.RawDescriptionHelpFormatter, Formatter), {}))
    p.add_argument("--epochs", type=int, default=5, help="passes over the training images")
    p.add_argument("--data-dir", default=None, help="folder with the IDX files (default: the usual places)")
    p.add_argument("--max-train", type=int, default=None, help="train on the first N images only (default: all)")
    p.add_argument("--max-test", type=int, default=None, help="evaluate on the first N test images only (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = load_dataset("fashion_mnist", args.data_dir)
    train = DeviceBatches(data.train_images[: args.max_train], data.train_labels[: args.max_train], 128, seed=args.seed, device=device)
    test = DeviceBatches(data.test_images[: args.max_test], data.test_labels[: args.max_test], 500, shuffle=False, seed=args.seed, device=device)
    print(f"test ELBO after {args.epochs} epochs, nats per image (higher is better):")
    for name, settings in LIKELIHOODS.items():
        print(f"  {name:32s} {train_and_test(settings, train, test, args.epochs, args.seed, device):10.2f}")


if __name__ == "__main__":
    main()
