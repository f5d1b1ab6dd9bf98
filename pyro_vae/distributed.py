"""Communication between the processes of a ``torchrun`` job, and nothing else: joining and
leaving the job, collectives with timeouts, agreement, sharding, replica checks. No Pyro, no model.

``torchrun`` starts one process per GPU (or CPU worker) and sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`job` joins the job's process group for the duration of a ``with`` block
and yields this process's place in it, :class:`Distributed`, or :class:`SingleProcess` (the same
interface, every collective trivial) outside a job. The trainer uses it the same way in both:

* every rank holds the same global batch (``batch_size`` stays the global batch; the data order and
  binarization come from ``(seed, epoch)``) and steps on its contiguous block of rows,
  :meth:`Distributed.shard`, with the latent noise drawn for the global batch
  (:class:`~pyro_vae.step.TrainingStep` with ``rows``), so its rows see the single-process draws;
* :meth:`Distributed.sum_in_place` then sums the loss and the gradients over the ranks in one
  all-reduce of one flat buffer: every rank holds the gradient of the global batch's ``-ELBO`` sum,
  the single-process objective, and takes the same skip-or-step decision.

Only rank 0 evaluates the test ELBO (and broadcasts it), and writes checkpoints, metrics and
figures; the other ranks wait for each save and hear whether it worked. Every collective has the
timeout given to :func:`job`, so a rank whose peer died stops with a
:class:`~pyro_vae.errors.DistributedError` instead of waiting forever, and a rank that cannot even
start (missing data, a bad setting) tells all the others, which stop at once (:func:`all_or_none`).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError, DistributedError, first_line
from .launcher import launched
from .names import BACKENDS, DEFAULT_TIMEOUT_S
from .runtime import resolve_device


class SingleProcess:
    """Training in this process alone: the trivial implementation of the interface."""

    rank, world_size, is_main = 0, 1, True

    def device(self, name: str) -> torch.device:
        return resolve_device(name)

    @contextlib.contextmanager
    def all_or_none(self, doing: str) -> Iterator[None]:
        yield

    def shard(self, n: int) -> tuple[int, int, float]:
        """All ``n`` rows of a batch, weight 1."""
        return 0, n, 1.0

    def sum_in_place(self, tensors: list[torch.Tensor], what: str = "") -> None:
        """One process: the sum over ranks is the tensors themselves."""

    def broadcast_object(self, obj: Any, what: str) -> Any:
        return obj

    def share(self, value: float, device: torch.device, what: str) -> float:
        return value

    def check_replicas(self, module: nn.Module) -> None:
        """One replica: nothing to compare."""

    def save_device_rng(self, state: dict[str, Any], device: torch.device) -> None:
        """The global RNG state (:func:`~pyro_vae.runtime.rng_state`) holds every GPU's already."""

    def restore_device_rng(self, state: dict[str, Any], device: torch.device) -> None:
        """Restored with the global state."""

    def explain_failure(self, error: BaseException, checkpoint: Path) -> BaseException:
        return error


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job, and the few collectives training needs."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    timeout_s: float | None

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files and prints."""
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The training device of this rank: ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK``."""
        device = resolve_device(name, self.local_rank)
        if self.backend == "nccl" and device.type != "cuda":
            raise ConfigError(
                f"the nccl backend reduces CUDA tensors only, but this run trains on {device}; use --backend gloo "
                "(or auto) or a CUDA device"
            )
        return device

    def share(self, value: float, device: torch.device, what: str) -> float:
        """Rank 0's ``value`` on every rank."""
        return self.broadcast_float(value, device, what)

    def save_device_rng(self, state: dict[str, Any], device: torch.device) -> None:
        """Rank 0's GPU stream, which every rank continues on resume (ranks share one stream)."""
        if device.type == "cuda":
            state["device"] = torch.cuda.get_rng_state(device)

    def restore_device_rng(self, state: dict[str, Any], device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.set_rng_state(state.get("device", state["cuda"][0]), device)

    def explain_failure(self, error: BaseException, checkpoint: Path) -> BaseException:
        """A lost peer, with where the run can continue from."""
        if not checkpoint.exists():
            return error
        return DistributedError(
            f"{str(error).rstrip('.')}. The last complete checkpoint is {checkpoint}; continue the run with --resume."
        )

    def all_or_none(self, doing: str):
        """:func:`all_or_none` over this job."""
        return all_or_none(self, doing)

    def shard(self, n: int) -> tuple[int, int, float]:
        """This rank's rows ``[start, stop)`` of a global batch of ``n`` and their weight.

        Contiguous blocks, the first ``n % world_size`` ranks one row longer. A rank left without
        rows (a last batch smaller than the world) borrows row 0 with weight 0: it still draws the
        global batch's noise, so the ranks' RNG streams stay together.
        """
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        size = base + (1 if self.rank < extra else 0)
        return (start, start + size, 1.0) if size else (0, 1, 0.0)

    @contextlib.contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turn a failed or timed-out collective into a :class:`DistributedError` that says why.
        Only the collective call itself may run inside: any RuntimeError is the transport's."""
        try:
            yield
        except RuntimeError as e:  # dist.DistError, or gloo's plain RuntimeError
            raise self.lost_contact(what, e) from e

    def lost_contact(self, what: str, error: BaseException) -> DistributedError:
        timeout = f" (timeout {self.timeout_s:g} s, --dist-timeout)" if self.timeout_s else ""
        return DistributedError(
            f"lost contact with the other ranks while trying to {what}{timeout}: another rank probably "
            f"crashed, hung or was stopped; see its output. Cause: {first_line(error)}"
        )

    def agree(self, error: BaseException | None, doing: str) -> None:
        """Collective: every rank reports whether it could ``doing``. Raises on every rank if any
        could not: the failing rank's own error is left for the caller to re-raise, the others get a
        :class:`DistributedError` carrying its message."""
        mine = None if error is None else f"{type(error).__name__}: {error}"[:4000]
        gathered: list[Any] = [None] * self.world_size
        with self.collective(f"hear from the other ranks whether they could {doing}"):
            dist.all_gather_object(gathered, mine)
        failed = [(rank, message) for rank, message in enumerate(gathered) if message is not None]
        if error is None and failed:
            rank, message = failed[0]
            more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
            raise DistributedError(f"rank {rank} of {self.world_size}{more} could not {doing}: {message}")

    def sum_in_place(
        self, tensors: list[torch.Tensor], what: str = "sum the loss and gradients over the ranks"
    ) -> None:
        """Replace each of ``tensors`` (same shapes on every rank) by its sum over the ranks, in one
        all-reduce of one flat buffer (the gradient summation of data-parallel training)."""
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        with self.collective(what):
            dist.all_reduce(flat)
        with torch.no_grad():
            for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
                t.copy_(part.view_as(t))

    def broadcast_float(self, value: float, device: torch.device, what: str) -> float:
        """Rank 0's ``value`` on every rank."""
        t = torch.tensor([value], dtype=torch.float64, device=device)
        with self.collective(what):
            dist.broadcast(t, src=0)
        return t.item()

    def broadcast_object(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank."""
        box = [obj]
        with self.collective(what):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_replicas(self, module: nn.Module) -> None:
        """Raise unless ``module``'s parameters and buffers are bitwise the same on every rank."""
        digest = hashlib.sha256()
        for name, t in module.state_dict().items():
            digest.update(name.encode())
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digests: list[Any] = [None] * self.world_size
        with self.collective("compare the model replicas"):
            dist.all_gather_object(digests, digest.hexdigest())
        if len(set(digests)) != 1:
            groups = {d: [r for r, x in enumerate(digests) if x == d] for d in digests}
            raise DistributedError(
                "the model's parameters differ between ranks (ranks with equal parameters: "
                f"{list(groups.values())}); the replicas went out of sync and training cannot go on"
            )


@contextlib.contextmanager
def job(backend: str = "auto", timeout_s: float | None = None) -> Iterator[Distributed | SingleProcess]:
    """This process's place in the ``torchrun`` job it belongs to, joined for the ``with`` block
    and left at its end; :class:`SingleProcess` when it is a plain process.

    ``backend``: ``auto`` (NCCL for CUDA tensors and gloo for CPU tensors, or gloo alone where there
    is no GPU), ``nccl`` or ``gloo``; ignored outside a job. ``timeout_s`` bounds every wait for the
    other ranks, joining included (default :data:`~pyro_vae.names.DEFAULT_TIMEOUT_S`). A process
    group someone else initialized is used as it is, and left to them.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if timeout_s is not None and not timeout_s > 0:
        raise ConfigError(f"the distributed timeout must be a positive number of seconds, got {timeout_s}")
    if not launched() and not (dist.is_available() and dist.is_initialized()):
        yield SingleProcess()
        return
    if not dist.is_available():
        raise ConfigError(
            "this process was launched as part of a distributed job but this torch build has no torch.distributed"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owned = not dist.is_initialized()
    if owned:
        timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
        _join(backend, timeout_s, local_rank)
    try:
        yield Distributed(
            dist.get_rank(), dist.get_world_size(), local_rank, str(dist.get_backend()), timeout_s if owned else None
        )
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def _join(backend: str, timeout_s: float, local_rank: int) -> None:
    """``init_process_group`` from torchrun's environment, its failures in one line."""
    cuda = torch.cuda.is_available()
    if backend == "nccl" and not cuda:
        raise ConfigError("the nccl backend needs CUDA GPUs and none is available; use --backend gloo or auto")
    if cuda and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)  # NCCL's collectives run on the current device
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(
            f"RANK and WORLD_SIZE are set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
            "start the processes with torchrun, or unset RANK and WORLD_SIZE for a single process"
        )
    name = {"auto": "cpu:gloo,cuda:nccl" if cuda else "gloo"}.get(backend, backend)
    try:
        dist.init_process_group(name, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:  # dist.DistError, or a bad environment
        raise DistributedError(
            f"could not join the job at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} (timeout "
            f"{timeout_s:g} s, "
            f"--dist-timeout); is every node started, with the same --nnodes and --master_addr? Cause: {first_line(e)}"
        ) from e


def end_process(code: int = 0) -> NoReturn:
    """End this process with exit status ``code``. In a torchrun job: leave the process group if it
    is still joined, flush stdout and stderr, and ``os._exit(code)``, skipping the interpreter's
    finalization (and so any ``atexit`` handler); outside one, ``sys.exit(code)``.

    Why: with torch 2.15, a process group that DistributedDataParallel had used stayed alive into
    the interpreter's finalization, where about 1 process in 100 aborted with SIGABRT after all its
    work was done, failing the job. pyro-vae no longer uses DDP, but a user's code in the same
    process may: a script started by torchrun should end with this call; ``pyro-vae`` does.
    """
    if not launched():
        sys.exit(code)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


@contextlib.contextmanager
def all_or_none(d: Distributed | SingleProcess | None, doing: str) -> Iterator[None]:
    """Run a setup block on every rank, then agree: if it failed on any rank it fails on all of
    them at once, the failing rank with its own error, the others saying which rank failed and why.
    No other collective may run inside the block. A no-op context for a single process."""
    if d is None or isinstance(d, SingleProcess):
        yield
        return
    try:
        yield
    except Exception as e:
        d.agree(e, doing)
        raise
    d.agree(None, doing)
