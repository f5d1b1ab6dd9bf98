"""The ``pyro-vae`` command: ``train``, ``evaluate``, ``compare`` and ``sample``.

This module parses and prints; the work is done by the library (:mod:`pyro_vae.train`,
:mod:`pyro_vae.evaluate`, :mod:`pyro_vae.compare`, :mod:`pyro_vae.run`), imported by the
subcommand that needs it, so ``pyro-vae --help`` answers without loading torch. Errors a user can
fix (bad data, impossible settings, a busy or existing run folder) print one line
``pyro-vae: error: ...`` and exit with status 2, never a traceback. Under ``torchrun`` errors name
the rank (``pyro-vae: error (rank 1 of 2): ...``) and a lost or failed peer exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import warnings
from pathlib import Path

from .checks import MIN_IMPORTANCE_SAMPLES, check_importance_samples
from .config import TrainConfig
from .errors import ConfigError, DataError, DistributedError, NumericalError
from .launcher import launched, rank_label
from .names import (
    ACTIVATIONS,
    ARCHITECTURES,
    BACKENDS,
    BINARIZATIONS,
    DATASETS,
    DEFAULT_TIMEOUT_S,
    ESTIMATORS,
    LAYOUTS,
    SAVED_MODELS,
    STEP_MODES,
    TRAIN_ESTIMATORS,
)
from .options import choices, option, settings
from .schedule import DEFAULT_LR_DECAY, LR_SCHEDULES, best_epoch

PIXELS_OF = {"binary": "binarized", "8bit": "8-bit"}  # what bits/dim are counted on, by the likelihood's data kind
DEFAULTS = argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(TrainConfig)})


def _number(kind, minimum=None, maximum=None, what="a number"):
    """An argparse type: ``kind(text)`` within ``[minimum, maximum]`` and finite, else a one-line error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            bounds = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {bounds}")
        return value

    return parse


whole_number = _number(int, what="a whole number")
positive_int = _number(int, 1, what="a whole number")
seed_int = _number(int, 0, 2**63 - 1, what="a whole number")
learning_rate = _number(float, 1e-12, 10.0)
non_negative = _number(float, 0.0)
positive_seconds = _number(float, 1e-3)


def dataset_choice(text: str) -> str:
    from .names import dataset_name

    try:
        return dataset_name(text)
    except DataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def setting_value(setting):
    """An argparse type: the text of a likelihood's, prior's or guide's setting (:mod:`pyro_vae.options`)
    parsed and checked, else a one-line error."""

    def parse(text: str):
        try:
            return setting.check(setting.parse(text))
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        except ValueError:  # the text is not even of the setting's type
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid value: {setting.help}") from None

    return parse


CHOOSES = {"likelihood": "observation model p(x|z)", "prior": "p(z)", "guide": "q(z|x)"}


