"""weightpca.partial_products: the split kernel's partial products sum to every map's output.

The kernel itself runs in Triton's CPU interpreter (TRITON_INTERPRET=1, a subprocess: the variable
is read when Triton compiles); the torch reference and the fused projections that use it run here.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from weightpca.partial_products import MAX_SLICES, partial_products, plan_tiles, reference_partial_products

# a dense map, two factored ones (ranks 80 and 16: over one 64-rank step and under it), a dense map
# whose outputs end mid-tile; m = 96 inputs (not a multiple of the 16-wide input slices)
CASE = """
import json, torch
from weightpca.partial_products import partial_products, plan_tiles, reference_partial_products

def case(rows, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    m, maps, stack, coefs, want = 96, [], [], [], []
    x = torch.randn(rows, m, generator=g).to(dtype)
    first = 0
    for n, rank in [(80, None), (64, 80), (48, 16), (20, None)]:
        if rank is None:
            w = torch.randn(n, m, generator=g).to(dtype)
            maps.append((n, first, 0, 0, True)); stack.append(w); first += n
            want.append(x.float() @ w.float().t())
        else:
            b, c = torch.randn(rank, m, generator=g).to(dtype), torch.randn(n, rank, generator=g).to(dtype)
            offset = sum(t.numel() for t in coefs)
            maps.append((n, first, rank, offset, False)); stack.append(b); coefs.append(c.reshape(-1)); first += rank
            want.append((x.float() @ b.float().t()).to(dtype).float() @ c.float().t())
    tiles, block_k, slices, max_rank = plan_tiles(maps, m)
    args = (x, torch.cat(stack), torch.cat(coefs), tiles, sum(n for n, *_ in maps), block_k, slices, max_rank)
    p, ref = partial_products(*args), reference_partial_products(*args)
    want = torch.cat(want, dim=1)
    return {"rows": rows, "shape": list(p.shape), "slices": slices, "max_rank": max_rank,
            "err": (p - ref).abs().max().item(), "err_unsplit": (p.sum(0) - want).abs().max().item(),
            "scale": want.abs().max().item()}

print(json.dumps([case(rows, dtype, seed) for rows, dtype, seed in
                  [(1, torch.float16, 0), (5, torch.float16, 1), (17, torch.float32, 2)]]))
"""


def test_kernel_in_the_cpu_interpreter_sums_to_each_maps_output():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", CASE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for case in json.loads(done.stdout.strip().splitlines()[-1]):
        assert case["shape"][1:] == [case["rows"], 80 + 64 + 48 + 20], case
        assert 1 < case["slices"] <= MAX_SLICES and case["max_rank"] == 128, case
        # the reference's products, summed in another order (float32)
        assert case["err"] <= 1e-4 * case["scale"], case
        # and every map's output: factored maps' partial B x are rounded one input slice at a time
        tolerance = 1e-4 if case["rows"] == 17 else 1e-2  # float32 / float16 rounding
        assert case["err_unsplit"] <= tolerance * case["scale"], case


@pytest.mark.parametrize("family, mode", [("llama", None), ("llama", "activation_aware"), ("gpt", "activation_aware")])
def test_fused_projections_tile_tables_give_their_members_outputs(family, mode):
    """Each fused projection's tile table (dense stacks, factored bases and coefficient views) through
    the reference: the partial products sum to the members' outputs, and the residual sum of a group
    of one equals ``add_linear``'s."""
    from test_adapters import factored_model, small_gpt

    from weightpca.adapters import GPTAdapter, LlamaAdapter
    from weightpca.adapters.base import add_linear
    from weightpca.compress import fuse_shared_inputs

    from test_surgery import tiny_llama

    if mode is None:
        adapter = GPTAdapter(small_gpt().eval()) if family == "gpt" else LlamaAdapter(tiny_llama(None)[0].eval())
    else:
        adapter = factored_model(family, mode)
    assert fuse_shared_inputs(adapter, few_rows=True) > 0
    x_width = {id(f): f.weight.shape[1] for f in adapter.fused.values()}
    for (_, roles), fused in adapter.fused.items():
        assert fused.tiles is not None and fused.slices <= MAX_SLICES
        x = torch.randn(3, x_width[id(fused)], generator=torch.Generator().manual_seed(len(roles)))
        with torch.no_grad():
            want = torch.cat([m(x) for m in fused.members], dim=-1)
            p = reference_partial_products(
                x,
                fused.weight,
                fused.coefs,
                fused.tiles,
                sum(fused.n_outputs),
                fused.block_k,
                fused.slices,
                fused.max_rank,
            )
            got = p.sum(0) + (0 if fused.out_bias is None else fused.out_bias)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            if len(roles) == 1:  # off CUDA add_to is add_linear's sum
                residual = torch.randn_like(want)
                torch.testing.assert_close(
                    fused.add_to(residual, x), add_linear(residual, fused.members[0], x), rtol=0, atol=0
                )


def test_a_pca_mean_row_leaves_the_group_without_a_tile_table():
    from test_adapters import factored_model

    from weightpca.compress import fuse_shared_inputs

    adapter = factored_model("llama", "separate")
    fuse_shared_inputs(adapter, few_rows=True)
    centred = [f for f in adapter.fused.values() if any(mean is not None for *_, mean in f.reads)]
    assert centred and all(f.tiles is None for f in centred)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [1, 64])
