"""A decode step's attention in one kernel: one new query per sequence, rotated, over a static KV cache.

For a decode step (one new token per sequence) of a Llama-style layer with a static cache, the
token's rotated key and its value are stored in the layer's cache at ``position`` (as
``KVCache.update``), then for every sequence b and query head h, which reads key/value head
``g = h // n`` (``n = H / H_kv``)::

    q̃ = q cos + roll(q, D/2) sin±                  (the rotary embedding, as adapters.llama.rotate; k alike)
    s_j = scale · q̃ · k_j        for j = 0 .. position (the positions written so far)
    y = Σ_j softmax(s)_j v_j                         (out: [B, H·D], the o projection's input)

Why: the same step through ``adapters.base.attend`` (SDPA's memory-efficient kernel) launches 8
kernels per layer for attention on an H200 under ``torch.compile``: the key's rotation with its cache
write, the value's write, the query's rotation into SDPA's layout, a mask and key/value preparations,
the attention, the copy of its output back to ``[B, 1, H·D]``; in SmolLM2's shape 12.9 µs of kernels
per layer at batch 1, the attention kernel itself 5.5 (docs/speed.md). Here it is one kernel. One
program per (sequence, key/value head) stores that head's new key and value, then takes its n query
rows (padded to 16, ``tl.dot``'s least) and walks the keys in blocks of ``BLOCK_S`` with the online
softmax of FlashAttention (Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact
Attention with IO-Awareness", Alg. 1): every key and value of the sequence is read once, and the
probabilities are rounded to the cache's dtype before they meet the values, as there.

The loop runs over the whole cache, the blocks past ``position`` fully masked (their loads read
nothing), so the program count is fixed and a CUDA graph replays it at every position. Where Triton
cannot run (CPU tensors, no Triton) :func:`reference_decode_attention` computes the same with
``attend``; ``TRITON_INTERPRET=1`` runs the kernel on CPU tensors (tests/test_decode_attention.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .partial_products import dot_block, triton, triton_runs_on

if triton is not None:
    import triton.language as tl

BLOCK_S = 64  # keys per step of the walk over the cache
KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # the dtypes a decode step runs this kernel in


def runs_on(x: Tensor) -> bool:
    """Whether a decode step on ``x``'s device and dtype runs the kernel (CUDA, Triton, 16-bit floats)."""
    return x.is_cuda and triton_runs_on(x) and x.dtype in KERNEL_DTYPES