def add_option_arguments(add, kind: str) -> None:
    """``--likelihood``, ``--prior`` or ``--guide`` with the registered names, then a flag per setting."""
    names = "; ".join(f"{name}, {option(kind, name).help}" for name in choices(kind))
    add(f"--{kind}", choices=choices(kind), help=f"{CHOOSES[kind]}: {names} (default {getattr(DEFAULTS, kind)})")
    for owner, setting in settings(kind):
        text = f"for --{kind} {owner.name}: {setting.help} (default {setting.default})"
        add(setting.flag, type=setting_value(setting), help=text)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    # defaults are SUPPRESSed so that --resume can tell which settings the user gave
    a = lambda *names, **kw: p.add_argument(*names, default=argparse.SUPPRESS, **kw)
    d = DEFAULTS
    a(
        "--dataset",
        type=dataset_choice,
        metavar="{" + ",".join(DATASETS) + "}",
        help="image data set: folder (your PNG/JPEG images) and array (your .npy/.npz file) read --data-dir; "
        f"fashion-mnist is accepted too (default {d.dataset})",
    )
    a(
        "--data-dir",
        help="for folder: the folder of images (class subfolders give labels, train/ and test/ the splits); for "
        "array: the .npy or .npz file; otherwise the folder with the data set's files (IDX, CIFAR-10 batches, "
        "SVHN .mat) or torchvision's layout; only this place is used (default: ~/.cache/pyro-vae/data, then the "
        "system's data sets)",
    )
    a(
        "--test-fraction",
        type=_number(float, 1e-9, 1 - 1e-9),
        help="for folder or array data without a test split of their own: the fraction held out at random for "
        f"testing, the same for every run (default {d.test_fraction})",
    )
    a(
        "--image-size",
        type=positive_int,
        nargs=2,
        metavar=("H", "W"),
        help="for --dataset folder: resize (bicubic) and centre-crop every image to H x W (default: all images "
        "must have one size)",
    )
    a(
        "--layout",
        choices=LAYOUTS,
        help="for --dataset array: the order of a 4-D array, channels first or last (default: from its shape)",
    )
    a(
        "--download",
        action="store_true",
        help="download the data with torchvision if it is not found (needs internet; default off)",
    )
    add_option_arguments(a, "likelihood")
    a(
        "--binarize",
        choices=BINARIZATIONS,
        help="pixel preparation: binarization, none (the 8-bit levels) or dequantize (k + u)/256 for density "
        "likelihoods (default: dynamic for bernoulli, none otherwise)",
    )
    a("--architecture", choices=ARCHITECTURES, help=f"encoder/decoder networks (default {d.architecture})")
    a("--hidden", type=positive_int, nargs="*", help=f"hidden layer widths (default {' '.join(map(str, d.hidden))})")
    a("--activation", choices=ACTIVATIONS, help=f"hidden-layer nonlinearity (default {d.activation})")
    a("--z-dim", type=positive_int, help=f"latent dimensions (default {d.z_dim}; 2 also draws the latent manifold)")
    add_option_arguments(a, "prior")
    add_option_arguments(a, "guide")
    a(
        "--estimator",
        choices=TRAIN_ESTIMATORS,
        help=f"ELBO estimator (default {d.estimator}: analytic KL; renyi is for compare only: it tempers its weights "
        "under minibatch scaling)",
    )
    a("--num-particles", type=positive_int, help=f"vectorized samples of z per datapoint (default {d.num_particles})")
    a(
        "--epochs",
        type=positive_int,
        help=f"total epochs; with --resume, train until this many are done (default {d.epochs})",
    )
    a("--batch-size", type=positive_int, help=f"images per step (default {d.batch_size})")
    a("--lr", type=learning_rate, help=f"Adam learning rate (default {d.lr})")
    a(
        "--kl-anneal-epochs",
        type=non_negative,
        help="warm the KL weight up from 0 to 1 over this many epochs (default 0: no annealing)",
    )
    a(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        help="constant, exponential (times --lr-decay each epoch) or plateau (times --lr-decay after --lr-patience "
        f"epochs without a better validation ELBO; needs --validation-size) (default {d.lr_schedule})",
    )
    a(
        "--lr-decay",
        type=_number(float, 1e-6, 1 - 1e-9),
        help="for --lr-schedule exponential or plateau: the factor in (0, 1) that lowers the rate (default "
        + ", ".join(f"{factor} for {name}" for name, factor in DEFAULT_LR_DECAY.items())
        + ")",
    )
    a(
        "--lr-patience",
        type=positive_int,
        help=f"for --lr-schedule plateau: epochs without a better validation ELBO before the rate drops "
        f"(default {d.lr_patience})",
    )
    a(
        "--validation-size",
        type=_number(int, 0, what="a whole number"),
        help="hold this many training images out (chosen by --seed) and report their ELBO every epoch; the best "
        "epoch's model is kept as best.pt and evaluated by default (default 0: none)",
    )
    a(
        "--early-stopping",
        type=positive_int,
        metavar="PATIENCE",
        help="stop once this many epochs in a row have not raised the best validation ELBO; needs "
        "--validation-size; may change on --resume (default: train all --epochs)",
    )
    a("--seed", type=seed_int, help=f"seed of data order, binarization and latent draws (default {d.seed})")
    a("--max-train", type=positive_int, help="train on the first N images only (default: all)")
    a("--max-test", type=positive_int, help="evaluate on the first N test images only (default: all)")
    a("--device", help="auto (the GPU if there is one), cpu, cuda or cuda:N (default auto)")
    a(
        "--data-memory",
        type=non_negative,
        metavar="GIB",
        help="GiB of images a run may hold in memory (on a GPU, in its memory); a folder or .npy file over it "
        "streams from disk through DataLoader workers, with the same batches and results (default: half of the "
        "memory free at the start)",
    )
    a(
        "--data-workers",
        type=_number(int, 0, what="a whole number"),
        help="processes that read streamed data, 0 for the main process (default: the cores but one, at most 4)",
    )
    a(
        "--step",
        choices=STEP_MODES,
        help="how a training step runs: traced (a graph traced once from the Pyro model/guide, no Pyro work per "
        "step), inductor (that graph compiled: fastest per step, 15-40 s to compile a batch shape), eager "
        f"(plain Pyro ELBO); the same draws in each, and under torchrun (default {d.step})",
    )
    p.add_argument(
        "--run-dir", type=Path, help="run folder (default: runs/<dataset>-<likelihood>-<architecture>-<time>)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --run-dir from its checkpoint (default off)"
    )
    p.add_argument(
        "--allow-different-data",
        action="store_true",
        help="with --resume: continue even if the data differ from the run's (default off: refused)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="quiet: no progress bar and no per-epoch lines (the bar is off anyway when the output is not a terminal)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="under torchrun: process group backend (default auto: nccl for GPU tensors, gloo for CPU tensors)",
    )
    p.add_argument(
        "--dist-timeout",
        type=positive_seconds,
        default=None,
        metavar="SECONDS",
        help=f"under torchrun: how long a rank waits for the others before failing (default {DEFAULT_TIMEOUT_S:g})",
    )


