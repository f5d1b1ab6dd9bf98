"""The VAE as a Pyro model/guide pair.

Generative model (Kingma & Welling 2013, section 3)::

    z_i ~ p(z)                         latent site "z", event dim 1: N(0, I), or the VampPrior
    x_i ~ p(x | decoder(z_i))          observed site "x", the likelihood's distribution

Guide (the encoder, amortized over data)::

    z_i ~ q(z | encoder(x_i))          N(loc(x_i), diag(scale(x_i)^2)), or that followed by an IAF

The likelihood (:mod:`pyro_vae.likelihoods`), the prior (:mod:`pyro_vae.priors`) and the guide's
family (:mod:`pyro_vae.guides`) are chosen by their names in :mod:`pyro_vae.options`, which also
lists the settings each reads (``normal_scale``, ``pseudo_inputs``, ...). The encoder and decoder
may be the user's own modules (the contract is in :class:`VAE`), checked once at construction on a
dummy batch with a leading particle dimension.

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
from typing import Any, Iterable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn

from .checks import check_count
from .errors import ConfigError, DataError
from .guides import posterior_center
from .likelihoods import Likelihood
from .names import ARCHITECTURES
from .networks import IMAGE_SHAPE, ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder
from .options import KINDS, default, option
from .options import settings as options_settings

DUMMY_BATCH = (2, 3)  # particles x datapoints: the batch that checks the networks at construction

GENERATE_CHUNK_SIZE = 256  # draws of z that VAE.generate decodes at a time


def _count(name: str, value) -> int:
    """:func:`~pyro_vae.checks.check_count` (an integer >= 1), also for a one-element integer tensor."""
    if (
        isinstance(value, torch.Tensor)
        and value.numel() == 1
        and not value.is_floating_point()
        and value.dtype != torch.bool
    ):
        value = int(value)
    return check_count(name, value)


def data_shape(x_dim, x_shape, architecture: str, own_networks: bool) -> tuple[int, ...]:
    """The shape of one datapoint: ``x_shape``, else ``(x_dim,)`` (``(1, 28, 28)`` for the conv
    networks, which need ``x_dim=784`` then); :class:`ConfigError` for a shape the networks cannot take."""
    if x_shape is None:
        x_dim = _count("x_dim", 784 if x_dim is None else x_dim)
        if architecture == "conv" and not own_networks:
            if x_dim != 784:
                raise ConfigError(
                    "the conv architecture takes images: pass x_shape=(C, H, W), or x_dim=784 for 1x28x28, "
                    f"got x_dim={x_dim}"
                )
            return IMAGE_SHAPE
        return (x_dim,)
    if isinstance(x_shape, (str, bytes)) or not isinstance(x_shape, Iterable):
        raise ConfigError(f"x_shape must be a tuple of sizes such as (3, 32, 32), got {x_shape!r}")
    shape = tuple(_count("a size in x_shape", n) for n in x_shape)
    if not shape:
        raise ConfigError("x_shape is empty; pass the shape of one datapoint, such as (784,) or (3, 32, 32)")
    if x_dim is not None and _count("x_dim", x_dim) != math.prod(shape):
        size = math.prod(shape)
        raise ConfigError(f"x_dim={x_dim} does not match x_shape {shape} ({size} values); pass only one of them")
    if architecture == "mlp" and len(shape) != 1 and not own_networks:
        raise ConfigError(
            f"the mlp networks take flat vectors; for images of shape {shape} use architecture='conv' "
            f"or x_dim={math.prod(shape)} with flattened images"
        )
    return shape


def _shapes(value) -> str:
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_shapes(v) for v in value) + ")"
    return type(value).__name__


@torch.no_grad()
def _dummy_call(net: nn.Module, part: str, inputs: torch.Tensor):
    """``net(inputs)`` in eval mode (no batch statistics updated), its modes restored after."""
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        return net(inputs)
    except Exception as e:  # the user's network cannot take the contract's input at all
        reason = " ".join(str(e).split())[:200]
        raise ConfigError(f"the {part} fails on a batch of shape {tuple(inputs.shape)}: {reason}") from e
    finally:
        for module, mode in modes:
            module.train(mode)


def _dummy_input(net: nn.Module, shape: Sequence[int]) -> torch.Tensor:
    param = next(net.parameters(), None)
    like = param if param is not None else torch.empty(())
    return torch.full((*DUMMY_BATCH, *shape), 0.5, dtype=like.dtype, device=like.device)


def check_encoder(encoder: nn.Module, x_shape: Sequence[int], z_dim: int, needs_context: bool) -> int:
    """:class:`ConfigError` naming expected and actual shapes unless ``encoder`` maps a dummy batch
    ``(2, 3, *x_shape)`` to ``(loc, scale)`` of shape ``(2, 3, z_dim)`` with ``scale > 0`` [and a
    context ``(2, 3, context_dim)`` when ``needs_context``]; returns ``context_dim`` (0 without)."""
    x = _dummy_input(encoder, x_shape)
    out = _dummy_call(encoder, "encoder", x)
    z_shape = (*DUMMY_BATCH, z_dim)
    wanted = f"(loc, scale) of shape {z_shape} each"
    wanted += " and a context of shape (2, 3, context_dim)" if needs_context else ""
    ok = isinstance(out, (tuple, list)) and len(out) in ((3,) if needs_context else (2, 3))
    ok = ok and all(isinstance(t, torch.Tensor) for t in out) and all(tuple(t.shape) == z_shape for t in out[:2])
    ok = ok and (len(out) == 2 or (out[2].dim() == 3 and out[2].shape[:2] == DUMMY_BATCH and out[2].shape[2] >= 1))
    if not ok:
        raise ConfigError(f"the encoder must map x of shape {tuple(x.shape)} to {wanted}; it returned {_shapes(out)}")
    if not torch.all(out[1] > 0):
        raise ConfigError(
            "the encoder's scale (its second output) must be positive; end it with softplus, "
            "as pyro_vae.networks.positive_scale does"
        )
    return out[2].shape[-1] if len(out) == 3 else 0


def check_decoder(decoder: nn.Module, z_dim: int, out_shape: Sequence[int], likelihood: Likelihood) -> None:
    """:class:`ConfigError` naming expected and actual shapes unless ``decoder`` maps a dummy
    ``z`` of shape ``(2, 3, z_dim)`` to ``(2, 3, *out_shape)``."""
    z = _dummy_input(decoder, (z_dim,))
    out = _dummy_call(decoder, "decoder", z)
    expected = (*DUMMY_BATCH, *out_shape)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        per = f"{likelihood.num_params} value{'s' if likelihood.num_params > 1 else ''} per pixel for this likelihood"
        returned, z_shape = _shapes(out), tuple(z.shape)
        raise ConfigError(f"the decoder must map z of shape {z_shape} to {expected} ({per}); it returned {returned}")


def without_store_links(module: nn.Module, plain: dict[int, nn.Parameter]) -> nn.Module:
    """A shallow copy of ``module`` whose parameters (and its submodules', recursively) are new
    ``Parameter`` objects on the same data, without the ``unconstrained`` weakref that Pyro's
    parameter store sets on each; ``plain`` maps a parameter's id to its copy, so a shared one stays shared."""

    def unlinked(p: nn.Parameter) -> nn.Parameter:
        if id(p) not in plain:
            plain[id(p)] = nn.Parameter(p.data, p.requires_grad)
            plain[id(p)].__dict__.update({k: v for k, v in p.__dict__.items() if k != "unconstrained"})
        return plain[id(p)]

    clone = nn.Module.__new__(type(module))
    clone.__dict__.update(module.__dict__)
    clone._parameters = {k: None if p is None else unlinked(p) for k, p in module._parameters.items()}
    clone._modules = {k: None if m is None else without_store_links(m, plain) for k, m in module._modules.items()}
    return clone


class VAE(nn.Module):
    """A variational autoencoder whose ``model`` and ``guide`` are Pyro programs.

    Args:
        x_dim: values per datapoint for flat vectors ``(N, x_dim)`` (default 784; the conv networks
            read ``x_dim=784`` as ``1x28x28`` images).
        z_dim: latent dimensions.
        likelihood: a likelihood's name in :mod:`pyro_vae.options` (``"bernoulli"``,
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
        x_shape: the shape of one datapoint, ``(C, H, W)`` for the conv networks (any C; H and W
            as :func:`~pyro_vae.networks.conv_halvings` allows: 28x28, 32x32, 64x64, ...), or any
            shape your own networks take. The model takes batches ``(N, *x_shape)``.
        encoder: your own ``nn.Module`` instead of the built-in one: ``encoder(x)`` maps
            ``x (..., *x_shape)`` to ``(loc, scale)``, each ``(..., z_dim)``, ``scale > 0``, and for
            ``guide="iaf"`` to ``(loc, scale, context)`` with ``context (..., context_dim)``.
        decoder: your own ``nn.Module``: ``decoder(z)`` maps ``z (..., z_dim)`` to the
            likelihood's parameters, ``(..., num_params * x_shape[0], *x_shape[1:])`` (for
            ``"bernoulli"``, 1 logit per value: ``(..., *x_shape)``). "..." is any number of leading
            dimensions (datapoints, particles); both are checked once here on a batch ``(2, 3)``.
        prior: ``"standard"`` (``N(0, I)``) or ``"vamp"`` (:class:`~pyro_vae.priors.VampPrior`).
        pseudo_inputs: for ``"vamp"``: the number K of learned pseudo-inputs.
        guide: ``"gaussian"`` or ``"iaf"`` (:class:`~pyro_vae.guides.IAFGuide`).
        flow_steps: for ``"iaf"``: the number T of autoregressive steps.
        **settings: the settings of likelihoods, priors and guides registered in
            :mod:`pyro_vae.options` beyond those above; each is read by its own option only.
    """

    _instances = itertools.count()

    def __init__(
        self,
        x_dim: int | None = None,
        z_dim: int = 20,
        likelihood: str | Likelihood = "bernoulli",
        normal_scale: str | float = default("normal_scale"),
        mixture_components: int = default("mixture_components"),
        architecture: str = "mlp",
        hidden: Sequence[int] | int = (400,),
        activation: str = "softplus",
        name: str | None = None,
        *,
        x_shape: Sequence[int] | None = None,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        prior: str = "standard",
        pseudo_inputs: int = default("pseudo_inputs"),
        guide: str = "gaussian",
        flow_steps: int = default("flow_steps"),
        **settings: Any,
    ):
        super().__init__()
        z_dim = _count("z_dim", z_dim)
        if architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {architecture!r}; choose one of {ARCHITECTURES}")
        known = {s.name for _, s in options_settings()}
        if set(settings) - known:
            unknown = ", ".join(sorted(set(settings) - known))
            raise ConfigError(f"VAE has no setting {unknown}; the settings are {', '.join(sorted(known))}")
        settings |= dict(
            normal_scale=normal_scale,
            mixture_components=mixture_components,
            pseudo_inputs=pseudo_inputs,
            flow_steps=flow_steps,
        )
        prior_option, guide_option = option("prior", prior), option("guide", guide)
        likelihood_option = None if isinstance(likelihood, Likelihood) else option("likelihood", likelihood)
        for chosen in (prior_option, guide_option, likelihood_option):
            for setting in chosen.settings if chosen is not None else ():  # before any network is built
                setting.check(settings[setting.name])
        for part, net in (("encoder", encoder), ("decoder", decoder)):
            if net is not None and not isinstance(net, nn.Module):
                raise ConfigError(f"{part} must be a torch.nn.Module, got {type(net).__name__}")
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, (numbers.Integral, Iterable)):
            raise ConfigError(f"hidden must be a width or a sequence of widths (positive integers), got {hidden!r}")
        hidden = tuple(
            _count("a hidden layer width", h) for h in ((hidden,) if isinstance(hidden, numbers.Integral) else hidden)
        )
        own_networks = encoder is not None and decoder is not None
        self.x_shape = data_shape(x_dim, x_shape, architecture, own_networks)
        self.likelihood = (
            likelihood if likelihood_option is None else likelihood_option.build(settings, x_shape=self.x_shape)
        )
        if self.likelihood.x_shape != self.x_shape:
            raise ConfigError(
                f"the likelihood is built for x_shape {self.likelihood.x_shape}, the networks for {self.x_shape}"
            )
        # the decoder emits num_params values per pixel (per channel for images)
        out_shape = (self.likelihood.num_params * self.x_shape[0], *self.x_shape[1:])
        if architecture == "conv" and len(hidden) > 1:  # a run would record widths it never used
            raise ConfigError(
                f"the conv networks have one dense layer: give one hidden width (--hidden {hidden[0]}), "
                f"got {len(hidden)} ({' '.join(map(str, hidden))})"
            )
        width = hidden[0] if hidden else 256
        needs_context = guide_option.load().needs_context
        context_dim = z_dim if needs_context else 0  # the built-in encoder's context h(x)
        if encoder is not None:
            context_dim = check_encoder(encoder, self.x_shape, z_dim, needs_context)
        elif architecture == "conv":
            encoder = ConvEncoder(z_dim, width, activation, image_shape=self.x_shape, context_dim=context_dim)
        else:
            encoder = MLPEncoder(self.x_shape[0], z_dim, hidden, activation, context_dim=context_dim)
        if decoder is not None:
            check_decoder(decoder, z_dim, out_shape, self.likelihood)
        elif architecture == "conv":
            decoder = ConvDecoder(z_dim, out_shape[0], width, activation, image_size=self.x_shape[1:])
        else:
            decoder = MLPDecoder(z_dim, out_shape[0], hidden, activation)
        self.encoder, self.decoder = encoder, decoder
        self.guide_family = guide_option.build(settings, z_dim=z_dim, context_dim=context_dim or None)
        self.prior_family = prior_option.build(settings, x_shape=self.x_shape, z_dim=z_dim)
        self.prior_name, self.guide_name = prior, guide  # their names in pyro_vae.options
        self.z_dim = z_dim
        number = next(self._instances)
        self.name = name if name is not None else ("vae" if number == 0 else f"vae_{number}")
        self.register_buffer("prior_loc", torch.zeros(z_dim))
        self.register_buffer("prior_scale", torch.ones(z_dim))

    def prior(self) -> dist.TorchDistribution:
        """``p(z)``: ``N(0, I)``, or the VampPrior's mixture of the encoder's Gaussians at the
        pseudo-inputs, or the registered prior chosen (it lives on the module's device)."""
        return self.prior_family(self.encoder)

    def posterior(self, x: torch.Tensor) -> dist.TorchDistribution:
        """``q(z|x)`` for a batch ``x`` (no checks, no Pyro sites): batch shape ``x.shape[:-len(x_shape)]``."""
        return self.guide_family(*self.encoder(x))

    def __getstate__(self) -> dict:
        """The state ``pickle``, ``copy.deepcopy`` and ``torch.save(vae)`` save: the module's, with its
        parameters unlinked from Pyro's parameter store (which gives each one a weakref, unpicklable)."""
        return nn.Module.__getstate__(without_store_links(self, {}))

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        """``nn.Module``'s, after moving a checkpoint's ``vamp_prior.*`` entries (saved before the
        prior became ``prior_family``) to ``prior_family.*``, where the VampPrior is now."""
        old = prefix + "vamp_prior."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[prefix + "prior_family." + key[len(old) :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)

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
            raise DataError(
                f"x has dtype {x.dtype} but the model's parameters are {self.prior_loc.dtype}; use "
                f"x.to({self.prior_loc.dtype})"
            )
        if x.device != self.prior_loc.device:
            raise DataError(
                f"x is on {x.device} but the model is on {self.prior_loc.device}; move one of them (x.to(device) or "
                "vae.to(device))"
            )
        if is_validation_enabled():
            if not torch.all(torch.isfinite(x)):
                raise DataError("x has NaN or infinite values")
            self.likelihood.check_support(x)

    def data_plate(self, batch: int, num_data: int | None, subsample_size: int | None) -> pyro.plate:
        """The ``"data"`` plate. ``num_data``: x is a minibatch of a dataset of that size (log-densities
        are scaled by ``num_data / batch``). ``subsample_size``: the plate draws its own subsample of x."""
        if subsample_size is not None:
            check_count("subsample_size", subsample_size, 1, batch)
        if num_data is None:
            return pyro.plate("data", batch, subsample_size=subsample_size, dim=-1, device=self.prior_loc.device)
        if subsample_size is not None:
            raise ConfigError("pass either num_data (x is already a minibatch) or subsample_size, not both")
        if check_count("num_data", num_data) < batch:
            raise ConfigError(f"num_data={num_data} is smaller than the batch of {batch}")
        return pyro.plate("data", num_data, subsample=torch.arange(batch, device=self.prior_loc.device), dim=-1)

    def model(
        self,
        x: torch.Tensor | None = None,
        num_data: int | None = None,
        subsample_size: int | None = None,
        batch_size: int = 1,
    ):
        """``p(x, z) = p(z) p(x|z)`` for the batch ``x``, or ``batch_size`` fresh draws when ``x`` is None."""
        self.pyro_module("decoder", self.decoder)
        self.pyro_module("likelihood", self.likelihood)
        if next(self.prior_family.parameters(), None) is not None:  # a learned p(z), such as the VampPrior's,
            self.pyro_module("prior", self.prior_family)  # may read the encoder (at the pseudo-inputs)
            self.pyro_module("encoder", self.encoder)
        if x is not None:
            self.check_data(x)
        prior = self.prior()  # once per call, outside the plate: the data and particles broadcast it
        batch = check_count("batch_size", batch_size) if x is None else x.shape[0]
        with self.data_plate(batch, num_data, subsample_size) as idx:
            z = pyro.sample("z", prior)
            x_obs = x if x is None or subsample_size is None else x.index_select(0, idx)
            return pyro.sample("x", self.likelihood(self.decoder(z)), obs=x_obs)

    def guide(
        self, x: torch.Tensor, num_data: int | None = None, subsample_size: int | None = None, batch_size: int = 1
    ):
        """``q(z|x)`` from the encoder: ``N(z; loc(x), diag(scale(x)^2))``, then the flow for ``"iaf"``."""
        self.pyro_module("encoder", self.encoder)
        self.pyro_module("guide", self.guide_family)
        self.check_data(x)  # SVI runs the guide first: refuse bad data before anything else
        with self.data_plate(x.shape[0], num_data, subsample_size) as idx:
            x_batch = x if subsample_size is None else x.index_select(0, idx)
            return pyro.sample("z", self.posterior(x_batch))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of ``p(x|z)`` at the centre of ``q(z|x)``: ``z = loc(x)``, carried through the flow for ``"iaf"``."""
        with pyro.validation_enabled(False):  # shape, dtype, device; any values in the pixel range are fine
            self.check_data(x)
        if not torch.isfinite(x).all():
            raise DataError("x has NaN or infinite values")
        return self.likelihood(self.decoder(posterior_center(self.posterior(x)))).mean

    @torch.no_grad()
    def generate(self, n: int, chunk_size: int = GENERATE_CHUNK_SIZE) -> torch.Tensor:
        """Mean of ``p(x|z)`` for ``n`` draws ``z ~ p(z)``, decoded ``chunk_size`` at a time."""
        z = self.prior().sample((_count("the number of samples n", n),))
        return torch.cat([self.likelihood(self.decoder(zc)).mean for zc in z.split(_count("chunk_size", chunk_size))])


def build_vae(config) -> VAE:
    """The untrained VAE a :class:`~pyro_vae.config.TrainConfig` describes: images of its
    ``image_shape`` (1x28x28 for a run saved before it was recorded), flattened for the mlp, with the
    settings of every registered option (each option reads its own)."""
    image_shape = tuple(config.image_shape or IMAGE_SHAPE)
    return VAE(
        x_shape=image_shape if config.architecture == "conv" else (math.prod(image_shape),),
        z_dim=config.z_dim,
        architecture=config.architecture,
        hidden=config.hidden,
        activation=config.activation,
        **{kind: getattr(config, kind) for kind in KINDS},
        **{s.name: getattr(config, s.name) for _, s in options_settings()},
    )
