"""Throughput of the importance-sampled test log-likelihood, against the machine's own matmul rate.

    python benchmarks/loglik_throughput.py --threads 1 --test-images 200

Runs ``pyro_vae.evaluate.log_marginal_likelihood`` with K = 5000 samples per image on Fashion-MNIST
test images for the default 784-400-20 Bernoulli model (trained weights are not needed for speed),
(``--prior vamp``: with the VampPrior, 500 pseudo-inputs, scored by its mixture density's matrix
products; ``--guide iaf``: with two IAF steps, the fast path carrying each block of draws through them) and reports images x samples per second: the fast path (chosen automatically for a VAE's own model
and guide) on every batch, the Pyro program (``fast_path=False``) on the first ``--pyro-batches``
batches. The work is dominated by the decoder, 2 (z h + h D) FLOPs per image-sample for an MLP
z -> h -> D; its achieved FLOP rate is compared with a float32 2048x2048 matmul timed three times before
each batch, so load that drifts on a shared machine hits both alike; on a CPU both are timed in CPU
seconds of this process, which other processes' time slices do not inflate. ``--json PATH`` also writes the figures there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from timing import describe_machine, sync

from pyro_vae import VAE
from pyro_vae.cli import positive_int, seed_int  # whole numbers from 1, from 0
from pyro_vae.data import DeviceBatches, load_dataset
from pyro_vae.evaluate import ImportanceSamplingWarning, log_marginal_likelihood


def timed(device: torch.device, fn) -> float:
    """Seconds ``fn`` takes: CPU time of this process on a CPU (what time-slicing on a shared machine
    does not inflate), wall-clock time on an accelerator."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    sync(device)
    start = clock()
    fn()
    sync(device)
    return clock() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--test-images", type=positive_int, default=500, help="10000 for the whole test set")
    p.add_argument("--num-samples", type=positive_int, default=5000)
    p.add_argument("--chunk-size", type=positive_int, default=500, help="particles per pass")
    p.add_argument("--batch-size", type=positive_int, default=100, help="images per pass")
    p.add_argument("--pyro-batches", type=seed_int, default=1, help="batches also run through the Pyro program (0: none)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--prior", choices=("standard", "vamp"), default="standard", help="vamp: 500 pseudo-inputs")
    p.add_argument("--guide", choices=("gaussian", "iaf"), default="gaussian", help="iaf: 2 flow steps")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", ImportanceSamplingWarning)  # untrained weights: speed only
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(0)
    vae = VAE(prior=args.prior, guide=args.guide).to(device).eval()
    data = load_dataset("fashion_mnist", args.data_dir)
    test = DeviceBatches(data.test_images[: args.test_images], data.test_labels[: args.test_images], args.batch_size, binarization="dynamic", shuffle=False, device=device)
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    x0 = next(iter(test.eval_batches()))[0]
    for fast in (True, False):  # untimed: the first call pays one-time imports and set-up (~2 s)
        log_marginal_likelihood(vae.model, vae.guide, x0, 50, fast_path=fast)
    matmul, seconds = [], {True: 0.0, False: 0.0}
    pairs = {True: 0, False: 0}
    for i, (x, _) in enumerate(test.eval_batches()):
        for fast in (True, False) if i < args.pyro_batches else (True,):
            matmul.extend(timed(device, lambda: a @ b) for _ in range(3))
            run = lambda: log_marginal_likelihood(vae.model, vae.guide, x, args.num_samples, args.chunk_size, fast_path=fast)
            seconds[fast] += timed(device, run)
            pairs[fast] += x.shape[0] * args.num_samples
    peak = 2 * n**3 / statistics.mean(matmul)
    flops = 2 * (vae.z_dim * vae.decoder.net[0].out_features + vae.decoder.net[0].out_features * 784)
    print(f"importance-sampled log p(x), {args.prior} prior, {args.guide} guide, K={args.num_samples}, chunks of {min(args.chunk_size, args.num_samples)}, batches of {args.batch_size}; "
          f"{describe_machine(device)}")
    print(f"float32 {n}x{n} matmul, mean of {len(matmul)} (three before each timed batch): {peak / 1e9:.1f} GFLOP/s")
    rates = {}
    for fast, name in ((True, "fast path"), (False, "Pyro program")):
        if pairs[fast]:
            rates[fast] = pairs[fast] / seconds[fast]
            print(f"{name}: {pairs[fast] // args.num_samples} images, {rates[fast]:,.0f} image-samples/s ({seconds[fast]:.1f} s); "
                  f"decoder {rates[fast] * flops / 1e9:.1f} GFLOP/s: {rates[fast] * flops / peak:.2f} of the matmul rate")
    if len(rates) == 2:
        print(f"fast path / Pyro program: {rates[True] / rates[False]:.2f}x")
    whole = 10000 * args.num_samples / rates[True]
    print(f"the whole test set (10000 images) would take {whole:.0f} s at the fast path's rate (one core)")
    if args.json:
        figures = {
            "machine": describe_machine(device), "images": pairs[True] // args.num_samples, "num_samples": args.num_samples,
            "chunk_size": args.chunk_size, "batch_size": args.batch_size, "seconds": seconds[True],
            "image_samples_per_s": rates[True], "decoder_flops_per_s": rates[True] * flops, "matmul_flops_per_s": peak,
            "fraction_of_matmul": rates[True] * flops / peak, "pyro_image_samples_per_s": rates.get(False),
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
