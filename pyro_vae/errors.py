"""Errors pyro-vae raises for bad input: each names the problem and the fix."""

import re

# Pyro's poutine.trace re-raises a ValueError or RuntimeError from inside a model as the same type
# with its "Trace Shapes" table appended to the message
PYRO_TRACE_DUMP = re.compile(r"\n\s*Trace Shapes:")


class OneLineMessage:
    """An error whose message stays the library's own: a Pyro trace re-raising it (``exc_type(message
    + table)``) cannot append its table of site shapes."""

    def __init__(self, message: object = "", *args):
        super().__init__(PYRO_TRACE_DUMP.split(str(message))[0], *args)


class DataError(OneLineMessage, ValueError):
    """Data that the model or loader cannot use (wrong support, shape, dtype, corrupt file)."""


class ConfigError(OneLineMessage, ValueError):
    """A configuration that cannot work (impossible sizes, incompatible checkpoint)."""


class NumericalError(OneLineMessage, RuntimeError):
    """Training produced non-finite losses, gradients or evaluations and cannot go on."""


class DistributedError(OneLineMessage, RuntimeError):
    """The ranks of a distributed run lost each other, disagree, or another rank failed."""


def first_line(error: BaseException, limit: int = 300, with_type: bool = True) -> str:
    """``"Type: first line of the message"`` of ``error`` (without ``Type: `` if not ``with_type``;
    the type alone for an empty message), at most ``limit`` characters: how an error from another
    layer (torch, a peer rank, a tracer, a file) is quoted inside one of ours."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return (f"{type(error).__name__}: {line}" if with_type or not line else line)[:limit]
