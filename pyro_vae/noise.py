"""Which sample sites draw noise that a handler can supply in the draw's place.

A reparameterized Normal site draws ``z = loc + eps * scale`` with ``eps = empty(shape).normal_()``
(``torch.distributions.Normal.rsample``). Two handlers supply ``eps`` themselves: the traced
training step (:class:`pyro_vae.compiled.SuppliedNoise`, ``eps`` becomes a graph input) and
distributed training (:class:`pyro_vae.distributed.GlobalBatchNoise`, ``eps`` is drawn for the
global batch and sliced). Both classify a site the same way, here.
"""

from __future__ import annotations

import torch
from pyro.poutine.subsample_messenger import _Subsample


class UnsuppliableNoise(Exception):
    """A random site whose draws a handler cannot supply; the message says which and why."""


def reparameterized_normal(msg: dict) -> torch.distributions.Normal | None:
    """The Normal whose ``loc + eps * scale`` gives this sample site's value, or ``None`` when the
    site draws nothing (observed, already valued, or a plate that does not subsample).

    Raises :class:`UnsuppliableNoise` for any other random site: a subsampling plate, a
    non-Normal distribution, or a Normal subclass with its own ``rsample``.
    """
    if msg["is_observed"] or msg["value"] is not None:
        return None
    fn, name = msg["fn"], msg["name"]
    if isinstance(fn, _Subsample):
        if fn.subsample_size is None or fn.subsample_size == fn.size:
            return None
        raise UnsuppliableNoise(f"plate {name!r} subsamples at random; pass the minibatch with num_data instead of subsample_size")
    base = fn
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    # a Normal whose rsample is torch's loc + eps * scale (pyro.distributions.Normal included)
    if not isinstance(base, torch.distributions.Normal) or type(base).rsample is not torch.distributions.Normal.rsample or msg["args"] or msg["kwargs"]:
        raise UnsuppliableNoise(f"sample site {name!r} ({type(fn).__name__}) draws noise that cannot be supplied; only reparameterized Normal sites can")
    return base
