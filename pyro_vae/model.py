"""The VAE as a Pyro model/guide pair.

Generative model (Kingma & Welling 2013, section 3)::

    z_i ~ N(0, I)                      latent site "z", event dim 1
    x_i ~ p(x | decoder(z_i))          observed site "x", the likelihood's distribution

Guide (the encoder, amortized over data)::

    z_i ~ N(loc(x_i), diag(scale(x_i)^2))

Datapoints live in the plate ``"data"`` at dim -1, so any ELBO with ``max_plate_nesting=1`` can
run them with vectorized particles at dim -2. The model is always the unweighted ``p(x, z)``: a KL
weight (beta-VAE, annealing) belongs to the training objective, :func:`pyro_vae.kl_weighted`.

Networks are registered with ``pyro.module`` under a name of this instance's own (``vae``,
``vae_1``, ... in order of construction), so several VAEs in one process each train with plain
``SVI`` and Pyro's global parameter store never hands one model another's tensors.
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import Iterable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn

from .errors import ConfigError, DataError
from .likelihoods import Likelihood, make_likelihood
from .names import ARCHITECTURES
from .networks import IMAGE_SHAPE, ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder

GENERATE_CHUNK_SIZE = 256  # draws of z that VAE.generate decodes at a time


def _count(name: str, value) -> int:
    """``value`` as an int if it is a whole number >= 1 (not a bool), else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.Tensor)) or (isinstance(value, torch.Tensor) and (value.numel() != 1 or value.is_floating_point() or value.dtype == torch.bool)):
        raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
    if int(value) < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, got {int(value)}")
    return int(value)


