"""Re-measure an exported compressed model against its dense original (what the compress stage records).

    python benchmarks/compress_bench.py results/compress/smollm2/whole20 [--device auto] [--dtype auto] \\
        [--prefill 1x512 1x2048 8x2048] [--decode-batches 1 64] [--new-tokens 32] [--repeats 3] \\
        [--threads 1] [--json out.json]

Reads the folder's compress.json for the dense source, then measures both models, each in a fresh
process holding only that model (``weightpca.speed.measure``), in every regime: prefill at each
batch x context, greedy decode through a static KV cache at each batch size (a CUDA graph per step on
CUDA), each figure with its bandwidth bound; on CUDA when ``--device auto`` finds a GPU, else on the
CPU; ``--dtype auto`` times the export's own dtype on CUDA and float32 on a CPU. Run it from the
repository root (the dense source paths in compress.json are relative to it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from weightpca.compress import DTYPES, compute_dtype, dtype_name  # noqa: E402
from weightpca.evaluate import resolve_device  # noqa: E402
from weightpca.speed import compare, measure_in_subprocess  # noqa: E402


def regime_table(dense: dict, factored: dict) -> str:
    """A markdown table: per regime, both figures with their bounds, the ratio and the verdict."""
    lines = [
        "| regime | dense tokens/s (bound) | factored tokens/s (bound) | factored / dense | verdict |",
        "|---|---|---|---|---|",
    ]
    for r in compare(dense, factored):
        lines.append(
            f"| {r['regime']} | {r['dense_tokens_per_s']:.4g} ({r['dense_bound']:.3g}) | "
            f"{r['factored_tokens_per_s']:.4g} ({r['factored_bound']:.3g}) | {r['speedup']:.2f}x | {r['verdict']} |"
        )
    return "\n".join(lines)


def parse_prefill(pairs: list[str]) -> list[list[int]]:
    return [[int(x) for x in p.lower().split("x")] for p in pairs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    ap.add_argument("--prefill", nargs="+", default=["1x512", "1x2048", "8x2048"])
    ap.add_argument("--decode-batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    record = json.loads((args.folder / "compress.json").read_text())
    device = resolve_device(args.device)
    stored = DTYPES[record.get("dtype", "float32")]
    dtype = dtype_name(compute_dtype(stored, device)) if args.dtype == "auto" else args.dtype
    speed = dict(
        dtype=dtype,
        prefill=parse_prefill(args.prefill),
        decode_batches=args.decode_batches,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
    )
    results = {
        "dense": measure_in_subprocess(device=device, threads=args.threads, **record["dense_source"], **speed),
        "factored": measure_in_subprocess("compressed", args.folder, device=device, threads=args.threads, **speed),
    }
    dense, fact = results["dense"], results["factored"]
    print(
        f"{args.folder} on {dense['device']} in {dtype}: weights {fact['weight_bytes'] / 2**20:.1f} vs "
        f"{dense['weight_bytes'] / 2**20:.1f} MiB, parameters {fact['params']:,} vs {dense['params']:,}, peak "
        f"memory {fact['peak_memory_mb']:.0f} vs {dense['peak_memory_mb']:.0f} MiB, copy bandwidth "
        f"{dense['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s"
    )
    print(regime_table(dense, fact))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
