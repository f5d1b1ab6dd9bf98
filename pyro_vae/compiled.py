"""One training step as a graph traced from the Pyro model and guide: no Pyro work per step.

A step of ``elbo_loss(elbo, vae.model, vae.guide, x, kl_weight)`` followed by ``backward()`` spends
about 0.8 ms per call in Pyro's Python machinery (handlers, traces, site bookkeeping) whatever the
batch. :class:`CompiledStep` runs that Python *once*, under
:func:`torch.fx.experimental.proxy_tensor.make_fx`, which records the ATen operations it executes,
the backward pass of ``torch.autograd.grad`` included, into a graph::

    (parameters, buffers, x, eps..., kl_weight) -> (-ELBO_beta, d(-ELBO_beta)/d parameters)

and then runs that graph, compiled by TorchInductor (``torch.compile``'s backend, called directly
on the graph) or as traced. The graph is *derived* from ``vae.model``/``vae.guide`` and the chosen
Pyro ELBO, not written beside them: what the model computes is what the graph computes.

Randomness. The only random draw of a step is the standard-normal ``eps`` of each reparameterized
guide site, ``z = loc + eps * scale``. :class:`SuppliedNoise` makes those sites read ``eps`` from the
graph's inputs, and each call draws them outside the graph with the call eager Pyro makes
(``torch.empty(shape).normal_()``, torch's ``_standard_normal``), same shapes, same order. So for a
given RNG state the compiled step uses bit-identical ``eps`` (the same ``z`` up to floating-point
rounding in a compiled graph; bitwise in the traced one), and it leaves torch's RNG exactly where an
eager step leaves it. So a run resumed from a checkpoint (parameters, optimizer, RNG state) repeats
the uninterrupted run bit for bit on CPU.

Cache and fallback. Graphs are cached per :meth:`CompiledStep.signature`: the batch's shape,
dtype, device and strides, the identity, dtype, device and shape of every parameter and buffer, the
identity of every submodule, the model and guide functions, the estimator and its particles, the
training flag and the CPU thread count. Computing it takes tens of microseconds per call. Tracing
runs the program twice (a recording run to learn the noise shapes, then the traced run) and
requires both to visit the same sites; it refuses sites whose draws cannot be supplied (anything but
a reparameterized Normal), parameters that are not the VAE's own, and data-dependent Python control
flow (``make_fx`` errors on it). If tracing fails, that signature runs the plain eager Pyro ELBO
instead (if compiling fails, the traced graph uncompiled), with one :class:`FallbackWarning` per
distinct reason. Every ``audit_every``
graph calls the model and guide are run once more eagerly (forward only, torch's RNG state
restored) and their sites compared with the traced ones: a program whose structure changed is
re-traced. Python-level changes that leave every site's name, distribution type and shape as they
were (a different constant in the model) are *not* seen: call :meth:`CompiledStep.clear` after
changing the model's code.

Like the trainer's step, the graph runs with Pyro's validation off: the value checks of
``VAE.check_data`` (finite, within the likelihood's support) are not made per step.
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
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.infer.util
import pyro.util
import torch
from pyro.infer import ELBO
from pyro.poutine.messenger import Messenger
from torch import nn

from .estimators import make_elbo
from .names import STEP_MODES
from .noise import UnsuppliableNoise, reparameterized_normal
from .objective import check_kl_weight, elbo_loss



class FallbackWarning(UserWarning):
    """A compiled step runs the plain eager Pyro ELBO (tracing or compiling failed)."""


class TraceRefused(RuntimeError):
    """The program cannot be turned into a graph (the reason is the message)."""


# ---------------------------------------------------------------------------------------------
# Pyro handlers used while recording and tracing


def _site_record(msg) -> tuple:
    fn = msg["fn"]
    shape = tuple(fn.batch_shape) + tuple(fn.event_shape) if hasattr(fn, "batch_shape") else ()
    return (msg["type"], msg["name"], type(fn).__name__, bool(msg["is_observed"]), shape)


@dataclass(frozen=True)
class NoiseSpec:
    """The standard-normal draw of one reparameterized site: ``torch.empty(shape).normal_()``."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def draw(self) -> torch.Tensor:
        # exactly torch.distributions.utils._standard_normal outside JIT tracing, so the draws and
        # the RNG state after them are bitwise those of eager Normal.rsample
        return torch.empty(self.shape, dtype=self.dtype, device=self.device).normal_()