def train_command(args: argparse.Namespace) -> int:
    from . import distributed
    from .train import Trainer

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if args.resume and args.run_dir is None:
        raise ConfigError("--resume needs --run-dir, the folder of the run to continue")
    with distributed.job(args.backend, args.dist_timeout) as parallel:
        say = print if parallel.is_main else lambda *a, **k: None
        run_dir, config = args.run_dir, None
        if not args.resume:  # a resumed run's configuration is its checkpoint's, with the settings given changed
            config = TrainConfig(**given)
            config.check_options_given(given)
            if run_dir is None:
                run_dir = (
                    Path("runs")
                    / f"{config.dataset}-{config.likelihood}-{config.architecture}-{time.strftime('%Y%m%d-%H%M%S')}"
                )
                run_dir = parallel.broadcast_object(run_dir, "agree on the run folder")  # rank 0's time stamp
        trainer = Trainer(
            config,
            run_dir,
            resume=args.resume,
            progress=not args.no_progress,
            changes=given if args.resume else None,
            parallel=parallel,
            allow_different_data=args.allow_different_data,
        )
        with trainer:
            epochs = trainer.config.epochs
            if args.resume:
                say(f"resuming {run_dir} after epoch {trainer.epochs_done} of {epochs}", flush=True)
                if lost := trainer.lost_best_note():
                    say(f"pyro-vae: warning: {lost}", file=sys.stderr, flush=True)
                if trainer.stopped_early:
                    say(
                        f"nothing to train: {stopped_early_line(trainer)}; pass --early-stopping above "
                        f"{trainer.config.early_stopping} to train on"
                    )
                    return 0
                if trainer.epochs_done == epochs:
                    say(
                        f"nothing to train: the run has all its {epochs} epochs; pass --epochs above {epochs} to "
                        "train more"
                    )
                    return 0
            data = f"{trainer.dataset.source}{trainer.train_batches.reading}"
            say(f"run folder: {run_dir}\ndata: {data}\ndevice: {trainer.device}", flush=True)
            if parallel.world_size > 1:
                say(
                    f"distributed: {parallel.world_size} processes, backend {parallel.backend}, global batch "
                    f"{trainer.config.batch_size}",
                    flush=True,
                )
            start = time.perf_counter()
            try:
                metrics = trainer.fit()
            except KeyboardInterrupt:
                if trainer.epochs_done == 0:  # no checkpoint: nothing to resume, and nothing lost by starting again
                    say(
                        "\ninterrupted in the first epoch, before any checkpoint: start the run again with the same "
                        "command (not --resume), or choose another --run-dir",
                        file=sys.stderr,
                    )
                else:
                    say(
                        f"\ninterrupted after {trainer.epochs_done} epochs; continue with: "
                        f"pyro-vae train --resume --run-dir {run_dir}",
                        file=sys.stderr,
                    )
                return 130
        if trainer.stopped_early:
            say(stopped_early_line(trainer))
        if metrics:
            last = metrics[-1]
            say(
                f"done: {last['epoch']} epochs, test ELBO {last['test_elbo']:.2f} nats/image (the last epoch's), "
                f"{time.perf_counter() - start:.0f} s this session, step: {last['step']}"
            )
            if "val_elbo" in last:
                best = metrics[best_epoch(metrics) - 1]
                say(
                    f"best validation ELBO {best['val_elbo']:.2f} at epoch {best['epoch']} (test ELBO "
                    f"{best['test_elbo']:.2f}): {best_model_words(trainer)}"
                )
        say(f"run folder: {run_dir}")
        return 0


