"""Image data sets from every source, binarization and device-resident minibatches.

Sources (:func:`load_dataset`): MNIST, Fashion-MNIST and KMNIST as IDX files, CIFAR-10 and SVHN in
their own formats (:mod:`pyro_vae.image_arrays`), a folder of PNG/JPEG images
(:mod:`pyro_vae.image_folder`) and a numpy ``.npy``/``.npz`` file. Every one gives an
:class:`ImageDataset` of uint8 images ``(N, C, H, W)``. Each IDX file is read by :func:`read_idx`
(plain or gzipped), which checks the header's sizes while streaming, before allocating.
torchvision is used to *download* (into its own layout, which is then read here like any other
folder). An explicit ``data_dir`` is the only place looked in: a wrong one is refused, never
silently replaced by another copy of the data. Each :class:`ImageDataset` carries a content
fingerprint, so a run can tell whether it is given the data it was trained on. A folder or array
without a test split of its own has ``test_fraction`` of its images held out by a permutation
seeded with :data:`SPLIT_SEED` (the same for every run, so that runs compare on one test set).
Minibatching (:class:`Batches`) keeps one split on the training device as uint8 and converts per
batch (:class:`DeviceBatches`), or, for data over the memory budget, reads it from disk through
torch's ``DataLoader`` (:class:`~pyro_vae.streaming.StreamedBatches`; a folder's images and a
``.npy`` file then stay on disk as :class:`~pyro_vae.lazy_images.LazyImages`). Either way every
random choice is seeded from ``(seed, epoch)`` and drawn in the main process, so the batches are the
same, and a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checks import check_count, data_dir_path
from .errors import ConfigError, DataError
from .image_arrays import FileData, find_cifar10, find_svhn, read_array_file, read_cifar10, read_svhn
from .image_folder import read_image_folder
from .lazy_images import LazyImages
from .names import DATASETS, DEFAULT_TEST_FRACTION, IDX_DATASETS, check_binarization_name, dataset_name
from .networks import IMAGE_SHAPE
from .runtime import resolve_device

# ImageDataset field -> IDX file stem; torchvision uses the same stems for all three datasets.
IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# Directories that system packages install gzipped IDX files into, searched without a data_dir.
SYSTEM_DATA_DIRS = {
    "fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),),  # Debian: dataset-fashion-mnist
}

_SYSTEM_PACKAGES = {"fashion_mnist": "dataset-fashion-mnist"}

# The largest IDX file read: 2 million 28x28 images (1.5 GiB). A header asking for more is refused
# before anything is allocated (a small gzip can claim gigabytes).
MAX_IDX_BYTES = 2_000_000 * 28 * 28

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Independent random streams derived from one seed.
_STREAM_ORDER, _STREAM_DYNAMIC, _STREAM_STATIC, _STREAM_EVAL, _STREAM_VALIDATION = range(5)
# The seed of the held-out test split of a folder or array that has none: one split for every run.
SPLIT_SEED = 0


@dataclass(frozen=True)
class ImageDataset:
    """Train and test splits: uint8 images (N, C, H, W), int64 labels (N,), their origin and fingerprint.

    ``classes`` names the labels where the source does (class subfolders, CIFAR-10's meta file);
    ``file_digest`` is a SHA-256 of the files the images were decoded from (an image folder's names,
    sizes and bytes), which the fingerprint covers too. Images over the memory budget are
    :class:`~pyro_vae.lazy_images.LazyImages`, read from disk when needed (:attr:`streamed`)."""

    name: str
    source: str
    train_images: torch.Tensor | LazyImages
    train_labels: torch.Tensor
    test_images: torch.Tensor | LazyImages
    test_labels: torch.Tensor
    classes: tuple[str, ...] | None = None
    file_digest: str | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.train_images.shape[1:])

    @property
    def streamed(self) -> bool:
        """Whether the images stay on disk (:class:`~pyro_vae.lazy_images.LazyImages`), over the memory budget."""
        return isinstance(self.train_images, LazyImages)

    @property
    def nbytes(self) -> int:
        """The bytes of both splits' uint8 images."""
        return sum(math.prod(t.shape) for t in (self.train_images, self.test_images))

    def fingerprint(self, progress: bool = False) -> str:
        """SHA-256 of the four arrays' bytes (about 0.1 s for Fashion-MNIST) and of the files they were
        decoded from: the same data gives the same fingerprint whether it was read from gzipped, plain or
        torchvision files, or streamed from disk (read a chunk at a time then, with a progress bar if
        that takes more than a few seconds and ``progress``). Grey images hash as ``(N, H, W)``, as
        before colour, so older runs keep theirs."""
        from tqdm.auto import tqdm

        digest = hashlib.sha256()
        quiet = True if not (progress and self.streamed) else None  # None: shown where the output is a terminal
        with tqdm(
            total=self.nbytes, desc="fingerprinting the data", unit="B", unit_scale=True, delay=3, disable=quiet
        ) as bar:
            for t in (self.train_images, self.train_labels, self.test_images, self.test_labels):
                shape = tuple(t.shape[:1]) + tuple(t.shape[2:]) if t.dim() == 4 and t.shape[1] == 1 else tuple(t.shape)
                digest.update(str(shape).encode())
                for chunk in t.chunks() if isinstance(t, LazyImages) else [t.contiguous().numpy()]:
                    digest.update(chunk.tobytes())
                    bar.update(chunk.nbytes if isinstance(t, LazyImages) else 0)
        if self.file_digest is not None:
            digest.update(self.file_digest.encode())
        return digest.hexdigest()[:16]


def default_data_dir() -> Path:
    """Where downloads go when no data_dir is given: ``$PYRO_VAE_DATA`` or ``~/.cache/pyro-vae/data``."""
    return Path(os.environ.get("PYRO_VAE_DATA") or "~/.cache/pyro-vae/data").expanduser()


def _corrupt(path: Path, problem: str) -> DataError:
    return DataError(f"{path}: {problem}; the file is corrupt or incomplete, delete it and re-download it")


def _read_exactly(f, path: Path, n: int) -> bytes:
    data = f.read(n)
    if len(data) < n:
        raise _corrupt(path, f"ends after {len(data)} of the {n} bytes its header needs")
    return data


def read_idx(path: str | os.PathLike, max_bytes: int = MAX_IDX_BYTES) -> torch.Tensor:
    """Read an unsigned-byte IDX file (gzipped if the name ends in ``.gz``) as a uint8 tensor.

    The header (magic ``00 00 08 ndim``, then ``ndim`` big-endian sizes) is read first; a payload
    larger than ``max_bytes`` is refused before it is allocated, and the payload is streamed into
    one buffer of exactly the announced size.
    """
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4:
                raise _corrupt(path, f"only {len(magic)} bytes, shorter than the 4-byte IDX magic number")
            if magic[0] != 0 or magic[1] != 0 or magic[2] != 0x08 or magic[3] == 0:
                raise _corrupt(
                    path,
                    f"bad IDX magic number {magic.hex()} (expected 0000 08 then a dimension count >= 1, i.e. "
                    "unsigned-byte data)",
                )
            ndim = magic[3]
            header = _read_exactly(f, path, 4 * ndim)
            dims = [int.from_bytes(header[4 * i : 4 * i + 4], "big") for i in range(ndim)]
            size = math.prod(dims)
            if size > max_bytes:
                raise _corrupt(
                    path,
                    f"its header announces {dims} = {size} bytes, more than the {max_bytes} an image data set of "
                    "this kind can hold",
                )
            payload = np.empty(size, dtype=np.uint8)
            got = f.readinto(memoryview(payload)) if size else 0
            while got < size:
                more = f.readinto(memoryview(payload)[got:])
                if not more:
                    raise _corrupt(path, f"payload has {got} bytes but the header dimensions {dims} need {size}")
                got += more
            if f.read(1):
                raise _corrupt(path, f"payload is longer than the {size} bytes the header dimensions {dims} need")
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise _corrupt(path, f"gzip stream cannot be decompressed ({str(e) or type(e).__name__})") from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    return torch.from_numpy(payload).reshape(dims)


def _find_idx_files(directory: Path) -> dict[str, Path] | None:
    """The four IDX files in ``directory`` (plain preferred over ``.gz``), or None if any is missing."""
    found = {}
    for field, stem in IDX_STEMS.items():
        candidates = [directory / stem, directory / f"{stem}.gz"]
        found[field] = next((p for p in candidates if p.is_file()), None)
    return found if all(found.values()) else None


def _load_idx_dir(name: str, directory: Path, files: dict[str, Path]) -> ImageDataset:
    """Read and check the four files: image shapes, label counts, at least one image per split."""
    arrays = {field: read_idx(path) for field, path in files.items()}
    kinds = sorted({"gzipped" if p.suffix == ".gz" else "plain" for p in files.values()})
    source = f"IDX files ({' and '.join(kinds)}) in {directory}"
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dim() != 3 or tuple(images.shape[1:]) != IMAGE_SHAPE[1:]:
            raise DataError(f"{source}: {split} images have shape {tuple(images.shape)}, expected (N, 28, 28)")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(f"{source}: {images.shape[0]} {split} images but labels of shape {tuple(labels.shape)}")
        if images.shape[0] == 0:
            raise DataError(f"{source}: the {split} split has no images")
    arrays = {k: v.unsqueeze(1) if k.endswith("images") else v.to(torch.int64) for k, v in arrays.items()}
    classes = FASHION_MNIST_CLASSES if name == "fashion_mnist" else None
    return ImageDataset(name=name, source=source, classes=classes, **arrays)


def _moved(root: Path) -> DataError:
    """A saved run's data folder that no longer holds its data: the user never named it, so no spelling to check."""
    return DataError(
        f"the run's data were in {root}, which no longer holds them; pass --data-dir with their new location"
    )


def _not_found(name: str, looked: list[Path], root: Path, explicit: bool, from_run: bool = False) -> DataError:
    if from_run:
        return _moved(root)
    ways = [f"put the four IDX files ({', '.join(IDX_STEMS.values())}, each plain or .gz) in one of those folders"]
    if explicit:
        ways.append("check the spelling of --data-dir, or leave it out to use the usual places")
    ways.append("pass --download to fetch it with torchvision (needs internet)")
    if name in _SYSTEM_PACKAGES and not explicit:
        ways.append(f"on Debian/Ubuntu: apt-get install {_SYSTEM_PACKAGES[name]}")
    return DataError(
        f"dataset {name!r} not found. Looked in: {', '.join(map(str, looked))}. To get it: {'; or '.join(ways)} "
        f"(--download saves into {root})"
    )  # one line, as every error


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    *,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    image_size: tuple[int, int] | None = None,
    layout: str | None = None,
    progress: bool = True,
    memory_budget: int | None = None,
    from_run: bool = False,
) -> ImageDataset:
    """Load a dataset's train and test splits.

    ``"folder"`` reads the images under the folder ``data_dir`` (resized to ``image_size = (H, W)``
    if given; a progress bar if that takes more than a few seconds and ``progress``), ``"array"``
    the ``.npy``/``.npz`` file ``data_dir`` (``layout``: ``"NCHW"`` or ``"NHWC"`` where the shape
    does not tell); either holds out ``test_fraction`` of its images when it has no test split.
    For the others, with ``data_dir``, looks only there (``data_dir``, ``data_dir/<name>/`` and
    torchvision's layout: ``<Class>/raw/`` for IDX, ``cifar-10-batches-py/``) and downloads into it
    if ``download``. Without it, looks in :func:`default_data_dir` the same way, then in
    :data:`SYSTEM_DATA_DIRS`. Raises :class:`DataError` listing every place looked if nothing is found.

    A folder or ``.npy`` file whose images take more than ``memory_budget`` bytes (default:
    :func:`~pyro_vae.memory.data_memory_budget`) stays on disk (:attr:`ImageDataset.streamed`); the
    other sources are read whole (the largest, SVHN, is about 0.2 GiB).

    ``from_run``: ``data_dir`` is the place a saved run recorded, not one the user gave; where it no
    longer exists or holds the data, the error says so and asks for ``--data-dir`` with their new place.
    """
    name = dataset_name(name)
    if from_run and data_dir is not None and not data_dir_path(data_dir).exists():
        raise _moved(data_dir_path(data_dir))
    if image_size is not None and name != "folder":
        raise ConfigError(f"image_size (--image-size) resizes the images of --dataset folder, not {name}: leave it out")
    if layout is not None and name != "array":
        raise ConfigError(f"layout (--layout) orders the arrays of --dataset array, not {name}: leave it out")
    if not (isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1):
        raise ConfigError(f"the test fraction must be a number between 0 and 1 (exclusive), got {test_fraction!r}")
    if name in ("folder", "array"):
        if data_dir is None:
            what = "the folder of your images" if name == "folder" else "your .npy or .npz file"
            raise DataError(f"--dataset {name} reads your own images: pass --data-dir with {what}")
        path = data_dir_path(data_dir)
        if memory_budget is None:
            from .memory import data_memory_budget

            memory_budget = data_memory_budget()
        if name == "folder":
            read = read_image_folder(path, _image_size(image_size), progress, memory_budget)
        else:
            read = read_array_file(path, layout, memory_budget)
        return _from_files(name, read, test_fraction)
    explicit = data_dir is not None
    root = data_dir_path(data_dir) if explicit else default_data_dir()
    if explicit and root.exists() and not root.is_dir():
        raise DataError(f"--data-dir {root} is a file, not a folder")
    if name not in IDX_DATASETS:
        return _from_files(name, _torchvision_files(name, root, download), test_fraction)
    raw = root / DATASETS[name] / "raw"
    places = [root, root / name, raw, *(() if explicit else SYSTEM_DATA_DIRS.get(name, ()))]
    for directory in places:
        files = _find_idx_files(directory)
        if files is not None:
            return _load_idx_dir(name, directory.resolve(), files)
    if not download:
        raise _not_found(name, places, root, explicit, from_run and explicit)
    _download(name, root, {"train": True}, lambda e: _not_found(name, places, root, explicit))
    files = _find_idx_files(raw)
    if files is None:
        raise DataError(
            f"torchvision reported a download of {name!r} but {raw} lacks its IDX files; delete {raw} and try again"
        )
    return _load_idx_dir(name, raw.resolve(), files)


