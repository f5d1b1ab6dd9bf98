"""A training run and its folder: the configuration that defines it, the files that hold it, the
lock that keeps one writer at a time, and loading a saved run back.

A run folder holds ``config.json``, ``metrics.jsonl`` (one strict-JSON line per epoch; a pure
function of the configuration and the seed, so a resumed run's equals an uninterrupted one's),
``times.jsonl`` (each epoch's wall-clock seconds, threads and device: the machine's, kept apart),
``checkpoint.pt`` (model, optimizer, RNG state, metrics, and the fingerprint of the data it was
trained on) and figures. Every file is replaced atomically (:mod:`pyro_vae.checkpoint`): written
to a temporary file in the folder and renamed over the target, so a kill at any moment leaves the
old or the new file, and a symlink in the folder is replaced, never followed. A writer holds an
exclusive OS lock on ``.lock`` (released by the OS when the process dies), so a second writer is
refused with the first one's process id instead of corrupting its files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import fnmatch
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from .checkpoint import check_writable_folder, load_checkpoint, save_checkpoint, write_atomic
from .config import TrainConfig
from .data import Batches, DeviceBatches, ImageDataset, held_out, load_dataset
from .errors import ConfigError, DataError
from .model import VAE, build_vae
from .names import SAVED_MODELS
from .networks import IMAGE_SHAPE
from .runtime import resolve_device


def split_batches(config: TrainConfig, dataset: ImageDataset, split: str, device: torch.device) -> Batches:
    """The ``"train"``, ``"validation"`` or ``"test"`` split as the run sees it: its size limit,
    batch size, binarization, seed and image layout (the train split shuffled). The validation
    split is ``config.validation_size`` images of the training set (after ``max_train``) chosen by
    :func:`~pyro_vae.data.held_out` from the seed; the train split is the rest.

    Device-resident (:class:`~pyro_vae.data.DeviceBatches`) if the data set fits the memory budget
    (``config.data_memory``, :func:`~pyro_vae.memory.data_memory_budget`) on ``device``; else
    streamed (:class:`~pyro_vae.streaming.StreamedBatches`, ``config.data_workers`` workers): from
    disk where the data set stayed there, from host memory where only the GPU lacks room. The
    batches are the same either way."""
    if split == "test":
        images, labels = dataset.test_images[: config.max_test], dataset.test_labels[: config.max_test]
    else:
        images, labels = dataset.train_images[: config.max_train], dataset.train_labels[: config.max_train]
        rows = held_out(images.shape[0], config.validation_size, config.seed)
        rows = rows if split == "validation" else ~rows
        images, labels = images[rows], labels[rows]
    options = dict(
        binarization=config.binarize,
        seed=config.seed,
        shuffle=split == "train",
        flatten=config.architecture == "mlp",
        device=device,
    )
    if streams(config, dataset, device):
        from .streaming import StreamedBatches

        return StreamedBatches(images, labels, config.batch_size, num_workers=config.data_workers, **options)
    return DeviceBatches(images, labels, config.batch_size, **options)


def streams(config: TrainConfig, dataset: ImageDataset, device: torch.device) -> bool:
    """Whether the run reads ``dataset`` streamed: it stayed on disk, or it is over the memory budget
    of a GPU ``device`` (on the CPU, data in memory are where training reads them already)."""
    if dataset.streamed:
        return True
    if torch.device(device).type == "cpu":
        return False
    from .memory import data_memory_budget

    return dataset.nbytes > data_memory_budget(config.data_memory, device)


def dataset_for(
    config: TrainConfig, data_dir: str | None = None, progress: bool = False, from_run: bool = False
) -> ImageDataset:
    """The data set ``config`` names, read from ``data_dir`` (default: the run's own ``config.data_dir``;
    ``from_run``: that is the place a saved run recorded, not one just given, which an error names as
    the run's if the data are no longer there); a folder or ``.npy`` over ``config.data_memory`` GiB
    (:func:`~pyro_vae.memory.data_memory_budget`) stays on disk."""
    from .memory import data_memory_budget

    return load_dataset(
        config.dataset,
        config.data_dir if data_dir is None else data_dir,
        config.download,
        test_fraction=config.test_fraction,
        image_size=config.image_size,
        layout=config.layout,
        progress=progress,
        memory_budget=data_memory_budget(config.data_memory),
        from_run=from_run and data_dir is None,
    )


def config_for_data(config: TrainConfig, dataset: ImageDataset) -> TrainConfig:
    """``config`` with the ``image_shape`` of ``dataset`` filled in (left None for 1x28x28, what None
    means, so that MNIST-family configurations stay as given); :class:`DataError` if it names another
    shape, or if colour images would be binarized without ``binarize`` set explicitly."""
    shape = dataset.image_shape
    if config.image_shape not in (None, shape):
        raise DataError(
            f"the configuration's image_shape {config.image_shape} is not the data's {shape} ({dataset.source}); "
            "leave image_shape out to take the data's"
        )
    if shape[0] > 1 and config.binarize not in ("none", "dequantize") and config.binarize_by_default:
        raise DataError(
            f"{dataset.source} holds colour images, which the {config.likelihood} likelihood would binarize "
            f"channel by channel; use --likelihood discretized_logistic for 8-bit colour, or pass --binarize "
            f"{config.binarize} to binarize them"
        )
    if config.image_shape is None and shape == IMAGE_SHAPE:
        return config
    return dataclasses.replace(config, image_shape=shape)


def data_identity(dataset: ImageDataset, progress: bool = False) -> dict[str, str]:
    """What a checkpoint records of its data: where it was read and its content fingerprint."""
    return {"source": dataset.source, "fingerprint": dataset.fingerprint(progress)}


def check_same_data(run_path: Path, saved: dict[str, Any], found: dict[str, str], allow_different_data: bool) -> None:
    """Refuse data whose fingerprint differs from the run's, unless ``allow_different_data``."""
    if saved.get("fingerprint") == found["fingerprint"] or allow_different_data:
        return
    if "fingerprint" not in saved:  # a run evaluated from an old best.pt, its checkpoint lost
        raise DataError(
            f"the fingerprint of {run_path}'s data was kept in its missing {RunFolder.CHECKPOINT}, so the data found "
            f"({found['source']}) cannot be checked against it; pass --allow-different-data to use them"
        )
    raise DataError(
        f"{run_path} was trained on other data ({saved.get('source')}, fingerprint {saved.get('fingerprint')}) than "
        "what was "
        f"found now ({found['source']}, fingerprint {found['fingerprint']}); pass --data-dir with the run's data, or "
        "--allow-different-data to use these"
    )


def _holder(lock_path: Path) -> str:
    try:
        pid = lock_path.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


class RunFolder:
    """The files of one run: where they are, how they are written, who may write them."""

    CONFIG, METRICS, TIMES = "config.json", "metrics.jsonl", "times.jsonl"
    CHECKPOINT, BEST, LOCK = "checkpoint.pt", "best.pt", ".lock"
    # what training (its figures: pyro_vae.plots.draw_run_figures) and evaluate write here, and temporary files
    OWN_FILES = (
        CONFIG,
        METRICS,
        TIMES,
        CHECKPOINT,
        BEST,
        LOCK,
        ".*.tmp",
        "evaluation*.json",
        "inference_data*.nc",
        "elbo.png",
        "reconstructions.png",
        "samples.png",
        "manifold.png",
        "latent_scatter.png",
    )

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: int | None = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint_path(self) -> Path:
        return self.path / self.CHECKPOINT

    @contextlib.contextmanager
    def locked(self, doing: str = "write to it") -> Iterator["RunFolder"]:
        """Hold the folder's exclusive lock (``flock`` on ``.lock``, freed when the process dies);
        :class:`ConfigError` naming the holder if another process has it. Creates the folder."""
        if self._lock_fd is not None:  # already held by this object
            yield self
            return
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / self.LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ConfigError(
                    f"cannot {doing} in {self.path}: its {self.LOCK} is a symbolic link, which pyro-vae never "
                    "follows; remove it and try again"
                ) from e
            raise ConfigError(
                f"cannot {doing} in {self.path}: {e.strerror or e}; choose a folder you can write to"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(
                    f"run folder {self.path} is in use by {_holder(self.path / self.LOCK)}; wait for it to finish or "
                    "stop it, then try again"
                ) from e
            raise
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # a full disk: the lock holds all the same, only its holder goes unnamed
        self._lock_fd = fd
        try:
            self.remove_temporary_files()  # ours to clean: no live writer can own them now
            yield self
        except BaseException:
            if created and [p.name for p in self.path.iterdir()] == [self.LOCK]:
                (self.path / self.LOCK).unlink()  # a folder made for a run that never started
                self.path.rmdir()
            raise
        finally:
            self._lock_fd = None
            os.close(fd)  # releases the lock

    def in_use_by(self) -> str | None:
        """Who holds the folder's lock (``process PID``), if another process does: a run in progress, say."""
        if self._lock_fd is not None:
            return None  # this object holds it
        try:
            fd = os.open(self.path / self.LOCK, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _holder(self.path / self.LOCK)
        finally:
            os.close(fd)  # and the shared lock with it
        return None

    def check_output(self, path: str | os.PathLike, option: str = "--out") -> None:
        """:class:`ConfigError` if writing ``path`` (a file, or a folder of outputs) would replace
        this folder itself or one of its own files (:attr:`OWN_FILES`, temporary ones included).
        ``path``'s folder is resolved, not ``path`` itself: a writer replaces a link, never follows it."""
        path, here = Path(path), self.path.resolve()
        if path.resolve() == here:
            raise ConfigError(
                f"{option} {path} is the run folder {self.path} itself, which holds the run's files; "
                f"choose another {option}"
            )
        if path.parent.resolve() == here and any(fnmatch.fnmatchcase(path.name, own) for own in self.OWN_FILES):
            raise ConfigError(
                f"{option} {path} would replace {path.name}, one of the run's own files in {self.path}; "
                f"choose another {option}"
            )

    def remove_temporary_files(self) -> None:
        """Temporary files left by a writer that was killed mid-write (only call with the lock held)."""
        for leftover in self.path.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)

    @contextlib.contextmanager
    def all_or_none(self, name: str) -> Iterator[None]:
        """Put the file ``name`` back as it was if the block fails (a later write of the same
        operation, say): a hard link keeps the old file until the block is done (lock held)."""
        path, keep = self.path / name, self.path / f".{name}.previous.tmp"
        kept, existed = False, os.path.lexists(path)
        if existed:
            keep.unlink(missing_ok=True)
            try:
                os.link(path, keep, follow_symlinks=False)
                kept = True
            except OSError:
                pass  # no hard links here: the old file cannot be kept
        try:
            yield
        except BaseException:
            if kept:
                os.replace(keep, path)
            elif not existed:
                path.unlink(missing_ok=True)  # there was none before: there is none after
            raise
        finally:
            keep.unlink(missing_ok=True)

    def write_text(self, name: str, text: str) -> Path:
        write_atomic(self.path / name, text)
        return self.path / name

    def write_config(self, config: TrainConfig) -> None:
        self.write_text(self.CONFIG, json.dumps(config.to_dict(), indent=2) + "\n")

    def write_metrics(self, metrics: list[dict[str, Any]]) -> None:
        """``metrics.jsonl``, strict JSON: a non-finite number is written as ``null``."""
        self.write_text(self.METRICS, "".join(json.dumps(strict_json(row), allow_nan=False) + "\n" for row in metrics))

    def write_times(self, times: list[dict[str, Any]]) -> None:
        """``times.jsonl``: one line per epoch, its wall-clock ``seconds``, ``threads`` and ``device``."""
        self.write_text(self.TIMES, "".join(json.dumps(row) + "\n" for row in times))

    def read_times(self, epochs: int) -> list[dict[str, Any]]:
        """The lines of ``times.jsonl`` for the first ``epochs`` epochs (none for a run saved before it
        was kept, or for epochs past the checkpoint's); :class:`ConfigError` naming the fix if damaged."""
        path = self.path / self.TIMES
        if not path.exists():
            return []
        try:
            return [row for row in map(json.loads, path.read_text().splitlines()) if row["epoch"] <= epochs]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"{path} is damaged ({type(e).__name__}); put the original back, or delete it to go on (only the "
                "wall-clock times of the epochs so far are lost)"
            ) from e

    def save_state(self, state: dict[str, Any]) -> None:
        save_checkpoint(state, self.checkpoint_path)

    def save_best(self, epoch: int, weights: dict[str, Any], data: dict[str, str]) -> None:
        """``best.pt``: the weights of the epoch with the best validation ELBO so far, and the identity
        of the data they were trained on (:func:`data_identity`): they can be evaluated without ``checkpoint.pt``."""
        save_checkpoint({"epoch": epoch, "model": weights, "data": data}, self.path / self.BEST)

    def load_best(self, config: TrainConfig, metrics: list[dict[str, Any]]) -> tuple[int, VAE, dict[str, Any]]:
        """The epoch, VAE and data identity (empty in a ``best.pt`` written before it was kept) of ``best.pt``;
        :class:`ConfigError` if the run has none or it is damaged."""
        path = self.path / self.BEST
        if not config.validation_size:
            raise ConfigError(
                f"{self.path} was trained without a validation split, so it has no best model; use --model last"
            )
        if not path.is_file():
            raise ConfigError(f"{self.path} has no {self.BEST} (deleted?); use --model last, or train the run again")
        saved = load_checkpoint(path)
        epoch = saved.get("epoch") if isinstance(saved, dict) else None
        if not (isinstance(epoch, int) and isinstance(saved.get("model"), dict) and 1 <= epoch <= len(metrics) + 1):
            raise ConfigError(f"{path} is not a best-model file of this run; the run folder is damaged: train again")
        data = saved.get("data", {})
        return epoch, load_vae(config, saved["model"], path), data if isinstance(data, dict) else {}

    def load_state(self) -> dict[str, Any]:
        """The checkpoint, checked against :func:`check_state`; :class:`ConfigError` if absent or damaged."""
        return self.load_checked()[0]

    def load_checked(self) -> tuple[dict[str, Any], TrainConfig, VAE]:
        """The checkpoint with its configuration and the VAE it describes (on the CPU), each checked once."""
        if not self.checkpoint_path.is_file():
            raise self.missing_checkpoint()
        state = load_checkpoint(self.checkpoint_path)
        check_state(state, self.checkpoint_path)
        config = TrainConfig.from_dict(state["config"], f"the configuration in {self.checkpoint_path}")
        vae = load_vae(config, state["model"], self.checkpoint_path)
        check_optimizer(vae, state["optimizer"], self.checkpoint_path)
        return state, config, vae

    def missing_checkpoint(self) -> ConfigError:
        """Why there is no ``checkpoint.pt`` to load, and the way out: epochs in ``metrics.jsonl`` mean the
        file was lost (put it back, or start a new run; ``best.pt``, if there, still loads with ``--model
        best``); else a process holding the lock is training the first epoch, whatever files it has written
        yet; else ``config.json`` means the run stopped in its first epoch, and nothing, not a run folder."""
        try:
            epochs = sum(1 for line in (self.path / self.METRICS).read_text().splitlines() if line.strip())
        except (OSError, UnicodeDecodeError):
            epochs = 0
        if epochs:  # a training writes checkpoint.pt before each epoch's line: this one was lost
            best = (self.path / self.BEST).is_file()
            lost = "is not a file" if os.path.lexists(self.checkpoint_path) else "is missing"
            return ConfigError(
                f"{self.checkpoint_path} {lost}, though {self.METRICS} records {epochs} "
                f"epoch{'s' * (epochs != 1)}: put checkpoint.pt back to resume or evaluate the run, or start a new "
                "--run-dir"
                + ("; its best.pt still holds the best epoch's model: evaluate or sample it with --model best" * best)
            )
        training = self.in_use_by()
        if training:
            return ConfigError(
                f"{self.path} has no checkpoint yet: its run is in progress, in its first epoch ({training} is "
                "training it); try again once that epoch has ended"
            )
        if (self.path / self.CONFIG).exists():
            return ConfigError(
                f"{self.path} has no checkpoint yet: the run stopped before its first epoch ended; start it "
                "again without --resume"
            )
        return ConfigError(f"{self.path} holds no {self.CHECKPOINT}; pass the folder a 'pyro-vae train' run wrote")

    def read_config(self) -> TrainConfig:
        """The run's configuration from ``config.json`` (where ``checkpoint.pt``, which holds it too, is missing)."""
        path = self.path / self.CONFIG
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:120]
            raise ConfigError(
                f"{path} cannot be read ({reason}), and without {self.CHECKPOINT} it is what holds the run's "
                "settings; put checkpoint.pt back"
            ) from e
        return TrainConfig.from_dict(saved, f"the configuration in {path}")

    def read_metrics(self) -> list[dict[str, Any]]:
        """The per-epoch records of ``metrics.jsonl`` (a non-finite number is ``None`` there);
        :class:`ConfigError` if it cannot be read or a line is not its epoch's record."""
        path = self.path / self.METRICS
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as e:
            reason = " ".join(str(e).split())[:120]
            raise ConfigError(f"{path} cannot be read ({reason}); put checkpoint.pt back") from e
        for i, row in enumerate(rows):
            if not (isinstance(row, dict) and row.get("epoch") == i + 1):
                raise ConfigError(
                    f"{path} is damaged (line {i + 1} is not epoch {i + 1}'s record); put checkpoint.pt back"
                )
        return rows

    def stamp(self) -> tuple[tuple[int, int, int] | None, ...]:
        """The identity (inode, modification time, size) of ``checkpoint.pt`` and ``best.pt`` (None where
        absent): a training replaces them with new files every epoch, so a changed stamp means new weights."""
        found = []
        for name in (self.CHECKPOINT, self.BEST):
            try:
                info = os.stat(self.path / name)
                found.append((info.st_ino, info.st_mtime_ns, info.st_size))
            except OSError:
                found.append(None)
        return tuple(found)

    def config_file_disagreement(self, saved: dict[str, Any]) -> str | None:
        """How ``config.json`` differs from ``saved``, the configuration in the checkpoint (a hand edit,
        or a damaged file), in one line; None when they agree or there is no ``config.json``."""
        path = self.path / self.CONFIG
        try:
            found = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            reason = " ".join(str(e).split())[:120]
            return f"{path} cannot be read as JSON ({reason}), while its checkpoint holds the run's settings"
        expected = json.loads(json.dumps(saved))  # the checkpoint's settings as config.json writes them
        if found == expected:
            return None
        if not isinstance(found, dict):
            kind = type(found).__name__
            return f"{path} is not a mapping of settings (it holds a {kind}), while its checkpoint holds the settings"
        absent = "(absent)"
        differ = [k for k in dict.fromkeys([*expected, *found]) if found.get(k, absent) != expected.get(k, absent)]
        says = lambda k: f"{k}: {expected.get(k, absent)!r} in the checkpoint, {found.get(k, absent)!r} in config.json"
        detail = ", ".join(map(says, differ))
        return f"{path} disagrees with its checkpoint ({detail})"

    def mark_evaluation_stale(self, epochs: int) -> None:
        """Flag each ``evaluation*.json`` that describes an earlier checkpoint than the one of ``epochs``."""
        for path in sorted(self.path.glob("evaluation*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not (isinstance(record, dict) and record.get("epochs", epochs) < epochs):
                continue
            note = (
                f"describes the checkpoint after epoch {record['epochs']}; "
                f"the run has trained to epoch {epochs} since: run pyro-vae evaluate again"
            )
            if record.get("stale") != note:  # each new checkpoint updates the epoch it names
                record["stale"] = note
                self.write_text(path.name, json.dumps(record, indent=2) + "\n")

    def is_fresh_for(self, config: TrainConfig) -> bool:
        """Absent, empty, or holding only this very config (a run stopped before its first
        checkpoint, with nothing to lose by starting it again), whatever ``image_shape`` it took from the data."""
        if not self.path.exists():
            return True
        contents = sorted(p.name for p in self.path.iterdir() if not p.name.endswith(".tmp") and p.name != self.LOCK)
        if not contents:
            return True
        if contents != [self.CONFIG]:
            return False
        try:
            saved, given = json.loads((self.path / self.CONFIG).read_text()), config.to_dict()
            return isinstance(saved, dict) and {**saved, "image_shape": None} == {**given, "image_shape": None}
        except (ValueError, OSError):
            return False


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


STATE_KEYS = {"config": dict, "model": dict, "optimizer": dict, "rng": dict, "metrics": list, "data": dict}


def check_state(state: Any, path: Path) -> None:
    """Refuse a checkpoint whose layout is not the one :class:`~pyro_vae.train.Trainer` writes."""
    if not isinstance(state, dict):
        raise ConfigError(f"{path} is not a pyro-vae checkpoint (it holds a {type(state).__name__}, not a mapping)")
    for key, kind in STATE_KEYS.items():
        if not isinstance(state.get(key), kind):
            raise ConfigError(
                f"{path} is not a complete pyro-vae checkpoint ({key!r} missing or not a {kind.__name__}); the run "
                "folder is damaged: train again"
            )
    if not all(
        isinstance(t, torch.Tensor) and torch.isfinite(t).all()
        for t in state["model"].values()
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    ):
        raise ConfigError(
            f"{path} holds non-finite model weights; the run diverged or the file is damaged: train again with a "
            "lower --lr"
        )
    rng = state["rng"].get("torch")
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise ConfigError(f"{path} has no saved random-number state; the run folder is damaged: train again")
    if "cuda" in state["rng"] and not (
        isinstance(state["rng"]["cuda"], (list, tuple))
        and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in state["rng"]["cuda"])
    ):
        raise ConfigError(f"{path} has a damaged GPU random-number state; the run folder is damaged: train again")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    for i, row in enumerate(state["metrics"]):
        if not (
            isinstance(row, dict)
            and row.get("epoch") == i + 1
            and number(row.get("train_elbo"))
            and number(row.get("test_elbo"))
        ):
            raise ConfigError(
                f"{path} has damaged metrics (entry {i + 1} is not epoch {i + 1}'s record); the run folder is "
                "damaged: train again"
            )


@dataclasses.dataclass
class SavedRun:
    """A run as saved: its configuration, trained VAE (eval mode), per-epoch metrics and the
    fingerprint of the data it was trained on."""

    folder: RunFolder
    config: TrainConfig
    vae: VAE
    metrics: list[dict[str, Any]]
    data: dict[str, Any]
    config_file_note: str | None = None  # how config.json disagrees with the checkpoint, whose settings are used
    model: str = "last"  # which weights vae holds: "last" (the checkpoint's) or "best" (best.pt's)
    model_epoch: int = 0  # the epoch they were saved after
    stamp: tuple = ()  # RunFolder.stamp() of the files as read, to tell whether a training replaced them since

    @property
    def is_default_model(self) -> bool:
        """Whether :attr:`model` is the one :func:`load_run` picks unasked."""
        return self.model == default_model(self.config)

    def test_split(self, data_dir: str | None = None, allow_different_data: bool = False) -> Batches:
        """The run's test split on the VAE's device, from its own data folder or ``data_dir``;
        refused if the data are not those the run was trained on (unless ``allow_different_data``)."""
        return self.test_data(data_dir, allow_different_data)[0]

    def test_data(
        self, data_dir: str | None = None, allow_different_data: bool = False
    ) -> tuple[Batches, dict[str, str]]:
        """:meth:`test_split` and the identity (:func:`data_identity`) of the data it was read from."""
        dataset = dataset_for(self.config, data_dir, from_run=True)
        found = data_identity(dataset)
        check_same_data(self.folder.path, self.data, found, allow_different_data)
        return split_batches(self.config, dataset, "test", self.vae.prior_loc.device), found

    def evaluation_paths(self, found: dict[str, str], out: str | os.PathLike | None = None) -> tuple[Path, Path]:
        """Where ``pyro-vae evaluate`` writes its results on the data ``found``, in the run folder or
        the folder ``out``: ``evaluation.json`` and ``inference_data.nc`` for the run's own data (the
        same fingerprint), else ``evaluation-on-<fingerprint>.json`` and ``inference_data-on-<fingerprint>.nc``,
        so that results on other data never replace those on the run's own; the model that is not the
        run's default (``last`` where there is a best) adds ``-<model>`` before those."""
        suffix = "" if self.is_default_model else f"-{self.model}"
        suffix += "" if found["fingerprint"] == self.data.get("fingerprint") else f"-on-{found['fingerprint']}"
        folder = self.folder.path if out is None else Path(out)
        return folder / f"evaluation{suffix}.json", folder / f"inference_data{suffix}.nc"

    def evaluate(
        self,
        data_dir: str | None = None,
        allow_different_data: bool = False,
        num_samples: int = 1000,
        chunk_size: int = 250,
        idata_points: int = 100,
        progress: bool = False,
        out: str | os.PathLike | None = None,
    ) -> tuple[Any, dict[str, Any], Path, Path]:
        """:func:`~pyro_vae.evaluate.evaluate_model` of the run on its test split (or on the data in
        ``data_dir``), written as :func:`evaluation_record` to the JSON file and the ArviZ export of
        its first ``idata_points`` images to the netCDF file of :meth:`evaluation_paths`, both or
        neither; returns the :class:`~pyro_vae.evaluate.Evaluation`, the record written and the two
        paths. The one writer of ``evaluation*.json``. A folder that cannot take them is refused first.

        Into the run folder (``out`` None): with the folder locked, and refused if a training replaced
        the checkpoint since the run was loaded (:func:`opened_run` loads it under the lock, so that it
        cannot be); the results are marked stale by the next checkpoint. Into the folder ``out`` (made if
        needed; never the run folder, and not a file): the run folder is only read, so it is not locked
        (a read-only one cannot be, and a training may go on in a writable one): the results name the
        epoch of the weights evaluated (``epochs``, ``model_epoch``), and no later training marks them stale."""
        from .evaluate import evaluate_model, export_inference_data
        from .inference_data import save_inference_data

        if out is not None:
            self.folder.check_output(out)
        writer = self.folder if out is None else RunFolder(out)
        check_writable_folder(writer.path, "--out")
        with self.folder.locked("evaluate") if out is None else contextlib.nullcontext():
            if out is None and self.stamp and self.folder.stamp() != self.stamp:
                raise ConfigError(
                    f"{self.folder.checkpoint_path} was replaced (a training went on) after this run was loaded; "
                    "load it again, with the folder locked first (pyro_vae.run.opened_run)"
                )
            test, data = self.test_data(data_dir, allow_different_data)
            json_path, idata_path = self.evaluation_paths(data, out)  # other data never replace the run's own
            result = evaluate_model(
                self.vae,
                test,
                self.config.seed,
                num_samples,
                chunk_size,
                keep_log_weights=idata_points,
                progress=progress,
            )
            attrs = {f"data_{k}": v for k, v in data.items()}  # the file says which data it describes
            idata = export_inference_data(
                self.vae, test, result, chunk_size, training_metrics=self.metrics, attrs=attrs
            )
            record = evaluation_record(result.summary(), len(self.metrics), data, self.model, self.model_epoch)
            text = json.dumps(strict_json(record), indent=2, allow_nan=False) + "\n"
            with writer.all_or_none(idata_path.name):  # the two files describe one evaluation
                save_inference_data(idata, idata_path)
                writer.write_text(json_path.name, text)
        return result, record, json_path, idata_path


def evaluation_record(
    summary: dict[str, Any], epochs: int, data: dict[str, str], model: str = "last", model_epoch: int | None = None
) -> dict[str, Any]:
    """What ``evaluation*.json`` holds: the evaluation's numbers (``Evaluation.summary``), the epoch
    of the checkpoint it describes (``epochs``, which :meth:`RunFolder.mark_evaluation_stale` reads,
    adding ``stale`` once the run trains further), which weights were scored (``model``: ``last``
    or ``best``, saved after epoch ``model_epoch``) and the data's ``source`` and ``fingerprint``."""
    model_epoch = epochs if model_epoch is None else model_epoch
    return {**summary, "epochs": epochs, "model": model, "model_epoch": model_epoch, "data": data}


def load_vae(config: TrainConfig, weights: dict[str, Any], source: Path) -> VAE:
    """The VAE of ``config`` with ``weights``; :class:`ConfigError` if they do not fit it."""
    vae = build_vae(config)
    expected = vae.state_dict()
    try:
        for name, value in weights.items():  # load_state_dict would convert a wrong dtype silently
            if isinstance(value, torch.Tensor) and name in expected and value.dtype != expected[name].dtype:
                raise TypeError(f"{name} is {value.dtype}, the model's {expected[name].dtype}")
        vae.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        detail = " ".join(str(e).split()).replace("Error(s) in loading state_dict for VAE: ", "")
        raise ConfigError(
            f"{source} holds weights that do not fit its own configuration ({detail[:300]}); the run folder is "
            "damaged: train again"
        ) from e
    with torch.no_grad():  # finite weights can still overflow: refuse a model that cannot score an image
        encoded = vae.encoder(vae.prior_loc.new_full((1, *vae.x_shape), 0.5))
        outputs = (*encoded, vae.decoder(encoded[0]))
    if not all(torch.isfinite(t).all() for t in outputs):
        raise ConfigError(
            f"{source} holds weights whose outputs are not finite; the run diverged or the file is damaged: train "
            "again with a lower --lr"
        )
    return vae


def check_optimizer(vae: VAE, saved: dict[str, Any], source: Path) -> None:
    """:class:`ConfigError` unless ``saved`` is an Adam state for ``vae``'s parameters."""
    optimizer = torch.optim.Adam(vae.parameters())
    try:
        optimizer.load_state_dict(saved)
        by_id = dict(zip((i for group in saved["param_groups"] for i in group["params"]), vae.parameters()))
        for i, entries in saved["state"].items():  # as saved: load_state_dict converts a wrong dtype silently
            for key, value in entries.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.dtype != by_id[i].dtype:
                    raise TypeError(f"{key} is {value.dtype}, its parameter {by_id[i].dtype}")
        for p in vae.parameters():
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                    raise ValueError(f"{key} has shape {tuple(value.shape)}, its parameter {tuple(p.shape)}")
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError) as e:
        raise ConfigError(
            f"{source} holds an optimizer state that does not fit its model ({' '.join(str(e).split())[:200]}); the "
            "run folder is damaged: train again"
        ) from e