class SuppliedNoise(Messenger):
    """Give each random reparameterized Normal site the value ``loc + eps * scale`` with ``eps``
    taken in turn from ``eps`` (or, with ``eps=None``, drawn as eager ``rsample`` would, recording
    its :class:`NoiseSpec`). Installed around the whole ELBO call, it sees each site after every
    plate (data, vectorized particles) has broadcast it. It also records every sample and param
    site, for structure comparisons. Random sites it cannot supply raise :class:`TraceRefused`.
    """

    def __init__(self, eps: list[torch.Tensor] | None = None, allowed_params: set[int] | None = None):
        super().__init__()
        self.eps = eps
        self.used = 0
        self.specs: list[NoiseSpec] = []
        self.sites: list[tuple] = []
        self.allowed_params = allowed_params
        self.problem: str | None = None  # why a recorded program cannot be traced

    def _pyro_sample(self, msg) -> None:
        self.sites.append(_site_record(msg))
        try:
            base = reparameterized_normal(msg)
        except UnsuppliableNoise as e:
            return self._refuse(str(e))
        if base is None:
            return
        fn, name = msg["fn"], msg["name"]
        shape = tuple(fn.batch_shape) + tuple(fn.event_shape)
        if self.eps is None:
            spec = NoiseSpec(name, shape, base.loc.dtype, base.loc.device)
            self.specs.append(spec)
            eps = spec.draw()
        else:
            if self.used >= len(self.eps):
                raise TraceRefused(f"sample site {name!r} is a random site the recording run did not have")
            eps = self.eps[self.used]
            if tuple(eps.shape) != shape:
                raise TraceRefused(f"sample site {name!r} has shape {shape} now, {tuple(eps.shape)} in the recording run")
        self.used += 1
        msg["value"] = base.loc + eps * base.scale

    def _refuse(self, reason: str) -> None:
        """Recording: note the reason and let the site draw as usual (the eager program runs on);
        tracing: raise."""
        if self.eps is not None:
            raise TraceRefused(reason)
        if self.problem is None:
            self.problem = reason

    def _pyro_post_param(self, msg) -> None:
        self.sites.append(("param", msg["name"]))
        if self.allowed_params is not None and id(msg["value"]) not in self.allowed_params:
            raise TraceRefused(f"param site {msg['name']!r} is not a parameter of the VAE module; its gradient would be lost")