def _image_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if not (isinstance(image_size, (tuple, list)) and len(image_size) == 2):
        raise ConfigError(f"image_size must be (H, W), two sizes in pixels, got {image_size!r}")
    return tuple(check_count("a side of image_size", side) for side in image_size)


def _download(name: str, root: Path, options: dict, not_found) -> None:
    """Download ``name`` into ``root`` with its torchvision class; :class:`DataError` if that fails."""
    from .runtime import load_torchvision  # only to download: it is slow to import

    torchvision = load_torchvision()
    try:
        getattr(torchvision.datasets, DATASETS[name])(root=str(root), download=True, **options)
    except (OSError, RuntimeError) as e:
        raise DataError(f"downloading {name!r} into {root} failed ({' '.join(str(e).split())}). {not_found(e)}") from e


def _torchvision_files(name: str, root: Path, download: bool) -> FileData:
    """CIFAR-10 or SVHN in their own formats under ``root``, downloaded there first if asked and absent."""
    find, read = (find_cifar10, read_cifar10) if name == "cifar10" else (find_svhn, read_svhn)
    splits = ({"train": True}, {"train": False}) if name == "cifar10" else ({"split": "train"}, {"split": "test"})
    wanted = "data_batch_1 to 5 and test_batch" if name == "cifar10" else "train_32x32.mat and test_32x32.mat"
    sub = "cifar-10-batches-py" if name == "cifar10" else "svhn"

    def not_found(_=None) -> DataError:
        return DataError(
            f"dataset {name!r} not found: no {wanted} in {root} or {root / sub}; pass --download to fetch it with "
            f"torchvision (needs internet; it saves into {root}), or --data-dir with the folder that holds them"
        )

    folder = find(root)
    if folder is None and download:
        for options in splits:
            _download(name, root, options, not_found)
        folder = find(root)
    if folder is None:
        raise not_found()
    return read(folder)


