"""How much memory a step needs, estimated before anything large is allocated, and refused with
the options that lower it when the device does not have it."""

from __future__ import annotations

import math
import os

import torch

from .errors import ConfigError
from .model import VAE


def step_memory_bytes(vae: VAE, particles: int, batch: int, training: bool = True, parameter_copies: int = 0) -> int:
    """A rough estimate of the memory one step over ``particles`` x ``batch`` draws of z needs: every
    decoder activation (counted on one draw) and the per-pixel numbers that scoring x keeps for each
    draw (``Likelihood.log_prob_numbers``), 4 bytes a number, times 3 with gradients (saved
    activations, gradients, temporaries) or 2 without; plus ``parameter_copies`` tensors the size of
    the parameters still to be allocated (4 before training: the values, their gradients and Adam's
    two moments). ``vae`` may live on the ``meta`` device, which allocates nothing."""
    counted = []
    hooks = [
        m.register_forward_hook(lambda m, i, out: counted.append(out.numel() if isinstance(out, torch.Tensor) else 0))
        for m in vae.decoder.modules()
        if not list(m.children())
    ]
    try:
        with torch.no_grad():
            vae.decoder(vae.prior_loc.new_zeros(1, vae.z_dim))
    finally:
        for hook in hooks:
            hook.remove()
    per_draw = sum(counted) + vae.likelihood.log_prob_numbers * math.prod(vae.x_shape) + 4 * vae.z_dim
    per_draw += getattr(vae.prior_family, "log_prob_numbers", 0)  # a mixture prior keeps its components' numbers
    parameters = sum(p.numel() * p.element_size() for p in vae.parameters())
    return particles * batch * per_draw * 4 * (3 if training else 2) + parameter_copies * parameters


def available_memory(device: torch.device) -> int | None:
    """Bytes a step may use: the GPU's free memory, else the machine's physical memory; None if unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None


def check_step_memory(
    vae: VAE,
    particles: int,
    batch: int,
    device: torch.device,
    options: str,
    training: bool = True,
    extra_bytes: int = 0,
    parameter_copies: int = 0,
) -> None:
    """:class:`ConfigError` naming ``options`` if a step (:func:`step_memory_bytes`, plus
    ``extra_bytes``) would need more memory than ``device`` has, before anything is allocated."""
    need = step_memory_bytes(vae, particles, batch, training, parameter_copies) + extra_bytes
    have = available_memory(torch.device(device))
    if have is not None and need > have:
        where = "free GPU memory" if torch.device(device).type == "cuda" else "memory"
        model = f" with a model of {sum(p.numel() for p in vae.parameters()):,} parameters" if parameter_copies else ""
        kept = f" and {extra_bytes / 2**30:,.1f} GiB of results kept" if extra_bytes else ""
        what = f"{particles} particles x {batch} images a step{model}{kept}"
        raise ConfigError(
            f"{what} need about {need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB of {where} on "
            f"{device}; lower {options}"
        )


# the default share of the memory available when a run starts that its images may take
DATA_MEMORY_SHARE = 0.5


def data_memory_budget(gib: float | None = None, device: torch.device | str = "cpu") -> int:
    """The bytes of uint8 images a run may hold in memory: ``gib`` GiB if given, else
    :data:`DATA_MEMORY_SHARE` of the machine's available memory (``MemAvailable``) and, on a GPU,
    at most that share of its free memory too. Data sets over it stream from disk."""
    if gib is not None:
        return int(gib * 2**30)
    shares = [_available_host_memory()]
    device = torch.device(device)
    if device.type == "cuda":
        shares.append(available_memory(device))
    known = [int(DATA_MEMORY_SHARE * b) for b in shares if b is not None]
    return min(known) if known else 2**63 - 1


def _available_host_memory() -> int | None:
    """What ``/proc/meminfo`` calls ``MemAvailable`` (free memory and what the page cache can give
    back), else the free pages; None if neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
