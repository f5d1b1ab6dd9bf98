"""Images stored as arrays in files: numpy ``.npy``/``.npz``, CIFAR-10's pickled batches, SVHN's ``.mat``.

Every reader returns :class:`FileData`: uint8 images ``(N, C, H, W)`` (C = 1 grey or 3 RGB) and
int64 labels per split, the splits being ``"train"`` and ``"test"``, or ``"all"`` where the files
hold no test split (:func:`pyro_vae.data.load_dataset` then holds one out at random). Arrays are
checked before use (dtype, layout, label counts) and each problem is one :class:`DataError` naming
the file and the fix.

A 4-D array is ``(N, C, H, W)`` or ``(N, H, W, C)``: the layout is read from where the 1 or 3
channels are, and must be given (``layout="NCHW"`` or ``"NHWC"``) when both axes could hold them.
CIFAR-10's batches are Python pickles: they are read by an unpickler that builds numpy arrays and
nothing else, so a file posing as a batch cannot run code. SVHN's ``.mat`` files are read by
``scipy.io.loadmat``, as torchvision reads them; its label 10 is the digit 0.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import DataError, first_line
from .lazy_images import ArrayReader, LazyImages
from .names import LAYOUTS

CHANNELS = (1, 3)  # grey or RGB
CIFAR10_FOLDER = "cifar-10-batches-py"  # torchvision's layout under its root
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


class FileData(NamedTuple):
    """What a source read: ``splits`` maps ``"train"``/``"test"`` (or ``"all"``) to uint8 images
    ``(N, C, H, W)`` (or :class:`~pyro_vae.lazy_images.LazyImages` left on disk, over the memory
    budget) and int64 labels ``(N,)``; ``source`` says where from; ``classes`` names the
    labels where the files do; ``digest`` is a SHA-256 of the files themselves where the images were
    decoded from them (so that the fingerprint covers names and bytes, not only pixels)."""

    splits: dict[str, tuple[np.ndarray | LazyImages, np.ndarray]]
    source: str
    classes: tuple[str, ...] | None = None
    digest: str | None = None


def array_layout(array: np.ndarray, what: str, layout: str | None = None) -> str | None:
    """How the uint8 images ``array`` are ordered: None for grey ``(N, H, W)``, else ``"NCHW"`` or ``"NHWC"``.

    ``layout`` says how a 4-D array is ordered; without it, the axis of 1 or 3 values is the channel
    axis, and a shape where axis 1 and axis 3 both could be is refused. Reads the header only."""
    if array.dtype != np.uint8:
        raise DataError(
            f"{what} is {array.dtype}, not uint8: pass 8-bit images (0 to 255), e.g. (x * 255).round()"
            ".astype(np.uint8) for floats in [0, 1]"
        )
    if array.ndim == 3:
        if layout is not None:
            raise DataError(
                f"{what} has shape {array.shape}, grey images (N, H, W): leave --layout out (it orders 4-D arrays)"
            )
        return None
    if array.ndim != 4:
        raise DataError(f"{what} has shape {array.shape}; pass images shaped (N, H, W), (N, H, W, C) or (N, C, H, W)")
    if layout is None:
        first, last = array.shape[1] in CHANNELS, array.shape[3] in CHANNELS
        if first and last:
            raise DataError(
                f"{what} has shape {array.shape}, which reads as NCHW or as NHWC; choose with --layout NCHW or "
                "--layout NHWC (layout= in the library)"
            )
        if not (first or last):
            raise DataError(
                f"{what} has shape {array.shape}: neither axis 1 (NCHW) nor axis 3 (NHWC) holds 1 or 3 channels; "
                "pass grey (N, H, W) or RGB images"
            )
        layout = "NCHW" if first else "NHWC"
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    channels = array.shape[1 if layout == "NCHW" else 3]
    if channels not in CHANNELS:
        raise DataError(
            f"{what} read as {layout} has {channels} channels; pass 1 (grey) or 3 (RGB) channels, or the "
            f"other --layout ({' or '.join(LAYOUTS)})"
        )
    return layout


def image_shape(shape: tuple[int, ...], layout: str | None) -> tuple[int, int, int]:
    """``(C, H, W)`` of one image of an array of ``shape`` ordered as ``layout`` (:func:`array_layout`)."""
    if layout is None:
        return (1, *shape[1:])
    return tuple(shape[1:]) if layout == "NCHW" else (shape[3], shape[1], shape[2])


def images_nchw(array: np.ndarray, what: str, layout: str | None = None) -> np.ndarray:
    """``array`` of uint8 images ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` as ``(N, C, H, W)``
    (the layout read by :func:`array_layout`)."""
    layout = array_layout(array, what, layout)
    if layout is None:
        return np.ascontiguousarray(array[:, None])
    return np.ascontiguousarray(array if layout == "NCHW" else array.transpose(0, 3, 1, 2))


def checked_labels(labels: np.ndarray | None, count: int, what: str) -> np.ndarray:
    """``labels`` as int64 ``(count,)`` class indices (zeros where there are none)."""
    if labels is None:
        return np.zeros(count, np.int64)
    labels = np.asarray(labels)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer) or (count and labels.min() < 0):
        raise DataError(
            f"{what} are {labels.dtype} of shape {labels.shape}; pass {count} non-negative integer class labels, one "
            "per image"
        )
    return labels.astype(np.int64)


def _mapped_split(path: Path, array: np.ndarray, layout: str | None):
    """The images of the memory-mapped ``.npy`` ``array`` as :class:`LazyImages`, with no labels."""
    layout = array_layout(array, str(path), layout)
    if array.shape[0] == 0:
        raise DataError(f"{path} holds no images; pass at least one")
    lazy = LazyImages(ArrayReader(path, layout), np.arange(array.shape[0]), image_shape(array.shape, layout))
    return lazy, checked_labels(None, array.shape[0], "")


def _split(images: np.ndarray, labels: np.ndarray | None, what: str, layout: str | None):
    images = images_nchw(images, what, layout)
    if images.shape[0] == 0:
        raise DataError(f"{what} holds no images; pass at least one")
    return images, checked_labels(labels, images.shape[0], f"the labels of {what}")


def read_array_file(path: Path, layout: str | None = None, memory_budget: int | None = None) -> FileData:
    """Images in a ``.npy`` file (one array: all images) or an ``.npz`` file holding ``train`` and
    optionally ``test``, ``train_labels``, ``test_labels``; or ``images`` and optionally ``labels``;
    or one array of any name. A ``.npy`` file larger than ``memory_budget`` bytes (None: no limit)
    stays on disk, mapped into memory (:class:`~pyro_vae.lazy_images.LazyImages`); an ``.npz`` is
    always read whole (its arrays are compressed members of a zip file, which cannot be mapped)."""
    if path.suffix not in (".npy", ".npz"):
        raise DataError(f"--data-dir {path}: for --dataset array pass a .npy or .npz file")
    if not path.is_file():
        raise DataError(f"--data-dir {path}: no such file; for --dataset array pass the .npy or .npz file itself")
    mapped = path.suffix == ".npy" and memory_budget is not None and path.stat().st_size > memory_budget
    try:
        loaded = np.load(path, allow_pickle=False, mmap_mode="r" if mapped else None)
        if path.suffix == ".npy":
            arrays = {"images": loaded}
        else:
            with loaded:
                arrays = {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(
            f"{path}: cannot be read as a numpy {path.suffix} file ({first_line(e, with_type=False)}); write it with "
            f"numpy.{'save' if path.suffix == '.npy' else 'savez'}"
        ) from e
    if mapped:
        return FileData({"all": _mapped_split(path, loaded, layout)}, f"numpy file {path}")
    if len(arrays) == 1:
        arrays = {"images": next(iter(arrays.values()))}
    names = ("train", "test", "train_labels", "test_labels") if "train" in arrays else ("images", "labels")
    unknown = sorted(set(arrays) - set(names))
    if unknown or names[0] not in arrays:
        raise DataError(
            f"{path} holds arrays {sorted(arrays)}; name them train and optionally test, train_labels, test_labels, "
            "or images and optionally labels"
        )
    if names[0] == "images":
        splits = {"all": _split(arrays["images"], arrays.get("labels"), f"{path}", layout)}
    else:
        splits = {
            split: _split(arrays[split], arrays.get(f"{split}_labels"), f"{path} ({split})", layout)
            for split in ("train", "test")
            if split in arrays
        }
    return FileData(splits, f"numpy file {path}")


class _ArrayUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, bytes and numpy arrays only: a CIFAR batch needs nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol 2 writes bytes from Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a CIFAR batch never holds")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(
            f"{path}: not a readable CIFAR-10 batch ({first_line(e, with_type=False)}); delete it and download the "
            "data set again"
        ) from e
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not a CIFAR-10 batch (it holds a {type(batch).__name__}); download it again")
    return batch


def find_cifar10(root: Path) -> Path | None:
    """The folder under ``root`` (itself or torchvision's ``cifar-10-batches-py``) with every CIFAR-10 batch."""
    for folder in (root, root / CIFAR10_FOLDER):
        if all((folder / name).is_file() for names in CIFAR10_FILES.values() for name in names):
            return folder
    return None


def read_cifar10(folder: Path) -> FileData:
    """CIFAR-10's pickled batches (``data``: N x 3072 uint8 rows, R then G then B planes of 32x32;
    ``labels``) as torchvision's ``CIFAR10`` reads them; class names from ``batches.meta`` if present."""
    splits = {}
    for split, names in CIFAR10_FILES.items():
        images, labels = [], []
        for name in names:
            batch = _unpickle(folder / name)
            data = np.asarray(batch.get("data"))
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise DataError(
                    f"{folder / name}: its data are {data.dtype} {data.shape}, not CIFAR-10's uint8 (N, 3072) rows; "
                    "download the data set again"
                )
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(checked_labels(batch.get("labels"), data.shape[0], f"the labels of {folder / name}"))
        splits[split] = (np.concatenate(images), np.concatenate(labels))
    meta = folder / "batches.meta"
    names = tuple(map(str, _unpickle(meta).get("label_names", ()))) if meta.is_file() else ()
    classes = names if len(names) == 10 else None
    return FileData(splits, f"CIFAR-10 batches in {folder}", classes)


def find_svhn(root: Path) -> Path | None:
    """The folder under ``root`` (itself or ``svhn/``) holding SVHN's two ``.mat`` files."""
    for folder in (root, root / "svhn"):
        if all((folder / name).is_file() for name in SVHN_FILES.values()):
            return folder
    return None


def read_svhn(folder: Path) -> FileData:
    """SVHN's ``train_32x32.mat`` and ``test_32x32.mat`` (``X``: 32 x 32 x 3 x N uint8, ``y``: N x 1
    labels 1 to 10, 10 the digit 0) as torchvision's ``SVHN`` reads them."""
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise DataError("reading SVHN's .mat files needs scipy: pip install scipy") from e
    splits = {}
    for split, name in SVHN_FILES.items():
        path = folder / name
        try:
            mat = loadmat(path)
        except (OSError, ValueError, TypeError, NotImplementedError) as e:
            raise DataError(
                f"{path}: not a readable SVHN .mat file ({first_line(e, with_type=False)}); delete it and download "
                "the data set again"
            ) from e
        x, y = mat.get("X"), mat.get("y")
        if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
            raise DataError(f"{path}: no 32 x 32 x 3 x N array X and labels y as SVHN has; download it again")
        labels = checked_labels(np.asarray(y).reshape(-1), x.shape[3], f"the labels y of {path}") % 10
        splits[split] = _split(x.transpose(3, 2, 0, 1), labels, f"{path} (X)", "NCHW")
    return FileData(splits, f"SVHN .mat files in {folder}", tuple(map(str, range(10))))
