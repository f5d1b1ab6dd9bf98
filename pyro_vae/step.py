"""The training step: ``-ELBO_beta`` of a batch and its gradients, eager or as a graph traced from
the Pyro model and guide, on all the rows of a batch or on this process's rows of a global batch.

Modes (``pyro-vae train --step``):

* ``"eager"``: ``elbo_loss(elbo, vae.model, vae.guide, x, kl_weight).backward()``, Pyro's ELBO.
* ``"traced"``: Pyro's Python machinery (handlers, traces, site bookkeeping: about 0.8 ms per call
  whatever the batch) runs *once*, under :func:`torch.fx.experimental.proxy_tensor.make_fx`, which
  records the ATen operations it executes, the backward pass of ``torch.autograd.grad`` included,
  into a graph ``(parameters, buffers, x, eps..., kl_weight) -> (-ELBO_beta, gradients)``; each step
  then runs that graph. The graph is *derived* from ``vae.model``/``vae.guide`` and the chosen ELBO,
  not written beside them.
* ``"inductor"``: that graph compiled by TorchInductor (15-40 s per batch shape on a small CPU).

Randomness. The only random draw of a step is the standard-normal ``eps`` of each reparameterized
guide site, ``z = loc + eps * scale``, made by :class:`~pyro_vae.noise.SuppliedNoise` with the call
eager Pyro makes, same shapes, same order, outside the graph. So every mode uses bit-identical
``eps`` for a given RNG state and leaves torch's RNG where an eager step leaves it: a resumed run
repeats an uninterrupted one on CPU. With ``rows=(start, stop)`` the step runs on ``x[start:stop]``
of the global batch ``x`` with ``eps`` drawn for the global batch (one rank of a ``torchrun`` job):
its rows see exactly the draws a single process makes for them.

Graphs are cached per :meth:`TrainingStep.signature` (the batch's shape, dtype, device and strides,
the rows, the identity, dtype, device and shape of every parameter and buffer, the model and guide
functions, the estimator, the training flag, the CPU thread count). A signature whose program
cannot be traced (a site whose draws cannot be supplied, a parameter that is not the VAE's own,
data-dependent control flow, two runs that visit different sites) runs the eager ELBO instead,
with one :class:`FallbackWarning` per reason; ``mode`` and ``fallback`` say what ran and why.
Python-level changes that keep every site's name, distribution and shape are not seen: call
:meth:`TrainingStep.clear` after changing a model's code. Like the trainer's step, every mode runs
with Pyro's validation off (the data were checked once, by ``VAE.check_data``).
"""

from __future__ import annotations

import contextlib
import numbers
import sys
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.infer.util
import pyro.util
import torch
from pyro.infer import ELBO
from torch import nn

from .errors import ConfigError, first_line
from .estimators import make_elbo
from .kl_weight import check_kl_weight, elbo_loss
from .names import STEP_MODES
from .noise import NoiseSpec, SuppliedNoise, UnsuppliableNoise
from .runtime import preserved_rng


class FallbackWarning(UserWarning):
    """A traced or compiled step runs the plain eager Pyro ELBO (tracing or compiling failed)."""


def _item_as_tensor(x):
    return x if isinstance(x, numbers.Number) else x.detach()


def _no_nan_check(value, *args, **kwargs):
    return value


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def traceable_pyro():
    """While tracing, make Pyro's two host reads traceable.

    Pyro's ELBOs turn the loss into a Python float (``torch_item(x)`` is ``x.item()``) and test it
    for NaN (``warn_if_nan``); both read a tensor's value on the host, which a graph cannot do.
    Each ELBO module imports both names into its own namespace (``from pyro.infer.util import
    torch_item``), and users' ELBOs do the same, so for the duration every loaded ``pyro`` module's
    binding is replaced: ``torch_item`` returns ``x.detach()`` (the same value, as a tensor) and
    ``warn_if_nan`` its argument. Not safe for other threads running Pyro at the same moment.
    """
    originals = {
        "torch_item": (pyro.infer.util.torch_item, _item_as_tensor),
        "warn_if_nan": (pyro.util.warn_if_nan, _no_nan_check),
    }
    with _PATCH_LOCK:
        replaced = []
        try:
            for module in list(sys.modules.values()):
                if not getattr(module, "__name__", "").startswith("pyro"):
                    continue
                for attr, (original, replacement) in originals.items():
                    if getattr(module, attr, None) is original:
                        setattr(module, attr, replacement)
                        replaced.append((module, attr, original))
            yield
        finally:
            for module, attr, original in replaced:
                setattr(module, attr, original)


