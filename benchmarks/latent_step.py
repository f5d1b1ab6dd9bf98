"""Training step time of the prior and guide choices against the default, side by side.

    python benchmarks/latent_step.py --threads 1

Each candidate is a full eager training step of ``pyro-vae train`` (``Trainer.train_step``:
``TraceMeanField_ELBO``, one particle, the 784-400-20 Bernoulli MLP, Adam) on Fashion-MNIST with
``--prior standard|vamp`` and ``--guide gaussian|iaf``. The VampPrior runs the encoder on its K
pseudo-inputs once per step and scores every z against K components; the IAF guide adds T MADE
networks and, with either, the KL term is a Monte Carlo estimate (no analytic KL). Prints
per-step medians and the median per-round ratio to the default, measured in interleaved rounds.
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

CANDIDATES = {
    "standard + gaussian": {},
    "vamp (K=500) + gaussian": {"prior": "vamp", "pseudo_inputs": 500},
    "standard + iaf (T=2)": {"guide": "iaf", "flow_steps": 2},
    "vamp (K=500) + iaf (T=2)": {"prior": "vamp", "pseudo_inputs": 500, "guide": "iaf", "flow_steps": 2},
}


def main(argv=None):
    p = benchmark_parser(__doc__, rounds=9)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args(argv)
    start(args)
    fns, device = {}, None
    for name, settings in CANDIDATES.items():
        trainer = bench_trainer(args, args.batch_size, 1, max_train=8 * args.batch_size, **settings)
        next_batch, device = batch_cycler(trainer), trainer.device
        fns[name] = lambda trainer=trainer, next_batch=next_batch: trainer.train_step(next_batch())
    t = interleaved(fns, device, rounds=args.rounds, steps=5)
    baseline = next(iter(CANDIDATES))
    rounds = f"median of {args.rounds} interleaved rounds"
    print(f"training step, batch {args.batch_size}, {rounds}; {describe_machine(device)}")
    print(f"| {'prior + guide':26s} | step ms | / default |")
    print(f"|:{'-' * 26}-|--------:|----------:|")
    for name in CANDIDATES:
        print(f"| {name:26s} | {median_ms(t[name]):7.2f} | {median_ratio(t, name, baseline):9.2f} |")


if __name__ == "__main__":
    main()
