"""Errors pyro-vae raises for bad input: each names the problem and the fix."""


class DataError(ValueError):
    """Data that the model or loader cannot use (wrong support, shape, dtype, corrupt file)."""


class ConfigError(ValueError):
    """A configuration that cannot work (impossible sizes, incompatible checkpoint)."""


class NumericalError(RuntimeError):
    """Training produced non-finite losses, gradients or evaluations and cannot go on."""


class DistributedError(RuntimeError):
    """The ranks of a distributed run lost each other, disagree, or another rank failed."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """``"Type: first line of the message"`` of ``error``, at most ``limit`` characters: how an error
    from another layer (torch, a peer rank, a tracer) is quoted inside one of ours."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:limit]
