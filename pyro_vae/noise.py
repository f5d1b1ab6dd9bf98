"""The guide's noise, supplied by a handler: the one place where the draws of reparameterized
Normal sites are made, recorded or given.

A reparameterized Normal site draws ``z = loc + eps * scale`` with ``eps = empty(shape).normal_()``
(``torch.distributions.Normal.rsample``). :class:`SuppliedNoise` makes that draw itself, with the
same call, or takes ``eps`` from a list (the traced step's graph inputs). With ``rows``, the
process owns rows ``[start, stop)`` of a global batch of ``global_size`` datapoints: ``eps`` is
drawn for the whole global batch and this process keeps its rows, so its ``z`` are bitwise the
ones a single process makes for those rows and torch's RNG advances exactly as in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample


class UnsuppliableNoise(Exception):
    """A random site whose draws a handler cannot supply; the message says which and why."""


def reparameterized_normal(msg: dict) -> tuple[torch.distributions.Normal, list] | None:
    """The Normal and the transforms whose ``t_T(...t_1(loc + eps * scale))`` gives this sample
    site's value (no transforms for a plain Normal; a flow's for a ``TransformedDistribution`` of a
    Normal, such as the IAF guide), or ``None`` when the site draws nothing (observed, already
    valued, or a plate that does not subsample).

    Raises :class:`UnsuppliableNoise` for any other random site: a subsampling plate, a
    non-Normal distribution, or a Normal subclass with its own ``rsample``.
    """
    if msg["is_observed"] or msg["value"] is not None:
        return None
    fn, name = msg["fn"], msg["name"]
    if isinstance(fn, _Subsample):
        if fn.subsample_size is None or fn.subsample_size == fn.size:
            return None
        raise UnsuppliableNoise(
            f"plate {name!r} subsamples at random; pass the minibatch with num_data instead of subsample_size"
        )
    base, transforms = fn, []
    while isinstance(base, (torch.distributions.Independent, torch.distributions.TransformedDistribution)):
        if isinstance(base, torch.distributions.TransformedDistribution):
            if type(base).rsample is not torch.distributions.TransformedDistribution.rsample:
                break
            transforms = list(base.transforms) + transforms
        base = base.base_dist
    # a Normal whose rsample is torch's loc + eps * scale (pyro.distributions.Normal included)
    if (
        not isinstance(base, torch.distributions.Normal)
        or type(base).rsample is not torch.distributions.Normal.rsample
        or msg["args"]
        or msg["kwargs"]
    ):
        raise UnsuppliableNoise(
            f"sample site {name!r} ({type(fn).__name__}) draws noise that cannot be supplied; only reparameterized "
            "Normal sites (and flows of them) can"
        )
    return base, transforms


@dataclass(frozen=True)
class NoiseSpec:
    """The standard-normal draw of one site: ``torch.empty(shape).normal_()``, the rows
    ``[start, start + length)`` of dimension ``dim`` kept (all of them for a single process)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    dim: int = 0
    start: int = 0
    length: int | None = None

    def draw(self) -> torch.Tensor:
        # exactly torch.distributions.utils._standard_normal outside JIT tracing, so the draws and
        # the RNG state after them are bitwise those of eager Normal.rsample
        eps = torch.empty(self.shape, dtype=self.dtype, device=self.device).normal_()
        if self.length is None:
            return eps
        return eps.narrow(self.dim, self.start, self.length).contiguous()


class SuppliedNoise(Messenger):
    """Give each random reparameterized Normal site the value ``loc + eps * scale`` (pushed through
    its flow's transforms, if it has any).

    ``eps=None``: draw ``eps`` as eager ``rsample`` would (for the global batch with ``rows``),
    recording each draw's :class:`NoiseSpec` in ``specs``; otherwise take ``eps`` in turn from the
    list. ``rows=(start, stop, global_size)``: this process holds rows ``[start, stop)`` of the
    ``plate`` of a global batch. Installed around the whole ELBO call, it sees each site after every
    plate (data, vectorized particles) has broadcast it. It records every sample and param site in
    ``sites`` (for comparing two runs of a program). A random site it cannot supply is noted in
    ``problem`` and draws as usual when drawing, and raises :class:`UnsuppliableNoise` when ``eps`` are
    given or ``rows`` are sliced (its draws could not be matched). ``allowed_params``: ids of the
    only tensors param sites may return (others raise :class:`UnsuppliableNoise`).
    """

    def __init__(
        self,
        eps: list[torch.Tensor] | None = None,
        rows: tuple[int, int, int] | None = None,
        plate: str = "data",
        allowed_params: set[int] | None = None,
    ):
        super().__init__()
        self.eps, self.rows, self.plate, self.allowed_params = eps, rows, plate, allowed_params
        self.used = 0
        self.specs: list[NoiseSpec] = []
        self.sites: list[tuple] = []
        self.problem: str | None = None

    def _pyro_sample(self, msg) -> None:
        fn = msg["fn"]
        shape = tuple(fn.batch_shape) + tuple(fn.event_shape) if hasattr(fn, "batch_shape") else ()
        self.sites.append((msg["type"], msg["name"], type(fn).__name__, bool(msg["is_observed"]), shape))
        try:
            found = reparameterized_normal(msg)
        except UnsuppliableNoise as e:
            if self.eps is not None or self.rows is not None:
                raise
            self.problem = self.problem or str(e)
            return
        if found is None:
            return
        base, transforms = found
        if self.eps is None:
            spec = self._spec(msg, shape, base)
            self.specs.append(spec)
            eps = spec.draw()
        else:
            if self.used >= len(self.eps):
                raise UnsuppliableNoise(f"sample site {msg['name']!r} is a random site the recording run did not have")
            eps = self.eps[self.used]
            if tuple(eps.shape) != shape:
                raise UnsuppliableNoise(
                    f"sample site {msg['name']!r} has shape {shape} now, {tuple(eps.shape)} in the recording run"
                )
        self.used += 1
        value = base.loc + eps * base.scale
        for transform in transforms:  # as TransformedDistribution.rsample applies them
            value = transform(value)
        msg["value"] = value

    def _spec(self, msg, shape: tuple[int, ...], base) -> NoiseSpec:
        """The draw of this site: its own shape, or the global batch's in the plate's dimension."""
        if self.rows is None:
            return NoiseSpec(msg["name"], shape, base.loc.dtype, base.loc.device)
        start, stop, global_size = self.rows
        frame = next((f for f in msg["cond_indep_stack"] if f.name == self.plate), None)
        if frame is None:
            raise UnsuppliableNoise(
                f"sample site {msg['name']!r} is outside the {self.plate!r} plate, so it has no rows to share out"
            )
        dim = len(msg["fn"].batch_shape) + frame.dim
        if shape[dim] != stop - start:
            raise UnsuppliableNoise(
                f"sample site {msg['name']!r} has {shape[dim]} rows in plate {self.plate!r}, this process holds "
                f"{stop - start}"
            )
        full = shape[:dim] + (global_size,) + shape[dim + 1 :]
        return NoiseSpec(msg["name"], full, base.loc.dtype, base.loc.device, dim, start, stop - start)

    def _pyro_post_param(self, msg) -> None:
        self.sites.append(("param", msg["name"]))
        if self.allowed_params is not None and id(msg["value"]) not in self.allowed_params:
            raise UnsuppliableNoise(
                f"param site {msg['name']!r} is not a parameter of the VAE module; its gradient would be lost"
            )
