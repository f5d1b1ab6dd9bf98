"""Images that stay on disk: uint8 ``(N, C, H, W)`` read a few at a time from their files.

A data set larger than the memory budget (:func:`pyro_vae.memory.data_memory_budget`) is not
loaded whole: :class:`LazyImages` stands in for its uint8 tensor of images. It holds a reader (the
image files of a folder, decoded one by one by PIL as :mod:`pyro_vae.image_folder` decodes them,
or a ``.npy`` file mapped into memory by numpy) and the rows of the reader it shows, so that the
operations a split goes through (the held-out test split, ``max_train``, the validation mask) give
views, never copies. :meth:`LazyImages.read` returns the pixels of the rows asked for; that is
what a :class:`~pyro_vae.streaming.StreamedBatches` worker calls.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch


class FolderReader:
    """Image ``i`` of ``paths`` decoded as (C, H, W) uint8: resized to ``image_size`` if given, RGB
    if ``colour`` (so grey images among colour ones are converted, as when the folder is read whole)."""

    def __init__(self, paths: Sequence[Path], image_size: tuple[int, int] | None, colour: bool):
        self.paths, self.image_size, self.colour = list(paths), image_size, colour

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        from .image_folder import decoded_pixels

        return np.stack([decoded_pixels(self.paths[i], self.image_size, self.colour) for i in rows])


class ArrayReader:
    """Rows of the uint8 array in a ``.npy`` file, mapped into memory (opened anew in each process,
    so that a worker never copies the map), as (C, H, W): ``layout`` is how its 4-D rows are ordered."""

    def __init__(self, path: Path, layout: str | None):
        self.path, self.layout = path, layout
        self._array: np.ndarray | None = None

    def __getstate__(self):
        return {"path": self.path, "layout": self.layout, "_array": None}

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        images = self._array[np.asarray(rows)]
        if images.ndim == 3:
            return np.ascontiguousarray(images[:, None])
        return np.ascontiguousarray(images if self.layout == "NCHW" else images.transpose(0, 3, 1, 2))


class LazyImages:
    """uint8 images ``(N, C, H, W)`` read on demand: ``rows`` of what ``reader`` reads, each of ``image_shape``.

    Indexing (a slice, a boolean mask, an array of positions) gives another :class:`LazyImages`
    over the chosen rows, as indexing a tensor would give a tensor of them."""

    def __init__(self, reader, rows: np.ndarray, image_shape: tuple[int, int, int]):
        self.reader, self.rows, self.image_shape = reader, np.asarray(rows, np.int64), tuple(image_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.image_shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.rows)

    def dim(self) -> int:
        return 4

    def __getitem__(self, key) -> "LazyImages":
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        return LazyImages(self.reader, self.rows[key], self.image_shape)

    def read(self, positions) -> np.ndarray:
        """The uint8 pixels ``(len(positions), C, H, W)`` of the images at ``positions`` (in that order)."""
        return self.reader(self.rows[np.asarray(positions, np.int64)])

    def chunks(self, size: int = 256) -> Iterator[np.ndarray]:
        """Every image in order, ``size`` at a time (what a fingerprint hashes)."""
        for start in range(0, len(self), size):
            yield self.read(np.arange(start, min(start + size, len(self))))
