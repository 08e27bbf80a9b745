"""What a compressed model buys: parameters, bytes on disk, peak memory, prefill and decode speed.

Each model is measured in a fresh Python process holding only that model
(``python -m weightpca.speed``), so that peak memory is the model's own: on
CUDA the peak of ``torch.cuda.max_memory_allocated`` during prefill, on the
CPU the process's peak resident set during prefill (VmHWM, reset after
loading; it includes the Python and torch runtime, the same for both models
of a comparison). Speed:

- prefill: one forward pass of ``context`` tokens (batch 1), tokens / s,
  median of ``repeats`` after a warm-up;
- decode: greedy generation of ``new_tokens`` tokens after a 16-token prompt
  (batch 1; Hugging Face models with their KV cache, our GPT recomputes its
  window), new tokens / s, median of ``repeats``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

from . import adapters
from .resources import peak_rss_mb, reset_peak_rss, sync


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@torch.no_grad()
def measure(
    kind: str,
    path: str,
    config: str | None = None,
    device: str = "cpu",
    context: int = 512,
    new_tokens: int = 64,
    repeats: int = 3,
) -> dict:
    """Parameters, peak memory, prefill and decode tokens/s of one model (run in its own process)."""
    loaded = adapters.load(kind, path, config, device)
    model = loaded.model
    params = sum(p.numel() for p in model.parameters())
    context = min(context, loaded.max_len)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, model.config.vocab_size, (1, context))).to(device)
    loaded.logits(x)  # warm-up (allocations, kernel choice)
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        peak_includes_loading = False
    else:
        peak_includes_loading = not reset_peak_rss()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loaded.logits(x)
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else peak_rss_mb()
    prompt = x[0, :16].tolist()

    def decode() -> int:
        """New tokens generated greedily (our GPT recomputes its window; HF models use their KV cache)."""
        return len(loaded.greedy(prompt, new_tokens, stop_at_eos=False))

    decode()
    decode_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generated = decode()
        sync(device)
        decode_times.append(time.perf_counter() - t0)
    assert generated == new_tokens
    return dict(
        params=params,
        peak_memory_mb=peak,
        peak_includes_loading=peak_includes_loading,
        context=context,
        prefill_tokens_per_s=context / float(np.median(times)),
        decode_tokens_per_s=new_tokens / float(np.median(decode_times)),
        new_tokens=new_tokens,
        prefill_s=times,
        decode_s=decode_times,
        device=device_name(device),
        threads=torch.get_num_threads(),
    )


def speed_verdict(dense_s: list[float], factored_s: list[float]) -> str:
    """ "faster" / "slower" only when every repeat of one beats every repeat of the other."""
    if max(factored_s) < min(dense_s):
        return "faster"
    if min(factored_s) > max(dense_s):
        return "slower"
    return "not distinguishable"


def measure_in_subprocess(
    kind: str, path, config=None, device: str = "cpu", threads: int | None = None, **kwargs
) -> dict:
    """``measure`` in a fresh interpreter (its peak memory is this model's alone)."""
    args = dict(kind=kind, path=str(path), config=str(config) if config else None, device=device, **kwargs)
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), WEIGHTPCA_THREADS=str(threads))
    done = subprocess.run(
        [sys.executable, "-m", "weightpca.speed", json.dumps(args)], capture_output=True, text=True, env=env
    )
    if done.returncode:
        raise RuntimeError(f"measuring {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if os.environ.get("WEIGHTPCA_THREADS"):
        torch.set_num_threads(int(os.environ["WEIGHTPCA_THREADS"]))
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