def stopped_early_line(trainer) -> str:
    """What a run that stopped early says: when, why, and which epoch's model it keeps."""
    best, patience = best_epoch(trainer.metrics), trainer.config.early_stopping
    epochs = f"{patience} epoch{'s' * (patience != 1)}"
    return (
        f"stopped early after epoch {trainer.epochs_done}: {epochs} without a better validation ELBO than epoch "
        f"{best}'s ({trainer.metrics[best - 1]['val_elbo']:.2f}), whose model is "
        + ("best.pt" if trainer.lost_best_epoch is None else "lost (best.pt is missing)")
    )


def best_model_words(trainer) -> str:
    """Where the best epoch's model is, and what evaluate uses: best.pt, or --model last where it is lost."""
    if trainer.lost_best_epoch is None:
        return "best.pt, what evaluate and sample use"
    return "its model is lost (best.pt is missing): evaluate, sample and compare need --model last"


def warn_if_config_edited(run, options: str) -> None:
    """One stderr line when the run's config.json disagrees with its checkpoint, whose settings are
    used; ``options``: the command's own options that change a setting of the run."""
    if run.config_file_note:
        used = f"the checkpoint's settings are used (options of this command that change them: {options})"
        print(f"pyro-vae: warning: {run.config_file_note}; {used}", file=sys.stderr)


def evaluate_command(args: argparse.Namespace) -> int:
    from .diagnostics import K_GOOD, K_OK
    from .evaluate import MIN_SAMPLES_FOR_K_HAT
    from .run import opened_run

    check_importance_samples(args.num_samples)  # before the run is loaded
    # into the run folder: its lock first, then the load, so that what is evaluated is what the lock protects;
    # with --out the run folder is only read, unlocked (SavedRun.evaluate says why)
    with opened_run(args.run_dir, args.device, args.model, None if args.out else "evaluate") as run:
        warn_if_config_edited(run, "--data-dir, --data-memory, --device")
        if args.data_memory is not None:  # this machine's budget, not the one the run was trained with
            run.config = dataclasses.replace(run.config, data_memory=args.data_memory)
        evaluated = run.evaluate(
            args.data_dir,
            args.allow_different_data,
            args.num_samples,
            args.chunk_size,
            args.idata_points,
            not args.no_progress,
            args.out,
        )
    result, summary, json_path, idata_path = evaluated
    n_idata, data = result.log_weights.shape[1], summary["data"]
    print(f"data: {data['source']}{result.reading}")
    ll, pk = result.log_likelihood, summary["pareto_k"]
    print(
        f"test ELBO            {result.test_elbo:.2f} nats/image ({result.test_images} images, {run.model} model: "
        f"after epoch {run.model_epoch} of {len(run.metrics)})"
    )
    print(
        f"  one-particle split  reconstruction {result.reconstruction:.2f}, KL {result.kl:.2f} (an independent "
        "estimate)"
    )
    bits = (
        ""
        if result.bits_per_dim is None
        else f" ({result.bits_per_dim:.4f} bits/dim on {PIXELS_OF[result.data_kind]} pixels)"
    )
    kind = " (a density on continuous pixels, not a probability: no bits/dim)" if result.data_kind == "density" else ""
    se = ll.mean_standard_error()
    spread = f" +- {se:.2f}" if math.isfinite(se) else " (one image: no standard error)"
    print(f"test log p(x)        {ll.mean():.2f}{spread} nats/image, K={ll.num_samples}{bits}{kind}")
    if result.dequantized is not None:
        print(
            f"dequantized bound    log P(x) >= {summary['dequantized_log_likelihood']:.2f} +- "
            f"{summary['dequantized_log_likelihood_se']:.2f} nats/image ({summary['dequantized_bits_per_dim']:.4f} "
            "bits/dim on 8-bit pixels)"
        )
    if ll.num_samples < MIN_SAMPLES_FOR_K_HAT:  # the warning below says why
        print(f"PSIS k-hat           not fitted: K={ll.num_samples} is too few")
    else:
        good, ok = f"{pk['good']} good (<={K_GOOD})", f"{pk['ok']} ok (<={K_OK})"
        counts = f"{good}, {ok}, {pk['bad']} bad (>{K_OK}: log p(x) unreliable there)"
        print(f"PSIS k-hat           {counts}")
    if ll.warning():
        print(f"warning: {ll.warning()}")
    if result.active_units is None:
        print("active units         not measurable from one test image (Cov_x E[z_d|x] is a variance over images)")
    else:
        print(f"active units         {result.active_units} of {run.vae.z_dim} (Cov_x E[z_d|x] > 0.01)")
    other = ""
    if data["fingerprint"] != run.data.get("fingerprint"):
        other = f"; on data other than the run's ({data['source']}), so the run's own evaluation.json is left as it was"
    elif json_path.name != "evaluation.json":
        other = f"; the {run.model} model's, beside the default model's evaluation.json"
    print(f"written: {json_path}, {idata_path} (arviz.from_netcdf), {n_idata} images exported{other}")
    return 0