class VAE(nn.Module):
    """A variational autoencoder whose ``model`` and ``guide`` are Pyro programs.

    Args:
        x_dim: pixels per datapoint (the MLP takes ``(N, x_dim)``; the conv model needs 784 and
            takes ``(N, 1, 28, 28)``).
        z_dim: latent dimensions.
        likelihood: a name of :data:`~pyro_vae.names.LIKELIHOODS` (``"bernoulli"``,
            ``"continuous_bernoulli"``, ``"normal"``, ``"discretized_logistic"``, ...) or a
            :class:`~pyro_vae.likelihoods.Likelihood`.
        normal_scale: for ``"normal"``: a positive float (fixed), ``"shared"``, ``"pixel"`` or
            ``"decoder"``.
        mixture_components: for ``"discretized_logistic_mixture"``: logistics per pixel.
        architecture: ``"mlp"`` or ``"conv"``.
        hidden: hidden layer widths of the MLP encoder (the decoder mirrors them), or the one dense
            width of the conv networks.
        activation: ``"softplus"``, ``"relu"``, ``"tanh"`` or ``"elu"``.
        name: prefix of the networks' entries in Pyro's parameter store (default: ``vae`` for the
            first VAE of the process, then ``vae_1``, ``vae_2``, ...).
    """

    _instances = itertools.count()

    def __init__(
        self,
        x_dim: int = 784,
        z_dim: int = 20,
        likelihood: str | Likelihood = "bernoulli",
        normal_scale: str | float = "shared",
        mixture_components: int = 5,
        architecture: str = "mlp",
        hidden: Sequence[int] | int = (400,),
        activation: str = "softplus",
        name: str | None = None,
    ):
        super().__init__()
        x_dim, z_dim = _count("x_dim", x_dim), _count("z_dim", z_dim)
        if architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {architecture!r}; choose one of {ARCHITECTURES}")
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, (numbers.Integral, Iterable)):
            raise ConfigError(f"hidden must be a width or a sequence of widths (positive integers), got {hidden!r}")
        hidden = tuple(_count("a hidden layer width", h) for h in ((hidden,) if isinstance(hidden, numbers.Integral) else hidden))
        if isinstance(normal_scale, bool) or (isinstance(normal_scale, numbers.Real) and not (math.isfinite(normal_scale) and normal_scale > 0)):
            raise ConfigError(f"a fixed normal_scale must be a positive finite number, got {normal_scale!r}")
        if architecture == "conv" and x_dim != 784:
            raise ConfigError(f"the conv architecture is built for 1x28x28 images (x_dim=784), got x_dim={x_dim}")
        self.x_shape = IMAGE_SHAPE if architecture == "conv" else (x_dim,)
        self.likelihood = make_likelihood(likelihood, self.x_shape, normal_scale, mixture_components)
        if self.likelihood.x_shape != self.x_shape:
            raise ConfigError(f"the likelihood is built for x_shape {self.likelihood.x_shape}, the networks for {self.x_shape}")
        # the decoder emits num_params values per pixel (per channel for images)
        if architecture == "conv":
            width = hidden[0] if hidden else 256
            self.encoder = ConvEncoder(z_dim, width, activation)
            self.decoder = ConvDecoder(z_dim, self.likelihood.num_params * IMAGE_SHAPE[0], width, activation)
        else:
            self.encoder = MLPEncoder(x_dim, z_dim, hidden, activation)
            self.decoder = MLPDecoder(z_dim, self.likelihood.num_params * x_dim, hidden, activation)
        self.z_dim = z_dim
        number = next(self._instances)
        self.name = name if name is not None else ("vae" if number == 0 else f"vae_{number}")
        self.register_buffer("prior_loc", torch.zeros(z_dim))
        self.register_buffer("prior_scale", torch.ones(z_dim))

    def prior(self) -> dist.TorchDistribution:
        """``p(z) = N(0, I)``, built from buffers so it lives on the module's device."""
        return dist.Normal(self.prior_loc, self.prior_scale).to_event(1)

    def pyro_module(self, part: str, module: nn.Module) -> None:
        """``pyro.module`` under this VAE's name; refuse a store entry that belongs to another module."""
        name = f"{self.name}.{part}"
        pyro.module(name, module)
        param_name, param = next(module.named_parameters(), (None, None))
        if param is not None and pyro.get_param_store()._params.get(f"{name}$$${param_name}") is not param:
            raise ConfigError(
                f"Pyro's parameter store already holds {name!r} from another model, so SVI would train that "
                f"model instead of this one; give this VAE another name= or call pyro.clear_param_store()"
            )

    def check_data(self, x: torch.Tensor) -> None:
        """Raise :class:`DataError` naming the fix unless ``x`` is a batch this model can score.

        The value checks (finite, within the likelihood's support) read the data back from the
        device, so they run only while Pyro's validation is enabled (the default).
        """
        if not isinstance(x, torch.Tensor):
            raise DataError(f"x must be a torch.Tensor, got {type(x).__name__}")
        expected = "(N, " + ", ".join(map(str, self.x_shape)) + ")"
        if x.dim() != len(self.x_shape) + 1 or tuple(x.shape[1:]) != self.x_shape:
            raise DataError(f"x has shape {tuple(x.shape)}, but this model takes a batch of shape {expected}")
        if x.shape[0] == 0:
            raise DataError("x is an empty batch; pass at least one datapoint")
        if not x.dtype.is_floating_point:
            raise DataError(f"x has dtype {x.dtype}; convert it to floating point (uint8 images: x.float() / 255)")
        if x.dtype != self.prior_loc.dtype:
            raise DataError(f"x has dtype {x.dtype} but the model's parameters are {self.prior_loc.dtype}; use x.to({self.prior_loc.dtype})")
        if x.device != self.prior_loc.device:
            raise DataError(f"x is on {x.device} but the model is on {self.prior_loc.device}; move one of them (x.to(device) or vae.to(device))")
        if is_validation_enabled():
            if not torch.all(torch.isfinite(x)):
                raise DataError("x has NaN or infinite values")
            self.likelihood.check_support(x)

    def data_plate(self, batch: int, num_data: int | None, subsample_size: int | None) -> pyro.plate:
        """The ``"data"`` plate. ``num_data``: x is a minibatch of a dataset of that size (log-densities
        are scaled by ``num_data / batch``). ``subsample_size``: the plate draws its own subsample of x."""
        if num_data is None:
            return pyro.plate("data", batch, subsample_size=subsample_size, dim=-1, device=self.prior_loc.device)
        if subsample_size is not None:
            raise ConfigError("pass either num_data (x is already a minibatch) or subsample_size, not both")
        if num_data < batch:
            raise ConfigError(f"num_data={num_data} is smaller than the batch of {batch}")
        return pyro.plate("data", num_data, subsample=torch.arange(batch, device=self.prior_loc.device), dim=-1)

    def model(self, x: torch.Tensor | None = None, num_data: int | None = None, subsample_size: int | None = None, batch_size: int = 1):
        """``p(x, z) = p(z) p(x|z)`` for the batch ``x``, or ``batch_size`` fresh draws when ``x`` is None."""
        self.pyro_module("decoder", self.decoder)
        self.pyro_module("likelihood", self.likelihood)
        if x is not None:
            self.check_data(x)
        with self.data_plate(batch_size if x is None else x.shape[0], num_data, subsample_size) as idx:
            z = pyro.sample("z", self.prior())
            x_obs = x if x is None or subsample_size is None else x.index_select(0, idx)
            return pyro.sample("x", self.likelihood(self.decoder(z)), obs=x_obs)

    def guide(self, x: torch.Tensor, num_data: int | None = None, subsample_size: int | None = None, batch_size: int = 1):
        """``q(z|x) = N(z; loc(x), diag(scale(x)^2))`` from the encoder."""
        self.pyro_module("encoder", self.encoder)
        self.check_data(x)  # SVI runs the guide first: refuse bad data before anything else
        with self.data_plate(x.shape[0], num_data, subsample_size) as idx:
            x_batch = x if subsample_size is None else x.index_select(0, idx)
            loc, scale = self.encoder(x_batch)
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of ``p(x|z)`` at the encoder's mean ``z = loc(x)``."""
        with pyro.validation_enabled(False):  # shape, dtype, device; any values in the pixel range are fine
            self.check_data(x)
        if not torch.isfinite(x).all():
            raise DataError("x has NaN or infinite values")
        loc, _ = self.encoder(x)
        return self.likelihood(self.decoder(loc)).mean

    @torch.no_grad()
    def generate(self, n: int, chunk_size: int = GENERATE_CHUNK_SIZE) -> torch.Tensor:
        """Mean of ``p(x|z)`` for ``n`` draws ``z ~ p(z)``, decoded ``chunk_size`` at a time."""
        z = self.prior().sample((_count("the number of samples n", n),))
        return torch.cat([self.likelihood(self.decoder(zc)).mean for zc in z.split(_count("chunk_size", chunk_size))])
