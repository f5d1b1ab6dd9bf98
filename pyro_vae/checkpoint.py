"""Checkpoints that are written atomically and loaded without unpickling code.

Every file pyro-vae writes goes through :func:`replace_atomically`: a temporary file in the same
folder, flushed to disk and renamed over the old one (``os.replace`` is atomic on POSIX), so a
process killed at any moment leaves either the previous or the new complete checkpoint. ``load_checkpoint`` uses
``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only; a pickle that
names any other callable is refused before it can run.
"""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import ConfigError, first_line


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Let ``write(tmp)`` write a temporary file in ``path``'s folder, fsync it and rename it over
    ``path`` (a symlink at ``path`` is replaced, never followed). On any failure the temporary file
    is removed and ``path`` is untouched; a failed write to disk (full, read-only) becomes a
    :class:`ConfigError` saying so."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}; choose a folder you can write to") from e
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the user's usual permissions
        os.close(fd)
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise ConfigError(
            f"cannot write {path}: {e.strerror or e}; the previous file is intact. Free disk space or choose a "
            "writable folder"
        ) from e
    except BaseException as e:
        full = isinstance(e, RuntimeError) and _disk_full(
            e, path.parent
        )  # torch.save and h5py report a failed write as RuntimeError
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise ConfigError(
                f"cannot write {path}: {os.strerror(errno.ENOSPC)}; the previous file is intact. Free disk space or "
                "choose a writable folder"
            ) from e
        raise


def check_writable_folder(folder: str | os.PathLike, option: str = "--out") -> None:
    """:class:`ConfigError`, naming ``option``, unless files can be written in ``folder``: a folder, or
    a path not made yet whose nearest existing parent is one, where a temporary file can be created
    (and is removed at once). For a check before the work whose results go there, so that a long
    computation never ends in a folder that cannot take them (read-only, not yours, not a folder)."""
    folder = Path(folder).absolute()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{option} {folder} is a file, not a folder; pass {option} with a folder")
    nearest = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        fd, probe = tempfile.mkstemp(prefix=".pyro-vae-can-write.", suffix=".tmp", dir=nearest)
    except OSError as e:
        reason = e.strerror or e
        raise ConfigError(f"cannot write to {folder}: {reason}; pass {option} with a place you can write to") from e
    os.close(fd)
    Path(probe).unlink(missing_ok=True)  # a run folder's next lock holder may have removed it already


def _disk_full(e: BaseException, folder: Path) -> bool:
    """Whether a writer's failure ``e`` came from a full disk: it says so, or (checked before its
    temporary file is removed) the folder's file system has next to no space left."""
    if "No space left on device" in str(e) or "errno = 28" in str(e):
        return True
    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < 64 * 1024


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace the text file ``path`` atomically."""
    replace_atomically(path, lambda tmp: tmp.write_bytes(text.encode()))


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically."""
    replace_atomically(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, refusing anything but plain data."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(
            f"{path} is not a safe pyro-vae checkpoint (it holds more than tensors and plain data); refusing to load "
            f"it: {e}"
        ) from e
    except Exception as e:  # torch.load fails in many ways on a damaged file; none is the user's bug
        raise ConfigError(
            f"{path} is not a readable checkpoint ({first_line(e, with_type=False)}); the run folder is damaged: "
            "train again"
        ) from e
