"""One training step of pyro-vae against a hand-written PyTorch loop on the same networks and data.

    python benchmarks/step_time.py --threads 1 2
    python benchmarks/step_time.py --architecture conv --threads 1 --configs 128:1
    python benchmarks/step_time.py --device cuda --configs 128:1 128:16 1024:1 1024:16 --json step_time.json

Each candidate does forward, backward and an Adam step (``torch.optim.Adam``, lr 1e-3) on its own
copy of one initial model (default: 784-400-20 MLP, or the conv networks with ``--architecture
conv``; Bernoulli likelihood; dynamically binarized Fashion-MNIST batches):

* ``torch``: ``-reference_elbo(vae, x, K).sum()`` (analytic KL + (1/K) sum_k log p(x|z_k)) and
  ``backward()``: the hand-written baseline.
* ``torch + checks``: that step with the trainer's extras around it (gradient norm, finite check),
  to tell their cost from Pyro's.
* ``torch compiled``: the same loss function under ``torch.compile`` (inductor; its backward is
  compiled too).
* ``pyro-vae``: what the trainer's step does: ``elbo_loss(TraceMeanField_ELBO, vae.model,
  vae.guide, x)`` with Pyro's validation off, ``backward()``, the gradient norm
  (``clip_grad_norm_(params, inf)``), the finite check (one host sync) and Adam.
* ``pyro-vae compiled``: that step with ``TrainingStep(vae, "meanfield", K, mode="inductor")(x)``
  (the Pyro ELBO traced into a graph once, compiled by inductor) in place of loss and backward.
* ``pyro-vae traced``: the same traced graph, not compiled (``mode="traced"``).
* ``pyro SVI`` (``--svi``): ``pyro.infer.SVI.step`` with ``pyro.optim.Adam``, for reference.

All candidates of one configuration run in interleaved rounds in one process; the table gives
per-step medians and the medians of the per-round ratios to ``torch`` and to ``torch compiled``.
Compile times (the first call of each compiled candidate) are printed before each table.
``--json PATH`` also writes the tables there, rewritten after each configuration (a run stopped
part-way keeps the finished ones); ``--no-inductor`` leaves out the two inductor candidates, whose
first call takes a minute on a small CPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI
from timing import (
    benchmark_parser,
    describe_machine,
    interleaved,
    median_ms,
    median_ratio,
)

from pyro_vae.data import DeviceBatches, load_dataset
from pyro_vae.estimators import make_elbo
from pyro_vae.model import VAE
from pyro_vae.reference import reference_elbo
from pyro_vae.step import TrainingStep

LR = 1e-3


def batch_source(images, labels, batch_size: int, architecture: str, device: torch.device, max_train: int = 4096):
    """A function returning the first-epoch training batches in turn, forever."""
    batches = DeviceBatches(images[:max_train], labels[:max_train], batch_size, binarization="dynamic", flatten=architecture == "mlp", device=device)
    cached = [x for x, _ in batches.epoch(0)]
    cached = [x for x in cached if x.shape[0] == batch_size]  # one shape: no recompiles in the timing
    state = {"i": 0}

    def next_batch() -> torch.Tensor:
        state["i"] = (state["i"] + 1) % len(cached)
        return cached[state["i"]]

    return next_batch


def trainer_step(vae: VAE, loss_and_grads):
    """The trainer's step around ``loss_and_grads(x)`` (which leaves the gradients in ``.grad``)."""
    optimizer = torch.optim.Adam(vae.parameters(), lr=LR)
    params = list(vae.parameters())

    def step(x):
        optimizer.zero_grad(set_to_none=True)
        with pyro.validation_enabled(False):
            loss = loss_and_grads(x)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        if not torch.isfinite(loss + grad_norm):
            return None
        optimizer.step()
        return loss

    return step


