"""Data-parallel training across the processes of a ``torchrun`` job.

``torchrun`` starts one process per GPU (or CPU worker) and sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`setup` sees them and joins the job's process group. The
:class:`~pyro_vae.train.Trainer` trains through one object with one interface, whatever the number
of processes: :class:`SingleProcess` without those variables, :class:`Distributed` (with
:class:`~torch.nn.parallel.DistributedDataParallel`) in a job. The interface: ``is_main``,
``device``, ``all_or_none``, ``objective`` (loss and gradients of a step), ``share`` (the main
process's number everywhere), ``check_replicas``, the GPU RNG state, and ``explain_failure``.

One step, on every rank:

* The global batch is the one single-process training would use (``batch_size`` stays the global
  batch; :class:`~pyro_vae.data.DeviceBatches` makes the same permutation and binarization draws
  from ``(seed, epoch)`` on every rank), and each rank keeps its contiguous block of rows
  (:meth:`Distributed.shard`).
* The latent noise is matched too: :class:`GlobalBatchNoise` draws the standard-normal ``eps`` of
  the guide's ``z`` for the *global* batch from torch's RNG, whose state is the same on every rank,
  and keeps this rank's rows. So every rank sees exactly the draws single-process training makes
  for its rows, and the RNG streams stay identical across ranks and with a single-process run.
* :class:`ELBOLoss` is an ``nn.Module`` whose ``forward`` is ``elbo.differentiable_loss(model,
  guide, x)``, so DDP can wrap it and reduce the gradients during ``backward``. The loss is the
  ``-ELBO`` *sum* over the rank's rows and the gradient reduction is a sum (:func:`sum_gradients`
  as DDP's comm hook, instead of DDP's mean): the result is exactly the gradient of the global
  batch's sum, the single-process objective, with no ``1/world_size`` to undo.
* The loss sums are all-reduced, so every rank knows the global ``-ELBO`` and takes the same
  skip-or-step decision for a non-finite step.

Only rank 0 evaluates the test ELBO (and broadcasts it), and writes checkpoints, metrics and figures;
the other ranks wait for each save and hear whether it worked, so a save that fails stops every rank
with its reason, and ``Trainer.run`` returns on every rank once the last checkpoint is on disk (the
ranks then leave the process group together, not one while another is still writing).
Every collective has the timeout given to :func:`setup`, so a rank whose peer died stops with a
:class:`DistributedError` instead of waiting forever, and a rank that cannot even start (missing
data, a bad setting) tells all the others, which stop at once (:func:`all_or_none`).
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

import pyro
import torch
import torch.distributed as dist
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import ConfigError
from .names import BACKENDS, DEFAULT_TIMEOUT_S
from .noise import UnsuppliableNoise, reparameterized_normal
from .objective import elbo_loss
from .runtime import resolve_device



class DistributedError(RuntimeError):
    """The ranks of a distributed run lost each other, disagree, or another rank failed."""


def launched() -> bool:
    """Whether this process is one rank of a job started by ``torchrun`` (or any ``env://`` launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_label() -> str | None:
    """``"rank R of W"`` for a process launched as part of a job, else None."""
    if dist.is_available() and dist.is_initialized():
        return f"rank {dist.get_rank()} of {dist.get_world_size()}"
    if launched():
        return f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:500]