def default_model(config: TrainConfig) -> str:
    """The weights a run is scored with unless asked: the best by validation ELBO where the run has a
    validation split (the published protocol), else the last epoch's."""
    return "best" if config.validation_size else "last"


def load_run(run_dir: str | os.PathLike | RunFolder, device: str = "auto", model: str | None = None) -> SavedRun:
    """The saved run in ``run_dir``, its VAE on ``device`` in eval mode: ``model`` ``"last"`` (the
    checkpoint's weights) or ``"best"`` (``best.pt``, the epoch with the best validation ELBO);
    None: :func:`default_model`. ``"best"`` loads without ``checkpoint.pt`` too (the settings from
    ``config.json``, the epochs from ``metrics.jsonl``). Without the folder's lock a training may
    replace the files as they are read: ``checkpoint.pt`` and ``best.pt`` are read again until they
    were not replaced meanwhile (:meth:`RunFolder.stamp`), so the two are of one moment; to keep
    them so while using the run, hold the lock first (:func:`opened_run`)."""
    if model is not None and model not in SAVED_MODELS:
        raise ConfigError(f"unknown model {model!r}; choose one of {', '.join(SAVED_MODELS)}")
    folder = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
    for _ in range(3):  # a training replaces the files once an epoch: a second read is almost always still
        stamp = folder.stamp()
        run = _read_run(folder, model)
        if folder.stamp() == stamp:
            run.stamp, run.vae = stamp, run.vae.to(resolve_device(device)).eval()
            return run
    raise ConfigError(
        f"{folder.path} changed three times while it was read (a training writing a checkpoint every moment); "
        "try again, or once that training has ended"
    )