def candidates(args, images, labels, batch_size: int, particles: int, device: torch.device):
    """name -> zero-argument step function, and the compile seconds of the compiled candidates
    (the inductor ones only without ``args.no_inductor``)."""
    next_batch = batch_source(images, labels, batch_size, args.architecture, device)
    kwargs = {"architecture": args.architecture, "hidden": args.hidden}
    pyro.clear_param_store()
    torch.manual_seed(0)
    init = VAE(**kwargs, name="init").to(device)

    def copy(name: str) -> VAE:
        vae = VAE(**kwargs, name=name).to(device)
        vae.load_state_dict(init.state_dict())
        return vae

    fns, compile_s = {}, {}

    def hand_written(vae, loss_fn):
        optimizer = torch.optim.Adam(vae.parameters(), lr=LR)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(next_batch())
            loss.backward()
            optimizer.step()

        return step

    torch_vae = copy("torch")
    fns["torch"] = hand_written(torch_vae, lambda x: -reference_elbo(torch_vae, x, particles).sum())
    checked_vae = copy("torch_checked")
    checked = trainer_step(checked_vae, lambda x: _backward(-reference_elbo(checked_vae, x, particles).sum()))
    fns["torch + checks"] = lambda: checked(next_batch())
    if not args.no_inductor:
        compiled_vae = copy("torch_compiled")
        compiled_loss = torch.compile(lambda x: -reference_elbo(compiled_vae, x, particles).sum())
        fns["torch compiled"] = hand_written(compiled_vae, compiled_loss)

    for label, mode in (("pyro-vae", "eager"), ("pyro-vae compiled", "inductor"), ("pyro-vae traced", "traced")):
        if mode == "inductor" and args.no_inductor:
            continue
        vae = copy(label.replace(" ", "_").replace("-", "_"))
        fns[label] = _on_batches(trainer_step(vae, TrainingStep(vae, "meanfield", particles, mode=mode)), next_batch)

    if args.svi:
        svi_vae = copy("svi")
        svi = SVI(svi_vae.model, svi_vae.guide, pyro.optim.Adam({"lr": LR}), make_elbo("meanfield", particles))

        def svi_step():
            with pyro.validation_enabled(False):
                svi.step(next_batch())

        fns["pyro SVI"] = svi_step

    for name in ("torch compiled", "pyro-vae compiled", "pyro-vae traced"):
        if name not in fns:
            continue
        start = time.perf_counter()
        fns[name]()  # the first call traces and compiles
        compile_s[name] = time.perf_counter() - start
    return fns, compile_s


def _on_batches(step, next_batch):
    return lambda: step(next_batch())


def _backward(loss):
    loss.backward()
    return loss.detach()


def main(argv=None):
    p = benchmark_parser(__doc__, rounds=15)
    threads = next(a for a in p._actions if a.dest == "threads")  # here --threads takes several counts
    threads.nargs, threads.default, threads.help = "+", [1], "torch CPU thread counts, one table each"
    p.add_argument("--configs", nargs="+", default=["128:1", "256:16"], help="batch:particles pairs")
    p.add_argument("--architecture", choices=("mlp", "conv"), default="mlp")
    p.add_argument("--hidden", type=int, default=None, help="hidden width (default: 400 for the MLP, 256 for conv)")
    p.add_argument("--steps", type=int, default=10, help="steps per candidate per round")
    p.add_argument("--svi", action="store_true", help="also time pyro.infer.SVI.step")
    p.add_argument("--no-inductor", action="store_true", help="leave out torch compiled and pyro-vae compiled")
    p.add_argument("--json", type=Path, default=None, help="also write the tables to this JSON file")
    args = p.parse_args(argv)
    args.hidden = args.hidden or (400 if args.architecture == "mlp" else 256)
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    data = load_dataset("fashion_mnist", args.data_dir)
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs]
    report = {"machine": describe_machine(device), "architecture": args.architecture, "hidden": args.hidden}
    report.update(rounds=args.rounds, steps=args.steps, tables=[])
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n{args.architecture} (hidden {args.hidden}), step time, median of {args.rounds} interleaved rounds x {args.steps} steps; {describe_machine(device)}")
        for batch_size, particles in configs:
            torch._dynamo.reset()
            fns, compile_s = candidates(args, data.train_images, data.train_labels, batch_size, particles, device)
            print(f"batch {batch_size}, K={particles}, {threads} thread(s): first call (trace + compile) " + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()), flush=True)
            t = interleaved(fns, device, rounds=args.rounds, steps=args.steps)
            baselines = [b for b in ("torch", "torch compiled") if b in fns]
            print(f"  {'candidate':<18} {'ms/step':>9}" + "".join(f" {'/ ' + b:>17}" for b in baselines))
            for name in fns:
                ratios = "".join(f" {median_ratio(t, name, b):17.3f}" for b in baselines)
                print(f"  {name:<18} {median_ms(t[name]):9.2f}{ratios}", flush=True)
            ms = {name: median_ms(t[name]) for name in fns}
            row = {"batch": batch_size, "particles": particles, "threads": threads, "compile_s": compile_s, "ms": ms}
            row["ratio_to"] = {b: {n: median_ratio(t, n, b) for n in fns} for b in baselines}
            report["tables"].append(row)
            if args.json:
                args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
