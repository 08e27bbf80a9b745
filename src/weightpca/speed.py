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
from pathlib import Path

import numpy as np
import torch


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _load(kind: str, path: str, config: str | None, device: str):
    if kind == "compressed":
        from .compress import load_compressed

        return load_compressed(path, device)
    if kind == "gpt":
        from .evaluate import load_model

        return load_model(path, config, device).eval()
    from .targets import load_hf_model

    model, _ = load_hf_model(path)
    return model.to(device).eval()


def _reset_peak_rss() -> None:
    """Start VmHWM afresh at the current resident set (Linux: clear_refs 5), so loading is not counted."""
    import gc

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # the peak then includes loading; the record says which (peak_includes_loading)


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def measure(kind: str, path: str, config: str | None = None, device: str = "cpu", context: int = 512,
            new_tokens: int = 64, repeats: int = 3) -> dict:
    """Parameters, peak memory, prefill and decode tokens/s of one model (run in its own process)."""
    model = _load(kind, path, config, device)
    params = sum(p.numel() for p in model.parameters())
    is_gpt = hasattr(model, "transformer")
    vocab = model.config.vocab_size
    limit = model.config.block_size if is_gpt else getattr(model.config, "max_position_embeddings", context)
    context = min(context, limit)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, vocab, (1, context))).to(device)

    def forward(ids):
        return model(ids)[0] if is_gpt else model(input_ids=ids, use_cache=False).logits

    forward(x)  # warm-up (allocations, kernel choice)
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else _peak_rss_mb()
    prompt = x[:, :16]

    def decode() -> int:
        """New tokens generated greedily (our GPT: the surgery target's loop, which has no KV cache)."""
        if is_gpt:
            from .targets import GPTTarget

            return len(GPTTarget(model, None).greedy(prompt[0].tolist(), new_tokens))
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        return out.shape[1] - prompt.shape[1]

    decode()
    decode_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generated = decode()
        _sync(device)
        decode_times.append(time.perf_counter() - t0)
    assert generated == new_tokens
    return dict(params=params, peak_memory_mb=peak, context=context,
                prefill_tokens_per_s=context / float(np.median(times)),
                decode_tokens_per_s=new_tokens / float(np.median(decode_times)), new_tokens=new_tokens,
                prefill_s=times, decode_s=decode_times, device=device_name(device),
                threads=torch.get_num_threads())


def speed_verdict(dense_s: list[float], factored_s: list[float]) -> str:
    """"faster" / "slower" only when every repeat of one beats every repeat of the other."""
    if max(factored_s) < min(dense_s):
        return "faster"
    if min(factored_s) > max(dense_s):
        return "slower"
    return "not distinguishable"


def measure_in_subprocess(kind: str, path, config=None, device: str = "cpu", threads: int | None = None,
                          **kwargs) -> dict:
    """``measure`` in a fresh interpreter (its peak memory is this model's alone)."""
    args = dict(kind=kind, path=str(path), config=str(config) if config else None, device=device, **kwargs)
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), WEIGHTPCA_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-m", "weightpca.speed", json.dumps(args)], capture_output=True,
                          text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"measuring {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if os.environ.get("WEIGHTPCA_THREADS"):
        torch.set_num_threads(int(os.environ["WEIGHTPCA_THREADS"]))
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
