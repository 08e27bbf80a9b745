"""Training throughput of the one training step (weightpca.train.training_step).

Builds the model of a config preset, feeds it random tokens from a memmap-like
array through the same BatchSampler, precision settings and (compiled or
eager) forward as the training loop, and prints tokens per second after
warm-up, for every requested path and embedding rank k:

    python benchmarks/train_bench.py --config config/gpt2.yaml --batch 12 --block 1024 \\
        --paths eager compiled --ks none 128 [--compile-modes default max-autotune] \
        [--cuda-graph on off] [--flat-adamw on off] [--profile] [--grad-accum 1] [--steps 30] [--json out.json]

Tokens per second = batch · block · grad_accum · steps / wall time, timed
between two CUDA synchronisations; compilation and allocator warm-up happen
in the untimed warm-up steps. On a CPU the compiled path runs eager and
``--cuda-graph on`` and ``--flat-adamw on`` change nothing, as in the training loop (all are CUDA only).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from weightpca.evaluate import resolve_device  # noqa: E402
from weightpca.tokens import BatchSampler  # noqa: E402
from weightpca.train import (  # noqa: E402
    TrainSettings,
    build_model,
    make_optimizer,
    setup_precision,
    training_forward,
    training_step,
)

# kernel (CUDA) or op (CPU) names: cuBLAS/CUTLASS GEMMs and aten's matrix products; SDPA's kernels
MATMUL = ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "matmul", "aten::mm", "aten::addmm", "aten::bmm")
ATTENTION = ("flash", "fmha", "attention", "sdpa", "cudnn")


def kernel_kind(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ATTENTION):
        return "attention"
    if any(k in low for k in MATMUL):
        return "matmul"
    return "other"


def profile_step(step, steps: int, cuda: bool) -> dict:
    """Time per step by kind (matmul / attention / other) and the ten largest other kernels.

    CUDA: each kernel's device time. CPU: each aten op's self time (the
    profiler does not give bytes moved; a kernel's name says what it fuses).
    """
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        sync()
    kinds, others, calls = {"matmul": 0.0, "attention": 0.0, "other": 0.0}, [], 0
    for e in prof.key_averages():
        us = e.self_device_time_total if cuda else (e.self_cpu_time_total if e.key.startswith("aten::") else 0.0)
        if us <= 0:
            continue
        kind = kernel_kind(e.key)
        kinds[kind] += us / 1e3 / steps
        calls += e.count
        if kind == "other":
            others.append((us / 1e3 / steps, e.count // steps, e.key))
    others.sort(reverse=True)
    return {"ms_per_step": kinds, "top_other": others[:10], "kernels_per_step": calls / steps}


def measure(
    model_cfg: dict, train_cfg: dict, vocab_size: int, device: str, steps: int, warmup: int, profile: bool = False
) -> dict:
    run = {"name": "bench", "seed": 0, "model": model_cfg, "train": train_cfg}
    train_cfg = TrainSettings.from_dict(train_cfg)
    autocast = setup_precision(device, train_cfg)
    model = build_model(run, vocab_size).to(device)
    opt = make_optimizer(model, train_cfg)
    forward, _ = training_forward(model, opt, train_cfg, device)
    tokens = np.random.default_rng(0).integers(0, vocab_size, size=20_000_000, dtype=np.uint16)
    sampler = BatchSampler(tokens, train_cfg.batch_size, model_cfg["block_size"], 0, device)
    step = training_step(forward, model, opt, sampler, train_cfg, autocast, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step(train_cfg.lr)
    sync()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step(train_cfg.lr)
    sync()
    wall = time.perf_counter() - t0
    n_tokens = train_cfg.batch_size * model_cfg["block_size"] * train_cfg.grad_accum * steps
    result = {
        "tokens_per_s": n_tokens / wall,
        "step_ms": 1e3 * wall / steps,
        "warmup_s": warmup_s,
        "final_loss": float(loss),
        "params": model.num_params(),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
    }
    if profile:
        result["profile"] = profile_step(lambda: step(train_cfg.lr), 5, device.startswith("cuda"))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/gpt2.yaml", help="preset whose model and train sections to use")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=50257, help="tokenizer vocabulary (GPT-2: 50257)")
    parser.add_argument("--paths", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument(
        "--compile-modes", nargs="+", default=["default"], help="torch.compile modes to measure on the compiled path"
    )
    parser.add_argument(
        "--cuda-graph",
        nargs="+",
        default=["on"],
        choices=["on", "off"],
        help="record each optimizer step as one CUDA graph (train.cuda_graph)",
    )
    parser.add_argument(
        "--flat-adamw",
        nargs="+",
        default=["on"],
        choices=["on", "off"],
        help="flat fp32 masters, AdamW writes the bf16 weight copies (train.flat_adamw)",
    )
    parser.add_argument("--ks", nargs="+", default=["none"], help="embedding ranks; 'none' = full embedding")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print each step's time by kind (matmul / attention / other) and the largest "
        "other kernels (CUDA: kernel time; CPU: aten op self time)",
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    cfg = yaml.safe_load(Path(args.config).read_text())
    device = resolve_device(args.device)
    results = []
    paths = [("eager", None)] if "eager" in args.paths else []
    paths += [("compiled", mode) for mode in args.compile_modes] if "compiled" in args.paths else []
    for k, (path, mode), graph, flat in itertools.product(args.ks, paths, args.cuda_graph, args.flat_adamw):
        model_cfg = dict(cfg["model"], block_size=args.block, n_embd_wte=None if k == "none" else int(k))
        train_cfg = dict(
            cfg["train"],
            batch_size=args.batch,
            grad_accum=args.grad_accum,
            compile=path == "compiled",
            compile_mode=mode or "default",
            cuda_graph=graph == "on",
            flat_adamw=flat == "on",
        )
        r = measure(model_cfg, train_cfg, args.vocab, device, args.steps, args.warmup, args.profile)
        r.update(
            k=k,
            path=path,
            compile_mode=mode,
            cuda_graph=graph,
            flat_adamw=flat,
            batch=args.batch,
            block=args.block,
            grad_accum=args.grad_accum,
            torch=torch.__version__,
            device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        )
        results.append(r)
        label = (path if mode is None else f"{path}:{mode}") + f" graph {graph} flat {flat}"
        print(
            f"k={k:>5} {label:>36}: {r['tokens_per_s']:>10,.0f} tokens/s  "
            f"{r['step_ms']:7.1f} ms/step  (warm-up {r['warmup_s']:.0f} s, {r['params'] / 1e6:.1f}M params, "
            f"loss {r['final_loss']:.4f}, peak {r['peak_gpu_gib'] or 0:.1f} GiB, device {r['device']})",
            flush=True,
        )
        if "profile" in r:
            print(
                "    ms/step: "
                + ", ".join(f"{kind} {ms:.2f}" for kind, ms in r["profile"]["ms_per_step"].items())
                + f"; {r['profile']['kernels_per_step']:.0f} kernels"
            )
            for ms, calls, name in r["profile"]["top_other"]:
                print(f"      {ms:6.3f} ms  x{calls:<3} {name[:110]}")
        torch._dynamo.reset()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