def test_kernel_on_cuda_matches_the_reference(rows):
    g = torch.Generator().manual_seed(rows)
    m, maps, stack, coefs = 576, [], [], []
    for n, rank in [(576, 128), (192, 64), (192, None), (1536, 320)]:
        if rank is None:
            maps.append((n, sum(t.shape[0] for t in stack), 0, 0, True))
            stack.append(torch.randn(n, m, generator=g))
        else:
            maps.append((n, sum(t.shape[0] for t in stack), rank, sum(c.numel() for c in coefs), False))
            stack.append(torch.randn(rank, m, generator=g) / m**0.5)
            coefs.append(torch.randn(n * rank, generator=g) / rank**0.5)
    tiles, *blocks = plan_tiles(maps, m)
    args = [torch.randn(rows, m, generator=g), torch.cat(stack), torch.cat(coefs)]
    args = [a.to(torch.bfloat16) for a in args] + [tiles, sum(n for n, *_ in maps), *blocks]
    want = reference_partial_products(*args)
    cuda = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    got = partial_products(*cuda).cpu()
    torch.testing.assert_close(got.sum(0), want.sum(0), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("factored", [False, True])
def test_compiled_cuda_decode_step_runs_the_split_kernel_and_keeps_the_logits(factored):
    """A compiled bfloat16 forward of one new token per sequence, few_rows on: the split kernel runs
    (the profiler sees it) and the logits are the GEMM path's within bfloat16's rounding."""
    from test_adapters import factored_model

    from weightpca.adapters import KVCache, LlamaAdapter
    from weightpca.compress import fuse_shared_inputs

    from test_surgery import tiny_llama

    adapter = factored_model("llama", "activation_aware") if factored else LlamaAdapter(tiny_llama(None)[0].eval())
    adapter.model.to("cuda", torch.bfloat16)
    assert fuse_shared_inputs(adapter, few_rows=True) > 0
    ids = torch.from_numpy(np.random.default_rng(7).integers(0, 27, (2, 1))).cuda()

    def forward():
        cache = KVCache.empty(adapter.kv_shape(), 2, torch.bfloat16, "cuda", 16)
        return adapter.cached_logits(ids, cache)

    with torch.no_grad():
        eager = forward()
        compiled = torch.compile(forward, dynamic=False)
        compiled()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            got = compiled()
            torch.cuda.synchronize()
    assert any("_partial_products_kernel" in e.key for e in prof.key_averages())
    torch.testing.assert_close(got.float(), eager.float(), rtol=3e-2, atol=3e-2)
