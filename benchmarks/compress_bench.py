"""Re-measure an exported compressed model against its dense original (what the compress stage records).

    python benchmarks/compress_bench.py results/compress/smollm2/aa_tol10 \\
        [--device auto] [--context 512] [--new-tokens 64] [--repeats 3] [--threads 1] [--json out.json]

Reads the folder's compress.json for the dense source, then measures both
models, each in a fresh process holding only that model
(``weightpca.speed.measure``): parameters, peak memory while evaluating,
prefill tokens/s (batch 1) and greedy decode tokens/s (batch 1), on CUDA
when ``--device auto`` finds a GPU, else on the CPU. Run it from the
repository root (the dense source paths in compress.json are relative to it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from weightpca.evaluate import resolve_device  # noqa: E402
from weightpca.speed import measure_in_subprocess, speed_verdict  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    record = json.loads((args.folder / "compress.json").read_text())
    device = resolve_device(args.device)
    timing = dict(context=args.context, new_tokens=args.new_tokens, repeats=args.repeats)
    results = {
        "dense": measure_in_subprocess(device=device, threads=args.threads, **record["dense_source"], **timing),
        "factored": measure_in_subprocess("compressed", args.folder, device=device, threads=args.threads, **timing),
    }
    dense, fact = results["dense"], results["factored"]
    print(f"{args.folder} on {dense['device']}")
    print(f"{'':10} {'params':>12} {'peak MiB':>9} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, m in results.items():
        print(
            f"{name:10} {m['params']:>12,} {m['peak_memory_mb']:>9.0f} {m['prefill_tokens_per_s']:>14.0f} "
            f"{m['decode_tokens_per_s']:>13.1f}"
        )
    print(
        f"factored / dense: params {fact['params'] / dense['params']:.3f}, peak memory "
        f"{fact['peak_memory_mb'] / dense['peak_memory_mb']:.3f}, prefill "
        f"{fact['prefill_tokens_per_s'] / dense['prefill_tokens_per_s']:.2f}x "
        f"({speed_verdict(dense['prefill_s'], fact['prefill_s'])}), decode "
        f"{fact['decode_tokens_per_s'] / dense['decode_tokens_per_s']:.2f}x "
        f"({speed_verdict(dense['decode_s'], fact['decode_s'])})"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
