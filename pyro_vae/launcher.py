"""What a launcher such as ``torchrun`` told this process, read from the environment alone (no
torch: the command line asks before it imports anything heavy)."""

from __future__ import annotations

import os


def launched() -> bool:
    """Whether this process is one rank of a job started by ``torchrun`` (or any ``env://`` launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_label() -> str:
    """``" (rank R of W)"`` in such a job, for error lines; empty otherwise."""
    return f" (rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']})" if launched() else ""
