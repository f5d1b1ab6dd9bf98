"""One training step of pyro-vae against a hand-written PyTorch loop on the same networks and data.

    python benchmarks/step_time.py --threads 1

Three candidates, each doing forward, backward and an Adam step on the default model (784-400-20,
Bernoulli, dynamically binarized Fashion-MNIST batches):

* ``torch``: ``-reference_elbo(vae, x, K).sum()`` (analytic KL + (1/K) sum_k log p(x|z_k)) and
  ``torch.optim.Adam``: the hand-written baseline.
* ``pyro-vae``: ``Trainer.train_step``, what ``pyro-vae train`` runs: ``TraceMeanField_ELBO``'s
  ``differentiable_loss`` on the Pyro model/guide, Adam, and a finite-loss check.
* ``pyro SVI``: ``pyro.infer.SVI.step`` with ``TraceMeanField_ELBO`` and ``pyro.optim.Adam``, for
  reference (what Pyro's own example does).

Prints per-step medians and the ratios to the baseline, measured side by side.
"""

from __future__ import annotations

import copy

import pyro
import torch
from pyro.infer import SVI

from pyro_vae import make_elbo, reference_elbo
from timing import batch_cycler, bench_trainer, benchmark_parser, describe_machine, interleaved, median_ms, median_ratio, start


def candidates(args, batch_size: int, particles: int):
    trainer = bench_trainer(args, batch_size, particles, max_train=4096)
    config = trainer.config
    next_batch = batch_cycler(trainer)
    torch_vae = copy.deepcopy(trainer.vae)
    torch_opt = torch.optim.Adam(torch_vae.parameters(), lr=config.lr)

    def torch_step():
        torch_opt.zero_grad(set_to_none=True)
        loss = -reference_elbo(torch_vae, next_batch(), particles).sum()
        loss.backward()
        torch_opt.step()

    svi_vae = copy.deepcopy(trainer.vae)
    pyro.clear_param_store()
    svi = SVI(svi_vae.model, svi_vae.guide, pyro.optim.Adam({"lr": config.lr}), make_elbo("meanfield", particles))

    def svi_step():
        with pyro.validation_enabled(False):
            svi.step(next_batch())

    return trainer.device, {"torch": torch_step, "pyro-vae": lambda: trainer.train_step(next_batch()), "pyro SVI": svi_step}


def main(argv=None):
    p = benchmark_parser(__doc__, rounds=15)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--particles", type=int, nargs="+", default=[1, 16])
    args = p.parse_args(argv)
    start(args)
    header = f"{'batch':>5} {'K':>3} | {'torch ms':>9} {'pyro-vae ms':>11} {'SVI ms':>8} | {'pyro-vae/torch':>14} {'SVI/torch':>9}"
    for i, (batch_size, particles) in enumerate((b, k) for b in args.batch_sizes for k in args.particles):
        device, fns = candidates(args, batch_size, particles)
        if i == 0:
            print(f"step time, median of {args.rounds} interleaved rounds; {describe_machine(device)}")
            print(header)
        t = interleaved(fns, device, rounds=args.rounds)
        print(f"{batch_size:5d} {particles:3d} | {median_ms(t['torch']):9.2f} {median_ms(t['pyro-vae']):11.2f} {median_ms(t['pyro SVI']):8.2f} | "
              f"{median_ratio(t, 'pyro-vae', 'torch'):14.3f} {median_ratio(t, 'pyro SVI', 'torch'):9.3f}", flush=True)


if __name__ == "__main__":
    main()
