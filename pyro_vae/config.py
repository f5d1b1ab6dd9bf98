"""The configuration that defines a training run (``config.json``): values and their checks only.
It imports no torch, so the command line shows its defaults at once; the trainer builds the model
from it and checks what needs the model (its sizes, a step's memory) there."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .checks import check_count, data_dir_path, plain_value
from .errors import ConfigError
from .names import (
    ARCHITECTURES,
    DATA_OPTIONS,
    DEFAULT_STEP,
    DEFAULT_TEST_FRACTION,
    LAYOUTS,
    STEP_MODES,
    TRAIN_ESTIMATORS,
    check_binarization,
    dataset_name,
    default_binarization,
)
from .options import KINDS, option, settings, settings_are_fields
from .schedule import DEFAULT_LR_DECAY, LR_SCHEDULES


def with_option_settings(cls: type) -> type:
    """``cls`` with a field per setting of :mod:`pyro_vae.options` (its default, its annotation),
    right after the field that chooses its option (``normal_scale`` after ``likelihood``)."""
    annotations = {}
    for name, annotation in cls.__annotations__.items():
        annotations[name] = annotation
        for _, setting in settings(name) if name in KINDS else ():
            annotations[setting.name] = setting.annotation
            setattr(cls, setting.name, setting.default)
    cls.__annotations__ = annotations
    settings_are_fields()
    return cls


# settings read by one choice of another field, beyond the registry's: setting -> (field, choice)
CHOSEN_SETTINGS = {**DATA_OPTIONS, "lr_patience": ("lr_schedule", "plateau")}


@dataclasses.dataclass
@with_option_settings
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json`` in the run folder).

    The settings of likelihoods, priors and guides (``normal_scale``, ``mixture_components``,
    ``pseudo_inputs``, ``flow_steps``, ...) are fields too, made from :mod:`pyro_vae.options`.
    """

    dataset: str = "fashion_mnist"
    likelihood: str = "bernoulli"
    binarize: str | None = None  # None: the likelihood's default (dynamic for bernoulli, else none)
    architecture: str = "mlp"
    hidden: tuple[int, ...] = (400,)
    activation: str = "softplus"
    z_dim: int = 20
    prior: str = "standard"
    guide: str = "gaussian"
    estimator: str = "meanfield"
    num_particles: int = 1
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    kl_anneal_epochs: float = 0.0  # linear KL warm-up from 0 to 1 over this many epochs
    lr_schedule: str = "constant"  # pyro_vae.schedule: constant, exponential or plateau
    lr_decay: float | None = None  # the schedule's factor (None: its default; constant has none)
    lr_patience: int = 10  # for the plateau schedule: epochs without a better validation ELBO
    validation_size: int = 0  # images held out of the training set (seeded), scored every epoch
    seed: int = 0
    max_train: int | None = None  # use the first N training images (quick runs)
    max_test: int | None = None
    test_fraction: float = DEFAULT_TEST_FRACTION  # of a folder or array without a test split: held out at random
    image_size: tuple[int, int] | None = None  # --dataset folder: resize and centre-crop every image to (H, W)
    layout: str | None = None  # --dataset array: "NCHW" or "NHWC", where the array's shape does not tell
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of the data, filled by the trainer (None: 1x28x28)
    # where and how: not part of the run's identity, may change on resume
    early_stopping: int | None = None  # stop after this many epochs without a better validation ELBO
    device: str = "auto"
    data_dir: str | None = None
    download: bool = False
    data_memory: float | None = None  # GiB of images held in memory; more stream from disk (None: half of what is free)
    data_workers: int | None = None  # processes that read streamed data (None: pyro_vae.streaming.default_workers)
    # pyro_vae.step: "traced" (the graph traced from model/guide), "inductor" (compiled too), "eager" (Pyro's ELBO)
    step: str = DEFAULT_STEP

    RUNTIME_FIELDS = (
        "epochs",
        "early_stopping",
        "device",
        "data_dir",
        "download",
        "data_memory",
        "data_workers",
        "step",
    )

    def __post_init__(self):
        for field in dataclasses.fields(self):  # numpy scalars as Python numbers (config.json holds them)
            setattr(self, field.name, plain_value(getattr(self, field.name)))
        for name in ("hidden", "image_size", "image_shape"):  # config.json holds lists
            value = getattr(self, name)
            setattr(self, name, tuple(map(plain_value, value)) if isinstance(value, (list, tuple)) else value)
        self.binarize_by_default = self.binarize is None  # colour data are binarized only when asked (not a field)
        self.dataset = dataset_name(self.dataset)
        option("likelihood", self.likelihood)  # its data kind sets the default binarization
        if self.binarize is None:
            self.binarize = default_binarization(self.likelihood)
        if self.lr_decay is None:
            self.lr_decay = DEFAULT_LR_DECAY.get(self.lr_schedule)
        if self.data_dir is not None:
            self.data_dir = str(data_dir_path(self.data_dir))  # a run remembers where, whatever the working directory

    def validate(self) -> None:
        """:class:`ConfigError` for a value of the wrong type or out of range, or settings that
        cannot go together (values only: the trainer checks the device, the model and memory)."""
        for name in ("z_dim", "epochs", "batch_size", "num_particles"):
            check_count(name, getattr(self, name))
        check_count("seed", self.seed, 0, 2**63 - 1)
        for name in ("max_train", "max_test"):
            if getattr(self, name) is not None:
                check_count(name, getattr(self, name))
        for name, sides in (("image_size", 2), ("image_shape", 3)):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, tuple) and len(value) == sides):
                raise ConfigError(f"{name} must be {sides} positive integers, got {value!r}")
            for side in value or ():
                check_count(f"a size in {name}", side)
        if (
            isinstance(self.test_fraction, bool)
            or not isinstance(self.test_fraction, (int, float))
            or not 0 < self.test_fraction < 1
        ):
            raise ConfigError(
                f"the test fraction must be a number between 0 and 1 (exclusive), got {self.test_fraction}"
            )
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if not isinstance(self.hidden, tuple):
            raise ConfigError(f"hidden layer widths must be a list of positive integers, got {self.hidden!r}")
        for width in self.hidden:
            check_count("a hidden layer width", width)
        if (
            isinstance(self.lr, bool)
            or not isinstance(self.lr, (int, float))
            or not (math.isfinite(self.lr) and 0 < self.lr <= 10)
        ):
            raise ConfigError(f"the learning rate must be a number in (0, 10], got {self.lr}")
        if (
            isinstance(self.kl_anneal_epochs, bool)
            or not isinstance(self.kl_anneal_epochs, (int, float))
            or not (math.isfinite(self.kl_anneal_epochs) and self.kl_anneal_epochs >= 0)
        ):
            raise ConfigError(f"kl_anneal_epochs must be a finite number >= 0, got {self.kl_anneal_epochs}")
        for name, value, choices in (
            ("step mode", self.step, STEP_MODES),
            ("estimator", self.estimator, TRAIN_ESTIMATORS),
            ("architecture", self.architecture, ARCHITECTURES),
        ):
            if value not in choices:
                raise ConfigError(f"the {name} {value!r} cannot train here; choose one of {', '.join(choices)}")
        for kind in KINDS:
            option(kind, getattr(self, kind))
        for _, setting in settings():
            setting.check(getattr(self, setting.name))
        check_binarization(self.likelihood, self.binarize)
        self._validate_schedule()
        if not isinstance(self.device, str):
            raise ConfigError(f"device must be a name (auto, cpu, cuda or cuda:N), got {self.device!r}")
        if self.data_memory is not None and (
            isinstance(self.data_memory, bool)
            or not isinstance(self.data_memory, (int, float))
            or not (math.isfinite(self.data_memory) and self.data_memory >= 0)
        ):
            raise ConfigError(f"data_memory must be a number of GiB >= 0, got {self.data_memory!r}")
        if self.data_workers is not None:
            check_count("data_workers", self.data_workers, 0)
        if not isinstance(self.download, bool):
            raise ConfigError(f"download must be True or False, got {self.download!r}")

    def _validate_schedule(self) -> None:
        """The learning-rate schedule, the validation split and early stopping (:mod:`pyro_vae.schedule`)."""
        check_count("validation_size", self.validation_size, 0)
        check_count("lr_patience", self.lr_patience)
        if self.early_stopping is not None:
            check_count("early_stopping", self.early_stopping)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if self.lr_schedule == "constant" and self.lr_decay is not None:
            raise ConfigError("--lr-decay is for --lr-schedule exponential or plateau; leave it out, or choose one")
        if self.lr_schedule != "constant" and (
            isinstance(self.lr_decay, bool) or not isinstance(self.lr_decay, (int, float)) or not 0 < self.lr_decay < 1
        ):
            raise ConfigError(
                f"lr_decay must be a number in (0, 1), the factor that lowers the rate, got {self.lr_decay}"
            )
        needs_validation = [
            flag
            for flag, used in (
                ("--lr-schedule plateau", self.lr_schedule == "plateau"),
                ("--early-stopping", self.early_stopping is not None),
            )
            if used
        ]
        if needs_validation and self.validation_size == 0:
            raise ConfigError(
                f"{' and '.join(needs_validation)} watch the validation ELBO: add --validation-size N, the images "
                "held out of the training set (10000 in the published Fashion-MNIST protocol)"
            )

    def check_options_given(self, given) -> None:
        """:class:`ConfigError` if ``given`` (names of settings a user set) holds a setting of a
        likelihood, prior, guide, data set or schedule that this run does not use (``normal_scale``
        for a Bernoulli run, ``flow_steps`` without the iaf guide, ``lr_patience`` without plateau)."""
        owners = [(setting.name, setting.flag, owner.kind, owner.name) for owner, setting in settings()]
        owners += [(name, "--" + name.replace("_", "-"), *chooser) for name, chooser in CHOSEN_SETTINGS.items()]
        for name, flag, field, choice in owners:
            if name in given and getattr(self, field) != choice:
                chooser = "--" + field.replace("_", "-")
                raise ConfigError(
                    f"{flag} is for {chooser} {choice}; this run's {field} is {getattr(self, field)}: leave {flag} out"
                )

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run it continues (a likelihood's own
        setting, such as ``mixture_components``, only for the likelihood that reads it; likewise
        ``pseudo_inputs`` only for the vamp prior, ``flow_steps`` only for the iaf guide, and
        :data:`CHOSEN_SETTINGS` only for the choice that reads them)."""
        ignored = {setting.name for owner, setting in settings() if getattr(self, owner.kind) != owner.name}
        ignored |= {name for name, (field, choice) in CHOSEN_SETTINGS.items() if getattr(self, field) != choice}
        return {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME_FIELDS and k not in ignored}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("hidden", "image_size", "image_shape"):
            d[name] = None if d[name] is None else list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str = "the run's configuration") -> "TrainConfig":
        """The config saved as ``d``; :class:`ConfigError` naming the problem for anything else."""
        if not isinstance(d, dict):
            raise ConfigError(
                f"{source} is not a mapping of settings (got {type(d).__name__}); the run folder is damaged"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"{source} has settings this version of pyro-vae does not know ({', '.join(unknown)}); it was "
                "written by a newer version: upgrade pyro-vae"
            )
        try:
            config = cls(**d)
            config.validate()  # a damaged or hand-edited file: refused here, not deep in torch
            return config
        except (TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{source} is not a valid configuration ({e})") from e
