"""Compare ELBO estimators: loss spread, gradient signal-to-noise and cost against the particle count K.

Two models: probabilistic PCA as a linear VAE, where log p(x) is exact and the gap of each bound
can be read off, and a Bernoulli VAE briefly trained on binarized Fashion-MNIST (skipped, with a
note, when the data cannot be found). Writes a CSV and a PNG per model into --out.

    python examples/compare_estimators.py --repeats 50 --particles 1 4 16 64
"""

import argparse
from itertools import chain, count, islice
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI
from pyro.optim import Adam

from pyro_vae import VAE, make_elbo
from pyro_vae.cli import Formatter  # no (default: ...) where the help says it
from pyro_vae.compare import compare_estimators, format_table, plot_comparison, table_units, write_csv
from pyro_vae.data import DeviceBatches, load_dataset
from pyro_vae.errors import DataError
from pyro_vae.linear_gaussian import linear_gaussian_vae


def fashion_mnist_vae(args):
    """A Bernoulli VAE trained for ``--train-steps`` SVI steps on dynamically binarized training
    images, and ``--num-data`` statically binarized test images; None if the data is missing."""
    try:
        data = load_dataset("fashion_mnist", args.data_dir)
    except DataError as e:
        print(f"note: Fashion-MNIST not found, comparing on the linear-Gaussian model only ({e})")
        return None
    train = DeviceBatches(data.train_images, data.train_labels, 128, binarization="dynamic", seed=args.seed)
    n = args.num_data
    test = DeviceBatches(data.test_images[:n], data.test_labels[:n], n, binarization="static", shuffle=False, seed=args.seed)
    pyro.clear_param_store()  # SVI optimizes the param store's tensors: they must be this VAE's
    vae = VAE(x_dim=784, z_dim=10, likelihood="bernoulli", hidden=(200,))
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), make_elbo("meanfield"))
    for x, _ in islice(chain.from_iterable(map(train.epoch, count())), args.train_steps):
        svi.step(x)
    return vae, test.full()


def compare(name, title, vae, x, args, exact_log_px=None):
    """Run the comparison on one model, print its table and write ``<name>.csv`` and ``<name>.png``."""
    print(f"\n{title}")
    pyro.set_rng_seed(args.seed)
    rows = compare_estimators(vae, x, args.estimators, args.particles, args.repeats, exact_log_px)
    print(format_table(rows))
    print(table_units(len(x)))
    for path in (write_csv(rows, args.out / f"{name}.csv"), plot_comparison(rows, args.out / f"{name}.png", title)):
        print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=type("Help", (argparse.RawDescriptionHelpFormatter, Formatter), {}))
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="folder for the CSV and PNG")
    p.add_argument("--repeats", type=int, default=50, help="independent draws per estimator and K")
    p.add_argument("--particles", type=int, nargs="+", default=[1, 4, 16, 64], help="numbers of particles K")
    p.add_argument("--estimators", nargs="+", default=["trace", "meanfield", "iwae", "reference"], help="estimators to compare")
    p.add_argument("--data-dir", default=None, help="folder with the IDX files (default: the usual places)")
    p.add_argument("--num-data", type=int, default=32, help="datapoints compared: test images, and draws of the linear-Gaussian model")
    p.add_argument("--train-steps", type=int, default=300, help="SVI steps before comparing")
    p.add_argument("--threads", type=int, default=1, help="torch threads; 1 gives stable timings")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    vae, x, log_px = linear_gaussian_vae(num_data=args.num_data, seed=args.seed)
    title = f"linear-Gaussian VAE (PPCA), {x.shape[0]} datapoints, exact log p(x) = {log_px / x.shape[0]:.3f} nats each"
    compare("linear_gaussian", title, vae, x, args, log_px)
    pyro.set_rng_seed(args.seed)
    fashion = fashion_mnist_vae(args)
    if fashion is not None:
        title = f"Bernoulli VAE, binarized Fashion-MNIST, {args.train_steps} training steps, {args.num_data} test images"
        compare("fashion_mnist", title, *fashion, args)

if __name__ == "__main__":
    main()
