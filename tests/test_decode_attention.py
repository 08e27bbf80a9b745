"""weightpca.decode_attention: one new query per sequence over a static cache equals the cached forward's attention.

The kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, a subprocess: the variable is read
when Triton compiles) against the reference, which is ``attend`` under the mask of the positions
written; on CUDA against the reference and inside a compiled decode step of a Llama model.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

# query heads per key/value head 3 (padded to 16 rows) and 1; a head dim that is not a power of two
# (48: masked dims, and the rotation's halves meet mid-block); positions inside the first key block,
# at its last key, and in the second block (80 keys: two blocks of 64, the last partly past the cache)
CASE = """
import json, torch
from weightpca.decode_attention import decode_attention, reference_decode_attention

def case(heads, kv_heads, dim, position, seed):
    g = torch.Generator().manual_seed(seed)
    batch, capacity, dtype = 2, 80, torch.float16
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    # strided rows, as slices of a fused q/k/v output
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)
    if seed == 2:  # a key of its own layout (Qwen3's normalised keys), the value still a slice
        k = k.contiguous()
    angle = torch.randn(batch, dim // 2, generator=g).repeat(1, 2)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    sin = torch.cat([-sin[:, : dim // 2], sin[:, dim // 2 :]], dim=1)
    cache = torch.randn(2, batch, kv_heads, capacity, dim, generator=g).to(dtype)
    want_cache = cache.float()
    cache[:, :, :, position:] = float("nan")  # not written yet (the position: the kernel writes it)
    at = torch.tensor(position)
    got = decode_attention(q, k, v, cos, sin, cache[0], cache[1], at, dim**-0.5)
    f = [t.float() for t in (q, k, v, cos, sin)]
    want = reference_decode_attention(*f, want_cache[0], want_cache[1], at, dim**-0.5)
    written = (cache[:, :, :, : position + 1].float() - want_cache[:, :, :, : position + 1]).abs().max().item()
    return {"shape": list(got.shape), "dtype": str(got.dtype), "finite": bool(got.isfinite().all()),
            "err": (got.float() - want).abs().max().item(), "scale": want.abs().max().item(),
            "cache_err": written, "after_untouched": bool(cache[:, :, :, position + 1 :].isnan().all())}

print(json.dumps([case(*args) for args in
                  [(6, 2, 32, 5, 0), (6, 2, 48, 63, 1), (4, 4, 64, 70, 2), (6, 2, 32, 0, 3)]]))
"""


def test_kernel_in_the_cpu_interpreter_matches_attention_over_the_positions_written():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", CASE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["shape"] for r in results] == [[2, 192], [2, 288], [2, 256], [2, 192]]
    for r in results:
        assert r["dtype"] == "torch.float16" and r["finite"] and r["after_untouched"], r
        # float16 query, probabilities and output against float32 attention of the same inputs
        assert r["err"] <= 1e-2 * r["scale"], r
        assert r["cache_err"] <= 1e-2, r  # the rotated key (|k| ~ 1) and the value, stored in float16


def test_reference_stores_the_rotated_key_and_attends_to_every_written_position():
    """The reference against attention written out: rotate query and key, store the key and value at
    the position, softmax over keys 0..position."""
    from weightpca.decode_attention import reference_decode_attention

    g = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, dim, capacity, position = 2, 4, 2, 8, 12, 6
    q, k, v = (torch.randn(batch, h * dim, generator=g, dtype=torch.float64) for h in (heads, kv_heads, kv_heads))
    angle = torch.randn(batch, dim // 2, generator=g, dtype=torch.float64)
    cos, sin = angle.cos().repeat(1, 2), torch.cat([-angle.sin(), angle.sin()], dim=1)
    keys, values = (torch.randn(batch, kv_heads, capacity, dim, generator=g, dtype=torch.float64) for _ in range(2))
    before = keys.clone(), values.clone()
    got = reference_decode_attention(q, k, v, cos, sin, keys, values, torch.tensor(position), 0.3)

    def rotated(x, n_heads):  # Hugging Face's x cos + rotate_half(x) sin
        x = x.reshape(batch, n_heads, dim)
        half = torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], dim=-1)
        return x * cos[:, None] + half * angle.sin().repeat(1, 2)[:, None]

    want_keys, want_values = before[0].clone(), before[1].clone()
    want_keys[:, :, position] = rotated(k, kv_heads)
    want_values[:, :, position] = v.reshape(batch, kv_heads, dim)
    torch.testing.assert_close(keys, want_keys, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(values, want_values, rtol=0, atol=0)
    want = torch.empty(batch, heads, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            kk, vv = want_keys[b, h // 2, : position + 1], want_values[b, h // 2, : position + 1]
            want[b, h] = torch.softmax(0.3 * kk @ rotated(q, heads)[b, h], dim=0) @ vv
    torch.testing.assert_close(got, want.reshape(batch, -1), rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch", [1, 64])
def test_kernel_on_cuda_matches_the_reference(batch):
    from weightpca.decode_attention import decode_attention, reference_decode_attention

    g = torch.Generator().manual_seed(batch)
    heads, kv_heads, dim, capacity, position = 9, 3, 64, 48, 30
    q, k, v = torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=g).split(
        [heads * dim] + [kv_heads * dim] * 2, 1
    )
    angle = torch.randn(batch, dim // 2, generator=g)
    cos, sin = angle.cos().repeat(1, 2), torch.cat([-angle.sin(), angle.sin()], dim=1)
    cache = torch.randn(2, batch, kv_heads, capacity, dim, generator=g).to(torch.bfloat16)
    args = [t.to(torch.bfloat16).cuda() for t in (q, k, v, cos, sin)]
    at = torch.tensor(position).cuda()
    want_cache, got_cache = cache.cuda(), cache.cuda()
    want = reference_decode_attention(*args, want_cache[0], want_cache[1], at, dim**-0.5)
    got = decode_attention(*args, got_cache[0], got_cache[1], at, dim**-0.5)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_cache.float(), want_cache.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_cuda_decode_step_attends_in_one_kernel_and_keeps_the_logits(monkeypatch):
    """A compiled bfloat16 decode step (one new token after a prompt): the kernel runs, SDPA's does not,
    and the logits are those of the same step without the kernel within bfloat16's rounding."""
    from weightpca import decode_attention
    from weightpca.adapters import KVCache, LlamaAdapter

    from test_surgery import tiny_llama

    adapter = LlamaAdapter(tiny_llama(None)[0].eval())
    adapter.model.to("cuda", torch.bfloat16)
    ids = torch.from_numpy(np.random.default_rng(7).integers(0, 27, (2, 6))).cuda()

    def prefilled() -> KVCache:
        cache = KVCache.empty(adapter.kv_shape(), 2, torch.bfloat16, "cuda", 16)
        adapter.cached_logits(ids[:, :5], cache)
        return cache

    def step(cache: KVCache) -> torch.Tensor:
        return adapter.cached_logits(ids[:, 5:], cache)

    with torch.no_grad():
        compiled = torch.compile(step, dynamic=False)
        compiled(prefilled())
        cache = prefilled()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            got = compiled(cache)
            torch.cuda.synchronize()
        monkeypatch.setattr(decode_attention, "runs_on", lambda x: False)
        want = step(prefilled())
    names = [e.key for e in prof.key_averages()]
    assert any("_decode_attention_kernel" in n for n in names), names
    assert not any("fmha" in n or "Attention" in n for n in names), names
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
