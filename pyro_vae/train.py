"""Training: stochastic variational inference on image data, with checkpoints and figures.

Each step minimizes ``-ELBO`` of a minibatch with one of :func:`~pyro_vae.make_elbo`'s estimators
(``differentiable_loss``) and Adam on the VAE's parameters. Every epoch appends train and test ELBO
(nats per image) to ``metrics.jsonl``, rewrites ``checkpoint.pt`` atomically and redraws the
figures, so a run stopped at any moment can be resumed and has something to show.

Reproducibility: the data order and the binarization draws depend only on ``(seed, epoch)``
(:class:`~pyro_vae.data.DeviceBatches`), the latent draws on torch's RNG, whose state the
checkpoint keeps; so on CPU a resumed run repeats an uninterrupted one exactly.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) the same code trains data-parallel
(:mod:`pyro_vae.distributed`): each rank takes its rows of every global batch, with the
binarization and latent draws a single process would make for them, DistributedDataParallel
sums the gradients, and rank 0 alone evaluates and writes. The objective per step is the
single-process one on the global batch of ``batch_size``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable

import pyro
import torch
from tqdm.auto import tqdm

from . import distributed, plots
from .checkpoint import load_checkpoint, save_checkpoint, write_atomic
from .data import DeviceBatches, check_binarization, default_binarization, load_dataset
from .errors import ConfigError
from .estimators import make_elbo
from .model import ARCHITECTURES, VAE

TRAIN_ESTIMATORS = ("meanfield", "trace", "iwae")  # "renyi" tempers its weights under minibatches
# a step whose loss or gradient is not finite is skipped; this many in a row stop the run
MAX_CONSECUTIVE_BAD_STEPS = 20


class NumericalError(RuntimeError):
    """Training produced non-finite losses or gradients and cannot go on."""


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json`` in the run folder)."""

    dataset: str = "fashion_mnist"
    likelihood: str = "bernoulli"
    normal_scale: str | float = "shared"
    binarize: str | None = None  # None: the likelihood's default (dynamic for bernoulli, else none)
    architecture: str = "mlp"
    hidden: tuple[int, ...] = (400,)
    activation: str = "softplus"
    z_dim: int = 20
    estimator: str = "meanfield"
    num_particles: int = 1
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    kl_anneal_epochs: float = 0.0  # linear KL warm-up from 0 to 1 over this many epochs
    seed: int = 0
    max_train: int | None = None  # use the first N training images (quick runs)
    max_test: int | None = None
    # where and how: not part of the run's identity, may change on resume
    device: str = "auto"
    data_dir: str | None = None
    download: bool = False

    RUNTIME_FIELDS = ("epochs", "device", "data_dir", "download")

    def __post_init__(self):
        self.hidden = tuple(self.hidden)
        if self.binarize is None:
            self.binarize = default_binarization(self.likelihood)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for settings that cannot work."""
        positive = {"z_dim": self.z_dim, "epochs": self.epochs, "batch_size": self.batch_size, "num_particles": self.num_particles}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"the learning rate must be a positive number, got {self.lr}")
        if self.kl_anneal_epochs < 0:
            raise ConfigError(f"kl_anneal_epochs must be non-negative, got {self.kl_anneal_epochs}")
        if self.estimator not in TRAIN_ESTIMATORS:
            raise ConfigError(f"estimator {self.estimator!r} cannot train here; choose one of {TRAIN_ESTIMATORS}")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {self.architecture!r}; choose one of {ARCHITECTURES}")
        for name in ("max_train", "max_test"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        check_binarization(self.likelihood, self.binarize)
        build_vae(self)  # the model's own checks: sizes, likelihood, scale

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run it continues."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls(**d)


def build_vae(config: TrainConfig) -> VAE:
    return VAE(
        x_dim=784,
        z_dim=config.z_dim,
        likelihood=config.likelihood,
        normal_scale=config.normal_scale,
        architecture=config.architecture,
        hidden=config.hidden,
        activation=config.activation,
    )


def resolve_device(name: str) -> torch.device:
    """``"auto"``: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    return device


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def seeded(device: torch.device, seed: int):
    """Draw from ``seed`` and leave the training RNG stream (CPU and ``device``) as it was, so that
    evaluation and figures never change what training draws next (exact resumes need that)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def split_batches(config: TrainConfig, images: torch.Tensor, labels: torch.Tensor, shuffle: bool, device: torch.device) -> DeviceBatches:
    """A split of the data as the run sees it: its batch size, binarization, seed and image layout."""
    return DeviceBatches(images, labels, config.batch_size, binarization=config.binarize, seed=config.seed, shuffle=shuffle, flatten=config.architecture == "mlp", device=device)


@torch.no_grad()
def mean_elbo(vae: VAE, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], seed: int) -> float:
    """Test ELBO in nats per image: analytic KL, one particle, a fixed seed and the training
    RNG left untouched, so the number is comparable across epochs and exact across resumes."""
    elbo = make_elbo("meanfield", 1)
    total, count = torch.zeros((), dtype=torch.float64), 0
    with seeded(vae.prior_loc.device, seed):
        for x, _ in batches:
            total += elbo.differentiable_loss(vae.model, vae.guide, x).double().cpu()
            count += x.shape[0]
    return -(total / count).item()


class Trainer:
    """Holds a run's model, optimizer, data and folder; :meth:`run` trains the remaining epochs.

    In a process started by ``torchrun`` it joins the job (:func:`pyro_vae.distributed.setup` with
    ``backend`` and ``dist_timeout`` in seconds) and trains data-parallel; ``run_dir`` must then be
    the same folder for every rank (a shared file system across nodes).
    """

    def __init__(self, config: TrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True, *, backend: str = "auto", dist_timeout: float | None = None):
        self.dist = distributed.setup(backend, dist_timeout)  # None unless launched by torchrun
        self.is_main = self.dist is None or self.dist.is_main
        # every rank sets up; if one cannot (its data, its view of the run folder), all stop together
        with distributed.all_or_none(self.dist, "start training"):
            self._setup(config, run_dir, resume, progress)
        # DDP broadcasts rank 0's parameters (equal already: same seed or checkpoint) and from now on
        # sums the gradients of the ranks' shards
        self.loss = None if self.dist is None else self.dist.wrap(distributed.ELBOLoss(self.vae, self.elbo), self.device)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for leftover in self.run_dir.glob(".*.tmp"):  # from a process killed while writing
                leftover.unlink()
            write_atomic(self.run_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")

    def _setup(self, config: TrainConfig, run_dir: str | Path, resume: bool, progress: bool) -> None:
        config.validate()
        self.config, self.run_dir, self.progress = config, Path(run_dir), progress and self.is_main
        self.checkpoint_path = self.run_dir / "checkpoint.pt"
        state = self._resume_state() if resume else None
        if not resume and not self._fresh_folder(config):
            raise ConfigError(f"run folder {self.run_dir} already exists and is not empty; pass --resume to continue it or choose another --run-dir")
        if self.dist is None:
            self.device = resolve_device(config.device)
        else:
            self.device = self.dist.device(config.device)
            self.dist.check_device(self.device)
        self.dataset = load_dataset(config.dataset, config.data_dir, config.download)
        ds = self.dataset
        self.train_batches = split_batches(config, ds.train_images[: config.max_train], ds.train_labels[: config.max_train], True, self.device)
        self.test_batches = split_batches(config, ds.test_images[: config.max_test], ds.test_labels[: config.max_test], False, self.device)
        torch.manual_seed(config.seed)
        pyro.clear_param_store()  # pyro.module would otherwise hand SVI users stale store entries
        self.vae = build_vae(config).to(self.device)
        self.optimizer = torch.optim.Adam(self.vae.parameters(), lr=config.lr)
        self.elbo = make_elbo(config.estimator, config.num_particles, vectorize_particles=True)
        self.metrics: list[dict[str, Any]] = []
        if state is not None:
            self.vae.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.metrics = state["metrics"]
            set_rng_state(state["rng"])
            if self.dist is not None and self.device.type == "cuda":
                # every rank continues the stream of the device rank 0 saved
                torch.cuda.set_rng_state(state["rng"].get("device", state["rng"]["cuda"][0]), self.device)
        self.vae.check_data(next(self.train_batches.epoch(0))[0])  # support, shape, dtype, device: once

    def _fresh_folder(self, config: TrainConfig) -> bool:
        """Empty or absent, or holding only this very config: a run stopped before its first
        checkpoint, with nothing to lose by starting it again."""
        if not self.run_dir.exists():
            return True
        contents = [p for p in self.run_dir.iterdir() if not p.name.endswith(".tmp")]
        if not contents:
            return True
        if [p.name for p in contents] != ["config.json"]:
            return False
        try:
            return json.loads(contents[0].read_text()) == config.to_dict()
        except ValueError:
            return False

    def _resume_state(self) -> dict[str, Any]:
        if not self.checkpoint_path.exists() and (self.run_dir / "config.json").exists():
            raise ConfigError(f"{self.run_dir} has no checkpoint yet: the run stopped before its first epoch ended; start it again without --resume")
        state = load_checkpoint(self.checkpoint_path, map_location="cpu")
        saved = TrainConfig.from_dict(state["config"]).identity()
        changed = {k: (saved[k], v) for k, v in self.config.identity().items() if saved.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in changed.items())
            raise ConfigError(f"cannot resume {self.run_dir}: its checkpoint was trained with a different configuration ({detail})")
        return state

    @property
    def epochs_done(self) -> int:
        return len(self.metrics)

    def kl_scale(self, epoch: int, step: int) -> float:
        if self.config.kl_anneal_epochs == 0:
            return 1.0
        return min(1.0, (epoch + (step + 1) / len(self.train_batches)) / self.config.kl_anneal_epochs)

    def train_step(self, x: torch.Tensor) -> torch.Tensor | None:
        """One SVI step on the batch ``x``: returns ``-ELBO`` (detached), or None when the loss or
        gradient was not finite and the step was skipped, parameters and Adam state untouched."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.dist is not None:
            loss = self._distributed_loss_and_grads(x)
        else:
            # the data were checked once in __init__; per-step validation would stop at the first
            # non-finite parameter with a traceback instead of skipping the step
            with pyro.validation_enabled(False):
                loss = self.elbo.differentiable_loss(self.vae.model, self.vae.guide, x)
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.vae.parameters(), float("inf"))
        if not torch.isfinite(loss.detach() + grad_norm):  # NaN or inf in either; one host sync a step
            return None
        self.optimizer.step()
        return loss.detach()

    def _distributed_loss_and_grads(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the global batch ``x`` through DDP; returns the global batch's
        ``-ELBO``, the same on every rank, so that all take the same skip-or-step decision.
        The gradients, summed over the ranks by DDP, are those of the global batch's sum."""
        start, stop, weight = self.dist.shard(x.shape[0])
        with pyro.validation_enabled(False):
            loss = self.loss(x[start:stop], start, stop, x.shape[0])
        self.dist.backward(loss * weight)
        return self.dist.all_reduce_sum(loss.detach() * weight)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training split; returns the epoch's training metrics."""
        self.vae.train()
        total, count, skipped, bad_in_a_row = torch.zeros((), device=self.device), 0, 0, 0
        bar = tqdm(self.train_batches.epoch(epoch), total=len(self.train_batches), desc=f"epoch {epoch + 1}/{self.config.epochs}", disable=None if self.progress else True, leave=False)  # None: no bar off a terminal
        for step, (x, _) in enumerate(bar):
            self.vae.kl_scale = self.kl_scale(epoch, step)
            loss = self.train_step(x)
            if loss is None:
                skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
                if bad_in_a_row >= MAX_CONSECUTIVE_BAD_STEPS:
                    raise NumericalError(
                        f"{bad_in_a_row} training steps in a row gave a non-finite loss or gradient (epoch {epoch + 1}, step {step + 1}); "
                        f"the parameters were left as they were and the last good checkpoint is {self.checkpoint_path}. Try a lower --lr."
                    )
                continue
            bad_in_a_row = 0
            total += loss
            count += x.shape[0]
            if self.progress and step % 50 == 0:
                bar.set_postfix(elbo=f"{-(total / max(count, 1)).item():.2f}")
        return {"train_elbo": -(total / max(count, 1)).item(), "skipped_steps": skipped, "kl_scale": self.vae.kl_scale}

    def run(self) -> list[dict[str, Any]]:
        """Train until ``config.epochs`` epochs are done (a resumed run starts after its last)."""
        if self.dist is None:
            return self._run()
        try:
            return self._run()
        except distributed.DistributedError as e:
            if not self.checkpoint_path.exists():
                raise
            raise distributed.DistributedError(f"{e} The last complete checkpoint is {self.checkpoint_path}; continue the run with --resume.") from e

    def _run(self) -> list[dict[str, Any]]:
        for epoch in range(self.epochs_done, self.config.epochs):
            row = {"epoch": epoch + 1, **self.train_epoch(epoch)}
            row["test_elbo"] = self.test_elbo()
            if self.dist is not None:
                self.dist.check_replicas(self.vae)
            self.metrics.append(row)
            self.save()
            self.draw_figures()
            if self.progress:
                print(f"epoch {row['epoch']:3d}  train ELBO {row['train_elbo']:9.2f}  test ELBO {row['test_elbo']:9.2f} nats/image", flush=True)
        return self.metrics

    def test_elbo(self) -> float:
        """:func:`mean_elbo` of the test split; distributed, rank 0 computes it for everyone."""
        if self.dist is None:
            return mean_elbo(self.vae.eval(), self.test_batches.eval_batches(), self.config.seed)
        self.vae.eval()
        value = mean_elbo(self.vae, self.test_batches.eval_batches(), self.config.seed) if self.is_main else math.nan
        return self.dist.broadcast_float(value, self.device, "share the test ELBO")

    def save(self) -> None:
        """Write the checkpoint and metrics (rank 0 only in a distributed run)."""
        if not self.is_main:
            return
        state = {
            "config": self.config.to_dict(),
            "model": self.vae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
            "metrics": self.metrics,
        }
        if self.dist is not None and self.device.type == "cuda":
            state["rng"]["device"] = torch.cuda.get_rng_state(self.device)
        save_checkpoint(state, self.checkpoint_path)
        write_atomic(self.run_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in self.metrics))

    @torch.no_grad()
    def draw_figures(self) -> None:
        if not self.is_main:
            return
        draw_run_figures(self.vae, self.test_batches, self.metrics, self.run_dir, self.config.dataset, self.config.seed)


