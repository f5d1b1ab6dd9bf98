"""Side-by-side timing: candidates run in interleaved rounds, so drift on a shared machine hits all
of them alike; we report per-step medians and the median of the per-round ratios."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Callable

import torch

from pyro_vae import TrainConfig
from pyro_vae.train import Trainer


def benchmark_parser(description: str, rounds: int) -> argparse.ArgumentParser:
    """The options every speed benchmark takes: threads, rounds, device, data folder."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed: oversubscription swings timings)")
    p.add_argument("--rounds", type=int, default=rounds, help="interleaved timing rounds")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    return p


def start(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def bench_trainer(args: argparse.Namespace, batch_size: int, particles: int, max_train: int, **settings) -> Trainer:
    """A ``pyro-vae train`` Trainer on Fashion-MNIST in a throwaway run folder (``settings``: other
    :class:`~pyro_vae.TrainConfig` fields)."""
    config = TrainConfig(batch_size=batch_size, num_particles=particles, device=args.device, data_dir=args.data_dir, max_train=max_train, max_test=128, **settings)
    return Trainer(config, tempfile.mkdtemp(prefix="pyro-vae-bench-"), progress=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(candidates: dict[str, Callable[[], object]], device: torch.device, rounds: int = 15, steps: int = 10, warmup: int = 5) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one entry per round."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - start) / steps)
    return times


def batch_cycler(trainer) -> Callable[[], torch.Tensor]:
    """A function returning the trainer's first-epoch training batches in turn, forever."""
    batches = [x for x, _ in trainer.train_batches.epoch(0)]
    state = {"i": 0}

    def next_batch() -> torch.Tensor:
        state["i"] = (state["i"] + 1) % len(batches)
        return batches[state["i"]]

    return next_batch


def median_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of time(name) / time(baseline) within the same round."""
    return statistics.median(a / b for a, b in zip(times[name], times[baseline]))


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def describe_machine(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} torch thread(s)"
    import pyro

    return f"{name}; torch {torch.__version__}, pyro {pyro.__version__}"
