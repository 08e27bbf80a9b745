"""Throughput and memory of the streaming-sketch methods (weightpca.sketch).

Prints, for every method, the bytes of flattened samples consumed per second
while fitting, as a ratio to this machine's memory-copy bandwidth measured in
the same run (numpy copy of a large array), and the peak RSS of the `srht`
method at two sample lengths D (synthetic samples generated block by block,
never materialised), whose ratio shows that memory does not grow with D.

    python benchmarks/sketch_bench.py [--n 32] [--D 4000000] [--k 8] [--rss-D 10000000 100000000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def copy_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes per second read by a numpy copy of a large float32 array (best of `repeats`)."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def throughput(n: int, D: int, k: int, block: int) -> dict[str, float]:
    from weightpca.sketch import METHODS, NpySamples, SyntheticSamples, run_method

    synth = SyntheticSamples(n, D, rank=2 * k, noise=0.05, seed=0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = []
        for i in range(n):  # samples on disk (page cache), read through memmaps as in the workflow
            p = tmp / f"s{i:03d}.npy"
            np.save(p, synth.block(0, D)[i])
            paths.append(p)
        src = NpySamples(paths)
        src.block(0, D)  # warm the page cache
        for method in METHODS:
            rep = run_method(method, src, k, 4 * k, tmp / method, True, block, 0)
            out[method] = rep["throughput_bytes_per_s"]
    return out


RSS_CHILD = """
import json, sys, tempfile
from weightpca.sketch import SyntheticSamples, run_method
n, D, k = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
with tempfile.TemporaryDirectory() as tmp:
    rep = run_method("srht", SyntheticSamples(n, D, rank=4, seed=0), k, 4 * k, tmp, True, 1 << 16, 0)
print(json.dumps({"peak_rss_mb": rep["peak_rss_mb"], "wall_s": rep["wall_s"]}))
"""


def peak_rss(n: int, D: int, k: int) -> dict:
    done = subprocess.run([sys.executable, "-c", RSS_CHILD, str(n), str(D), str(k)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--D", type=int, default=4_000_000)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--block", type=int, default=1 << 16)
    ap.add_argument("--rss-D", type=int, nargs=2, default=[10_000_000, 100_000_000])
    ap.add_argument("--rss-n", type=int, default=8)
    args = ap.parse_args()

    bw = copy_bandwidth()
    print(f"memory copy bandwidth: {bw / 1e9:.2f} GB/s")
    for method, rate in throughput(args.n, args.D, args.k, args.block).items():
        print(f"{method:10s} {rate / 1e9:6.3f} GB/s  ratio to copy {rate / bw:.3f}  (n={args.n}, D={args.D})")
    small, large = (peak_rss(args.rss_n, D, 2) for D in args.rss_D)
    print(f"srht peak RSS: D={args.rss_D[0]:.0e}: {small['peak_rss_mb']:.0f} MB ({small['wall_s']:.0f} s), "
          f"D={args.rss_D[1]:.0e}: {large['peak_rss_mb']:.0f} MB ({large['wall_s']:.0f} s), "
          f"ratio {large['peak_rss_mb'] / small['peak_rss_mb']:.3f}")


if __name__ == "__main__":
    main()
