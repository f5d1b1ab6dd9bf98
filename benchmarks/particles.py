"""Vectorized particles against one particle and against a Python loop over particles.

    python benchmarks/particles.py --threads 1

Each candidate is a full training step of ``pyro-vae train`` (``Trainer.train_step``: the
``TraceMeanField_ELBO`` loss on the default 784-400-20 Bernoulli model, backward, Adam), with K
particles drawn at once (``vectorize_particles=True``, a plate at dim -2) or in a Python loop.
Prints per-step medians and ratios to K = 1, measured side by side.
"""

from __future__ import annotations

from timing import (
    batch_cycler,
    bench_trainer,
    benchmark_parser,
    describe_machine,
    interleaved,
    median_ms,
    median_ratio,
    start,
)

from pyro_vae import make_elbo


def step_fn(args, batch_size: int, particles: int, vectorize: bool):
    trainer = bench_trainer(args, batch_size, particles, max_train=8192)
    trainer.elbo = make_elbo("meanfield", particles, vectorize_particles=vectorize)
    next_batch = batch_cycler(trainer)
    return trainer.device, lambda: trainer.train_step(next_batch())


def main(argv=None):
    p = benchmark_parser(__doc__, rounds=9)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 256])
    p.add_argument("--particles", type=int, default=16)
    args = p.parse_args(argv)
    start(args)
    k = args.particles
    device = None
    rows = []
    for batch_size in args.batch_sizes:
        fns = {}
        for name, particles, vectorize in (("K=1", 1, True), (f"K={k} vectorized", k, True), (f"K={k} loop", k, False)):
            device, fns[name] = step_fn(args, batch_size, particles, vectorize)
        t = interleaved(fns, device, rounds=args.rounds, steps=5)
        rows.append((batch_size, t))
    print(f"training step with K particles, median of {args.rounds} interleaved rounds; {describe_machine(device)}")
    print(f"{'batch':>5} | {'K=1 ms':>8} {f'K={k} vec ms':>11} {f'K={k} loop ms':>12} | {'vec/K=1':>8} {'loop/K=1':>8} {'loop/vec':>8}")
    for batch_size, t in rows:
        names = list(t)
        print(f"{batch_size:5d} | {median_ms(t[names[0]]):8.2f} {median_ms(t[names[1]]):11.2f} {median_ms(t[names[2]]):12.2f} | "
              f"{median_ratio(t, names[1], names[0]):8.2f} {median_ratio(t, names[2], names[0]):8.2f} {median_ratio(t, names[2], names[1]):8.2f}")


if __name__ == "__main__":
    main()