def compare_command(args: argparse.Namespace) -> int:
    import torch

    from . import compare
    from .checkpoint import check_writable_folder
    from .linear_gaussian import linear_gaussian_vae
    from .memory import check_step_memory
    from .run import RunFolder, load_run

    out = args.out or (Path(args.run_dir) / "compare" if args.run_dir else Path("runs") / "compare")
    if args.run_dir is not None:
        RunFolder(args.run_dir).check_output(out)
    check_writable_folder(out, "--out")  # before the estimators run, not after
    torch.set_num_threads(args.threads)
    if args.run_dir is None:
        vae, x, exact = linear_gaussian_vae(num_data=args.num_data, seed=args.seed)
        name, title = "linear_gaussian", f"linear-Gaussian VAE, {len(x)} datapoints, exact log p(x) known"
        about = {"model": "linear_gaussian"}
    else:
        run = load_run(args.run_dir, "cpu", args.model)
        warn_if_config_edited(run, "--data-dir")
        test, data = run.test_data(args.data_dir, args.allow_different_data)
        vae, x, exact = run.vae, test.first(args.num_data), None
        model = f"{run.model} model, epoch {run.model_epoch}"
        # the other model's table beside, never over, the default model's (as evaluate's evaluation-last.json)
        name = "run" if run.is_default_model else f"run-{run.model}"
        title = f"{Path(args.run_dir).name} ({model}): {len(x)} test images"
        about = {"run": str(args.run_dir), "model": run.model, "model_epoch": run.model_epoch}
        about |= {"epochs": len(run.metrics), "data_fingerprint": data["fingerprint"]}
    about |= {"num_data": len(x), "seed": args.seed, "threads": args.threads}
    flags = "--particles or --num-data"
    check_step_memory(vae, max(args.particles), len(x), torch.device("cpu"), flags, parameter_copies=1)  # + gradients
    torch.manual_seed(args.seed)
    print(title, flush=True)  # before the rows' progress lines (on stderr), which come before the table
    rows = compare.compare_estimators(
        vae, x, args.estimators, args.particles, args.repeats, exact_log_px=exact, progress=not args.no_progress
    )
    print(compare.format_table(rows))
    print(compare.table_units(len(x)))
    # both written atomically: a symlink there is replaced, never followed
    csv_path = compare.write_csv(rows, out / f"{name}.csv", about)
    png_path = compare.plot_comparison(rows, out / f"{name}.png", title=title)
    print(f"written: {csv_path}, {png_path}")
    return 0


