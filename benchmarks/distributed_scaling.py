"""Data-parallel scaling: training throughput with 1 process and with 2 processes under torchrun.

    python benchmarks/distributed_scaling.py                 # CPU here: 1 thread per process
    python benchmarks/distributed_scaling.py --device cuda --nproc 1 2 4 8 --no-threads-row   # a GPU node

Each configuration runs the training loop of ``pyro-vae train`` (global batches from
``DeviceBatches``, ``Trainer.train_step``) on the default model (784-400-20, Bernoulli, dynamic
binarization, ``TraceMeanField_ELBO``, global batch 128) and reports images per second of the
*global* batch. The configurations are launched in interleaved rounds (1 process, 2 processes,
1 process, ...), so drift on a shared machine hits all of them alike; each launch times
``--windows`` windows of ``--steps`` steps after a warm-up and reports their median; the table
gives the median over rounds and the median of the per-round ratios to 1 process.

torch threads are set explicitly in every process (``--threads``, default 1): with 2 cores, 2
processes of 1 thread each use the machine fully. The row "1 process x N threads" (N = the largest
process count times ``--threads``) is the other way to use the same cores, for comparison.
Launch times (imports, process-group setup) are not counted. The load average is printed before
and after: other work on the machine takes cores from the processes timed, and hurts the
multi-process configurations most (a step waits for the slowest rank).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def worker(args: argparse.Namespace) -> None:
    """One process of a configuration: time training steps, rank 0 prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from pyro_vae import TrainConfig, distributed
    from pyro_vae.train import Trainer

    config = TrainConfig(batch_size=args.batch_size, max_train=args.batch_size * (args.warmup + args.steps * args.windows), max_test=args.batch_size, device=args.device, data_dir=args.data_dir, step=args.step)
    with distributed.job() as parallel, Trainer(config, args.run_dir, progress=False, parallel=parallel) as trainer:
        _time_steps(trainer, args)


def _time_steps(trainer, args: argparse.Namespace) -> None:
    """Windows of ``args.steps`` steps, every rank starting and ending each window together."""
    import torch

    d = trainer.parallel if trainer.parallel.world_size > 1 else None
    sync = (lambda: torch.cuda.synchronize(trainer.device)) if trainer.device.type == "cuda" else (lambda: None)
    batches = trainer.train_batches.epoch(0)  # global batches, as every rank iterates them
    for _ in range(args.warmup):
        trainer.train_step(next(batches)[0])
    rates = []
    for _ in range(args.windows):
        sync()
        if d is not None:
            torch.distributed.barrier()  # every rank starts the window together
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step(next(batches)[0])
        sync()
        if d is not None:
            torch.distributed.barrier()  # ... and the window ends when the slowest rank is done
        rates.append(args.steps * args.batch_size / (time.perf_counter() - start))
    if d is None or d.is_main:
        print("RESULT " + json.dumps({"world_size": 1 if d is None else d.world_size, "threads": torch.get_num_threads(), "rates": rates, "device": str(trainer.device)}), flush=True)


def launch(nproc: int, threads: int, args: argparse.Namespace) -> dict:
    worker_args = ["--worker", "--threads", str(threads), "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--windows", str(args.windows), "--warmup", str(args.warmup), "--device", args.device, "--step", args.step]
    if args.data_dir:
        worker_args += ["--data-dir", args.data_dir]
    with tempfile.TemporaryDirectory(prefix="pyro-vae-scaling-") as tmp:
        worker_args += ["--run-dir", os.path.join(tmp, "run")]
        script = os.path.abspath(__file__)
        if nproc == 1:
            cmd = [sys.executable, script, *worker_args]  # plain single-process training, no torchrun
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *worker_args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    line = next(text for text in done.stdout.splitlines() if text.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to compare (default 1 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--no-threads-row", action="store_true", help="skip the 1-process, many-threads comparison")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--windows", type=int, default=3, help="timed windows per launch")
    p.add_argument("--steps", type=int, default=40, help="training steps per window")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128, help="the global batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--step", default="traced", choices=("traced", "inductor", "eager"), help="the training step's mode (default traced)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files (default: the usual places)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    import pyro
    import torch

    configs = [(n, args.threads) for n in args.nproc]
    many = max(args.nproc) * args.threads
    if not args.no_threads_row and (1, many) not in configs:
        configs.append((1, many))
    name = lambda n, t: f"{n} process{'es' if n > 1 else ''} x {t} thread{'s' if t > 1 else ''}"
    print(f"training throughput, global batch {args.batch_size}, default model; median of {args.rounds} interleaved rounds "
          f"({args.windows} windows of {args.steps} steps each); {os.cpu_count()} CPU cores, device {args.device}; torch {torch.__version__}, pyro {pyro.__version__}", flush=True)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    results: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    for r in range(args.rounds):
        order = configs if r % 2 == 0 else configs[::-1]
        for c in order:
            results[c].append(statistics.median(launch(*c, args)["rates"]))
        print(f"round {r + 1}: " + ", ".join(f"{name(*c)} {results[c][-1]:.0f}" for c in configs) + " images/s", flush=True)
    base = (1, args.threads)
    print(f"\n{'configuration':>26} | {'images/s':>9} | {'ratio to ' + name(*base):>28}")
    for c in configs:
        ratio = statistics.median(a / b for a, b in zip(results[c], results[base]))
        print(f"{name(*c):>26} | {statistics.median(results[c]):9.0f} | {ratio:28.2f}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
