"""The likelihoods, priors and guides a VAE is built from, one registry entry each.

An entry (:class:`Option`) names one choice of ``p(x|z)``, ``p(z)`` or ``q(z|x)``, the class that
builds it (a dotted path, imported only when a model is built, so that this module, the
configuration and ``pyro-vae --help`` load no torch), a line of help, what its ``log p(x)`` is of
(likelihoods) and the settings it reads (:class:`Setting`). Every layer reads the entries:

* the command line: ``--likelihood``, ``--prior``, ``--guide`` offer the registered names, and each
  setting is a flag (``normal_scale``: ``--normal-scale``) whose help names its option;
* :class:`~pyro_vae.config.TrainConfig`: each setting is a field (right after the field that chooses
  its option), checked by the setting's ``check``, refused where its option is not chosen, and part
  of the run's identity only where it is;
* :class:`~pyro_vae.model.VAE` and :func:`~pyro_vae.model.build_vae`: each setting is a keyword,
  handed to the chosen class under its :attr:`Setting.keyword`.

So adding an option is its class and one :func:`register` call (the library's own are at the end
of this module). The classes follow one construction contract per kind, all keywords::

    likelihood   cls(x_shape=..., **settings)              a pyro_vae.likelihoods.Likelihood
    prior        cls(x_shape=..., z_dim=..., **settings)   an nn.Module; forward(encoder) -> p(z)
    guide        cls(z_dim=..., context_dim=..., **settings)
                 an nn.Module; forward(loc, scale, context) -> q(z|x), and a class attribute
                 needs_context (True: the encoder also returns a context, of context_dim values)

Settings become fields of ``TrainConfig`` when :mod:`pyro_vae.config` is imported, so an option
with settings is registered before that (an option without settings may come at any time).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
from typing import Any, Callable, Iterator, Mapping

from .checks import check_count
from .errors import ConfigError

KINDS = ("likelihood", "prior", "guide")  # the TrainConfig field and --flag that chooses each
DATA_KINDS = ("binary", "8bit", "density")  # what a likelihood's log p(x) is of: binarized, 8-bit, continuous pixels

NORMAL_SCALES = ("shared", "pixel", "decoder")  # or a positive float: a fixed scale
MAX_MIXTURE_COMPONENTS = 100  # logistics per pixel; PixelCNN++ uses 10, more is a typo rather than a model
MAX_PSEUDO_INPUTS = 100_000
MAX_FLOW_STEPS = 64


@dataclasses.dataclass(frozen=True)
class Setting:
    """A value an option reads: a keyword of ``VAE``, a field of ``TrainConfig`` and a flag.

    ``check(value)`` returns the value or raises :class:`ConfigError` naming the fix; ``parse(text)``
    turns the command line's text into a value (``ValueError`` if it cannot); ``keyword`` is the
    class's argument when it differs from ``name``; ``annotation`` the field's type.
    """

    name: str
    default: Any
    check: Callable[[Any], Any]
    help: str
    parse: Callable[[str], Any] = int
    keyword: str = ""
    annotation: str = "int"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def argument(self) -> str:
        return self.keyword or self.name


@dataclasses.dataclass(frozen=True)
class Option:
    """One likelihood, prior or guide: ``kind`` (one of :data:`KINDS`), ``name``, the class as
    ``"module:Class"``, a line of ``help``, its ``settings`` and, for a likelihood, its ``data_kind``."""

    kind: str
    name: str
    cls: str
    help: str
    settings: tuple[Setting, ...] = ()
    data_kind: str | None = None

    def load(self) -> type:
        """The class (its module imported now)."""
        module, _, attr = self.cls.partition(":")
        return getattr(importlib.import_module(module), attr)

    def build(self, values: Mapping[str, Any], **context: Any) -> Any:
        """The class called with ``context`` (``x_shape``, ``z_dim``, ...) and its settings, each
        taken from ``values`` (setting name -> value; the default where absent) and checked."""
        arguments = {s.argument: s.check(values.get(s.name, s.default)) for s in self.settings}
        return self.load()(**context, **arguments)


_REGISTRY: dict[str, dict[str, Option]] = {kind: {} for kind in KINDS}
_settings_are_fields = False  # set by pyro_vae.config once TrainConfig has made its fields


def register(option: Option) -> Option:
    """Add ``option``; :class:`ConfigError` for a name or setting already taken, an unknown kind or
    data kind, or a setting registered after ``TrainConfig`` made its fields."""
    if option.kind not in KINDS:
        raise ConfigError(f"an option's kind is one of {', '.join(KINDS)}, got {option.kind!r}")
    if option.name in _REGISTRY[option.kind]:
        raise ConfigError(f"the {option.kind} {option.name!r} is registered already; give the new one another name")
    if (option.data_kind is None) != (option.kind != "likelihood") or option.data_kind not in (None, *DATA_KINDS):
        raise ConfigError(f"a likelihood, and only a likelihood, has a data_kind ({', '.join(DATA_KINDS)})")
    taken = {s.name for _, s in settings()} | set(KINDS)
    for setting in option.settings:
        if setting.name in taken:
            raise ConfigError(f"the setting {setting.name!r} of {option.kind} {option.name!r} is taken; rename it")
        if _settings_are_fields:
            raise ConfigError(
                f"the setting {setting.name!r} of {option.kind} {option.name!r} comes after pyro_vae.config made "
                "TrainConfig's fields; register the option before importing pyro_vae.config"
            )
        setting.check(setting.default)
    _REGISTRY[option.kind][option.name] = option
    return option


def settings_are_fields() -> None:
    """Called by :mod:`pyro_vae.config` once the settings are ``TrainConfig`` fields: no new ones after."""
    global _settings_are_fields
    _settings_are_fields = True


def choices(kind: str) -> tuple[str, ...]:
    """The registered names of ``kind``, in order of registration."""
    return tuple(_REGISTRY[kind])


def option(kind: str, name: Any) -> Option:
    """The registered ``kind`` called ``name``; :class:`ConfigError` listing the valid names otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY[kind]:
        raise ConfigError(f"unknown {kind} {name!r}; choose one of {', '.join(_REGISTRY[kind])}")
    return _REGISTRY[kind][name]