class SingleProcess:
    """Training in this process alone: the trivial implementation of the interface."""

    rank, world_size, is_main = 0, 1, True

    def device(self, name: str) -> torch.device:
        return resolve_device(name)

    @contextlib.contextmanager
    def all_or_none(self, doing: str) -> Iterator[None]:
        yield

    def objective(self, vae: nn.Module, elbo: Any, device: torch.device, step: str = "eager"):
        """``loss_and_grads(x, kl_weight)``: ``-ELBO_beta`` of ``x`` (detached), gradients in ``.grad``;
        ``step`` ``"traced"`` or ``"inductor"`` runs the graph traced from model and guide
        (:class:`~pyro_vae.compiled.CompiledStep`, the same draws), ``"eager"`` the Pyro ELBO."""
        if step != "eager":
            from .compiled import CompiledStep

            return CompiledStep(vae, elbo=elbo, compile=step).loss_and_grads

        def loss_and_grads(x: torch.Tensor, kl_weight: float) -> torch.Tensor:
            # the data were checked once when training started; per-step validation would stop at
            # the first non-finite parameter with a traceback instead of skipping the step
            with pyro.validation_enabled(False):
                loss = elbo_loss(elbo, vae.model, vae.guide, x, kl_weight)
            loss.backward()
            return loss.detach()

        return loss_and_grads

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

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files and prints."""
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The training device of this rank: ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK``."""
        device = resolve_device(name, self.local_rank)
        if self.backend == "nccl" and device.type != "cuda":
            raise ConfigError(f"the nccl backend reduces CUDA tensors only, but this run trains on {device}; use --backend gloo (or auto) or a CUDA device")
        return device

    def objective(self, vae: nn.Module, elbo: Any, device: torch.device, step: str = "eager"):
        """``loss_and_grads(x, kl_weight)`` for the global batch ``x`` (always the eager Pyro ELBO: ``step``
        is ignored, the traced graph does not shard the noise): this rank runs its rows through
        DDP, whose backward sums the gradients of all ranks' rows; returns the global batch's
        ``-ELBO_beta``, the same on every rank, so all take the same skip-or-step decision."""
        loss_module = self.wrap(ELBOLoss(vae, elbo), device)

        def loss_and_grads(x: torch.Tensor, kl_weight: float) -> torch.Tensor:
            start, stop, weight = self.shard(x.shape[0])
            with pyro.validation_enabled(False):
                loss = loss_module(x[start:stop], start, stop, x.shape[0], kl_weight)
            self.backward(loss * weight)
            return self.all_reduce_sum(loss.detach() * weight)

        return loss_and_grads

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
        return DistributedError(f"{str(error).rstrip('.')}. The last complete checkpoint is {checkpoint}; continue the run with --resume.")

    def all_or_none(self, doing: str):
        """:func:`all_or_none` over this job."""
        return all_or_none(self, doing)

    def shard(self, n: int) -> tuple[int, int, float]:
        """This rank's rows ``[start, stop)`` of a global batch of ``n`` and their weight.

        Contiguous blocks, the first ``n % world_size`` ranks one row longer. A rank left without
        rows (a last batch smaller than the world) borrows row 0 with weight 0: it still runs the
        forward and backward that DDP's gradient reduction and the shared RNG stream need.
        """
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        size = base + (1 if self.rank < extra else 0)
        return (start, start + size, 1.0) if size else (0, 1, 0.0)

    def wrap(self, loss_module: nn.Module, device: torch.device) -> DistributedDataParallel:
        """``loss_module`` in DDP, parameters broadcast from rank 0, gradients summed over ranks."""
        with self.collective("set up DistributedDataParallel"):
            ddp = DistributedDataParallel(
                loss_module,
                device_ids=[device.index] if device.type == "cuda" else None,
                forward_sync_buffers=False,  # the buffers (prior, fixed scales) never change: synced once, at init
            )
        ddp.register_comm_hook(state=None, hook=sum_gradients)
        return ddp

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
            f"crashed, hung or was stopped; see its output. Cause: {_first_line(error)}"
        )

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, during which DDP sums the gradients over the ranks; a failure of
        that reduction (recorded by :func:`sum_gradients`) becomes a :class:`DistributedError`."""
        _hook_failures.clear()
        try:
            loss.backward()
        except RuntimeError as e:
            if not _hook_failures:
                raise  # autograd's own error, not the communication's
            raise self.lost_contact("sum the gradients with the other ranks", _hook_failures[0]) from e

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

    def all_reduce_sum(self, tensor: torch.Tensor, what: str = "sum the loss over the ranks") -> torch.Tensor:
        """The sum over ranks of ``tensor`` (a new tensor, the same on every rank)."""
        total = tensor.detach().clone().reshape(-1)
        with self.collective(what):
            dist.all_reduce(total)
        return total.reshape(tensor.shape)

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
            raise DistributedError(f"the model's parameters differ between ranks (ranks with equal parameters: {list(groups.values())}); the replicas went out of sync and training cannot go on")


_hook_failures: list[BaseException] = []  # what made sum_gradients fail, for Distributed.backward


def sum_gradients(state, bucket):  # no annotations: DDP checks them, and they are strings here
    """DDP comm hook: all-reduce the gradient bucket ``bucket`` (a ``dist.GradBucket``) as a *sum*
    over the process group ``state`` (None: the default group); DDP's own hook averages.
    DDP reports a failure here as a bare RuntimeError, so it is also recorded."""

    def summed(fut):
        try:
            return fut.value()[0]
        except Exception as e:
            _hook_failures.append(e)
            raise

    try:
        return dist.all_reduce(bucket.buffer(), group=state, async_op=True).get_future().then(summed)
    except Exception as e:
        _hook_failures.append(e)
        raise


_active: Distributed | None = None
_owned = False  # whether setup() created the process group (and shutdown() may destroy it)


def setup(backend: str = "auto", timeout_s: float | None = None) -> Distributed | SingleProcess:
    """Join the torchrun job this process belongs to; :class:`SingleProcess` when it is a plain process.

    ``backend``: ``auto`` (NCCL for CUDA tensors and gloo for CPU tensors, or gloo alone where there
    is no GPU), ``nccl`` or ``gloo``; ignored outside a job. ``timeout_s`` bounds every wait for the
    other ranks, joining included (default :data:`DEFAULT_TIMEOUT_S`). A process group someone else
    initialized is used as it is. Calling this again returns the same object.
    """
    global _active, _owned
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if timeout_s is not None and not timeout_s > 0:
        raise ConfigError(f"the distributed timeout must be a positive number of seconds, got {timeout_s}")
    if _active is not None and dist.is_initialized():
        return _active
    if not dist.is_available():
        if launched():
            raise ConfigError("this process was launched as part of a distributed job but this torch build has no torch.distributed")
        return SingleProcess()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if not launched():
            return SingleProcess()
        timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
        cuda = torch.cuda.is_available()
        if backend == "nccl" and not cuda:
            raise ConfigError("the nccl backend needs CUDA GPUs and none is available; use --backend gloo or auto")
        if cuda and local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)  # NCCL's collectives run on the current device
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ConfigError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: start the processes with torchrun, or unset RANK and WORLD_SIZE for a single process")
        name = {"auto": "cpu:gloo,cuda:nccl" if cuda else "gloo"}.get(backend, backend)
        try:
            dist.init_process_group(name, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:  # dist.DistError, or a bad environment
            raise DistributedError(
                f"could not join the job at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} (timeout {timeout_s:g} s, "
                f"--dist-timeout); is every node started, with the same --nnodes and --master_addr? Cause: {_first_line(e)}"
            ) from e
        _owned = True
    _active = Distributed(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        backend=str(dist.get_backend()),
        timeout_s=timeout_s if _owned else None,
    )
    return _active


def end_process(code: int = 0) -> NoReturn:
    """End this process with exit status ``code``. In a torchrun job: leave the process group,
    flush stdout and stderr, and ``os._exit(code)``, skipping the interpreter's finalization (and
    so any ``atexit`` handler); outside one, ``sys.exit(code)``.

    Why: a process group that :class:`~torch.nn.parallel.DistributedDataParallel` has used stays
    alive after :func:`shutdown`, gloo's threads running (DDP's C++ reducer keeps it; torch 2.15),
    until the interpreter's finalization, where about 1 process in 100 aborts with SIGABRT
    ("terminate called without an active exception") after all its work is done, which fails the
    torchrun job. A script started by torchrun should end with this call; ``pyro-vae`` does.
    """
    if not launched():
        sys.exit(code)
    shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def shutdown() -> None:
    """Leave the process group :func:`setup` created (a no-op otherwise)."""
    global _active, _owned
    if _owned and dist.is_initialized():
        dist.destroy_process_group()
    _active, _owned = None, False


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


class GlobalBatchNoise(Messenger):
    """Draw the noise of reparameterized Normal sample sites for the whole global batch and keep
    this rank's rows ``[start, stop)`` of the data plate.

    ``Normal.rsample`` is ``loc + eps * scale`` with ``eps = empty(shape).normal_()``; here ``eps``
    is drawn with the global batch in the plate's place of ``shape`` and sliced, so a rank's ``z``
    are bitwise the ones a single process makes for those rows, and torch's RNG advances exactly as
    in a single process. Sites with a value already (observed, replayed) are left alone; any other
    random site is refused, as its draws could not be matched.

    Installed around the whole ELBO call, it sees each site after every plate (the data plate and
    the vectorized-particles plate) has broadcast its distribution.
    """

    def __init__(self, start: int, stop: int, global_size: int, plate: str = "data"):
        super().__init__()
        self.start, self.stop, self.global_size, self.plate = start, stop, global_size, plate

    def _pyro_sample(self, msg) -> None:
        try:
            base = reparameterized_normal(msg)
        except UnsuppliableNoise as e:
            raise DistributedError(f"{e}; distributed training cannot match its draws to the global batch") from None
        if base is None:
            return
        fn, name = msg["fn"], msg["name"]
        frame = next((f for f in msg["cond_indep_stack"] if f.name == self.plate), None)
        if frame is None:
            raise DistributedError(f"sample site {name!r} is outside the {self.plate!r} plate, so it has no rows to shard")
        shape = list(fn.batch_shape + fn.event_shape)
        dim = len(fn.batch_shape) + frame.dim
        if shape[dim] != self.stop - self.start:
            raise DistributedError(f"sample site {name!r} has {shape[dim]} rows in plate {self.plate!r}, this rank's shard has {self.stop - self.start}")
        shape[dim] = self.global_size
        eps = torch.empty(shape, dtype=base.loc.dtype, device=base.loc.device).normal_()
        msg["value"] = base.loc + eps.narrow(dim, self.start, self.stop - self.start) * base.scale


class ELBOLoss(nn.Module):
    """``-ELBO`` of a batch as a module's ``forward``, so that DDP can wrap it (Pyro's ELBO calls the
    VAE's networks directly, never a module's ``forward``, which is what DDP hooks).

    ``forward(x)`` is ``elbo_loss(elbo, vae.model, vae.guide, x, kl_weight)``; with ``global_size``,
    ``x`` is rows ``[start, stop)`` of a global batch and the latent noise is matched to it
    (:class:`GlobalBatchNoise`).
    """

    def __init__(self, vae: nn.Module, elbo: Any):
        super().__init__()
        self.vae = vae
        self.elbo = elbo

    def forward(self, x: torch.Tensor, start: int = 0, stop: int | None = None, global_size: int | None = None, kl_weight: float = 1.0) -> torch.Tensor:
        noise = contextlib.nullcontext() if global_size is None else GlobalBatchNoise(start, x.shape[0] + start if stop is None else stop, global_size)
        with noise:
            return elbo_loss(self.elbo, self.vae.model, self.vae.guide, x, kl_weight)
