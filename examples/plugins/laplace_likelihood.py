"""Add a likelihood to pyro-vae: its class and one registry entry give it the whole command line.

    python examples/plugins/laplace_likelihood.py train --likelihood laplace --laplace-scale 0.05 --epochs 1

(a plugin module rather than an example script: it registers when imported, before pyro_vae.config)

``x_d ~ Laplace(mu_d, b)`` per pixel, ``mu`` from the decoder and ``b`` a fixed scale, so
``log p(x|z) = sum_d -|x_d - mu_d| / b - log(2 b)``: the L1 reconstruction loss, weighted by ``1/b``.

The entry below makes ``--likelihood laplace`` and a ``--laplace-scale`` flag, a ``laplace_scale``
field of ``TrainConfig`` (checked, in ``config.json``, part of the run's identity only with this
likelihood, refused with another) and a keyword of ``VAE``. An option with settings is registered
before ``pyro_vae.config`` (or ``pyro_vae.cli``) is imported, as here; a built-in one is an entry
at the end of ``pyro_vae/options.py``.
"""

import math
import sys

import pyro.distributions as dist
import torch

from pyro_vae.errors import ConfigError, DataError
from pyro_vae.likelihoods import Likelihood
from pyro_vae.options import Option, Setting, register


def check_laplace_scale(b):
    """``b``, a positive finite number; :class:`ConfigError` otherwise."""
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not (math.isfinite(b) and b > 0):
        raise ConfigError(f"the Laplace scale must be a positive finite number, got {b!r}")
    return b


class LaplaceLikelihood(Likelihood):
    """``x_d ~ Laplace(mu_d, b)``: one decoder output per pixel, a fixed scale ``b``."""

    name = "laplace"

    def __init__(self, x_shape, scale=0.1):
        super().__init__(x_shape)
        self.register_buffer("scale", torch.tensor(float(check_laplace_scale(scale))))

    def pixel_distribution(self, loc):
        return dist.Laplace(loc, self.scale.expand_as(loc))

    def check_support(self, x):
        if not torch.all(torch.isfinite(x)):
            raise DataError("the laplace likelihood needs finite data, but x has NaN or infinite values.")


register(
    Option(
        "likelihood",
        "laplace",
        f"{__name__}:LaplaceLikelihood",
        "L1 reconstruction, a Laplace density per pixel",
        data_kind="density",
        settings=(
            Setting(
                "laplace_scale",
                0.1,
                check_laplace_scale,
                "the Laplace scale b, a positive number",
                parse=float,
                keyword="scale",
                annotation="float",
            ),
        ),
    )
)

if __name__ == "__main__":
    from pyro_vae.cli import main

    sys.exit(main())
