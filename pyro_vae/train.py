"""The training loop: stochastic variational inference on image data, epoch by epoch.

Each step minimizes ``-ELBO_beta`` of a minibatch (:func:`~pyro_vae.kl_weight.elbo_loss`, one of
:func:`~pyro_vae.make_elbo`'s estimators, ``beta`` the KL weight of annealing) with Adam on the
VAE's parameters; a step whose loss or gradient is not finite is skipped. Every epoch appends the
train ELBO and the test ELBO of the model as defined (never weighted; while the KL weight is not 1,
the weighted objective too, as ``train_objective``) to ``metrics.jsonl`` and its wall-clock time
to ``times.jsonl``, rewrites ``checkpoint.pt`` and redraws the figures, so a run stopped at any moment can be resumed
(:mod:`pyro_vae.run`) and has something to show.

Reproducibility: the data order and the binarization draws depend only on ``(seed, epoch)``
(:class:`~pyro_vae.data.Batches`, device-resident or streamed alike), the latent draws on torch's RNG, whose state the
checkpoint keeps; so on CPU a resumed run repeats an uninterrupted one exactly.

A step (:meth:`Trainer.train_step`) reads the same in one process and in a ``torchrun`` job: this
process's rows of the global batch through the :class:`~pyro_vae.step.TrainingStep` (eager, traced
or compiled, as asked), the loss and gradients summed over the processes (``parallel``, from
:func:`pyro_vae.distributed.job`; nothing to sum in one process), then Adam.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import pyro
import torch
from torch.distributions import kl_divergence

from . import distributed
from .config import TrainConfig
from .data import Batches
from .errors import ConfigError, DistributedError, NumericalError
from .estimators import make_elbo
from .evaluate import mean_elbo
from .kl_weight import elbo_loss
from .launcher import launched
from .memory import check_step_memory
from .model import build_vae
from .run import RunFolder, check_same_data, config_for_data, data_identity, dataset_for, split_batches
from .runtime import InterruptWatch, interrupts_deferred, load_torchvision, preserved_rng, rng_state, set_rng_state
from .schedule import best_epoch, epochs_without_improvement, learning_rate
from .step import TrainingStep

# a step whose loss or gradient is not finite is skipped; this many in a row stop the run
MAX_CONSECUTIVE_BAD_STEPS = 20


class Trainer:
    """A run's model, optimizer, step, data and folder; :meth:`fit` trains the remaining epochs.

    ``config``: the run's :class:`TrainConfig`. With ``resume``, the run in ``run_dir`` continues
    from its checkpoint: ``config`` must then agree with it on every field that defines the model,
    or be None for the run's own configuration with ``changes`` (a dict of settings, such as
    ``epochs``) applied. ``allow_different_data``: resume on data whose fingerprint differs from the
    run's. ``parallel``: this process's place in a ``torchrun`` job (:func:`pyro_vae.distributed.job`;
    default: a single process); ``run_dir`` must then be one folder for every rank.

    The main process holds the run folder's lock from construction until :meth:`close`; use the
    trainer as a context manager (``with Trainer(...) as trainer: trainer.fit()``) so that it is
    released whatever happens. A constructor that fails has released it already.
    """

    def __init__(
        self,
        config: TrainConfig | None,
        run_dir: str | Path,
        resume: bool = False,
        progress: bool = True,
        *,
        changes: dict[str, Any] | None = None,
        parallel: distributed.Distributed | distributed.SingleProcess | None = None,
        allow_different_data: bool = False,
    ):
        if parallel is None and launched():
            raise ConfigError(
                "this process is one rank of a torchrun job: train with pyro_vae.train.train, or pass parallel= from "
                "pyro_vae.distributed.job()"
            )
        self.parallel = parallel or distributed.SingleProcess()
        self.folder = RunFolder(run_dir)
        self._held = contextlib.ExitStack()
        try:
            with self.parallel.all_or_none("start training"):
                if self.parallel.is_main:
                    self._held.enter_context(self.folder.locked("train"))
                self._setup(config, resume, changes or {}, progress, allow_different_data)
            if (
                self.parallel.is_main and not resume
            ):  # a resumed run's config.json changes with its first new checkpoint
                self.folder.write_config(self.config)
        except BaseException as e:
            self._held.__exit__(
                type(e), e, e.__traceback__
            )  # the lock's cleanup sees the failure: a folder made for nothing goes
            raise

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _setup(
        self,
        config: TrainConfig | None,
        resume: bool,
        changes: dict[str, Any],
        progress: bool,
        allow_different_data: bool,
    ) -> None:
        state = saved_vae = None
        if resume:
            state, saved_config, saved_vae = self.folder.load_checked()  # the one load of the checkpoint
            edited = self.folder.config_file_disagreement(state["config"])
            if edited:  # resuming would write the checkpoint's settings over the user's edit
                options = ", ".join("--" + f.replace("_", "-") for f in TrainConfig.RUNTIME_FIELDS)
                raise ConfigError(
                    f"cannot resume {self.folder.path}: {edited}; give a changed setting as an option instead "
                    f"(those that may change: {options}), or delete config.json to resume as saved"
                )
            config = self._resumed_config(saved_config, config, changes, len(state["metrics"]))
        elif config is None:
            raise ConfigError("a new run needs its TrainConfig; config=None is for resuming a run")
        config.validate()
        self.progress = progress and self.parallel.is_main
        if not resume and not self.folder.is_fresh_for(config):
            raise ConfigError(
                f"run folder {self.folder.path} already exists and is not empty; pass --resume to continue it or "
                "choose another --run-dir"
            )
        recorded = resume and config.data_dir == saved_config.data_dir  # an error names it as the run's place
        self.dataset = dataset_for(config, progress=self.progress, from_run=recorded)  # the model takes its shape
        self.config = config = config if resume else config_for_data(config, self.dataset)
        load_torchvision()  # it draws every epoch's figures: refused now rather than after the first epoch
        self.device = self.parallel.device(config.device)
        flags = "--hidden, --z-dim, --num-particles or --batch-size"
        planned = None
        if saved_vae is None:
            try:
                with torch.device("meta"):  # the model's own checks and its size, nothing allocated yet
                    planned = build_vae(config)
            except (RuntimeError, NotImplementedError):  # a part that reads values as it is built (Pyro's IAF masks)
                planned = None
        if planned is not None:
            # the parameters, their gradients and Adam's two moments: four copies, none allocated yet
            check_step_memory(planned, config.num_particles, config.batch_size, self.device, flags, parameter_copies=4)
        torch.manual_seed(config.seed)
        self.vae = (build_vae(config) if saved_vae is None else saved_vae).to(self.device)
        if planned is None:  # built for real: its values are allocated, Adam's two moments and the gradients not yet
            check_step_memory(self.vae, config.num_particles, config.batch_size, self.device, flags, parameter_copies=3)
        self.data = data_identity(self.dataset, self.progress)
        if state is not None:
            check_same_data(self.folder.path, state["data"], self.data, allow_different_data)
        self.train_batches = split_batches(config, self.dataset, "train", self.device)
        self.validation_batches = (
            split_batches(config, self.dataset, "validation", self.device) if config.validation_size else None
        )
        self.test_batches = split_batches(config, self.dataset, "test", self.device)
        self.optimizer = torch.optim.Adam(self.vae.parameters(), lr=config.lr)
        self.step = TrainingStep(
            self.vae, make_elbo(config.estimator, config.num_particles, vectorize_particles=True), mode=config.step
        )
        self.metrics: list[dict[str, Any]] = []
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.metrics = state["metrics"]
            set_rng_state(state["rng"])
            self.parallel.restore_device_rng(state["rng"], self.device)
        self.times = self.folder.read_times(len(self.metrics)) if self.parallel.is_main else []
        with contextlib.closing(self.train_batches.eval_batches()) as batches:  # support, shape, dtype, device: once
            self.vae.check_data(next(batches)[0])
        self.bad_in_a_row = 0
        self.step_announced = False
        self.interrupts = InterruptWatch()  # Ctrl-C ends fit() even where Python swallowed it

    def _resumed_config(
        self, saved: TrainConfig, config: TrainConfig | None, changes: dict[str, Any], done: int
    ) -> TrainConfig:
        """The configuration to resume with: ``config``, or the saved one with ``changes``; refused
        if it differs from the checkpoint's in a field that defines the model, or asks for fewer
        epochs than the run has done."""
        if config is None:
            config = dataclasses.replace(saved, **changes)
            config.check_options_given(changes)
        elif config.image_shape is None:  # the data's shape, as the run recorded it
            config = dataclasses.replace(config, image_shape=saved.image_shape)
        before = saved.identity()
        changed = {k: (before[k], v) for k, v in config.identity().items() if before.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in changed.items())
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise ConfigError(
                f"cannot resume {self.folder.path}: its checkpoint was trained with a different configuration "
                f"({detail}); leave {flags} out to resume it as trained, or start a new --run-dir"
            )
        if config.early_stopping is not None and not config.validation_size:
            raise ConfigError(
                f"cannot resume {self.folder.path} with --early-stopping: it was trained without a validation split; "
                "start a new --run-dir with --validation-size N to stop early"
            )
        if config.epochs < done:
            raise ConfigError(
                f"cannot resume {self.folder.path} to {config.epochs} epochs: it has trained {done} already; pass "
                f"--epochs above {done} to train more"
            )
        return config

    @property
    def epochs_done(self) -> int:
        return len(self.metrics)

    @property
    def lost_best_epoch(self) -> int | None:
        """The epoch of the best validation ELBO so far when its model, ``best.pt``, is missing (deleted,
        or never written): that model is lost, and only a later epoch with a better validation ELBO
        writes a new ``best.pt``; None while ``best.pt`` is there, or for a run without a validation split."""
        if self.validation_batches is None or not self.metrics or (self.folder / RunFolder.BEST).is_file():
            return None
        return best_epoch(self.metrics)

    def lost_best_note(self) -> str | None:
        """What a resume must say when :attr:`lost_best_epoch` is set (one line), else None. Training
        goes on: stopping would keep nothing more, and the epochs it adds may yet give a new best."""
        epoch = self.lost_best_epoch
        if epoch is None:
            return None
        return (
            f"{self.folder / RunFolder.BEST} is missing: the model of epoch {epoch}, the best validation ELBO so far "
            f"({self.metrics[epoch - 1]['val_elbo']:.2f}), is lost unless you put that file back; until a later "
            "epoch beats it, evaluate, sample and compare need --model last"
        )

    def kl_weight(self, epoch: int, step: int) -> float:
        """The KL weight of annealing: linear from 0 to 1 over ``kl_anneal_epochs`` epochs, then 1."""
        if self.config.kl_anneal_epochs == 0:
            return 1.0
        return min(1.0, (epoch + (step + 1) / len(self.train_batches)) / self.config.kl_anneal_epochs)

    def train_step(self, x: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor | None:
        """One SVI step on the global batch ``x``: returns its ``-ELBO_beta`` (detached), or None when
        the loss or gradient was not finite and the step was skipped, parameters and Adam untouched."""
        self.optimizer.zero_grad(set_to_none=True)
        start, stop, weight = self.parallel.shard(x.shape[0])
        loss = self.step(x, kl_weight, rows=(start, stop))  # this process's rows; gradients in .grad
        grads = [p.grad for p in self.vae.parameters() if p.grad is not None]
        if weight != 1:  # a process without rows of its own drew the batch's noise and adds nothing
            loss = loss * weight
            for grad in grads:
                grad.mul_(weight)
        self.parallel.sum_in_place([loss, *grads])  # the global batch's loss and gradient on every process
        grad_norm = torch.nn.utils.clip_grad_norm_(self.vae.parameters(), float("inf"))
        if not torch.isfinite(loss + grad_norm):  # NaN or inf in either; one host sync a step
            return None
        self.optimizer.step()
        return loss

    @torch.no_grad()
    def objective_gap(self, x: torch.Tensor, kl_weight: float) -> torch.Tensor:
        """``ELBO_beta - ELBO`` of the global batch ``x`` (summed) with the parameters before the step,
        so that ``-(loss + gap)`` is the ELBO of the step whose loss is ``-ELBO_beta``.

        Where the estimator is linear in beta (``trace``, ``meanfield``), it is
        ``(1 - beta) KL(q(z|x) || p(z))``: analytic where it exists (Gaussian guide and prior; the
        very KL of the meanfield loss, an unbiased stand-in for the Monte Carlo KL of ``trace``), else
        (a VampPrior, an IAF guide) ``log q(z|x) - log p(z)`` at one draw ``z ~ q(z|x)`` of its own,
        an unbiased stand-in again, for one encoder pass instead of two more loss evaluations.
        For the IWAE bound, not linear in beta, the loss is evaluated at 1 and at beta on the draws
        the step makes. Torch's RNG is left as it was either way."""
        if self.config.estimator != "iwae":
            posterior, prior = self.vae.posterior(x), self.vae.prior()
            try:
                kl = kl_divergence(posterior, prior).sum()
            except NotImplementedError:
                with preserved_rng(self.device):
                    z = posterior.sample()
                kl = (posterior.log_prob(z) - prior.log_prob(z)).sum()
            return (1 - kl_weight) * kl
        losses = []
        for weight in (kl_weight, 1.0):
            with preserved_rng(self.device), pyro.validation_enabled(False):
                losses.append(elbo_loss(self.step.elbo, self.vae.model, self.vae.guide, x, weight))
        return losses[1] - losses[0]

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training split; returns the epoch's training metrics: ``train_elbo``,
        the ELBO of the steps' batches, and, if the KL weight was not 1, ``train_objective``,
        their ``ELBO_beta``, the objective the steps maximized (both nats per image)."""
        from tqdm.auto import tqdm

        self.vae.train()
        total, objective = torch.zeros((), device=self.device), torch.zeros((), device=self.device)  # -ELBO, -ELBO_beta
        count, skipped, weight, weighted = 0, 0, 1.0, False
        batches = self.train_batches.epoch(epoch)
        bar = tqdm(
            batches,
            total=len(self.train_batches),
            desc=f"epoch {epoch + 1}/{self.config.epochs}",
            disable=None if self.progress else True,
            leave=False,
        )
        with contextlib.closing(batches):  # a streamed split's workers end with the epoch, even when it fails
            for step, (x, _) in enumerate(bar):
                weight = self.kl_weight(epoch, step)
                gap = self.objective_gap(x, weight) if weight != 1 else None  # before the step changes the parameters
                loss = self.train_step(x, weight)
                self.interrupts.check()
                if self.progress and not self.step_announced:
                    print(f"step: {self.step.describe()}", flush=True)
                    self.step_announced = True
                if loss is None:
                    skipped, self.bad_in_a_row = skipped + 1, self.bad_in_a_row + 1
                    if self.bad_in_a_row >= MAX_CONSECUTIVE_BAD_STEPS:
                        raise self.diverged(
                            f"{self.bad_in_a_row} training steps in a row gave a non-finite loss or gradient (epoch "
                            f"{epoch + 1}, step {step + 1})"
                        )
                    continue
                self.bad_in_a_row = 0
                objective += loss
                total += loss if gap is None else loss + gap
                weighted |= gap is not None
                count += x.shape[0]
                if self.progress and step % 50 == 0:
                    bar.set_postfix(elbo=f"{-(total / max(count, 1)).item():.2f}")
        if count == 0:
            raise self.diverged(f"no training step of epoch {epoch + 1} gave a finite loss and gradient")
        weighted_objective = {"train_objective": -(objective / count).item()} if weighted else {}
        elbo = -(total / count).item()
        return {
            "train_elbo": elbo,
            **weighted_objective,
            "skipped_steps": skipped,
            "kl_weight": weight,
            "step": self.step.describe(),
        }

    def diverged(self, what: str) -> NumericalError:
        last = (
            f"the last good checkpoint is {self.folder.checkpoint_path}"
            if self.folder.checkpoint_path.exists()
            else "no checkpoint was written"
        )
        scale = ""
        if self.config.likelihood == "normal":
            learned = isinstance(self.config.normal_scale, str)
            scale = (
                ", or a fixed --normal-scale"
                if learned
                else f", or a larger --normal-scale (now {self.config.normal_scale:g})"
            )
        return NumericalError(
            f"{what}: the optimization diverged; {last}. Try a lower --lr (now {self.config.lr:g}) or a larger "
            f"--batch-size{scale}"
        )

    def fit(self) -> list[dict[str, Any]]:
        """Train until ``config.epochs`` epochs are done (a resumed run starts after its last)."""
        try:
            with self.interrupts:
                return self._fit()
        except DistributedError as e:
            raise self.parallel.explain_failure(e, self.folder.checkpoint_path) from e
        finally:
            self.close()

    def _fit(self) -> list[dict[str, Any]]:
        """The epochs: set the learning rate, train, score, then save the epoch whole; stop early
        once ``early_stopping`` epochs have not raised the best validation ELBO."""
        for epoch in range(self.epochs_done, self.config.epochs):
            if self.stopped_early:
                break
            started = time.perf_counter()
            lr = self.learning_rate()
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            row = {"epoch": epoch + 1, **self.train_epoch(epoch)}
            if self.config.lr_schedule != "constant":
                row["lr"] = lr
            if self.validation_batches is not None:
                row["val_elbo"] = self.split_elbo(self.validation_batches)
            row["test_elbo"] = self.split_elbo(self.test_batches)
            self.interrupts.check()
            for key in ("val_elbo", "test_elbo"):
                if not math.isfinite(row.get(key, 0.0)):
                    raise self.diverged(f"the {key.replace('_', ' ')} after epoch {epoch + 1} is {row[key]}")
            self.parallel.check_replicas(self.vae)
            # the other ranks wait for rank 0's save; Ctrl-C waits for the save's end: the epoch is kept whole
            with self.parallel.all_or_none("save the checkpoint"), interrupts_deferred():
                self.metrics.append(row)
                self.save()
                self.record_time(epoch + 1, time.perf_counter() - started)
                if self.progress:  # before a deferred Ctrl-C is raised: every kept epoch has its line
                    print(epoch_line(row), flush=True)
        return self.metrics

    def learning_rate(self) -> float:
        """The rate of the next epoch: :func:`pyro_vae.schedule.learning_rate` of the metrics so far."""
        c = self.config
        return learning_rate(c.lr_schedule, c.lr, c.lr_decay, c.lr_patience, self.metrics)

    @property
    def stopped_early(self) -> bool:
        """Whether ``early_stopping`` epochs in a row have not raised the best validation ELBO."""
        patience = self.config.early_stopping
        return patience is not None and epochs_without_improvement(self.metrics) >= patience

    def split_elbo(self, batches: Batches) -> float:
        """:func:`~pyro_vae.evaluate.mean_elbo` of a held-out split (validation or test), computed on the
        main process and shared."""
        self.vae.eval()
        with pyro.validation_enabled(False):  # a diverged model gives NaN here, which fit() reports
            value = mean_elbo(self.vae, batches.eval_batches(), self.config.seed) if self.parallel.is_main else math.nan
        return self.parallel.share(value, self.device, "share a held-out ELBO")

    def save(self) -> None:
        """Write the checkpoint, metrics and figures (the main process only)."""
        if not self.parallel.is_main:
            return
        from .plots import draw_run_figures

        state = {
            "config": self.config.to_dict(),
            "model": self.vae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
            "metrics": self.metrics,
            "data": self.data,
        }
        self.parallel.save_device_rng(state["rng"], self.device)
        if self.validation_batches is not None and best_epoch(self.metrics) == len(self.metrics):
            self.folder.save_best(len(self.metrics), state["model"], self.data)  # first: never a missing best
        self.folder.save_state(state)
        self.folder.write_config(self.config)
        self.folder.write_metrics(self.metrics)
        self.folder.mark_evaluation_stale(len(self.metrics))
        draw_run_figures(self.vae, self.test_batches, self.metrics, self.folder, self.dataset.classes, self.config.seed)

    def record_time(self, epoch: int, seconds: float) -> None:
        """Append the epoch's wall-clock seconds (training, held-out ELBOs and saving) to ``times.jsonl``."""
        if self.parallel.is_main:
            device = str(self.device)
            self.times.append(
                {"epoch": epoch, "seconds": round(seconds, 3), "threads": torch.get_num_threads(), "device": device}
            )
            self.folder.write_times(self.times)

    def close(self) -> None:
        """Release the run folder's lock (the process's end does too)."""
        self._held.close()


