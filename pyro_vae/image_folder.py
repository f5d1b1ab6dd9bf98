"""A folder of PNG and JPEG images, found recursively and decoded by PIL into one uint8 array.

The layout is torchvision's ``ImageFolder``: images directly in the folder, or in class
subfolders (``cats/``, ``dogs/``: labels 0, 1, ... in sorted name order); a folder with ``train/``
and ``test/`` subfolders holds its two splits that way. Symbolic links are followed (a loop is
refused); hidden files (``.DS_Store``) are skipped; any other file that is not a PNG or JPEG, and
any image PIL cannot decode whole, is refused with its path, so a run never trains on part of the data.

Pixels stay 8-bit: grey images (PIL modes ``1``, ``L``, ``LA``) give one channel; if any image is
in colour, every image is RGB (palettes converted, alpha dropped). All images must have one size,
or are brought to ``image_size = (H, W)``: scaled by ``max(H / h, W / w)`` (bicubic) so that they
cover it, then cropped at the centre. :class:`~pyro_vae.image_arrays.FileData`'s digest covers every
file's path relative to the folder, its size and its bytes.

Every image is decoded once while the folder is read (so a damaged one is refused before training);
the pixels are kept only while they fit ``memory_budget`` bytes. A larger folder gives
:class:`~pyro_vae.lazy_images.LazyImages` that decode each image again when a batch needs it
(:func:`decoded_pixels`, the very conversion of the whole read), so the folder must not change during a run.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import os
from pathlib import Path

import numpy as np

from .errors import DataError, first_line
from .image_arrays import FileData
from .lazy_images import FolderReader, LazyImages

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L", "LA")
SPLITS = ("train", "test")


def image_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` in sorted order, symbolic links followed, hidden names skipped;
    :class:`DataError` for a link that leads back into its own ancestry or nowhere."""
    found: list[Path] = []

    def walk(directory: Path, ancestors: dict[tuple[int, int], Path]) -> None:
        info = directory.stat()
        key = (info.st_dev, info.st_ino)
        if key in ancestors:
            raise DataError(
                f"{directory}: a symbolic link loop (it is {ancestors[key]} again); remove the link from the folder"
            )
        ancestors = {**ancestors, key: directory}
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as e:
            raise DataError(f"cannot list {directory}: {e.strerror or e}") from e
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                walk(path, ancestors)
            elif entry.is_file():
                found.append(path)
            else:
                raise DataError(f"{path}: a broken symbolic link or not a regular file; remove it from the folder")

    walk(folder, {})
    return found


