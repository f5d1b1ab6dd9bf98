"""Image datasets (MNIST, Fashion-MNIST, KMNIST), binarization and device-resident minibatches.

Loading looks, in order, in a torchvision folder layout, in plain IDX files, in the
directories Debian's dataset packages install, and finally downloads with torchvision
when asked. Minibatching keeps one split on the training device as uint8 and converts
per batch; every random choice is seeded from ``(seed, epoch)`` so a resumed run sees
the same batches as an uninterrupted one.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

from pyro_vae.errors import ConfigError, DataError

IMAGE_SHAPE = (28, 28)

# ImageDataset field -> IDX file stem; torchvision uses the same stems for all three datasets.
IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class DatasetSpec:
    """A supported dataset: its torchvision class and its IDX file stems."""

    torchvision_class: type
    stems: dict[str, str]


DATASETS = {
    "mnist": DatasetSpec(torchvision.datasets.MNIST, IDX_STEMS),
    "fashion_mnist": DatasetSpec(torchvision.datasets.FashionMNIST, IDX_STEMS),
    "kmnist": DatasetSpec(torchvision.datasets.KMNIST, IDX_STEMS),
}

# Directories that system packages install gzipped IDX files into, searched without a data_dir.
SYSTEM_DATA_DIRS = {
    "fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),),  # Debian: dataset-fashion-mnist
}

_SYSTEM_PACKAGES = {"fashion_mnist": "dataset-fashion-mnist"}

BINARIZATIONS = ("none", "threshold", "static", "dynamic")

_DEFAULT_BINARIZATION = {"bernoulli": "dynamic", "continuous_bernoulli": "none", "normal": "none"}

# Independent random streams derived from one seed.
_STREAM_ORDER, _STREAM_DYNAMIC, _STREAM_STATIC, _STREAM_EVAL = range(4)


@dataclass(frozen=True)
class ImageDataset:
    """Train and test splits: uint8 images (N, 28, 28), int64 labels (N,), and their origin."""

    name: str
    source: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def default_data_dir() -> Path:
    """Where downloads go when no data_dir is given: ``$PYRO_VAE_DATA`` or ``~/.cache/pyro-vae/data``."""
    return Path(os.environ.get("PYRO_VAE_DATA") or "~/.cache/pyro-vae/data").expanduser()


def _corrupt(path: Path, problem: str) -> DataError:
    return DataError(f"{path}: {problem}; the file is corrupt or incomplete, delete it and re-download it")


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an unsigned-byte IDX file (gzipped if the name ends in ``.gz``) as a uint8 tensor."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise _corrupt(path, f"gzip stream cannot be decompressed ({str(e) or type(e).__name__})") from e
    if len(raw) < 4:
        raise _corrupt(path, f"only {len(raw)} bytes, shorter than the 4-byte IDX magic number")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise _corrupt(
            path,
            f"bad IDX magic number {raw[:4].hex()} (expected 0000 08 then a dimension count >= 1, "
            "i.e. unsigned-byte data)",
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _corrupt(path, f"header truncated: {ndim} dimensions need {header} bytes, file has {len(raw)}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected, payload = math.prod(dims), len(raw) - header
    if payload != expected:
        raise _corrupt(path, f"payload has {payload} bytes but the header dimensions {dims} need {expected}")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=header).copy()).reshape(dims)


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of a supported dataset; DataError listing the valid names otherwise."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[name]


def _raw_dir(spec: DatasetSpec, root: Path) -> Path:
    return root / spec.torchvision_class.__name__ / "raw"


def _find_idx_files(spec: DatasetSpec, directory: Path) -> dict[str, Path] | None:
    """The four IDX files in ``directory`` (plain preferred over ``.gz``), or None if any is missing."""
    found = {}
    for field, stem in spec.stems.items():
        candidates = [directory / stem, directory / f"{stem}.gz"]
        found[field] = next((p for p in candidates if p.is_file()), None)
    return found if all(found.values()) else None


def _validated(name: str, source: str, arrays: dict[str, torch.Tensor]) -> ImageDataset:
    """Check image shapes and label counts, then build the ImageDataset."""
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dim() != 3 or tuple(images.shape[1:]) != IMAGE_SHAPE:
            raise DataError(f"{source}: {split} images have shape {tuple(images.shape)}, expected (N, 28, 28)")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(
                f"{source}: {images.shape[0]} {split} images but labels of shape {tuple(labels.shape)}"
            )
    arrays = {k: v.to(torch.uint8 if k.endswith("images") else torch.int64) for k, v in arrays.items()}
    return ImageDataset(name=name, source=source, **arrays)


def _load_idx_dir(name: str, files: dict[str, Path], source: str) -> ImageDataset:
    return _validated(name, source, {field: read_idx(path) for field, path in files.items()})


def _load_torchvision(name: str, spec: DatasetSpec, root: Path, source: str) -> ImageDataset:
    """Load both splits with the torchvision class from ``root/<Class>/raw``."""
    arrays = {}
    for split in ("train", "test"):
        try:
            ds = spec.torchvision_class(root=str(root), train=split == "train", download=False)
        except (AssertionError, KeyError, TypeError, ValueError, RuntimeError) as e:
            # torchvision's IDX reader fails with these on corrupt files; read_idx names the bad file.
            raw = _raw_dir(spec, root)
            for stem in spec.stems.values():
                read_idx(raw / stem)
            raise DataError(f"torchvision could not load {raw} ({e}); delete it and re-download") from e
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = ds.data, ds.targets
    return _validated(name, source, arrays)


def _not_found(name: str, looked: list[str], root: Path) -> DataError:
    ways = [
        "pass --download to fetch it with torchvision (needs internet)",
        f"pass --data-dir DIR with the four IDX files ({', '.join(IDX_STEMS.values())}, each plain or .gz)",
    ]
    if name in _SYSTEM_PACKAGES:
        ways.append(f"on Debian/Ubuntu: apt-get install {_SYSTEM_PACKAGES[name]}")
    return DataError(
        f"dataset {name!r} not found. Looked in:\n"
        + "".join(f"  - {place}\n" for place in looked)
        + "To get it:\n"
        + "".join(f"  - {way}\n" for way in ways)
        + f"(--download saves into {root})"
    )


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = False
) -> ImageDataset:
    """Load a dataset's train and test splits.

    Looks in ``data_dir`` (default: :func:`default_data_dir`) for the torchvision layout
    ``<Class>/raw/``, then for IDX files in ``data_dir``, ``data_dir/<name>/`` and
    ``data_dir/<Class>/raw/``, then in :data:`SYSTEM_DATA_DIRS`, then downloads with
    torchvision if ``download``. Raises DataError listing every place looked if nothing is found.
    """
    spec = dataset_spec(name)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    raw = _raw_dir(spec, root)
    looked = [f"{raw} (torchvision layout, unzipped files)"]
    if all((raw / stem).is_file() for stem in spec.stems.values()):
        return _load_torchvision(name, spec, root, f"torchvision files in {raw}")
    for directory in (root, root / name, raw, *SYSTEM_DATA_DIRS.get(name, ())):
        looked.append(f"{directory} (IDX files, plain or .gz)")
        files = _find_idx_files(spec, directory)
        if files is not None:
            kinds = sorted({"gzipped" if p.suffix == ".gz" else "plain" for p in files.values()})
            return _load_idx_dir(name, files, f"IDX files ({' and '.join(kinds)}) in {directory}")
    if not download:
        raise _not_found(name, looked, root)
    try:
        spec.torchvision_class(root=str(root), train=True, download=True)
    except (OSError, RuntimeError) as e:
        raise DataError(f"downloading {name!r} into {root} failed ({e}).\n{_not_found(name, looked, root)}") from e
    return _load_torchvision(name, spec, root, f"downloaded by torchvision into {raw}")


def default_binarization(likelihood_name: str) -> str:
    """The binarization that suits a likelihood: Bernoulli gets dynamic binarization, others none."""
    if likelihood_name not in _DEFAULT_BINARIZATION:
        raise ConfigError(
            f"unknown likelihood {likelihood_name!r}; valid names: {', '.join(_DEFAULT_BINARIZATION)}"
        )
    return _DEFAULT_BINARIZATION[likelihood_name]


def _check_binarization_name(binarization: str) -> None:
    if binarization not in BINARIZATIONS:
        raise ConfigError(f"unknown binarization {binarization!r}; valid: {', '.join(BINARIZATIONS)}")


def check_binarization(likelihood_name: str, binarization: str) -> None:
    """Refuse a Bernoulli likelihood on continuous pixels (its support is {0, 1})."""
    default_binarization(likelihood_name)  # validates the name
    _check_binarization_name(binarization)
    if likelihood_name == "bernoulli" and binarization == "none":
        raise DataError(
            "the bernoulli likelihood needs pixels in {0, 1} but binarization 'none' keeps them "
            "continuous in [0, 1]; use --binarize dynamic, static or threshold, or the "
            "continuous_bernoulli or normal likelihood"
        )


def _generator(seed: int, stream: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator whose state depends only on (seed, stream, epoch)."""
    state = np.random.SeedSequence([seed, stream, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) >> 1)


