"""Where code runs and which random stream it draws from: device resolution and RNG state (and
Ctrl-C: :func:`interrupts_deferred` keeps it out of a save, :class:`InterruptWatch` keeps it from
being lost).

Training's latent draws come from torch's global generators (CPU and, on a GPU, CUDA). A
checkpoint keeps their state (:func:`rng_state`), so a resumed run draws exactly what the
uninterrupted run would have; evaluation and figures draw inside :func:`seeded`, which leaves that
stream untouched.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

import torch

from .checks import check_count
from .errors import ConfigError, first_line


def load_torchvision():
    """torchvision, imported (it tiles figures and downloads data); :class:`ConfigError` naming the
    fix when it is missing or was built for another torch, which fails only as it loads its
    operators (``RuntimeError: operator torchvision::nms does not exist``)."""
    try:
        import torchvision
    except (ImportError, RuntimeError) as e:
        cause = first_line(e, with_type=False)
        raise ConfigError(
            f"torchvision cannot be loaded with torch {torch.__version__} ({cause}); install the torchvision "
            "built for this torch, both from the same index: pip install --force-reinstall torch torchvision"
        ) from e
    return torchvision


def resolve_device(name: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"``: the GPU (``cuda:local_rank``) when there is one, else the CPU; otherwise the named
    device, refused with :class:`ConfigError` if it cannot be used here."""
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise ConfigError(f"device must be a name (auto, cpu, cuda or cuda:N) or a torch.device, got {name!r}")
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if name in ("auto", "cuda"):
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for but no CUDA GPU is available; use --device cpu or auto")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s); "
                "under torchrun start at most one process per GPU (--nproc_per_node)"
            )
    elif device.type != "cpu":
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def rng_state() -> dict[str, Any]:
    """torch's generator states (CPU, and every GPU's), for a checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (GPU states only where there are GPUs)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def preserved_rng(device: torch.device):
    """A context whose draws leave torch's RNG for the CPU and ``device`` as it was (``fork_rng``)."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else torch.get_device_module(device.type).current_device()
    return torch.random.fork_rng(devices=[index], device_type=device.type)


@contextlib.contextmanager
def seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Draw from ``seed`` and leave the training RNG stream (CPU and ``device``) as it was, so that
    evaluation and figures never change what training draws next (exact resumes need that)."""
    seed = check_count("seed", seed, 0, 2**63 - 1)
    with preserved_rng(device):
        torch.manual_seed(seed)
        yield


def _signals_reach_this_thread() -> bool:
    """Python runs signal handlers in the main thread only, and a shell starts a background job
    (or nohup a command) with SIGINT ignored, which must stay ignored."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    return in_main_thread and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN


class InterruptWatch:
    """Ctrl-C raises :class:`KeyboardInterrupt` where it lands, as Python's own handler does, and is
    remembered: where it lands in a weakref callback or a ``__del__`` (torch runs such callbacks
    inside its steps), Python prints "Exception ignored" and goes on, and the loop would run to its
    end. A loop that calls :meth:`check` at each step raises it there instead.

    Use it as a context manager around the loop; outside the main thread, and where SIGINT is
    ignored, it changes nothing and :meth:`check` never raises."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True
        raise KeyboardInterrupt

    def __enter__(self) -> "InterruptWatch":
        self.received = False
        if _signals_reach_this_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def check(self) -> None:
        """Raise :class:`KeyboardInterrupt` if Ctrl-C came since the watch began (the one Python
        swallowed, or one already raised and caught by code that went on)."""
        if self.received:
            raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block is done, then raise :class:`KeyboardInterrupt`: a save
    is never cut in half. Outside the main thread, where Python delivers no signal, and where SIGINT
    is ignored (a process started in the background by a shell, or under nohup), it does nothing."""
    if not _signals_reach_this_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
