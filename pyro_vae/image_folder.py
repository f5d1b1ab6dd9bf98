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
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
from pathlib import Path

import numpy as np

from .errors import DataError, first_line
from .image_arrays import FileData

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
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()  # the whole file: a truncated one fails here
            if opened.format not in ("PNG", "JPEG"):
                raise DataError(f"{path}: a {opened.format} image named as PNG or JPEG; convert it or remove it")
            if opened.mode in ("I", "I;16", "I;16B", "F"):
                raise DataError(f"{path}: {opened.mode} pixels are not 8-bit; convert the images to 8 bits per channel")
            image = opened.convert("L" if opened.mode in GREY_MODES else "RGB")
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
    ranked = sorted(sizes.items(), key=lambda kv: -len(kv[1]))
    return ", ".join(f"{len(paths)} of {h}x{w} (e.g. {paths[0]})" for (h, w), paths in ranked)


def read_image_folder(folder: Path, image_size: tuple[int, int] | None = None, progress: bool = True) -> FileData:
    """The images under ``folder``: ``{"train": ..., "test": ...}`` from ``train/`` and ``test/``
    subfolders if it has them, else ``{"all": ...}``; labels from class subfolders (0 without)."""
    if not folder.is_dir():
        raise DataError(f"--data-dir {folder}: not a folder; for --dataset folder pass the folder of your images")
    present = [s for s in SPLITS if (folder / s).is_dir()]
    if len(present) == 1:
        other = SPLITS[1 - SPLITS.index(present[0])]
        raise DataError(
            f"{folder / present[0]} is a split but {folder} has no {other}/ beside it; add {other}/ with its images, "
            f"or rename {present[0]}/ to hold out a random test split"
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
    decoded, digest = _decode_all(folder, files, image_size, progress)
    colour = any(image.mode == "RGB" for images in decoded.values() for image in images)
    splits = {}
    for split, images in decoded.items():
        pixels = np.stack([np.asarray(image.convert("RGB") if colour else image) for image in images])
        pixels = pixels.transpose(0, 3, 1, 2) if colour else pixels[:, None]
        labels = np.array([index.get(_class_of(p, roots[split]), 0) for p in files[split]], np.int64)
        splits[split] = (np.ascontiguousarray(pixels), labels)
    return FileData(splits, f"image folder {folder}", tuple(names) or None, digest)


def _decode_all(folder: Path, files: dict[str, list[Path]], image_size, progress: bool):
    """Every file decoded (one size checked), and the SHA-256 of paths, sizes and bytes."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256(repr(image_size).encode())
    decoded: dict[str, list] = {}
    sizes: dict[tuple[int, int], list[Path]] = collections.defaultdict(list)
    total = sum(map(len, files.values()))
    with tqdm(total=total, desc=f"reading {folder}", unit="image", delay=3, disable=None if progress else True) as bar:
        for split, paths in files.items():
            decoded[split] = []
            for path in paths:
                try:
                    data = path.read_bytes()
                except OSError as e:
                    raise DataError(f"cannot read {path}: {e.strerror or e}") from e
                digest.update(f"{path.relative_to(folder).as_posix()}\0{len(data)}\0".encode())
                digest.update(data)
                image = _decode(data, path, image_size)
                sizes[(image.height, image.width)].append(path)
                decoded[split].append(image)
                bar.update()
    if len(sizes) > 1:
        raise DataError(
            f"{folder} holds images of {len(sizes)} sizes: {_size_counts(sizes)}; pass --image-size H W to resize "
            "and centre-crop them to one"
        )
    return decoded, digest.hexdigest()