class DeviceBatches:
    """One split on the training device, served as seeded minibatches of float32 pixels.

    Images are stored as uint8 on ``device`` and converted per batch to float32 in [0, 1],
    shaped (B, H*W) if ``flatten`` else (B, 1, H, W). ``epoch(e)`` is a function of
    ``(seed, e)`` only: the permutation and the dynamic-binarization draws come from fresh
    generators seeded from them. Binarizations: "none" keeps intensities; "threshold" is
    x > 0.5; "static" is one Bernoulli draw made here from ``seed``; "dynamic" draws anew
    for every batch of every epoch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        binarization: str = "none",
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        flatten: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        _check_binarization_name(binarization)
        if images.dtype != torch.uint8 or images.dim() != 3:
            raise DataError(f"images must be uint8 of shape (N, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise DataError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        if batch_size < 1 or seed < 0:
            raise ConfigError(f"batch_size must be >= 1 and seed >= 0, got {batch_size} and {seed}")
        if drop_last and batch_size > images.shape[0]:
            raise ConfigError(f"batch_size {batch_size} exceeds the {images.shape[0]} examples with drop_last")
        self.batch_size, self.binarization, self.seed = batch_size, binarization, seed
        self.shuffle, self.drop_last, self.flatten = shuffle, drop_last, flatten
        self.device = torch.device(device)
        self.labels = labels.to(self.device, torch.int64)
        images = images.to(self.device)
        self._scale = 255.0
        if binarization == "threshold":
            images, self._scale = (images.float() / 255.0 > 0.5).to(torch.uint8), 1.0
        elif binarization == "static":
            gen = _generator(seed, _STREAM_STATIC, 0, self.device)
            images, self._scale = torch.bernoulli(images.float() / 255.0, generator=gen).to(torch.uint8), 1.0
        self._images = images

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n = self._images.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _pixels(self, index: torch.Tensor | slice, generator: torch.Generator | None) -> torch.Tensor:
        """Float32 pixels of the selected images, binarized and shaped."""
        x = self._images[index].float() / self._scale
        if self.binarization == "dynamic":
            x = torch.bernoulli(x, generator=generator)
        return x.flatten(1) if self.flatten else x.unsqueeze(1)

    def epoch(self, epoch_index: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(pixels, labels)`` minibatches; a function of ``(seed, epoch_index)`` only."""
        n = self._images.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=_generator(self.seed, _STREAM_ORDER, epoch_index))
            order = order.to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        draws = _generator(self.seed, _STREAM_DYNAMIC, epoch_index, self.device)
        for b in range(len(self)):
            index = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self._pixels(index, draws), self.labels[index]

    def full(self) -> torch.Tensor:
        """The whole split as float32 pixels in stored order, for evaluation.

        With "dynamic" binarization this is one fixed draw seeded from ``seed`` alone (the
        same on every call), so test metrics are comparable across epochs and runs.
        """
        return self._pixels(slice(None), _generator(self.seed, _STREAM_EVAL, 0, self.device))

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`full` and the labels in stored order, split into chunks of ``batch_size``."""
        yield from zip(self.full().split(self.batch_size), self.labels.split(self.batch_size))