def draw_run_figures(vae: VAE, test_batches: DeviceBatches, metrics: list[dict[str, Any]], run_dir: Path, dataset: str, seed: int) -> None:
    """ELBO curves, test reconstructions, prior samples and, for ``z_dim == 2``, the latent
    manifold and the test encodings coloured by label."""
    vae.eval()
    plots.plot_elbo_curves(metrics, run_dir / "elbo.png")
    x, labels = next(test_batches.eval_batches())
    plots.plot_reconstructions(x[:32].cpu(), vae.reconstruct(x[:32]).cpu(), run_dir / "reconstructions.png")
    with seeded(vae.prior_loc.device, seed):
        plots.plot_image_grid(vae.generate(64).cpu(), run_dir / "samples.png", title="samples from the prior: mean of p(x|z), z ~ N(0, I)")
    if vae.z_dim == 2:
        decode = lambda z: vae.likelihood(vae.decoder(z.to(vae.prior_loc))).mean.reshape(z.shape[0], -1).cpu()
        plots.plot_latent_manifold(decode, run_dir / "manifold.png")
        codes = torch.cat([vae.encoder(xb)[0].cpu() for xb, _ in test_batches.eval_batches()])
        names = plots.FASHION_MNIST_CLASSES if dataset == "fashion_mnist" else None
        plots.plot_latent_scatter(codes, test_batches.labels.cpu(), run_dir / "latent_scatter.png", class_names=names)


def train(config: TrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True, *, backend: str = "auto", dist_timeout: float | None = None) -> list[dict[str, Any]]:
    """Train (or resume) a run in ``run_dir``; returns the per-epoch metrics.

    Under ``torchrun`` every rank calls this with the same arguments: it joins the job, trains
    data-parallel and leaves the process group at the end (see :class:`Trainer`)."""
    try:
        return Trainer(config, run_dir, resume=resume, progress=progress, backend=backend, dist_timeout=dist_timeout).run()
    finally:
        distributed.shutdown()


def load_run(run_dir: str | Path, device: str = "auto") -> tuple[TrainConfig, VAE, list[dict[str, Any]]]:
    """The config, trained VAE (in eval mode, on ``device``) and metrics of a saved run."""
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoint.pt").is_file():
        raise ConfigError(f"{run_dir} holds no checkpoint.pt; pass the folder a 'pyro-vae train' run wrote")
    state = load_checkpoint(run_dir / "checkpoint.pt")
    config = TrainConfig.from_dict(state["config"])
    vae = build_vae(config)
    vae.load_state_dict(state["model"])
    return config, vae.to(resolve_device(device)).eval(), state["metrics"]
