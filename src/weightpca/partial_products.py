"""A few rows through one input's linear maps, dense or factored, in one kernel, as partial products.

For an input ``x [M, m]`` (M: the decode batch, a handful of rows) and the linear maps of one input
(a layer's q/k/v, gate/up, or one o / down matrix), each dense ``W [n, m]`` or factored
``W = C B`` (``C [n, r]``, ``B [r, m]``), the kernel writes ``S`` partial products ``P [S, M, N]``
(float32, N the summed outputs) whose sum over the first axis is every map's output side by side.
Both kinds are split over the same slices ``K_s`` of the m inputs, since both are linear in x::

    dense:     P[s] = x[:, K_s] W[:, K_s]ᵀ
    factored:  P[s] = round(x[:, K_s] B[:, K_s]ᵀ) Cᵀ      (round: to x's dtype, as a GEMM's output is)

Why: at decode sizes a GEMM costs its latency (2.5–5 µs on an H200 whatever its bytes,
docs/speed.md), so a factored matrix as two GEMMs costs twice a dense one. Split over its inputs it
is one kernel with no barrier between its two products: program ``(t, s)`` multiplies its input
slice by its slice of B's columns (all ranks, in steps of ``BLOCK_R``) and the result by output
tile t's rows of C. Every program reads its slice of x once and walks only the map's ranks, one
64-rank step per round of loads (a dense tile: one round); session 16's first version split the
ranks instead and looped over all m inputs in each program, ~2x a dense projection's time.
The sum over ``s`` is left to the kernel that reads the output: with
``S <= 8`` inductor unrolls it into that kernel (the RMSNorm after a residual sum, the rotary
embedding, the MLP's activation), so the step launches one kernel per projection, dense or
factored. The same split-K idea as split-K GEMMs (e.g. CUTLASS's), with the reduction moved into
the consumer.

Inputs are split into ``S <= MAX_SLICES`` slices of ``BLOCK_K`` (a power of two >= 16, ``tl.dot``'s
least); a factored map's ranks are walked in ``BLOCK_R`` steps up to the largest rank of the
input's maps. Where Triton cannot run (CPU tensors, no Triton) :func:`reference_partial_products`
gives the same sums with torch operations; ``TRITON_INTERPRET=1`` runs the kernel on CPU tensors
(tests/test_partial_products.py).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the reference below serves
    triton = None

MAX_SLICES = 8  # inductor's unroll_reductions_threshold: a sum over at most 8 fuses into its reader
BLOCK_N = 64  # output columns per program
BLOCK_R = 64  # ranks per step of a factored map
# per output tile: first and end output column, first and end row of the map in the stack (dense:
# W's rows from the tile's first, factored: B's), offset and row stride of its C (dense: of its W),
# 1 for a dense map
TILE_FIELDS = 7


def triton_runs_on(x: Tensor) -> bool:
    if triton is None:
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _partial_products_kernel(
        x_ptr, x_stride, stack_ptr, stack_stride, coef_ptr, tiles_ptr, out_ptr, M, N, K,
        MAX_RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        # MAX_RANK (the loop bound) is a compile-time constant: fixed per projection, and Triton
        # 3.6's interpreter cannot loop to a runtime bound
        t, s = tl.program_id(0), tl.program_id(1)
        tile = tiles_ptr + t * 7
        o0, o1 = tl.load(tile), tl.load(tile + 1)
        r0, r1 = tl.load(tile + 2), tl.load(tile + 3)
        c_base, c_stride, dense = tl.load(tile + 4).to(tl.int64), tl.load(tile + 5), tl.load(tile + 6)
        rows = tl.arange(0, BLOCK_M)
        ks = s * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = o0 + tl.arange(0, BLOCK_N)
        row_ok, k_ok, col_ok = rows < M, ks < K, cols < o1
        xs = tl.load(x_ptr + rows[:, None] * x_stride + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if dense:  # the tile's W rows sit in the stack
            w = tl.load(
                stack_ptr + c_base + (cols - o0)[:, None] * c_stride + ks[None, :],
                mask=col_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            p = tl.dot(xs, tl.trans(w))
        else:  # B's rows sit in the stack, C in the coefficient buffer
            p = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for q0 in range(0, MAX_RANK, BLOCK_R):
                if q0 < r1 - r0:  # the map's own ranks (MAX_RANK is the input's largest)
                    ranks = r0 + q0 + tl.arange(0, BLOCK_R)
                    rank_ok = ranks < r1
                    b = tl.load(
                        stack_ptr + ranks[:, None] * stack_stride + ks[None, :],
                        mask=rank_ok[:, None] & k_ok[None, :],
                        other=0.0,
                    )
                    z = tl.dot(xs, tl.trans(b)).to(x_ptr.dtype.element_ty)
                    c = tl.load(
                        coef_ptr + c_base + (cols - o0)[:, None] * c_stride + (ranks - r0)[None, :],
                        mask=col_ok[:, None] & rank_ok[None, :],
                        other=0.0,
                    )
                    p += tl.dot(z, tl.trans(c))
        out = out_ptr + s * M * N + rows[:, None] * N + cols[None, :]
        tl.store(out, p, mask=row_ok[:, None] & col_ok[None, :])


def plan_tiles(maps: list[tuple[int, int, int, int, bool]], m: int) -> tuple[Tensor, int, int, int]:
    """The tile table of one input's maps, its ``BLOCK_K``, ``S`` and largest rank.

    ``maps``: per map, in output order, ``(n, first, width, c_offset, dense)``: its n outputs, its
    first row in the stack (dense: W's, factored: B's), its rank ``width`` (dense: ignored) and where
    its C starts in the coefficient buffer (dense: ignored). Returns the int32 table ``[T, 7]``
    (``TILE_FIELDS``), ``BLOCK_K``, the slice count ``S <= MAX_SLICES`` of the m inputs, and the
    largest factored rank rounded up to ``BLOCK_R`` (0 if every map is dense)."""
    block_k = dot_block(-(-m // MAX_SLICES))
    rows, start = [], 0
    for n, first, width, c_offset, dense in maps:
        for o in range(0, n, BLOCK_N):
            if dense:  # W row (first + o) starts at (first + o) * m in the stack
                rows.append((start + o, start + n, first + o, first + n, (first + o) * m, m, 1))
            else:  # B: rows first..first+width of the stack; C [n, width] row o starts at c_offset + o * width
                rows.append((start + o, start + n, first, first + width, c_offset + o * width, width, 0))
        start += n
    ranks = [width for _, _, width, _, dense in maps if not dense]
    max_rank = -(-max(ranks, default=0) // BLOCK_R) * BLOCK_R
    return torch.tensor(rows, dtype=torch.int32), block_k, -(-m // block_k), max_rank


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def dot_block(n: int) -> int:
    """The least block that holds ``n`` rows or columns of a ``tl.dot`` operand: a power of two, >= 16."""
    return max(16, triton_next_power_of_2(n))


@torch.library.custom_op("weightpca::partial_products", mutates_args=())
def partial_products(
    x: Tensor, stack: Tensor, coefs: Tensor, tiles: Tensor, n_out: int, block_k: int, slices: int, max_rank: int
) -> Tensor:
    """``P [S, M, N]`` (float32) of ``x [M, m]``: see the module docstring; ``stack`` holds the dense
    maps' W rows and the factored maps' B rows, ``coefs`` the factored maps' C, flattened; ``tiles``,
    ``block_k``, ``slices`` and ``max_rank`` from :func:`plan_tiles`. A custom op, so that
    ``torch.compile`` calls the kernel as it is and fuses the sum over S into the op that reads it."""
    if not triton_runs_on(x):
        return reference_partial_products(x, stack, coefs, tiles, n_out, block_k, slices, max_rank)
    out = x.new_empty((slices, x.shape[0], n_out), dtype=torch.float32)
    block_m = dot_block(x.shape[0])
    _partial_products_kernel[(tiles.shape[0], slices)](
        x, x.stride(0), stack, stack.stride(0), coefs, tiles, out, x.shape[0], n_out, x.shape[-1],
        MAX_RANK=max_rank, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=block_k, BLOCK_R=BLOCK_R,
    )  # fmt: skip
    return out


@partial_products.register_fake
def _(x, stack, coefs, tiles, n_out, block_k, slices, max_rank):
    return x.new_empty((slices, x.shape[0], n_out), dtype=torch.float32)


def reference_partial_products(
    x: Tensor, stack: Tensor, coefs: Tensor, tiles: Tensor, n_out: int, block_k: int, slices: int, max_rank: int
) -> Tensor:
    """What the kernel computes, with torch operations, tile by tile and input slice by input slice
    (float32). ``max_rank`` only bounds the kernel's loop; every map's ranks are used."""
    out = x.new_zeros((slices, x.shape[0], n_out), dtype=torch.float32)
    for o0, o1, r0, r1, c_base, c_stride, dense in tiles.tolist():
        cols = min(BLOCK_N, o1 - o0)
        for s in range(slices):
            ks = slice(s * block_k, (s + 1) * block_k)
            if dense:
                w = stack.reshape(-1)[c_base : c_base + cols * c_stride].view(cols, c_stride)
                out[s, :, o0 : o0 + cols] = x[:, ks].float() @ w[:, ks].float().t()
            else:
                z = (x[:, ks].float() @ stack[r0:r1, ks].float().t()).to(x.dtype).float()
                c = coefs[c_base : c_base + cols * c_stride].view(cols, c_stride)
                out[s, :, o0 : o0 + cols] = z @ c.float().t()
    return out
