"""The configuration that defines a training run (``config.json``), importable without torch so
that the command line can show its defaults at once; its checks load the model code when run."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError
from .names import ARCHITECTURES, ESTIMATORS, LIKELIHOOD_OPTIONS, STEP_MODES, check_binarization_name, dataset_name

TRAIN_ESTIMATORS = tuple(e for e in ESTIMATORS if e != "renyi")  # renyi tempers its weights under minibatches


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json`` in the run folder)."""

    dataset: str = "fashion_mnist"
    likelihood: str = "bernoulli"
    normal_scale: str | float = "shared"
    mixture_components: int = 5  # for the discretized_logistic_mixture likelihood
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
    step: str = "eager"  # "eager": plain Pyro ELBO; "traced": the graph traced from model/guide; "inductor": compiled too (pyro-vae train: traced)

    RUNTIME_FIELDS = ("epochs", "device", "data_dir", "download", "step")

    def __post_init__(self):
        self.hidden = tuple(self.hidden) if isinstance(self.hidden, (list, tuple)) else self.hidden
        self.dataset = dataset_name(self.dataset)
        if self.binarize is None:
            from .likelihoods import likelihood_class

            self.binarize = likelihood_class(self.likelihood).default_binarization
        if self.data_dir is not None:
            if not str(self.data_dir).strip():
                raise DataError("--data-dir is empty; pass the folder that holds the IDX files, or leave it out")
            self.data_dir = str(Path(self.data_dir).expanduser().resolve())  # a run remembers where, whatever the working directory

    def validate(self) -> None:
        """Raise :class:`ConfigError` for settings that cannot work, here: values, the device, the
        model, a training step's memory (refused before anything large is allocated), and
        torchvision, which draws the figures of every epoch."""
        self.check_settings()
        from .run import build_vae, check_step_memory
        from .runtime import load_torchvision, resolve_device

        load_torchvision()

        import torch

        device = resolve_device(self.device)
        with torch.device("meta"):  # the model's own checks (sizes, likelihood, scale), nothing allocated
            vae = build_vae(self)
        flags = "--hidden, --z-dim, --num-particles or --batch-size"
        # the parameters, their gradients and Adam's two moments: four copies, none allocated yet
        check_step_memory(vae, self.num_particles, self.batch_size, device, flags, parameter_copies=4)

    def check_settings(self) -> None:
        """:class:`ConfigError` for a value of the wrong type or out of range (no device, no model)."""
        integers = {"z_dim": self.z_dim, "epochs": self.epochs, "batch_size": self.batch_size, "num_particles": self.num_particles, "seed": self.seed}
        for name, value in integers.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        for name in ("z_dim", "epochs", "batch_size", "num_particles"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be between 0 and 2**63 - 1, got {self.seed}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (math.isfinite(self.lr) and 0 < self.lr <= 10):
            raise ConfigError(f"the learning rate must be a number in (0, 10], got {self.lr}")
        if isinstance(self.kl_anneal_epochs, bool) or not isinstance(self.kl_anneal_epochs, (int, float)) or not (math.isfinite(self.kl_anneal_epochs) and self.kl_anneal_epochs >= 0):
            raise ConfigError(f"kl_anneal_epochs must be a finite number >= 0, got {self.kl_anneal_epochs}")
        if self.step not in STEP_MODES:
            raise ConfigError(f"unknown step mode {self.step!r}; choose one of {STEP_MODES}")
        if self.estimator not in TRAIN_ESTIMATORS:
            raise ConfigError(f"estimator {self.estimator!r} cannot train here; choose one of {TRAIN_ESTIMATORS}")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {self.architecture!r}; choose one of {ARCHITECTURES}")
        for name in ("max_train", "max_test"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.hidden, tuple) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in self.hidden):
            raise ConfigError(f"hidden layer widths must be positive integers, got {self.hidden!r}")
        check_binarization_name(self.binarize)
        from .likelihoods import likelihood_class

        likelihood_class(self.likelihood).check_binarization(self.binarize)

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run it continues (a likelihood's own
        setting, such as ``mixture_components``, only for the likelihood that reads it)."""
        ignored = {k for k, likelihood in LIKELIHOOD_OPTIONS.items() if likelihood != self.likelihood}
        return {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME_FIELDS and k not in ignored}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str = "the run's configuration") -> "TrainConfig":
        """The config saved as ``d``; :class:`ConfigError` naming the problem for anything else."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source} is not a mapping of settings (got {type(d).__name__}); the run folder is damaged")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source} has settings this version of pyro-vae does not know ({', '.join(unknown)}); it was written by a newer version: upgrade pyro-vae")
        try:
            config = cls(**d)
            config.check_settings()  # a damaged or hand-edited file: refused here, not deep in torch
            return config
        except (TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{source} is not a valid configuration ({e})") from e