def _class_of(path: Path, root: Path) -> str | None:
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def _decode(data: bytes, path: Path, image_size: tuple[int, int] | None):
    """The decoded PIL image of ``data`` in mode ``L`` or ``RGB``, resized if ``image_size``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()  # the whole file: a truncated one fails here
            if opened.format not in ("PNG", "JPEG"):
                raise DataError(f"{path}: a {opened.format} image named as PNG or JPEG; convert it or remove it")
            if opened.mode in ("I", "I;16", "I;16B", "F"):
                raise DataError(f"{path}: {opened.mode} pixels are not 8-bit; convert the images to 8 bits per channel")
            image = opened.convert("L" if opened.mode in GREY_MODES else "RGB")
    except DataError:
        raise
    except UnidentifiedImageError as e:
        raise DataError(f"{path}: not an image (no PNG or JPEG data in it); remove it from the folder") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(
            f"{path}: cannot be decoded as an image ({first_line(e, with_type=False)}); the file is damaged or "
            "incomplete: replace it or remove it from the folder"
        ) from e
    if image_size is not None:
        h, w = image_size
        scale = max(h / image.height, w / image.width)
        size = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - w) // 2, (size[1] - h) // 2
        image = image.crop((left, top, left + w, top + h))
    return image


def _size_counts(sizes: dict[tuple[int, int], list[Path]]) -> str:
    """The most common sizes (3 at most) with an example file each, and how many more there are."""
    ranked = sorted(sizes.items(), key=lambda kv: -len(kv[1]))
    shown = ", ".join(f"{len(paths)} of {h}x{w} (e.g. {paths[0]})" for (h, w), paths in ranked[:3])
    return shown + (f" and {len(ranked) - 3} more sizes" if len(ranked) > 3 else "")


def read_image_folder(
    folder: Path, image_size: tuple[int, int] | None = None, progress: bool = True, memory_budget: int | None = None
) -> FileData:
    """The images under ``folder``: ``{"train": ..., "test": ...}`` from ``train/`` and ``test/``
    subfolders if it has them, else ``{"all": ...}``; labels from class subfolders (0 without).
    Images of more than ``memory_budget`` bytes in all (None: no limit) stay on disk as :class:`LazyImages`."""
    if not folder.is_dir():
        raise DataError(f"--data-dir {folder}: not a folder; for --dataset folder pass the folder of your images")
    present = [s for s in SPLITS if (folder / s).is_dir()]
    if len(present) == 1:
        other = SPLITS[1 - SPLITS.index(present[0])]
        raise DataError(
            f"{folder / present[0]} is a split but {folder} has no {other}/ beside it; add {other}/ with its images, "
            f"or rename {present[0]}/ to hold out a random test split"
        )
    if present:  # a third split (valid/, say) would be neither trained on nor tested: refused, not ignored
        others = sorted(e.name for e in os.scandir(folder) if not e.name.startswith(".") and e.name not in SPLITS)
        if others:
            raise DataError(
                f"{folder} has train/ and test/ and also {', '.join(others)}, which would be left out; move its "
                "images into train/ (--validation-size holds a validation split out of train/) or out of the folder"
            )
    roots = {s: folder / s for s in SPLITS} if present else {"all": folder}
    files = {split: image_files(root) for split, root in roots.items()}
    for split, paths in files.items():
        if not paths:
            where = f"the {split} split {roots[split]}" if split != "all" else str(folder)
            raise DataError(f"{where} holds no images; put PNG or JPEG images in it")
        strays = [p for p in paths if p.suffix.lower() not in IMAGE_SUFFIXES]
        if strays:
            raise DataError(
                f"{strays[0]}: not a PNG or JPEG image, among the images of {folder}; move it out of the folder"
            )
        placed = {_class_of(p, roots[split]) is None: p for p in paths}
        if len(placed) == 2:
            raise DataError(
                f"{placed[True]} is not in a class subfolder while {placed[False]} is; put every image of "
                f"{roots[split]} in a class subfolder, or none"
            )
    names = sorted({_class_of(p, roots[s]) for s, paths in files.items() for p in paths} - {None})
    index = {name: i for i, name in enumerate(names)}
    decoded, (h, w), colour, digest = _decode_all(folder, files, image_size, progress, memory_budget)
    splits = {}
    for split, paths in files.items():
        labels = np.array([index.get(_class_of(p, roots[split]), 0) for p in paths], np.int64)
        if decoded is None:
            pixels = LazyImages(
                FolderReader(paths, image_size, colour), np.arange(len(paths)), (3 if colour else 1, h, w)
            )
        else:
            pixels = np.stack([_pixels(image, colour) for image in decoded[split]])
        splits[split] = (pixels, labels)
    return FileData(splits, f"image folder {folder}", tuple(names) or None, digest)


def _pixels(image, colour: bool) -> np.ndarray:
    """A decoded image's uint8 pixels (C, H, W), RGB if ``colour``."""
    pixels = np.asarray(image.convert("RGB") if colour else image)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1) if colour else pixels[None])


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e


def decoded_pixels(path: Path, image_size: tuple[int, int] | None, colour: bool) -> np.ndarray:
    """The uint8 pixels (C, H, W) of the image file ``path``, as reading its folder whole gives them."""
    return _pixels(_decode(_read(path), path, image_size), colour)


def _decode_all(folder: Path, files: dict[str, list[Path]], image_size, progress: bool, memory_budget: int | None):
    """Every file decoded (one size checked): the decoded images per split (None once they outgrow
    ``memory_budget`` bytes), their (H, W), whether any is in colour, and the SHA-256 of paths, sizes and bytes."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256(repr(image_size).encode())
    decoded: dict[str, list] | None = {split: [] for split in files}
    sizes: dict[tuple[int, int], list[Path]] = collections.defaultdict(list)
    total, kept, colour = sum(map(len, files.values())), 0, False
    with tqdm(total=total, desc=f"reading {folder}", unit="image", delay=3, disable=None if progress else True) as bar:
        for split, paths in files.items():
            for path in paths:
                data = _read(path)
                digest.update(f"{path.relative_to(folder).as_posix()}\0{len(data)}\0".encode())
                digest.update(data)
                image = _decode(data, path, image_size)
                sizes[(image.height, image.width)].append(path)
                colour |= image.mode == "RGB"
                kept += image.height * image.width * (3 if colour else 1)
                if decoded is not None and memory_budget is not None and kept > memory_budget:
                    decoded = None  # too large to hold: the images will be decoded again when a batch needs them
                if decoded is not None:
                    decoded[split].append(image)
                bar.update()
    if len(sizes) > 1:
        raise DataError(
            f"{folder} holds images of {len(sizes)} sizes: {_size_counts(sizes)}; pass --image-size H W to resize "
            "and centre-crop them to one"
        )
    if (
        decoded is not None
        and memory_budget is not None
        and total * math.prod(next(iter(sizes))) * (3 if colour else 1) > memory_budget
    ):
        decoded = None  # grey images counted once turned out to be colour
    return decoded, next(iter(sizes)), colour, digest.hexdigest()
