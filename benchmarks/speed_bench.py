"""Speed of a model shape, dense against every linear matrix factored, in every regime (weightpca.speed).

    python benchmarks/speed_bench.py MODEL_FOLDER --work DIR [--cut 0.2 | --removed 0.2] [--rank-multiple 64] \\
        [--dtype bfloat16] [--device auto] [--prefill 1x512 1x2048 8x2048] [--decode-batches 1 64] \\
        [--new-tokens 32] [--repeats 3] [--compile [--partial-products]] [--no-fuse] --json out.json [--markdown out.md]

Speed does not depend on the weights' values, only on the shapes: MODEL_FOLDER needs a Llama-style
``config.json`` and its tokenizer files, not its weights. Two models of that shape with random weights
are saved in ``--work`` in ``--dtype``: the dense one (``save_pretrained``) and a factored one
(``weightpca.compress.save_compressed``) in which every linear matrix of every layer keeps ``1 - cut``
of its parameters (rank ``(1 - cut) n m / (n + m)``, rounded to the nearest multiple of
``--rank-multiple``; ``--removed``: the cut that removes that fraction of the whole model, embeddings
counted). Each is then measured in a fresh process (``weightpca.speed.measure``): prefill at
each batch x context, greedy decode through a static KV cache at each batch size, both through the
model's cached forward with a layer's matrices of one input fused into one stacked GEMM (unless
``--no-fuse``) and on CUDA captured as CUDA graphs (the decode step compiled first with ``--compile``; with
``--partial-products`` too, each projection of the step one split kernel, weightpca.partial_products), each
figure with its bandwidth bound.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from compress_bench import parse_prefill, regime_table  # noqa: E402

from weightpca.adapters import LlamaAdapter  # noqa: E402
from weightpca.compress import (  # noqa: E402
    DTYPES,
    count_parameters,
    dense_bytes,
    dtype_name,
    factorize_model,
    save_compressed,
)
from weightpca.evaluate import resolve_device  # noqa: E402
from weightpca.plan import Factor  # noqa: E402
from weightpca.speed import measure_in_subprocess  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def cut_rank(n: int, m: int, cut: float, multiple: int) -> int:
    """The rank at which ``W [n, m]`` factored keeps ``1 - cut`` of its ``n m`` parameters, rounded."""
    r = (1 - cut) * n * m / (n + m)
    return int(min(min(n, m), max(multiple, multiple * round(r / multiple))))


def whole_model_cut(target: LlamaAdapter, removed: float) -> float:
    """The cut of every linear matrix that removes ``removed`` of the whole model's parameters (embeddings
    and norms counted, so the cut is larger than ``removed``)."""
    linear = sum(target.weight_view(m).numel() for m in target.matrices())
    return removed * count_parameters(target.model) / linear


def random_models(
    folder: Path, work: Path, cut: float, multiple: int, dtype: torch.dtype, removed: float | None = None
) -> tuple[Path, Path, dict]:
    """The dense and factored models of ``folder``'s shape, random weights, saved under ``work``; every
    linear matrix cut by ``cut``, or (``removed``) by the cut that removes that fraction of the whole model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dense_dir, factored_dir = work / "dense", work / "factored"
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False).eval()
    target = LlamaAdapter(model)
    if removed is not None:
        cut = whole_model_cut(target, removed)
    rng = np.random.default_rng(0)
    factors, ranks = {}, {}
    for m in target.matrices():
        n_out, n_in = target.weight_view(m).shape
        r = cut_rank(n_out, n_in, cut, multiple)
        scale = 1 / np.sqrt(n_in)
        coef = (rng.standard_normal((n_out, r)) * scale).astype(np.float32)
        basis = (rng.standard_normal((r, n_in)) / np.sqrt(r)).astype(np.float32)
        factors[m.name] = Factor(m.name, coef, basis, None)
        ranks[m.name] = r
    if not (dense_dir / "config.json").is_file():
        model.to(dtype).save_pretrained(dense_dir)
        model.float()
    if not (factored_dir / "compress.json").is_file():
        factored, spec = factorize_model(target, factors)
        save_compressed(factored.to(dtype), spec, factored_dir, "hf", config.to_dict(), {"dtype": dtype_name(dtype)})
    for d in (dense_dir, factored_dir):
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copy(folder / name, d / name)
    info = dict(
        cut=cut,
        ranks=sorted(set(ranks.values())),
        bytes_dense=dense_bytes(model, dtype),
        bytes_factored=(factored_dir / "model.safetensors").stat().st_size,
    )
    return dense_dir, factored_dir, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--cut", type=float, default=0.2)
    ap.add_argument("--rank-multiple", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--prefill", nargs="+", default=["1x512", "1x2048", "8x2048"])
    ap.add_argument("--decode-batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step before its capture")
    ap.add_argument("--no-fuse", action="store_true", help="run q/k/v and gate/up (their bases) as separate GEMMs")
    ap.add_argument(
        "--partial-products",
        action="store_true",
        help="with --compile on CUDA: each projection of a decode step as one split kernel, not its GEMMs",
    )
    ap.add_argument(
        "--removed",
        type=float,
        default=None,
        help="instead of --cut: this fraction of the whole model's parameters removed, from its linear matrices",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args()
    started = time.perf_counter()
    device = resolve_device(args.device)
    dense_dir, factored_dir, info = random_models(
        args.folder, args.work, args.cut, args.rank_multiple, DTYPES[args.dtype], args.removed
    )
    speed = dict(
        dtype=args.dtype,
        prefill=parse_prefill(args.prefill),
        decode_batches=args.decode_batches,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        compile=args.compile,
        fuse=not args.no_fuse,
        partial_products=args.partial_products,
    )
    command = " ".join(["python", "benchmarks/speed_bench.py", *sys.argv[1:]])

    def record(dense: dict, factored: dict | None) -> None:
        payload = dict(command=command, rank_multiple=args.rank_multiple, **info, dense=dense, factored=factored)
        args.json.write_text(json.dumps(dict(payload, wall_s=time.perf_counter() - started), indent=1))

    dense = measure_in_subprocess("hf", dense_dir, device=device, threads=args.threads, **speed)
    record(dense, None)  # the dense half kept if the factored measurement does not finish
    print(f"dense measured ({time.perf_counter() - started:.0f} s)", flush=True)
    factored = measure_in_subprocess("compressed", factored_dir, device=device, threads=args.threads, **speed)
    record(dense, factored)
    table = regime_table(dense, factored)
    text = (
        f"Measured with `{command}` on {dense['device']} (torch {torch.__version__}), {args.dtype}, random "
        f"weights of {args.folder.name}'s shape; factored: every linear matrix at {1 - info['cut']:.1%} of its "
        f"parameters, ranks {info['ranks']} (multiple of {args.rank_multiple}); bytes {info['bytes_factored']:,} "
        f"vs {info['bytes_dense']:,} ({info['bytes_factored'] / info['bytes_dense']:.3f}x); copy bandwidth "
        f"{dense['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s; bounds: bytes read per forward / bandwidth.\n\n"
        f"{table}\n"
    )
    if args.markdown:
        args.markdown.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