if triton is not None:

    @triton.jit
    def _rotated(x_at, cos, sin, dims, mask, D):
        """``x cos + roll(x, D/2) sin±`` of the rows at ``x_at`` (float32)."""
        x = tl.load(x_at + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        x_rolled = tl.load(x_at + ((dims + D // 2) % D)[None, :], mask=mask, other=0.0).to(tl.float32)
        return x * cos[None, :] + x_rolled * sin[None, :]

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, q_stride, k_ptr, k_stride, v_ptr, v_stride, cos_ptr, sin_ptr, cos_stride, sin_stride,
        keys_ptr, values_ptr, kv_stride_b, kv_stride_h, kv_stride_s, position_ptr, out_ptr, out_stride,
        scale, n, D,
        S: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        # S (the cache's capacity) is a compile-time constant: fixed for a decoder's life, and Triton
        # 3.6's interpreter cannot loop to a runtime bound
        b, g = tl.program_id(0), tl.program_id(1)
        rows, dims = tl.arange(0, BLOCK_Q), tl.arange(0, BLOCK_D)
        row_ok, dim_ok = rows < n, dims < D
        cos = tl.load(cos_ptr + b * cos_stride + dims, mask=dim_ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + b * sin_stride + dims, mask=dim_ok, other=0.0).to(tl.float32)
        position = tl.load(position_ptr)
        kv_at = b * kv_stride_b + g * kv_stride_h

        # the new key (rotated) and value into the cache at the position; the barrier makes them visible
        # to every thread of the program before the walk below reads them back
        one = tl.arange(0, 1)
        new_at = g * D + one[:, None] * 0
        key = _rotated(k_ptr + b * k_stride + new_at, cos, sin, dims, dim_ok[None, :], D)
        at_position = kv_at + position * kv_stride_s + dims[None, :] + one[:, None] * 0
        tl.store(keys_ptr + at_position, key.to(keys_ptr.dtype.element_ty), mask=dim_ok[None, :])
        value = tl.load(v_ptr + b * v_stride + new_at + dims[None, :], mask=dim_ok[None, :], other=0.0)
        tl.store(values_ptr + at_position, value.to(values_ptr.dtype.element_ty), mask=dim_ok[None, :])
        tl.debug_barrier()

        # the rotated queries of this key/value head, rounded to the cache's dtype as the rotary
        # embedding's output is
        q_mask = row_ok[:, None] & dim_ok[None, :]
        heads = g * n + rows
        q = _rotated(q_ptr + b * q_stride + heads[:, None] * D, cos, sin, dims, q_mask, D)
        q = q.to(keys_ptr.dtype.element_ty)
        best = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
        for start in range(0, S, BLOCK_S):
            keys = start + tl.arange(0, BLOCK_S)
            key_ok = keys <= position
            kv_mask = key_ok[:, None] & dim_ok[None, :]
            at = kv_at + keys[:, None] * kv_stride_s + dims[None, :]
            k = tl.load(keys_ptr + at, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(key_ok[None, :], s, float("-inf"))
            # best stays finite from the first block on: key 0 is always written
            new_best = tl.maximum(best, tl.max(s, axis=1))
            shrink = tl.exp(best - new_best)
            p = tl.exp(s - new_best[:, None])
            total = total * shrink + tl.sum(p, axis=1)
            v = tl.load(values_ptr + at, mask=kv_mask, other=0.0)
            acc = acc * shrink[:, None] + tl.dot(p.to(v.dtype), v)
            best = new_best
        y = (acc / total[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + b * out_stride + heads[:, None] * D + dims[None, :], y, mask=q_mask)


@torch.library.custom_op("weightpca::decode_attention", mutates_args=("keys", "values"))
def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    keys: Tensor,
    values: Tensor,
    position: Tensor,
    scale: float,
) -> Tensor:
    """Attention of one new token per sequence (see the module docstring), its key and value stored first.

    ``q [B, H·D]``, ``k, v [B, H_kv·D]``: the token's queries, keys and values, q and k before the rotary
    embedding (rows may be strided, as slices of a fused q/k/v output); ``cos, sin [B, D]``: its
    position's rotary cosines and sines, the sines' first half negated (``adapters.llama.rotation_sines``);
    ``keys, values [B, H_kv, S, D]``: the layer's static cache, written in place at ``position`` (a 0-dim
    long tensor) with the rotated key and the value. Returns ``[B, H·D]`` in ``q``'s dtype. A custom op
    that mutates the cache, so that ``torch.compile`` calls the kernel as it is, on the cache itself."""
    if not triton_runs_on(q):
        return reference_decode_attention(q, k, v, cos, sin, keys, values, position, scale)
    batch, width = q.shape
    _, kv_heads, capacity, dim = keys.shape
    if keys.stride() != values.stride() or keys.stride(-1) != 1:
        raise ValueError("decode_attention: the cached keys and values need one layout, head dims contiguous")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("decode_attention: the new queries, keys and values need contiguous rows")
    n = width // dim // kv_heads
    out = q.new_empty((batch, width))
    _decode_attention_kernel[(batch, kv_heads)](
        q, q.stride(0), k, k.stride(0), v, v.stride(0), cos, sin, cos.stride(0), sin.stride(0),
        keys, values, keys.stride(0), keys.stride(1), keys.stride(2), position, out, out.stride(0),
        scale, n, dim, S=capacity,
        BLOCK_Q=dot_block(n), BLOCK_D=dot_block(dim), BLOCK_S=BLOCK_S,
    )  # fmt: skip
    return out


@decode_attention.register_fake
def _(q, k, v, cos, sin, keys, values, position, scale):
    return q.new_empty(q.shape)


def reference_decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    keys: Tensor,
    values: Tensor,
    position: Tensor,
    scale: float,
) -> Tensor:
    """What the kernel computes, as the cached forward computes it without the kernel: the rotary
    embedding, the key and value stored at ``position``, then ``attend`` under the mask of the positions
    written."""
    from .adapters.base import attend
    from .adapters.llama import rotate

    batch, width = q.shape
    kv_heads, capacity, dim = keys.shape[1:]
    cos, sin = cos[:, None, None, :], sin[:, None, None, :]
    where = position.reshape(1)
    keys.index_copy_(2, where, rotate(k.reshape(batch, kv_heads, 1, dim), cos, sin).to(keys.dtype))
    values.index_copy_(2, where, v.reshape(batch, kv_heads, 1, dim).to(values.dtype))
    written = torch.arange(capacity, device=keys.device) <= position
    zero = torch.zeros((), dtype=keys.dtype, device=keys.device)
    mask = torch.where(written, zero, torch.finfo(keys.dtype).min)[None, :]
    queries = rotate(q.reshape(batch, width // dim, 1, dim), cos, sin)
    return attend(queries, keys, values, mask, scale).reshape(batch, width)