def settings(kind: str | None = None) -> Iterator[tuple[Option, Setting]]:
    """Every setting (of ``kind``'s options only, if given) with the option that reads it."""
    for k in KINDS if kind is None else (kind,):
        for opt in _REGISTRY[k].values():
            for setting in opt.settings:
                yield opt, setting


def default(name: str) -> Any:
    """The default value of the setting called ``name``."""
    return next(s.default for _, s in settings() if s.name == name)


def data_kind(likelihood: str) -> str:
    """``"binary"``, ``"8bit"`` or ``"density"``: what the likelihood's ``log p(x)`` is of."""
    return option("likelihood", likelihood).data_kind


# ------------------------------------------------------------------ the settings' checks and parsers


def check_normal_scale(scale: Any) -> str | float:
    """One of :data:`NORMAL_SCALES`, or a positive finite number (a fixed scale)."""
    if isinstance(scale, str):
        if scale not in NORMAL_SCALES:
            raise ConfigError(
                f"unknown normal scale {scale!r}; use a positive number or one of {', '.join(NORMAL_SCALES)}"
            )
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"a fixed normal scale must be a positive finite number, got {scale!r}")
    return scale


def normal_scale_text(text: str) -> str | float:
    """A number as a float (a fixed scale), any other text as it is."""
    try:
        return float(text)
    except ValueError:
        return text


def _count(name: str, maximum: int) -> Callable[[Any], int]:
    return lambda value: check_count(name, value, maximum=maximum)


# ------------------------------------------------------------------------- the library's own options

for _entry in (
    Option("likelihood", "bernoulli", "pyro_vae.likelihoods:BernoulliLikelihood", "binary pixels", data_kind="binary"),
    Option(
        "likelihood",
        "continuous_bernoulli",
        "pyro_vae.likelihoods:ContinuousBernoulliLikelihood",
        "a normalized density on [0, 1]",
        data_kind="density",
    ),
    Option(
        "likelihood",
        "normal",
        "pyro_vae.likelihoods:NormalLikelihood",
        "a Gaussian density per pixel",
        data_kind="density",
        settings=(
            Setting(
                "normal_scale",
                "shared",
                check_normal_scale,
                "shared, pixel, decoder or a fixed positive number",
                parse=normal_scale_text,
                keyword="scale",
                annotation="str | float",
            ),
        ),
    ),
    Option(
        "likelihood",
        "discretized_logistic",
        "pyro_vae.likelihoods:DiscretizedLogisticLikelihood",
        "a logistic binned onto the 256 levels",
        data_kind="8bit",
    ),
    Option(
        "likelihood",
        "discretized_normal",
        "pyro_vae.likelihoods:DiscretizedNormalLikelihood",
        "a normal binned onto the 256 levels",
        data_kind="8bit",
    ),
    Option(
        "likelihood",
        "discretized_logistic_mixture",
        "pyro_vae.likelihoods:DiscretizedLogisticMixtureLikelihood",
        "a mixture of binned logistics (PixelCNN++)",
        data_kind="8bit",
        settings=(
            Setting(
                "mixture_components",
                5,
                _count("mixture_components", MAX_MIXTURE_COMPONENTS),
                f"logistics per pixel, 1 to {MAX_MIXTURE_COMPONENTS}",
                keyword="components",
            ),
        ),
    ),
    Option("prior", "standard", "pyro_vae.priors:StandardPrior", "N(0, I)"),
    Option(
        "prior",
        "vamp",
        "pyro_vae.priors:VampPrior",
        "a mixture of the encoder's Gaussians at learned pseudo-inputs",
        settings=(
            Setting(
                "pseudo_inputs",
                500,
                _count("pseudo_inputs", MAX_PSEUDO_INPUTS),
                "the number K of pseudo-inputs",
            ),
        ),
    ),
    Option("guide", "gaussian", "pyro_vae.guides:GaussianGuide", "a diagonal Gaussian"),
    Option(
        "guide",
        "iaf",
        "pyro_vae.guides:IAFGuide",
        "a Gaussian followed by an inverse autoregressive flow",
        settings=(
            Setting(
                "flow_steps",
                2,
                _count("flow_steps", MAX_FLOW_STEPS),
                f"the number of flow steps, 1 to {MAX_FLOW_STEPS}",
            ),
        ),
    ),
):
    register(_entry)
