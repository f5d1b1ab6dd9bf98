"""pyro-vae: variational autoencoders as real Pyro programs."""

from .errors import ConfigError, DataError
from .estimators import ESTIMATORS, DataPlateIWELBO, make_elbo
from .likelihoods import LIKELIHOODS, make_likelihood
from .model import VAE
from .reference import reference_elbo

__all__ = [
    "VAE",
    "make_elbo",
    "make_likelihood",
    "reference_elbo",
    "DataPlateIWELBO",
    "ESTIMATORS",
    "LIKELIHOODS",
    "DataError",
    "ConfigError",
]
__version__ = "0.1.0"