def _from_files(name: str, read: FileData, test_fraction: float) -> ImageDataset:
    """The :class:`ImageDataset` of ``read``: its own splits, or ``test_fraction`` of its images held
    out by a permutation seeded with :data:`SPLIT_SEED` (the rest kept in their order)."""
    splits = read.splits
    if set(splits) != {"train", "test"}:
        (images, labels), n = next(iter(splits.values())), len(next(iter(splits.values()))[0])
        n_test = round(n * test_fraction)
        if not 1 <= n_test < n:
            raise DataError(
                f"{read.source}: a test fraction of {test_fraction:g} of its {n} images gives {n_test} test and "
                f"{n - n_test} training images; pass a --test-fraction that leaves at least one of each, or add images"
            )
        order = np.random.default_rng(SPLIT_SEED).permutation(n)
        test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
        splits = {"train": (images[train], labels[train]), "test": (images[test], labels[test])}
    shapes = {split: images.shape[1:] for split, (images, _) in splits.items()}
    if shapes["train"] != shapes["test"]:
        raise DataError(
            f"{read.source}: train images are {shapes['train']} but test images {shapes['test']} (C, H, W); give both "
            "splits one image size"
        )
    tensors = {
        f"{split}_{kind}": a if isinstance(a, LazyImages) else torch.from_numpy(a)
        for split, pair in splits.items()
        for kind, a in zip(("images", "labels"), pair)
    }
    return ImageDataset(name=name, source=read.source, classes=read.classes, file_digest=read.digest, **tensors)


