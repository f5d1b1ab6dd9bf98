"""Throughput of the importance-sampled test log-likelihood, against the machine's own matmul rate.

    python benchmarks/loglik_throughput.py --threads 2 --test-images 500

Runs ``pyro_vae.evaluate.log_marginal_likelihood`` with K = 5000 samples per image on Fashion-MNIST
test images for the default 784-400-20 Bernoulli model (trained weights are not needed for speed),
and reports images x samples per second. The work is dominated by the decoder, 2 (z h + h D) FLOPs
per image-sample for an MLP z -> h -> D; its achieved FLOP rate is compared with a large float32
matmul measured in the same run. ``--json PATH`` also writes the figures there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pyro_vae import VAE
from pyro_vae.data import DeviceBatches, load_dataset
from pyro_vae.evaluate import log_marginal_likelihood
from timing import describe_machine, sync


def matmul_flops(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--test-images", type=int, default=500, help="10000 for the whole test set")
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--chunk-size", type=int, default=500, help="particles per pass")
    p.add_argument("--batch-size", type=int, default=100, help="images per pass")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(0)
    vae = VAE().to(device).eval()
    data = load_dataset("fashion_mnist", args.data_dir)
    test = DeviceBatches(data.test_images[: args.test_images], data.test_labels[: args.test_images], args.batch_size, binarization="dynamic", shuffle=False, device=device)
    peak = matmul_flops(device)
    sync(device)
    start = time.perf_counter()
    for x, _ in test.eval_batches():
        log_marginal_likelihood(vae.model, vae.guide, x, num_samples=args.num_samples, chunk_size=args.chunk_size)
    sync(device)
    seconds = time.perf_counter() - start
    z, h, d = vae.z_dim, vae.decoder.net[0].out_features, 784
    pairs = args.test_images * args.num_samples
    achieved = pairs * 2 * (z * h + h * d) / seconds
    print(f"importance-sampled log p(x), K={args.num_samples}, {args.test_images} images; {describe_machine(device)}")
    print(f"{pairs / seconds:,.0f} image-samples/s ({seconds:.1f} s); decoder {achieved / 1e9:.1f} GFLOP/s against {peak / 1e9:.1f} GFLOP/s matmul: {achieved / peak:.2f} of the machine's rate")
    print(f"the whole test set (10000 images) would take {10000 * args.num_samples / (pairs / seconds):.0f} s at this rate")
    if args.json:
        figures = {
            "machine": describe_machine(device), "images": args.test_images, "num_samples": args.num_samples,
            "chunk_size": args.chunk_size, "batch_size": args.batch_size, "seconds": seconds,
            "image_samples_per_s": pairs / seconds, "decoder_flops_per_s": achieved, "matmul_flops_per_s": peak,
            "fraction_of_matmul": achieved / peak,
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
