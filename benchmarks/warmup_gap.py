"""What KL warm-up costs a VampPrior step: the ELBO gap the trainer logs beside each annealed step.

    python benchmarks/warmup_gap.py --threads 1

Without an analytic KL, ``Trainer.objective_gap`` estimates ``(1 - beta) KL`` from one draw of its
own (one encoder pass on the batch and one on the pseudo-inputs); before, it evaluated the loss
twice more, at beta and at 1. Times one training step, that gap, and the two loss evaluations it
replaced, interleaved, for the 784-300-300-40 elu model with 500 pseudo-inputs, batch 100; prints
medians and the ratio of a warm-up step's cost (step + gap) before and after.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import pyro
import torch

from pyro_vae import TrainConfig
from pyro_vae.kl_weight import elbo_loss
from pyro_vae.runtime import preserved_rng
from pyro_vae.train import Trainer


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds; the first 3 are warm-up")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = TrainConfig(prior="vamp", pseudo_inputs=500, hidden=(300, 300), z_dim=40, activation="elu",
                         batch_size=100, max_train=1000, max_test=100, kl_anneal_epochs=100, device="cpu")
    with tempfile.TemporaryDirectory() as folder, Trainer(config, f"{folder}/run", progress=False) as trainer:
        x = next(trainer.train_batches.epoch(0))[0]

        @torch.no_grad()
        def two_losses():  # the gap as it was: the loss at beta and at 1 on the step's draws
            for weight in (0.5, 1.0):
                with preserved_rng(trainer.device), pyro.validation_enabled(False):
                    elbo_loss(trainer.step.elbo, trainer.vae.model, trainer.vae.guide, x, weight)

        work = {"step": lambda: trainer.train_step(x, 0.5), "gap": lambda: trainer.objective_gap(x, 0.5),
                "two losses (before)": two_losses}
        times = {name: [] for name in work}
        for _ in range(args.rounds):
            for name, fn in work.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values[3:]) for name, values in times.items()}
    for name, value in median.items():
        print(f"{name:20s} {1000 * value:8.1f} ms")
    before, after = median["step"] + median["two losses (before)"], median["step"] + median["gap"]
    print(f"a warm-up step before / now: {before / after:.2f}x")


if __name__ == "__main__":
    main()