def _generator(seed: int, stream: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator whose state depends only on (seed, stream, epoch)."""
    state = np.random.SeedSequence([seed, stream, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) >> 1)


def held_out(n: int, size: int, seed: int) -> torch.Tensor:
    """A boolean mask of ``size`` of ``n`` images, drawn uniformly without replacement from a
    generator seeded by ``seed`` alone: the validation split carved from a training set."""
    if not 0 <= size < n:
        raise DataError(
            f"a validation split of {size} images leaves no training images out of {n}; choose --validation-size "
            f"below {n}"
        )
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=_generator(seed, _STREAM_VALIDATION, 0))[:size]] = True
    return mask


class Batches:
    """One split served as seeded minibatches of float32 pixels: what training and evaluation read.

    Images (N, C, H, W) are kept as uint8 (on the device: :class:`DeviceBatches`; on disk or in host
    memory: :class:`~pyro_vae.streaming.StreamedBatches`) and converted per batch, on ``device``, to
    float32 in [0, 1], shaped (B, C*H*W) if ``flatten`` else (B, C, H, W). ``epoch(e)`` is a
    function of ``(seed, e)`` only: the permutation and the dynamic-binarization draws come from
    fresh generators seeded from them, and are drawn here, batch after batch, whoever reads the
    images. Preparations: "none" keeps the 8-bit levels ``k / 255``; "threshold" is x > 0.5;
    "static" is one Bernoulli draw made once from ``seed``; "dynamic" draws anew for every batch of
    every epoch; "dequantize" gives ``(k + u) / 256``, ``u ~ U[0, 1)`` drawn anew for every batch
    (Theis et al. 2016: training a density on dequantized pixels maximizes a bound on the
    probability of the 8-bit data).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
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
        check_binarization_name(binarization)
        if len(shape) not in (3, 4):
            raise DataError(f"images must be uint8 of shape (N, H, W) or (N, C, H, W), got shape {tuple(shape)}")
        if tuple(labels.shape) != tuple(shape[:1]):
            raise DataError(f"{shape[0]} images but labels of shape {tuple(labels.shape)}")
        batch_size, seed = check_count("batch_size", batch_size), check_count("seed", seed, 0, 2**63 - 1)
        if drop_last and batch_size > shape[0]:
            raise ConfigError(f"batch_size {batch_size} exceeds the {shape[0]} examples with drop_last")
        self.batch_size, self.binarization, self.seed = batch_size, binarization, seed
        self.shuffle, self.drop_last, self.flatten = shuffle, drop_last, flatten
        self.device = resolve_device(device)  # refused here if it cannot be used
        self.size, self._image_shape = shape[0], tuple(shape[1:]) if len(shape) == 4 else (1, *shape[1:])
        self._scale = 255.0  # what divides the stored levels (1 where they are binarized already)

    def _loaded(self, order: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The uint8 images and labels of ``order`` (CPU positions), ``size`` at a time, on the device."""
        raise NotImplementedError

    reading = ""  # how the images are read, as the command line says after where they are from

    def __len__(self) -> int:
        """Number of batches per epoch."""
        return self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)

    def _pixels(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Float32 pixels of the uint8 ``images``, binarized and shaped."""
        if self.binarization == "dequantize":
            u = torch.rand(images.shape, generator=generator, device=images.device)
            x = (images.float() + u) / 256.0
        else:
            x = images.float() / self._scale
        if self.binarization == "threshold":
            x = (x > 0.5).float()
        elif self.binarization == "dynamic":
            x = torch.bernoulli(x, generator=generator)
        return self._shaped(x)

    def _shaped(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) if self.flatten else x

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image, whether batches are flattened or not."""
        return self._image_shape

    @property
    def eight_bit(self) -> bool:
        """Whether the split still holds the 8-bit levels (not binarized)."""
        return self.binarization in ("none", "dequantize")

    def levels(self) -> torch.Tensor:
        """The whole split's 8-bit levels ``k / 255`` in stored order (not binarized, not dequantized)."""
        return torch.cat(list(self.level_batches()))

    def level_batches(self) -> Iterator[torch.Tensor]:
        """:meth:`levels` ``batch_size`` images at a time, read one batch at a time."""
        if not self.eight_bit:
            raise DataError(f"a {self.binarization}-binarized split has no 8-bit levels")
        for images, _ in self._loaded(torch.arange(self.size), self.batch_size):
            yield self._shaped(images.float() / 255.0)

    def epoch(self, epoch_index: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(pixels, labels)`` minibatches; a function of ``(seed, epoch_index)`` only."""
        if self.shuffle:
            order = torch.randperm(self.size, generator=_generator(self.seed, _STREAM_ORDER, epoch_index))
        else:
            order = torch.arange(self.size)
        order = order[: len(self) * self.batch_size]  # drop_last leaves the rest out
        draws = _generator(self.seed, _STREAM_DYNAMIC, epoch_index, self.device)
        for images, labels in self._loaded(order, self.batch_size):
            yield self._pixels(images, draws), labels

    def full(self) -> torch.Tensor:
        """The whole split as float32 pixels in stored order, for evaluation: :meth:`eval_batches` joined."""
        return torch.cat([x for x, _ in self.eval_batches()])

    def first(self, n: int) -> torch.Tensor:
        """The first ``n`` images of :meth:`full` (all of them if fewer), reading no batch beyond them."""
        check_count("n", n, 0)
        taken, count = [], 0
        with contextlib.closing(self.eval_batches()) as batches:  # a streamed split's workers end here
            for x, _ in batches if n else ():
                taken.append(x[: n - count])
                count += taken[-1].shape[0]
                if count == n:
                    break
        return torch.cat(taken) if taken else self._shaped(torch.empty(0, *self.image_shape, device=self.device))

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The split in stored order, ``batch_size`` images at a time, with the labels.

        With "dynamic" binarization (and "dequantize") the draws come from one generator seeded from
        ``seed`` alone (the same on every call), so test metrics are comparable across epochs and runs.
        """
        draws = _generator(self.seed, _STREAM_EVAL, 0, self.device)
        for images, labels in self._loaded(torch.arange(self.size), self.batch_size):
            yield self._pixels(images, draws), labels


class DeviceBatches(Batches):
    """:class:`Batches` of a split held on the training device: ``images`` (N, H, W) or (N, C, H, W)
    uint8, moved there once (with "static" binarization, as its one Bernoulli draw)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, **kwargs) -> None:
        if images.dtype != torch.uint8 or images.dim() not in (3, 4):
            raise DataError(
                f"images must be uint8 of shape (N, H, W) or (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        super().__init__(tuple(images.shape), labels, batch_size, **kwargs)
        self.labels = labels.to(self.device, torch.int64)
        images = (images.unsqueeze(1) if images.dim() == 3 else images).to(self.device)
        if self.binarization == "static":
            gen = _generator(self.seed, _STREAM_STATIC, 0, self.device)
            images, self._scale = torch.bernoulli(images.float() / 255.0, generator=gen).to(torch.uint8), 1.0
        self._images = images

    def _loaded(self, order: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in order.to(self.device).split(size):
            yield self._images[index], self.labels[index]
