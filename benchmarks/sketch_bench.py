"""Throughput and memory of the streaming-sketch methods (weightpca.sketch).

Prints, for every method, the bytes of flattened samples consumed per second
while fitting, as a ratio to this machine's memory-copy bandwidth measured in
the same run, and the peak RSS of the `srht` method at two sample lengths D
(synthetic samples generated block by block, never materialised), whose ratio
shows that memory does not grow with D.

On the CPU the samples are .npy files in the page cache, read block by block
as in the workflow, and the bandwidth is a numpy copy of a large array. With
``--device cuda`` the samples are one tensor in GPU memory (``TensorSamples``),
Y and W are kept there (``store="device"``), and the bandwidth is a
device-to-device copy; the RSS check is CPU-only.

    python benchmarks/sketch_bench.py [--n 32] [--D 4000000] [--k 4] [--device cpu|cuda]
"""

from __future__ import annotations

import os

# idle OpenMP threads sleep instead of spinning while the main thread reads a block (see weightpca.sketch);
# it must be set before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def copy_bandwidth(device: str, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second read by a copy of a large float32 array (numpy on CPU, torch on CUDA; best of `repeats`)."""
    if device == "cpu":
        src = np.ones(nbytes // 4, dtype=np.float32)
        dst = np.empty_like(src)
        copy, sync = (lambda: np.copyto(dst, src)), (lambda: None)
    else:
        src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        copy, sync = (lambda: dst.copy_(src)), torch.cuda.synchronize
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy warms up
        sync()
        t0 = time.perf_counter()
        copy()
        sync()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def throughput(n: int, D: int, k: int, block: int, device: str) -> dict[str, float]:
    from weightpca.sketch import METHODS, NpySamples, SyntheticSamples, TensorSamples, run_method

    synth = SyntheticSamples(n, D, rank=2 * k, noise=0.05, seed=0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if device == "cpu":
            paths = []
            for i in range(n):  # samples on disk (page cache), read block by block as in the workflow
                p = tmp / f"s{i:03d}.npy"
                np.save(p, synth.block(0, D)[i])
                paths.append(p)
            src, store = NpySamples(paths), "disk"
        else:
            src, store = TensorSamples(torch.from_numpy(synth.block(0, D)).to(device)), "device"
        # a first run warms the page cache, the BLAS threads and (on CUDA) the kernels; then best of 3
        with src:
            run_method(
                "srht",
                src,
                k,
                4 * k,
                tmp / "warmup" / "W.npy",
                tmp / "warmup" / "errors.json",
                True,
                block,
                0,
                device=device,
                store=store,
            )
            for method in METHODS:
                out[method] = max(
                    run_method(
                        method,
                        src,
                        k,
                        4 * k,
                        tmp / method / "W.npy",
                        tmp / method / "errors.json",
                        True,
                        block,
                        0,
                        device=device,
                        store=store,
                    )["throughput_bytes_per_s"]
                    for _ in range(3)
                )
    return out


def product_rate(n: int, D: int, k: int, block: int, device: str) -> float:
    """Bytes per second of the range finder's two products alone (Y_b = A_b Ω, T += Y_bᵀ A_b) on
    blocks already in memory: the compute ceiling of ``srht``/``gaussian``, with no reads or writes."""
    r = 4 * k
    x = torch.randn(n, block, device=device)
    omega, y = torch.randn(n, r, device=device), torch.empty(block, r, device=device)
    t = torch.zeros(r, n, dtype=torch.float64, device=device)
    steps = max(1, D // block)
    best = float("inf")
    for _ in range(4):  # the first round warms up
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            torch.mm(x.T, omega, out=y)
            t.add_((x @ y).T.double())
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return steps * x.numel() * 4 / best


RSS_CHILD = """
import json, sys, tempfile
from pathlib import Path
from weightpca.sketch import SyntheticSamples, run_method
n, D, k = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
with tempfile.TemporaryDirectory() as tmp:
    rep = run_method("srht", SyntheticSamples(n, D, rank=4, seed=0), k, 4 * k, Path(tmp) / "W.npy",
                     Path(tmp) / "errors.json", True, 1 << 16, 0)
print(json.dumps({"peak_rss_mb": rep["peak_rss_mb"], "wall_s": rep["wall_s"]}))
"""


def peak_rss(n: int, D: int, k: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, str(n), str(D), str(k)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--D", type=int, default=4_000_000)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--block", type=int, default=1 << 16)
    ap.add_argument("--rss-D", type=int, nargs=2, default=[10_000_000, 100_000_000])
    ap.add_argument("--rss-n", type=int, default=8)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:i] for samples held in GPU memory")
    args = ap.parse_args()

    bw = copy_bandwidth(args.device)
    print(f"{args.device} copy bandwidth: {bw / 1e9:.2f} GB/s")
    for method, rate in throughput(args.n, args.D, args.k, args.block, args.device).items():
        print(
            f"{method:10s} {rate / 1e9:7.3f} GB/s  ratio to copy {rate / bw:.3f}  "
            f"(n={args.n}, D={args.D}, k={args.k}, r={4 * args.k}, block={args.block}, {args.device})"
        )
    rate = product_rate(args.n, args.D, args.k, args.block, args.device)
    print(f"products only {rate / 1e9:7.3f} GB/s  ratio to copy {rate / bw:.3f}  (srht's compute ceiling)")
    if args.device != "cpu":
        return
    small, large = (peak_rss(args.rss_n, D, 2) for D in args.rss_D)
    print(
        f"srht peak RSS: D={args.rss_D[0]:.0e}: {small['peak_rss_mb']:.0f} MB ({small['wall_s']:.0f} s), "
        f"D={args.rss_D[1]:.0e}: {large['peak_rss_mb']:.0f} MB ({large['wall_s']:.0f} s), "
        f"ratio {large['peak_rss_mb'] / small['peak_rss_mb']:.3f}"
    )


if __name__ == "__main__":
    main()
