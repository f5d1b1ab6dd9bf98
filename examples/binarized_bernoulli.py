"""A VAE on dynamically binarized Fashion-MNIST with a Bernoulli likelihood, trained by Pyro's SVI.

The reconstruction term is log p(x|z) of a Bernoulli: minus the binary cross-entropy, which the
model never writes down: it is the Bernoulli's log_prob.

    python examples/binarized_bernoulli.py --epochs 5
"""

import argparse

import pyro
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.optim import Adam

from pyro_vae import VAE
from pyro_vae.cli import Formatter  # no (default: ...) where the help says it
from pyro_vae.data import DeviceBatches, load_dataset


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=type("Help", (argparse.RawDescriptionHelpFormatter, Formatter), {}))
    p.add_argument("--epochs", type=int, default=5, help="passes over the training images")
    p.add_argument("--particles", type=int, default=1, help="vectorized samples of z per image")
    p.add_argument("--data-dir", default=None, help="folder with the IDX files (default: the usual places)")
    p.add_argument("--max-train", type=int, default=None, help="train on the first N images only (default: all)")
    p.add_argument("--max-test", type=int, default=None, help="evaluate on the first N test images only (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    data = load_dataset("fashion_mnist", args.data_dir)
    train = DeviceBatches(data.train_images[: args.max_train], data.train_labels[: args.max_train], 128, binarization="dynamic", seed=args.seed, device=device)
    test = DeviceBatches(data.test_images[: args.max_test], data.test_labels[: args.max_test], 500, binarization="dynamic", shuffle=False, seed=args.seed, device=device)

    vae = VAE(x_dim=784, z_dim=20, likelihood="bernoulli").to(device)
    elbo = TraceMeanField_ELBO(num_particles=args.particles, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), elbo)
    n_train, n_test = len(train.labels), len(test.labels)
    for epoch in range(args.epochs):
        train_loss = sum(svi.step(x) for x, _ in train.epoch(epoch))
        test_loss = sum(svi.evaluate_loss(x) for x, _ in test.eval_batches())
        print(f"epoch {epoch + 1}: train ELBO {-train_loss / n_train:.2f}, test ELBO {-test_loss / n_test:.2f} nats/image")


if __name__ == "__main__":
    main()
