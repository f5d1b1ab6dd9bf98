"""Checkpoints that are written atomically and loaded without unpickling code.

``save_checkpoint`` writes to a temporary file in the same folder, flushes it to disk and renames
it over the old one (``os.replace`` is atomic on POSIX), so a process killed at any moment leaves
either the previous or the new complete checkpoint. ``load_checkpoint`` uses
``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only; a pickle that
names any other callable is refused before it can run.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from .errors import ConfigError


def _replace_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temporary file in the same folder, fsync it, rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the user's usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace the text file ``path`` atomically."""
    _replace_atomically(Path(path), lambda f: f.write(text.encode()))


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically."""
    _replace_atomically(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, refusing anything but plain data."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{path} is not a safe pyro-vae checkpoint (it holds more than tensors and plain data); refusing to load it: {e}") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ConfigError(f"{path} is not a readable checkpoint ({e})") from e
