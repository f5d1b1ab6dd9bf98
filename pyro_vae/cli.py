"""The ``pyro-vae`` command: ``train``, ``evaluate``, ``compare`` and ``sample``.

Errors a user can fix (bad data, impossible settings, an existing run folder) print one line
``pyro-vae: error: ...`` and exit with status 2, never a traceback. ``pyro-vae train`` under
``torchrun`` trains data-parallel (:mod:`pyro_vae.distributed`); there errors name the rank
(``pyro-vae: error (rank 1 of 2): ...``) and a lost or failed peer exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import compare, diagnostics, distributed, plots
from .distributed import BACKENDS, DEFAULT_TIMEOUT_S, DistributedError
from .data import BINARIZATIONS, DATASETS, DeviceBatches, load_dataset
from .errors import ConfigError, DataError
from .estimators import ESTIMATORS
from .evaluate import LogLikelihood, importance_log_weights
from .likelihoods import LIKELIHOODS
from .model import ARCHITECTURES
from .networks import ACTIVATIONS
from .train import TRAIN_ESTIMATORS, NumericalError, TrainConfig, Trainer, load_run, mean_elbo, split_batches

DEFAULTS = TrainConfig()


def normal_scale(text: str) -> str | float:
    """``shared``, ``pixel``, ``decoder`` or a positive number (a fixed scale)."""
    try:
        return float(text)
    except ValueError:
        return text


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    # defaults are SUPPRESSed so that --resume can tell which settings the user gave
    a = lambda *names, **kw: p.add_argument(*names, default=argparse.SUPPRESS, **kw)
    d = DEFAULTS
    a("--dataset", choices=sorted(DATASETS), help=f"image data set (default {d.dataset})")
    a("--data-dir", help="folder with the IDX files or torchvision's layout (default: search the usual places)")
    a("--download", action="store_true", help="download the data with torchvision if it is not found (needs internet)")
    a("--likelihood", choices=LIKELIHOODS, help=f"observation model p(x|z) (default {d.likelihood})")
    a("--normal-scale", type=normal_scale, help="for --likelihood normal: shared, pixel, decoder or a fixed positive number (default shared)")
    a("--binarize", choices=BINARIZATIONS, help="pixel binarization (default: dynamic for bernoulli, none otherwise)")
    a("--architecture", choices=ARCHITECTURES, help=f"encoder/decoder networks (default {d.architecture})")
    a("--hidden", type=int, nargs="*", help=f"hidden layer widths (default {' '.join(map(str, d.hidden))})")
    a("--activation", choices=sorted(ACTIVATIONS), help=f"(default {d.activation})")
    a("--z-dim", type=int, help=f"latent dimensions (default {d.z_dim}; 2 also draws the latent manifold)")
    a("--estimator", choices=TRAIN_ESTIMATORS, help=f"ELBO estimator (default {d.estimator}: analytic KL)")
    a("--num-particles", type=int, help=f"vectorized samples of z per datapoint (default {d.num_particles})")
    a("--epochs", type=int, help=f"(default {d.epochs})")
    a("--batch-size", type=int, help=f"(default {d.batch_size})")
    a("--lr", type=float, help=f"Adam learning rate (default {d.lr})")
    a("--kl-anneal-epochs", type=float, help="warm the KL weight up from 0 to 1 over this many epochs (default 0: no annealing)")
    a("--seed", type=int, help=f"(default {d.seed})")
    a("--max-train", type=int, help="train on the first N images only (quick runs)")
    a("--max-test", type=int, help="evaluate on the first N test images only")
    a("--device", help="auto (GPU if present), cpu or cuda (default auto)")
    p.add_argument("--run-dir", type=Path, help="run folder (default: runs/<dataset>-<likelihood>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="quiet: no progress bar and no per-epoch lines (the bar is off anyway when the output is not a terminal)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="under torchrun: process group backend (default auto: nccl for GPU tensors, gloo for CPU tensors)")
    p.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS", help=f"under torchrun: how long a rank waits for the others before failing (default {DEFAULT_TIMEOUT_S:g})")


def train_command(args: argparse.Namespace) -> int:
    dist = distributed.setup(args.backend, args.dist_timeout)  # None unless launched by torchrun
    try:
        return _train(args, dist)
    finally:
        distributed.shutdown()


def _train(args: argparse.Namespace, dist: distributed.Distributed | None) -> int:
    say = print if dist is None or dist.is_main else lambda *a, **k: None
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    with distributed.all_or_none(dist, "read the run's settings"):
        if args.resume:
            if args.run_dir is None:
                raise ConfigError("--resume needs --run-dir, the folder of the run to continue")
            saved, _, _ = load_run(args.run_dir, device="cpu")
            config = dataclasses.replace(saved, **given)  # Trainer refuses changes to the run's identity
        else:
            config = TrainConfig(**given)
        run_dir = args.run_dir or Path("runs") / f"{config.dataset}-{config.likelihood}-{time.strftime('%Y%m%d-%H%M%S')}"
    if dist is not None and args.run_dir is None:
        run_dir = dist.broadcast_object(run_dir, "agree on the run folder")  # rank 0's time stamp
    trainer = Trainer(config, run_dir, resume=args.resume, progress=not args.no_progress, backend=args.backend, dist_timeout=args.dist_timeout)
    say(f"run folder: {run_dir}\ndata: {trainer.dataset.source}\ndevice: {trainer.device}", flush=True)
    if dist is not None:
        say(f"distributed: {dist.world_size} processes, backend {dist.backend}, global batch {config.batch_size}", flush=True)
    start = time.perf_counter()
    try:
        metrics = trainer.run()
    except KeyboardInterrupt:
        say(f"\ninterrupted after {trainer.epochs_done} epochs; continue with: pyro-vae train --resume --run-dir {run_dir}", file=sys.stderr)
        return 130
    if metrics:
        last = metrics[-1]
        say(f"done: {last['epoch']} epochs, test ELBO {last['test_elbo']:.2f} nats/image, {time.perf_counter() - start:.0f} s this session")
    say(f"run folder: {run_dir}")
    return 0


def test_split(config: TrainConfig, device: torch.device) -> DeviceBatches:
    data = load_dataset(config.dataset, config.data_dir, config.download)
    return split_batches(config, data.test_images[: config.max_test], data.test_labels[: config.max_test], False, device)


def evaluate_command(args: argparse.Namespace) -> int:
    config, vae, metrics = load_run(args.run_dir, args.device)
    if args.data_dir is not None:
        config.data_dir = args.data_dir
    test = test_split(config, vae.prior_loc.device)
    torch.manual_seed(config.seed)
    log_w = [importance_log_weights(vae.model, vae.guide, x, args.num_samples, args.chunk_size) for x, _ in tqdm(test.eval_batches(), total=len(test), desc="importance sampling", disable=args.no_progress, leave=False)]
    log_px = LogLikelihood.cat([LogLikelihood.from_log_weights(w) for w in log_w])
    k = np.concatenate([diagnostics.pareto_k(w) for w in log_w])
    x_all = test.full()
    terms = diagnostics.elbo_terms(vae, x_all)
    active, _ = diagnostics.active_units(vae, x_all)
    n = log_px.log_px.numel()
    result = {
        "test_images": n,
        "test_elbo": mean_elbo(vae, test.eval_batches(), config.seed),  # the estimator of metrics.jsonl
        "reconstruction": terms["reconstruction"].mean().item(),
        "kl": terms["kl"].mean().item(),
        "num_samples": args.num_samples,
        "test_log_likelihood": log_px.mean(),
        "test_log_likelihood_se": log_px.mean_standard_error(),
        "bits_per_dim": log_px.bits_per_dim(784),
        "pareto_k": diagnostics.pareto_k_summary(k),
        "active_units": active,
        "kl_per_dimension": diagnostics.kl_per_dimension(vae, x_all).tolist(),
    }
    out = Path(args.run_dir)
    idata_x = x_all[: args.idata_points]
    idata = diagnostics.to_inference_data(vae, idata_x, log_weights=log_w[0][:, : args.idata_points] if args.idata_points <= log_w[0].shape[1] else None, training_metrics=metrics)
    diagnostics.save_inference_data(idata, out / "inference_data.nc")
    (out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    pk = result["pareto_k"]
    print(f"test ELBO            {result['test_elbo']:.2f} nats/image ({n} images)")
    print(f"  one-particle split  reconstruction {result['reconstruction']:.2f}, KL {result['kl']:.2f} (an independent estimate)")
    print(f"test log p(x)        {result['test_log_likelihood']:.2f} +- {result['test_log_likelihood_se']:.2f} nats/image, K={args.num_samples} ({result['bits_per_dim']:.4f} bits/dim)")
    print(f"PSIS k-hat           {pk['good']} good (<=0.5), {pk['ok']} ok (<=0.7), {pk['bad']} bad (>0.7: log p(x) unreliable there)")
    if pk["bad_share"] > 0.1:
        print(f"warning: k-hat > 0.7 for {100 * pk['bad_share']:.0f}% of the images: the encoder is narrower than the posterior there, so read log p(x) as a lower bound; more --num-samples tightens it")
    print(f"active units         {active} of {vae.z_dim} (Cov_x E[z_d|x] > 0.01)")
    print(f"written: {out / 'evaluation.json'}, {out / 'inference_data.nc'} (arviz.from_netcdf)")
    return 0


def compare_command(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    if args.run_dir is None:
        vae, x, exact = compare.linear_gaussian_vae(seed=args.seed)
        name, title = "linear_gaussian", f"linear-Gaussian VAE, {len(x)} datapoints, exact log p(x) known"
    else:
        config, vae, _ = load_run(args.run_dir, "cpu")
        x, exact = test_split(config, torch.device("cpu")).full()[: args.num_data], None
        name, title = "run", f"{Path(args.run_dir).name}: {len(x)} test images"
    torch.manual_seed(args.seed)
    rows = compare.compare_estimators(vae, x, args.estimators, args.particles, args.repeats, exact_log_px=exact, progress=not args.no_progress)
    out = args.out or (Path(args.run_dir) / "compare" if args.run_dir else Path("runs") / "compare")
    print(title)
    print(compare.format_table(rows))
    csv_path = compare.write_csv(rows, out / f"{name}.csv")
    png_path = compare.plot_comparison(rows, out / f"{name}.png", title=title)
    print(f"written: {csv_path}, {png_path}")
    return 0


def sample_command(args: argparse.Namespace) -> int:
    config, vae, _ = load_run(args.run_dir, args.device)
    torch.manual_seed(args.seed)
    out = args.out or Path(args.run_dir) / f"samples-seed{args.seed}-n{args.num}.png"  # not training's samples.png
    plots.plot_image_grid(vae.generate(args.num).cpu(), out, title="samples from the prior: mean of p(x|z), z ~ N(0, I)")
    print(f"written: {out}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyro-vae", description="Variational autoencoders as Pyro programs: train, evaluate, compare ELBO estimators and sample.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a VAE with SVI on MNIST-family images", description="Train a VAE with SVI; writes a run folder with config, metrics, checkpoint and figures.")
    add_train_arguments(t)
    t.set_defaults(run=train_command)
    e = sub.add_parser("evaluate", help="test ELBO, importance-sampled log p(x), PSIS k-hat, active units; writes evaluation.json and inference_data.nc")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--num-samples", type=int, default=1000, help="importance samples per image (Burda et al. use 5000; default 1000)")
    e.add_argument("--chunk-size", type=int, default=250, help="particles drawn at a time (memory)")
    e.add_argument("--data-dir", help="where the test data is, if not where training found it")
    e.add_argument("--idata-points", type=int, default=100, help="test images exported to inference_data.nc (posterior draws of z, predictive x)")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--device", default="auto")
    e.set_defaults(run=evaluate_command)
    c = sub.add_parser("compare", help="compare ELBO estimators: bound, loss spread, gradient variance and SNR, time per step", description="Compare ELBO estimators on a saved run's model and test images, or (without RUN_DIR) on a linear-Gaussian model whose log p(x) is exact.")
    c.add_argument("run_dir", type=Path, nargs="?", help="a run folder; omit for the linear-Gaussian model")
    c.add_argument("--estimators", nargs="+", default=["trace", "meanfield", "iwae", "reference"], choices=[*ESTIMATORS, "reference"])
    c.add_argument("--particles", type=int, nargs="+", default=[1, 4, 16, 64])
    c.add_argument("--repeats", type=int, default=50, help="independent estimates per estimator and K")
    c.add_argument("--num-data", type=int, default=32, help="test images used from the run")
    c.add_argument("--threads", type=int, default=1, help="torch CPU threads, fixed for comparable timings")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", type=Path, help="folder for the CSV and PNG (default RUN_DIR/compare or runs/compare)")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(run=compare_command)
    s = sub.add_parser("sample", help="a PNG grid of samples from a saved run")
    s.add_argument("run_dir", type=Path)
    s.add_argument("--num", type=int, default=64, help="number of samples")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, help="PNG path (default RUN_DIR/samples-seed<SEED>-n<NUM>.png)")
    s.add_argument("--device", default="auto")
    s.set_defaults(run=sample_command)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    rank = distributed.rank_label()
    where = f" ({rank})" if rank else ""
    try:
        return args.run(args)
    except (ConfigError, DataError, NumericalError) as e:
        message = str(e).replace("\n", "\n  ")
        print(f"pyro-vae: error{where}: {message}", file=sys.stderr)
        return 2
    except DistributedError as e:
        message = str(e).replace("\n", "\n  ")
        print(f"pyro-vae: error{where}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
