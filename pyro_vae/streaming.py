"""Minibatches of data over the memory budget, read from disk by ``DataLoader`` workers.

:class:`StreamedBatches` serves a split exactly as :class:`~pyro_vae.data.DeviceBatches` does (the
same images in the same order, the same float pixels, the same binarization draws): the order and
every random draw are made in the main process from ``(seed, epoch)`` by the code both share
(:class:`~pyro_vae.data.Batches`); the workers only read the uint8 pixels of the positions they are
given, in order (a folder's images decoded one by one, a ``.npy`` file's rows from its memory map,
or rows of a uint8 tensor in host memory too large for the GPU), into pinned memory on a GPU. So a
run streams or not by its memory budget alone, with the same results, and resumes exactly (the
loader's own seed comes from a private generator: torch's global one, which draws the latents, is left alone).

A pass's workers start with it and are shut down when it ends, is abandoned, or fails (a file that
became unreadable is a :class:`~pyro_vae.errors.DataError` naming it, as when the data were read).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from .checks import check_count
from .data import Batches
from .errors import ConfigError, DataError
from .lazy_images import LazyImages


def default_workers() -> int:
    """Worker processes that read a streamed split: one per core this process may use but one, at most 4."""
    return max(0, min(4, len(os.sched_getaffinity(0)) - 1))


class _Rows:
    """The map-style data set a worker reads: ``source[positions]`` and their labels, as CPU tensors;
    a :class:`DataError` comes back as its message, so that the main process raises it as one line."""

    def __init__(self, source: torch.Tensor | LazyImages, labels: torch.Tensor):
        self.source, self.labels = source, labels

    def __getitem__(self, positions: torch.Tensor):
        try:
            if isinstance(self.source, LazyImages):
                images = torch.from_numpy(self.source.read(positions.numpy()))
            else:
                images = self.source[positions]
        except DataError as e:
            return str(e), None
        return images, self.labels[positions]


class StreamedBatches(Batches):
    """:class:`~pyro_vae.data.Batches` of a split read from ``images`` (uint8 (N, C, H, W): a
    :class:`~pyro_vae.lazy_images.LazyImages`, or a CPU tensor) by ``num_workers`` worker processes
    (None: :func:`default_workers`; 0 reads in the main process). Other arguments as
    :class:`~pyro_vae.data.DeviceBatches`; "static" binarization, one draw over the whole split held
    in memory, is refused."""

    def __init__(
        self,
        images: torch.Tensor | LazyImages,
        labels: torch.Tensor,
        batch_size: int,
        *,
        num_workers: int | None = None,
        **kwargs,
    ) -> None:
        if isinstance(images, torch.Tensor) and (images.dtype != torch.uint8 or images.dim() != 4):
            raise DataError(f"images must be uint8 of shape (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        super().__init__(tuple(images.shape), labels, batch_size, **kwargs)
        if self.binarization == "static":
            raise ConfigError(
                f"static binarization draws once over a whole split held in memory, and these "
                f"{len(images)} images stream from disk (they exceed the data memory budget); choose --binarize "
                "dynamic or threshold, or raise --data-memory above the data's size"
            )
        self.num_workers = default_workers() if num_workers is None else check_count("num_workers", num_workers, 0)
        self.labels = labels.to(torch.int64).cpu()
        self._source = images.cpu() if isinstance(images, torch.Tensor) else images
        where = "host memory" if isinstance(images, torch.Tensor) else "disk"
        self.reading = f", streamed from {where} by {self.num_workers} DataLoader workers (over the memory budget)"

    def _loaded(self, order: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pin = self.device.type == "cuda"
        loader = DataLoader(
            _Rows(self._source, self.labels),
            sampler=order.split(size),
            batch_size=None,  # each position list is one batch, read whole by one worker
            num_workers=self.num_workers,
            pin_memory=pin,
            generator=torch.Generator().manual_seed(0),  # its workers' seeds, never drawn from torch's global RNG
        )
        batches = iter(loader)
        try:
            for images, labels in batches:
                if labels is None:  # a worker's DataError, as one line
                    raise DataError(images)
                yield images.to(self.device, non_blocking=pin), labels.to(self.device, non_blocking=pin)
        finally:
            shutdown = getattr(batches, "_shutdown_workers", None)  # now, not when the garbage collector gets to it
            if shutdown is not None:
                shutdown()