def sample_command(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import check_writable_folder
    from .memory import check_step_memory
    from .model import GENERATE_CHUNK_SIZE
    from .plots import plot_image_grid
    from .run import RunFolder, opened_run

    chosen = f"-{args.model}" if args.model else ""  # best's and last's grids side by side, never one over the other
    out = args.out or Path(args.run_dir) / f"samples-seed{args.seed}-n{args.num}{chosen}.png"  # never samples.png
    RunFolder(args.run_dir).check_output(out)
    check_writable_folder(Path(out).parent, "--out")
    # inside the run folder: locked first (a trainer starting now must not clean up our temporary file), then loaded
    inside = Path(out).resolve().parent == Path(args.run_dir).resolve()
    with opened_run(args.run_dir, args.device, args.model, "sample" if inside else None) as run:
        warn_if_config_edited(run, "--device")
        check_step_memory(
            run.vae, 1, min(args.num, GENERATE_CHUNK_SIZE), run.vae.prior_loc.device, "--num", training=False
        )
        torch.manual_seed(args.seed)
        title = f"samples from the prior ({run.model} model, epoch {run.model_epoch}): mean of p(x|z), z ~ p(z)"
        plot_image_grid(run.vae.generate(args.num).cpu(), out, title=title, image_shape=run.config.image_shape)
    print(f"written: {out}")
    return 0


def add_model_argument(p: argparse.ArgumentParser) -> None:
    """``--model best|last``: which of a run's saved models a command uses."""
    p.add_argument(
        "--model",
        choices=SAVED_MODELS,
        help="best: the epoch with the best validation ELBO (best.pt); last: the last epoch's (default: best where "
        "the run has a validation split, else last)",
    )


class UsageError(Exception):
    """A command line argparse refused."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line ``pyro-vae: error: ...`` (exit 2), as every user error is."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` for options with a default, except where the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default" in text
            or any(action.default is v for v in (None, argparse.SUPPRESS, False))
            or not action.option_strings
        ):
            return text
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="pyro-vae",
        description="Variational autoencoders as Pyro programs: train, evaluate, compare ELBO estimators and sample.",
        formatter_class=Formatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="train a VAE with SVI on images: MNIST family, CIFAR-10, SVHN, your own folder or array",
        description="Train a VAE with SVI; writes a run folder with config, metrics, checkpoint and figures.",
        formatter_class=Formatter,
    )
    add_train_arguments(t)
    t.set_defaults(run=train_command, parser=t, memory_options="--hidden, --z-dim, --num-particles or --batch-size")

    run_dir_help = "a run folder written by pyro-vae train"
    e = sub.add_parser(
        "evaluate",
        formatter_class=Formatter,
        help="test ELBO, importance-sampled log p(x), PSIS k-hat, active units",
        description="Evaluate a saved run on its test images: test ELBO and its two terms, importance-sampled log "
        "p(x) with standard error and PSIS k-hat, bits/dim where log p(x) is a probability, active "
        "units. Writes evaluation.json and inference_data.nc (ArviZ) into the run folder, or into --out.",
    )
    e.add_argument("run_dir", type=Path, help=run_dir_help)
    e.add_argument(
        "--out",
        type=Path,
        help="folder for evaluation.json and inference_data.nc, for a run folder you cannot or would not write "
        "(read-only, archived, shared); the run folder is then only read, not locked, and the results there are "
        "never marked stale (default: the run folder)",
    )
    e.add_argument(
        "--num-samples",
        type=whole_number,  # below MIN_IMPORTANCE_SAMPLES: the library's refusal, which says why
        default=1000,
        help=f"importance samples K per image, at least {MIN_IMPORTANCE_SAMPLES} (Burda et al. use 5000)",
    )
    e.add_argument(
        "--chunk-size", type=positive_int, default=250, help="importance samples drawn at a time (bounds memory)"
    )
    e.add_argument("--data-dir", help="where the test data is, if not where training found it (default: the run's own)")
    e.add_argument(
        "--allow-different-data",
        action="store_true",
        help="evaluate even if the data differ from the run's (default off: refused)",
    )
    e.add_argument(
        "--idata-points",
        type=positive_int,
        default=100,
        help="test images exported to inference_data.nc (posterior draws of z, predictive x, k-hat)",
    )
    e.add_argument(
        "--data-memory",
        type=non_negative,
        metavar="GIB",
        help="GiB of images evaluate may hold in memory; a folder or .npy file over it streams from disk, batch by "
        "batch, with the same results (default: the run's --data-memory, or half of the memory free)",
    )
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_model_argument(e)
    e.set_defaults(run=evaluate_command, parser=e, memory_options="--chunk-size, --num-samples or --idata-points")

    c = sub.add_parser(
        "compare",
        formatter_class=Formatter,
        help="compare ELBO estimators: bound, loss spread, gradient variance and SNR, time per step",
        description="Compare ELBO estimators on a saved run's model and test images, or (without RUN_DIR) on a "
        "linear-Gaussian model whose log p(x) is exact. Prints a table and writes a CSV and a PNG.",
    )
    c.add_argument("run_dir", type=Path, nargs="?", help=f"{run_dir_help}; omit it for the linear-Gaussian model")
    c.add_argument(
        "--estimators",
        nargs="+",
        default=["trace", "meanfield", "iwae", "reference"],
        choices=[*ESTIMATORS, "reference"],
        help="estimators to compare; reference is the plain-PyTorch ELBO",
    )
    c.add_argument("--particles", type=positive_int, nargs="+", default=[1, 4, 16, 64], help="numbers of particles K")
    c.add_argument(
        "--repeats",
        type=_number(int, 2, what="a whole number"),
        default=50,
        help="independent estimates per estimator and K",
    )
    c.add_argument(
        "--num-data",
        type=positive_int,
        default=32,
        help="datapoints: test images of the run, or draws of the linear-Gaussian model",
    )
    c.add_argument(
        "--data-dir", help="where the run's test data is, if not where training found it (default: the run's own)"
    )
    c.add_argument(
        "--allow-different-data",
        action="store_true",
        help="compare even if the data differ from the run's (default off: refused)",
    )
    c.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads, fixed for comparable timings")
    c.add_argument("--seed", type=seed_int, default=0, help="seed of the draws (and of the linear-Gaussian model)")
    c.add_argument("--out", type=Path, help="folder for the CSV and PNG (default RUN_DIR/compare or runs/compare)")
    c.add_argument("--no-progress", action="store_true", help="do not print each finished row")
    add_model_argument(c)
    c.set_defaults(run=compare_command, parser=c, memory_options="--particles or --num-data")

    s = sub.add_parser(
        "sample",
        formatter_class=Formatter,
        help="a PNG grid of samples from a saved run's prior",
        description="Draw z from the prior p(z) and save the means of p(x|z) as a PNG grid (training's own "
        "samples.png is left alone).",
    )
    s.add_argument("run_dir", type=Path, help=run_dir_help)
    s.add_argument("--num", type=_number(int, 1, 10000, what="a whole number"), default=64, help="number of samples")
    s.add_argument("--seed", type=seed_int, default=0, help="seed of the draws")
    s.add_argument("--out", type=Path, help="PNG path (default RUN_DIR/samples-seed<SEED>-n<NUM>[-<MODEL>].png)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_model_argument(s)
    s.set_defaults(run=sample_command, parser=s, memory_options="--num")
    return p


class OutputWithoutReader:
    """``sys.stdout`` for a command whose reader may go (``pyro-vae train ... | head -3``): once the
    pipe is closed, what is printed goes to ``/dev/null``, so that a run goes on and writes its files."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._discard()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._discard()

    def _discard(self) -> None:
        """Point the stream's file descriptor at /dev/null: what it still buffers goes there too."""
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv``; returns the exit status (a torchrun worker ends the process
    instead, by :func:`pyro_vae.distributed.end_process`)."""
    stdout, sys.stdout = sys.stdout, OutputWithoutReader(sys.stdout)
    try:
        code = _dispatch(argv)
        sys.stdout.flush()  # now, while a closed pipe is still caught, rather than as the process exits
    finally:
        sys.stdout = stdout
    if launched():
        from .distributed import end_process

        end_process(code)
    return code


def _dispatch(argv: list[str] | None) -> int:
    try:
        args, unknown = parser().parse_known_args(argv)
        if unknown:  # named by the subcommand's parser, so that the hint is its --help
            args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except UsageError as e:
        print(f"pyro-vae: error: {e}", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            # a non-finite step is skipped and counted, and too many stop the run with one line:
            # Pyro's own warning is noise
            warnings.filterwarnings("ignore", message="Encountered (NaN|Inf)")
            return args.run(args)
    except (ConfigError, DataError, NumericalError) as e:
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"pyro-vae: error{rank_label()}: {message}", file=sys.stderr)
        return 2
    except DistributedError as e:
        print(f"pyro-vae: error{rank_label()}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # train says what it kept itself; the other commands replace files whole or not at all
        print(
            f"pyro-vae: {args.command} interrupted; the files it had not finished writing are as they were",
            file=sys.stderr,
        )
        return 130
    except Exception as e:
        if isinstance(e, MemoryError) or any(
            m in str(e).lower() for m in ("out of memory", "can't allocate memory")
        ):  # CUDA's and the CPU allocator's words
            print(f"pyro-vae: error{rank_label()}: out of memory; lower {args.memory_options}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