def inductor_compile(graph_module, example: list[torch.Tensor]) -> Callable[..., Any]:
    """``graph_module`` compiled by TorchInductor, ``torch.compile``'s backend, called directly
    (``torch._inductor.compile``, the one private API used): no TorchDynamo, whose per-call guard
    checks cost ~0.1 ms, as the step's signature already fixes what the graph is specialized on.
    On CPU, layout optimization (convolutions in channels_last) made the conv VAE 1.2x slower."""
    options = {"layout_optimization": False} if example[0].device.type == "cpu" else None
    return torch._inductor.compile(graph_module, example, options=options)


@dataclass
class _Graph:
    """A traced step for one signature: ``run(params, buffers, x, eps, w) -> (loss, *grads)``."""

    run: Callable[..., Any]
    modules: tuple[nn.Module, ...]  # held, so that the ids in the signature cannot be reused
    params: list[nn.Parameter]  # the differentiable parameters, in input order
    buffers: list[torch.Tensor]
    noise: list[NoiseSpec]
    grad_params: list[nn.Parameter]  # the parameters that get a gradient (the rest are unused)
    mode: str  # "inductor" or "traced"
    seconds: float  # to trace (and compile)


@dataclass
class _Fallback:
    reason: str


class TrainingStep:
    """``loss = step(x, kl_weight, rows)``: ``-ELBO_beta`` of the batch ``x`` (or of its rows
    ``[start, stop)``, noise drawn for all of ``x``), detached, summed over datapoints, with the
    gradients of the VAE's parameters accumulated into their ``.grad`` as ``backward()`` does.

    Args:
        vae: the :class:`~pyro_vae.VAE` (or any module with ``model``/``guide`` Pyro programs whose
            parameters are the module's).
        elbo: an ELBO instance, or an estimator name of :func:`~pyro_vae.make_elbo`.
        num_particles: with an estimator name, as for :func:`~pyro_vae.make_elbo` (vectorized).
        mode: ``"traced"``, ``"inductor"`` or ``"eager"`` (see the module's notes).
        max_graphs: graphs kept (least recently used dropped first).

    After each call ``mode_run`` says what ran and ``fallback`` why it was the eager ELBO (None
    otherwise); :meth:`describe` says both in words.
    """

    def __init__(
        self,
        vae: nn.Module,
        elbo: ELBO | str = "meanfield",
        num_particles: int = 1,
        mode: str = "traced",
        max_graphs: int = 8,
    ):
        if mode not in STEP_MODES:
            raise ConfigError(f"unknown step mode {mode!r}; choose one of {', '.join(STEP_MODES)}")
        self.vae = vae
        self.elbo = make_elbo(elbo, num_particles, vectorize_particles=True) if isinstance(elbo, str) else elbo
        self.mode = mode
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Graph | _Fallback] = OrderedDict()
        self.mode_run: str | None = None
        self.fallback: str | None = None
        self._warned: set[str] = set()
        self._weight: torch.Tensor | None = None

    def describe(self) -> str:
        """What the last call ran: ``"traced"``, or ``"eager (traced refused: reason)"``."""
        if self.mode_run is None:
            return f"{self.mode} (not run yet)"
        return self.mode_run if self.fallback is None else f"eager ({self.mode} refused: {self.fallback})"

    @property
    def fallbacks(self) -> dict[tuple, str]:
        """Every signature that runs the eager ELBO, with its reason."""
        return {key: g.reason for key, g in self.graphs.items() if isinstance(g, _Fallback)}

    def clear(self) -> None:
        """Forget every graph and fallback (after changing the model's code)."""
        self.graphs.clear()

    def signature(self, x: torch.Tensor, rows: tuple[int, int, int] | None) -> tuple:
        """The cache key: what a graph is specialized on (about 20 microseconds for a VAE)."""
        vae, elbo = self.vae, self.elbo
        modules = tuple(vae.modules())
        tensors = [t for m in modules for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
        return (
            tuple(x.shape),
            x.dtype,
            x.device,
            x.stride(),
            rows,
            tuple(map(id, modules)),
            tuple((id(t), t.dtype, t.device, t.shape, t.stride(), t.requires_grad) for t in tensors),
            getattr(vae.model, "__func__", vae.model),
            getattr(vae.guide, "__func__", vae.guide),
            type(elbo),
            elbo.num_particles,
            elbo.vectorize_particles,
            elbo.max_plate_nesting,
            vae.training,
            torch.get_num_threads(),
        )

    def __call__(
        self, x: torch.Tensor, kl_weight: float | torch.Tensor = 1.0, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """``-ELBO_beta`` of ``x`` (or of ``x[start:stop]`` for ``rows=(start, stop)``), gradients into ``.grad``."""
        check_kl_weight(kl_weight)
        sliced = None if rows is None or (rows[0], rows[1]) == (0, x.shape[0]) else (rows[0], rows[1], x.shape[0])
        if sliced is not None:
            x = x[rows[0] : rows[1]]
        if self.mode == "eager":
            self.mode_run, self.fallback = "eager", None
            return self._eager(x, kl_weight, sliced)
        key = self.signature(x, sliced)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._build(key, x, kl_weight, sliced)
        else:
            self.graphs.move_to_end(key)
        if isinstance(graph, _Fallback):
            self.mode_run, self.fallback = "eager", graph.reason
            return self._eager(x, kl_weight, sliced)
        self.mode_run, self.fallback = graph.mode, None
        return self._run(graph, x, kl_weight)

    def _loss(self, x, kl_weight, noise: SuppliedNoise | None) -> torch.Tensor:
        with pyro.validation_enabled(False), noise or contextlib.nullcontext():
            return elbo_loss(self.elbo, self.vae.model, self.vae.guide, x, kl_weight)

    def _eager(self, x, kl_weight, rows) -> torch.Tensor:
        loss = self._loss(x, kl_weight, None if rows is None else SuppliedNoise(rows=rows))
        loss.backward()
        return loss.detach()

    def _weight_tensor(self, kl_weight, dtype, device) -> torch.Tensor:
        if isinstance(kl_weight, torch.Tensor):
            return kl_weight.detach().to(dtype=dtype, device=device)
        if self._weight is None or self._weight.dtype != dtype or self._weight.device != device:
            self._weight = torch.empty((), dtype=dtype, device=device)
        return self._weight.fill_(float(kl_weight))

    def _run(self, graph: _Graph, x, kl_weight) -> torch.Tensor:
        noise = [spec.draw() for spec in graph.noise]  # the draws eager Normal.rsample makes
        with torch.no_grad():
            loss, *grads = graph.run(
                *graph.params, *graph.buffers, x, *noise, self._weight_tensor(kl_weight, x.dtype, x.device)
            )
            storages = set()
            for p, g in zip(graph.grad_params, grads):
                if p.grad is not None:
                    p.grad.add_(g)
                    continue
                storage = g.untyped_storage().data_ptr()
                if g.stride() != p.stride() or storage in storages:  # as AccumulateGrad: p's layout, no sharing
                    g = torch.empty_like(p).copy_(g)
                storages.add(storage)
                p.grad = g
        return loss

    def _build(self, key, x, kl_weight, rows) -> _Graph | _Fallback:
        try:
            graph = self._trace(x, kl_weight, rows)
        except Exception as error:  # noqa: BLE001 - any failure: run the Pyro ELBO instead
            # if the eager ELBO fails on this batch too (bad data), its error reaches the caller and nothing is cached
            with preserved_rng(x.device), torch.no_grad():
                self._loss(x, kl_weight, None if rows is None else SuppliedNoise(rows=rows))
            graph = _Fallback(first_line(error))
            self._notice(f"running the eager Pyro ELBO for this batch signature ({graph.reason})")
        else:
            if self.mode == "inductor":
                try:
                    self._compile(graph, x, kl_weight)
                except Exception as error:  # noqa: BLE001 - the traced graph still runs
                    self._notice(f"torch.compile failed, running the traced graph uncompiled ({first_line(error)})")
        self.graphs[key] = graph
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return graph

    def _trace(self, x, kl_weight, rows) -> _Graph:
        """Run the program once eagerly to learn its noise (RNG restored), then trace it with that
        noise as inputs; both runs must visit the same sites."""
        from torch.fx.experimental.proxy_tensor import make_fx

        start = time.perf_counter()
        recorder = SuppliedNoise(rows=rows)
        with preserved_rng(x.device), torch.no_grad():
            self._loss(x, kl_weight, recorder)
        if recorder.problem is not None:
            raise UnsuppliableNoise(recorder.problem)
        params = [p for p in self.vae.parameters() if p.requires_grad]
        buffers = list(self.vae.buffers())
        allowed = {id(t) for t in params}
        n_p, n_b, n_e = len(params), len(buffers), len(recorder.specs)
        grad_mask: list[bool] = []
        traced_sites: list[tuple] = []

        def step(*flat):
            ps, x_, eps, w = flat[:n_p], flat[n_p + n_b], list(flat[n_p + n_b + 1 : n_p + n_b + 1 + n_e]), flat[-1]
            noise = SuppliedNoise(eps, allowed_params=allowed)
            with torch.enable_grad():
                loss = self._loss(x_, w, noise)
            if noise.used != len(eps):
                raise UnsuppliableNoise(f"the traced run drew {noise.used} noise tensors, the recording run {len(eps)}")
            traced_sites.extend(noise.sites)
            if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                raise UnsuppliableNoise("the loss does not depend on the parameters")
            grads = torch.autograd.grad(loss, ps, allow_unused=True)
            grad_mask.extend(g is not None for g in grads)
            return (loss.detach(), *(g for g in grads if g is not None))

        with preserved_rng(x.device):  # example inputs only: the RNG is left as it was
            noise = [spec.draw() for spec in recorder.specs]
        with traceable_pyro():
            gm = make_fx(step)(
                *params, *buffers, x, *noise, torch.tensor(float(kl_weight), dtype=x.dtype, device=x.device)
            )
        if traced_sites != recorder.sites:
            raise UnsuppliableNoise(
                "the Pyro program visited different sites in two consecutive runs; its structure is not fixed"
            )
        constants = [(n, getattr(gm, n)) for n in dir(gm) if n.startswith("_tensor_constant")]
        for name, value in list(gm.named_buffers()) + list(gm.named_parameters()) + constants:
            if isinstance(value, torch.Tensor) and value.requires_grad:
                raise UnsuppliableNoise(
                    f"the traced graph holds a trainable tensor it does not take as input ({name}); its gradient "
                    "would be lost"
                )
        gm.graph.eliminate_dead_code()
        gm.recompile()
        grad_params = [p for p, used in zip(params, grad_mask) if used]
        return _Graph(
            gm,
            tuple(self.vae.modules()),
            params,
            buffers,
            recorder.specs,
            grad_params,
            "traced",
            time.perf_counter() - start,
        )

    def _compile(self, graph: _Graph, x, kl_weight) -> None:
        """Compile the traced graph (an inference graph: its backward is already in it)."""
        start = time.perf_counter()
        with preserved_rng(x.device), torch.no_grad():
            example = [
                *graph.params,
                *graph.buffers,
                x,
                *(spec.draw() for spec in graph.noise),
                self._weight_tensor(kl_weight, x.dtype, x.device),
            ]
            compiled = inductor_compile(graph.run, example)
            compiled(*example)  # the first call loads the kernels
        graph.run, graph.mode = compiled, "inductor"
        graph.seconds += time.perf_counter() - start

    def _notice(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"TrainingStep: {message}", FallbackWarning, stacklevel=4)