def preserved_rng(device: torch.device):
    """Fork torch's RNG for ``device`` (and the CPU's): draws inside leave no trace outside."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else torch.get_device_module(device.type).current_device()
    return torch.random.fork_rng(devices=[index], device_type=device.type)


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _item_as_tensor(x):
    return x if isinstance(x, numbers.Number) else x.detach()


def _no_nan_check(value, *args, **kwargs):
    return value


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def traceable_pyro():
    """While tracing, make Pyro's two host reads traceable.

    Pyro's ELBOs turn the loss into a Python float (``torch_item(x)`` is ``x.item()``) and test it
    for NaN (``warn_if_nan``); both read a tensor's value on the host, which a graph cannot do. For
    the duration, every loaded ``pyro`` module's ``torch_item`` returns ``x.detach()`` (the same
    value, as a tensor) and ``warn_if_nan`` returns its argument. Not thread-safe for other threads
    running Pyro at the same moment (they would see the replacements).
    """
    originals = {"torch_item": (pyro.infer.util.torch_item, _item_as_tensor), "warn_if_nan": (pyro.util.warn_if_nan, _no_nan_check)}
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


# ---------------------------------------------------------------------------------------------
# One traced program


@dataclass
class _Graph:
    """A traced step for one signature: ``run(params, buffers, x, eps, w) -> (loss, *grads)``."""

    run: Callable[..., Any]
    modules: tuple[nn.Module, ...]  # held, so that the ids in the signature cannot be reused
    params: list[nn.Parameter]  # the differentiable parameters, in input order
    buffers: list[torch.Tensor]
    noise: list[NoiseSpec]
    sites: list[tuple]
    grad_mask: list[bool]  # which differentiable parameters get a gradient (the rest: unused)
    mode: str  # "inductor" or "traced"
    trace_seconds: float
    compile_seconds: float = 0.0
    calls: int = 0
    graph_module: Any = field(default=None, repr=False)

    def __post_init__(self):
        self.grad_params = [p for p, used in zip(self.params, self.grad_mask) if used]


@dataclass
class _Fallback:
    reason: str


class CompiledStep:
    """``loss = step.loss_and_grads(x, kl_weight)``: ``-ELBO_beta`` of the batch (detached) with
    the gradients of the VAE's parameters written to their ``.grad`` as
    ``elbo_loss(elbo, vae.model, vae.guide, x, kl_weight).backward()`` writes them (accumulated
    into an existing ``.grad``, set where it is None), from a graph traced from the Pyro program.

    Args:
        vae: the :class:`~pyro_vae.VAE` (or any module with ``model``/``guide`` Pyro programs whose
            parameters are the module's).
        elbo_name: an estimator of :func:`~pyro_vae.make_elbo` (``"trace"``, ``"meanfield"``,
            ``"iwae"``), or pass ``elbo=`` an ELBO instance.
        num_particles: as for :func:`~pyro_vae.make_elbo`.
        vectorize_particles: as for :func:`~pyro_vae.make_elbo`.
        compile: ``"inductor"`` (compile the traced graph with TorchInductor, ``torch.compile``'s
            backend: ~5-35 s per signature on a small CPU, cached on disk by inductor), ``"traced"``
            (run the traced graph as it is: no compile time, no Pyro overhead, but unfused) or
            ``"eager"`` (no graph: the plain Pyro ELBO).
        audit_every: re-run the Pyro program eagerly every this many graph calls to check that its
            sites are those traced (None: never).
        max_graphs: graphs kept (least recently used dropped first).

    After each call, ``mode`` says what ran (``"inductor"``, ``"traced"`` or ``"eager"``) and
    ``fallback`` why it was the eager ELBO (None when a graph ran); ``fallbacks`` maps every
    signature that runs eagerly to its reason; ``compile_seconds`` sums the trace and compile times.
    """

    def __init__(
        self,
        vae: nn.Module,
        elbo_name: str = "meanfield",
        num_particles: int = 1,
        vectorize_particles: bool = True,
        compile: str = "inductor",
        audit_every: int | None = 1000,
        max_graphs: int = 8,
        elbo: ELBO | None = None,
    ):
        if compile not in STEP_MODES:
            raise ValueError(f"compile must be one of {STEP_MODES}, got {compile!r}")
        self.vae = vae
        self.elbo = elbo if elbo is not None else make_elbo(elbo_name, num_particles, vectorize_particles)
        self.compile = compile
        self.audit_every = audit_every
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Graph | _Fallback] = OrderedDict()
        self.fallback: str | None = None
        self.mode: str | None = None
        self._warned: set[str] = set()
        self._weight: torch.Tensor | None = None
        self._weight_value: float | None = None

    # -- public -----------------------------------------------------------------------------

    @property
    def fallbacks(self) -> dict[tuple, str]:
        return {key: g.reason for key, g in self.graphs.items() if isinstance(g, _Fallback)}

    @property
    def compile_seconds(self) -> float:
        """Seconds spent tracing and compiling, over all graphs built so far."""
        return sum(g.trace_seconds + g.compile_seconds for g in self.graphs.values() if isinstance(g, _Graph))

    def clear(self) -> None:
        """Forget every graph and fallback (after changing the model's code)."""
        self.graphs.clear()
        self.fallback = None

    def signature(self, x: torch.Tensor) -> tuple:
        """The cache key: what a graph is specialized on (about 20 microseconds for a VAE)."""
        vae, elbo = self.vae, self.elbo
        modules = tuple(vae.modules())
        tensors = [t for m in modules for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
        return (
            tuple(x.shape), x.dtype, x.device, x.stride(),
            tuple(map(id, modules)),
            tuple((id(t), t.dtype, t.device, t.shape, t.stride(), t.requires_grad) for t in tensors),
            getattr(vae.model, "__func__", vae.model), getattr(vae.guide, "__func__", vae.guide),
            type(elbo), elbo.num_particles, elbo.vectorize_particles, elbo.max_plate_nesting,
            vae.training, torch.get_num_threads(),
        )

    def loss_and_grads(self, x: torch.Tensor, kl_weight: float | torch.Tensor = 1.0) -> torch.Tensor:
        """``-ELBO_beta(x)`` (detached, a 0-dim tensor); gradients written to ``.grad``."""
        check_kl_weight(kl_weight)
        if self.compile == "eager":
            self.fallback, self.mode = "compile='eager'", "eager"
            return self._eager(x, kl_weight)
        key = self.signature(x)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._build(key, x, kl_weight)
        else:
            self.graphs.move_to_end(key)
        if isinstance(graph, _Fallback):
            self.fallback, self.mode = graph.reason, "eager"
            return self._eager(x, kl_weight)
        if self.audit_every and graph.calls and graph.calls % self.audit_every == 0 and not self._audit(graph, x, kl_weight):
            del self.graphs[key]
            return self.loss_and_grads(x, kl_weight)
        self.fallback, self.mode = None, graph.mode
        return self._run(graph, x, kl_weight)

    __call__ = loss_and_grads

    # -- running ------------------------------------------------------------------------------

    def _weight_tensor(self, kl_weight, dtype, device) -> torch.Tensor:
        if isinstance(kl_weight, torch.Tensor):
            return kl_weight.detach().to(dtype=dtype, device=device)
        w = self._weight
        if w is None or w.dtype != dtype or w.device != device:
            w = self._weight = torch.tensor(float(kl_weight), dtype=dtype, device=device)
        elif self._weight_value != kl_weight:
            w.fill_(float(kl_weight))
        self._weight_value = kl_weight
        return w

    def _inputs(self, graph: _Graph, x, kl_weight, noise: list[torch.Tensor]) -> list[torch.Tensor]:
        return [*graph.params, *graph.buffers, x, *noise, self._weight_tensor(kl_weight, x.dtype, x.device)]

    def _run(self, graph: _Graph, x, kl_weight) -> torch.Tensor:
        noise = [spec.draw() for spec in graph.noise]  # the draws eager Normal.rsample makes
        inputs = self._inputs(graph, x, kl_weight, noise)
        with torch.no_grad():
            loss, *grads = graph.run(*inputs)
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
        graph.calls += 1
        return loss

    def _eager(self, x, kl_weight) -> torch.Tensor:
        with pyro.validation_enabled(False):
            loss = elbo_loss(self.elbo, self.vae.model, self.vae.guide, x, kl_weight)
        loss.backward()
        return loss.detach()

    # -- building -------------------------------------------------------------------------------

    def _record(self, x, kl_weight) -> SuppliedNoise:
        """Run the ELBO eagerly, forward only, with torch's RNG state restored afterwards; returns
        the handler with the noise specs and the sites visited."""
        recorder = SuppliedNoise()
        with preserved_rng(x.device), torch.no_grad(), pyro.validation_enabled(False), recorder:
            elbo_loss(self.elbo, self.vae.model, self.vae.guide, x, kl_weight)
        return recorder

    def _audit(self, graph: _Graph, x, kl_weight) -> bool:
        try:
            sites = self._record(x, kl_weight).sites
        except Exception:  # noqa: BLE001 - any failure means the program is no longer the traced one
            sites = None
        if sites != graph.sites:
            self._notice("the Pyro program's sites changed since it was traced; re-tracing")
            return False
        return True

    def _build(self, key, x, kl_weight) -> _Graph | _Fallback:
        try:
            graph = self._trace(x, kl_weight)
        except Exception as error:  # noqa: BLE001 - any failure: run the Pyro ELBO instead
            # if the eager ELBO fails on this batch too (bad data), its error reaches the caller
            # and nothing is cached
            self._record(x, kl_weight)
            graph = _Fallback(_describe(error))
            self._notice(f"running the eager Pyro ELBO for this batch signature ({graph.reason})")
        else:
            if self.compile == "inductor":
                try:
                    self._compile(graph, x, kl_weight)
                except Exception as error:  # noqa: BLE001 - the traced graph still runs
                    self._notice(f"torch.compile failed, running the traced graph uncompiled ({_describe(error)})")
        self.graphs[key] = graph
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return graph

    def _trace(self, x, kl_weight) -> _Graph:
        from torch.fx.experimental.proxy_tensor import make_fx

        start = time.perf_counter()
        recorder = self._record(x, kl_weight)
        if recorder.problem is not None:
            raise TraceRefused(recorder.problem)
        params = [p for p in self.vae.parameters() if p.requires_grad]
        buffers = list(self.vae.buffers())
        allowed = {id(t) for t in params}
        specs = recorder.specs
        n_p, n_b, n_e = len(params), len(buffers), len(specs)
        grad_mask: list[bool] = []
        traced_sites: list[tuple] = []

        def step(*flat):
            ps, x_, eps, w = flat[:n_p], flat[n_p + n_b], list(flat[n_p + n_b + 1 : n_p + n_b + 1 + n_e]), flat[-1]
            noise = SuppliedNoise(eps, allowed_params=allowed)
            with torch.enable_grad(), pyro.validation_enabled(False), noise:
                loss = elbo_loss(self.elbo, self.vae.model, self.vae.guide, x_, w)
            if noise.used != len(eps):
                raise TraceRefused(f"the traced run drew {noise.used} noise tensors, the recording run {len(eps)}")
            traced_sites.extend(noise.sites)
            if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                raise TraceRefused("the loss does not depend on the parameters")
            grads = torch.autograd.grad(loss, ps, allow_unused=True)
            grad_mask.extend(g is not None for g in grads)
            return (loss.detach(), *(g for g in grads if g is not None))

        with preserved_rng(x.device):  # example inputs only: the RNG is left as it was
            noise = [spec.draw() for spec in specs]
        weight = torch.tensor(float(kl_weight), dtype=x.dtype, device=x.device)
        with traceable_pyro():
            gm = make_fx(step)(*params, *buffers, x, *noise, weight)
        if traced_sites != recorder.sites:
            raise TraceRefused("the Pyro program visited different sites in two consecutive runs; its structure is not fixed")
        for name, value in list(gm.named_buffers()) + list(gm.named_parameters()) + [(n, getattr(gm, n)) for n in dir(gm) if n.startswith("_tensor_constant")]:
            if isinstance(value, torch.Tensor) and value.requires_grad:
                raise TraceRefused(f"the traced graph holds a trainable tensor it does not take as input ({name}); its gradient would be lost")
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return _Graph(run=gm, modules=tuple(self.vae.modules()), params=params, buffers=buffers, noise=specs, sites=recorder.sites, grad_mask=grad_mask, mode="traced", trace_seconds=time.perf_counter() - start, graph_module=gm)

    def _compile(self, graph: _Graph, x, kl_weight) -> None:
        """Compile the traced graph with TorchInductor, the backend of ``torch.compile``, called
        directly on the graph: no TorchDynamo (its per-call guard checks cost ~0.1 ms), as the
        signature already fixes what the graph is specialized on. Compiled and run without grad
        mode, so it is an inference graph (its backward is already in it)."""
        start = time.perf_counter()
        with preserved_rng(x.device), torch.no_grad():
            example = self._inputs(graph, x, kl_weight, [spec.draw() for spec in graph.noise])
            # on CPU, inductor's layout optimization (convolutions in channels_last) made the conv
            # VAE's step 1.2x slower than without it (oneDNN reorders); the MLP has no convolutions
            options = {"layout_optimization": False} if x.device.type == "cpu" else None
            compiled = torch._inductor.compile(graph.graph_module, example, options=options)
            compiled(*example)  # the first call loads the kernels
        graph.run, graph.mode = compiled, "inductor"
        graph.compile_seconds = time.perf_counter() - start

    def _notice(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"CompiledStep: {message}", FallbackWarning, stacklevel=4)