def _read_run(folder: RunFolder, model: str | None) -> SavedRun:
    """One reading of the run's files for :func:`load_run` (the VAE on the CPU)."""
    if model == "best" and not folder.checkpoint_path.is_file():  # the checkpoint was lost; best.pt remains
        config, metrics = folder.read_config(), folder.read_metrics()
        epoch, vae, data = folder.load_best(config, metrics)
        return SavedRun(folder, config, vae, metrics, data, None, model, epoch)
    state, config, vae = folder.load_checked()
    model = model or default_model(config)
    epoch = len(state["metrics"])
    if model == "best":
        epoch, vae, _ = folder.load_best(config, state["metrics"])
    note = folder.config_file_disagreement(state["config"])
    return SavedRun(folder, config, vae, state["metrics"], state["data"], note, model, epoch)


@contextlib.contextmanager
def opened_run(
    run_dir: str | os.PathLike, device: str = "auto", model: str | None = None, doing: str | None = "write to it"
) -> Iterator[SavedRun]:
    """:func:`load_run` for a command that writes into the run folder (``doing``: what, for messages):
    the folder's exclusive lock is taken first and held until the block ends, so what is loaded is
    what the lock protects: no training can write a newer checkpoint between the load and the writes
    (which :meth:`SavedRun.evaluate` would otherwise refuse). A folder without a checkpoint is
    refused before it is locked, with :meth:`RunFolder.missing_checkpoint`'s reason (a training in
    its first epoch: in progress), unless ``model`` ``"best"`` can load from ``best.pt``; so is a
    folder that cannot be written (read-only: ``--out`` writes elsewhere). ``doing`` None, for a
    command that writes elsewhere: nothing is locked, and the run is just :func:`load_run`'s."""
    folder = RunFolder(run_dir)
    if doing is None:
        yield load_run(folder, device, model)
        return
    if not folder.checkpoint_path.is_file() and not (model == "best" and (folder / folder.BEST).is_file()):
        raise folder.missing_checkpoint()
    check_writable_folder(folder.path, "--out")
    with folder.locked(doing):
        yield load_run(folder, device, model)