def train(
    config: TrainConfig | None,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    *,
    backend: str = "auto",
    dist_timeout: float | None = None,
    **kwargs,
) -> list[dict[str, Any]]:
    """Train (or resume) a run in ``run_dir``; returns the per-epoch metrics. ``kwargs`` go to
    :class:`Trainer`. Under ``torchrun`` every rank calls this with the same arguments, and it joins
    the job (``backend``, ``dist_timeout`` in seconds) for the duration."""
    with (
        distributed.job(backend, dist_timeout) as parallel,
        Trainer(config, run_dir, resume, progress, parallel=parallel, **kwargs) as trainer,
    ):
        return trainer.fit()


def epoch_line(row: dict[str, Any]) -> str:
    """The line printed after an epoch: its ELBOs (nats per image), and, where they vary, the
    learning rate and the KL weight with the objective it weights."""
    line = f"epoch {row['epoch']:3d}  train ELBO {row['train_elbo']:9.2f}"
    if "val_elbo" in row:
        line += f"  validation ELBO {row['val_elbo']:9.2f}"
    line += f"  test ELBO {row['test_elbo']:9.2f} nats/image"
    if "lr" in row:
        line += f"  lr {row['lr']:.3g}"
    if "train_objective" in row:
        line += f"  (KL-weighted objective {row['train_objective']:.2f}, KL weight {row['kl_weight']:.3g})"
    return line
