"""Errors pyro-vae raises for bad input: each names the problem and the fix."""


class DataError(ValueError):
    """Data that the model or loader cannot use (wrong support, shape, dtype, corrupt file)."""


class ConfigError(ValueError):
    """A configuration that cannot work (impossible sizes, incompatible checkpoint)."""


class NumericalError(RuntimeError):
    """Training produced non-finite losses, gradients or evaluations and cannot go on."""
