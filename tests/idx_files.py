"""Small real IDX files for tests, written the way the MNIST-family files are laid out."""

import gzip
from pathlib import Path

import numpy as np

from pyro_vae.data import IDX_STEMS

N_TRAIN, N_TEST = 50, 20


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """Write a uint8 array as an IDX file (gzipped if ``gz``, adding ``.gz`` to the name)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path = path.with_name(path.name + ".gz") if gz else path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def fake_arrays(seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST) -> dict[str, np.ndarray]:
    """Random uint8 images (N, 28, 28) and labels in 0..9 for both splits."""
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_dataset(directory: Path, gz: bool, seed: int = 0, **sizes: int) -> dict[str, np.ndarray]:
    """Write the four IDX files of a small fake dataset into ``directory``."""
    arrays = fake_arrays(seed, **sizes)
    for field, stem in IDX_STEMS.items():
        write_idx(directory / stem, arrays[field], gz)
    return arrays
