"""pyro-vae: variational autoencoders as real Pyro programs, with explicit observation models.

The model and guide are Pyro functions (``vae.model``, ``vae.guide``) that run under ``SVI``,
``Predictive`` and poutine handlers; the reconstruction losses people call "BCE" and "MSE" fall out
of the likelihood's ``log_prob``.

    import pyro
    from pyro_vae import VAE, make_elbo

    vae = VAE(x_dim=784, z_dim=20, likelihood="bernoulli")
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), make_elbo("meanfield"))
    loss = svi.step(x)  # x: a (N, 784) batch of binary pixels

Public API: :class:`VAE`; :func:`make_elbo` (trace, meanfield, iwae, renyi);
:func:`kl_weighted` (beta-VAE, KL annealing); :func:`log_marginal_likelihood` (importance-sampled
``log p(x)`` with PSIS k-hat) and :func:`evaluate_model`; :class:`TrainConfig`;
:func:`load_run` (:func:`pyro_vae.train.train` trains a run from Python). The command line is
``pyro-vae`` (``pyro-vae --help``). Documentation: the
``docs/`` folder of the repository (``mkdocs serve``), with the math behind each piece.
"""

import importlib

# name -> module; imported on first use, so that `pyro-vae --help` does not wait for torch
_EXPORTS = {
    "VAE": "model",
    "make_elbo": "estimators",
    "kl_weighted": "kl_weight",
    "log_marginal_likelihood": "evaluate",
    "LogLikelihood": "evaluate",
    "evaluate_model": "evaluate",
    "ImportanceSamplingWarning": "evaluate",
    "TrainConfig": "config",
    "load_run": "run",
    "ESTIMATORS": "names",
    "LIKELIHOODS": "names",
    "DataError": "errors",
    "ConfigError": "errors",
    "NumericalError": "errors",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pyro_vae' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return sorted(list(globals()) + __all__)
