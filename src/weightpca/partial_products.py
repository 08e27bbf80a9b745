"""A few rows through one input's linear maps, dense or factored, in one kernel, as partial products.

For an input ``x [M, m]`` (M: the decode batch, a handful of rows) and the linear maps of one input
(a layer's q/k/v, gate/up, or one o / down matrix), each dense ``W [n, m]`` or factored
``W = C B`` (``C [n, r]``, ``B [r, m]``), the kernel writes ``S`` partial products ``P [S, M, N]``
(float32, N the summed outputs) whose sum over the first axis is every map's output side by side::

    dense:     P[s] = x[:, K_s] W[:, K_s]ᵀ        (K_s: the s-th slice of the m inputs)
    factored:  P[s] = (x B[R_s]ᵀ) C[:, R_s]ᵀ      (R_s: the s-th slice of the r ranks)

Why: at decode sizes a GEMM costs its latency (2.5–5 µs on an H200 whatever its bytes,
docs/speed.md), so a factored matrix as two GEMMs costs twice a dense one. Split over its ranks it
is one kernel: program ``(t, s)`` computes its slice of ``z = B x`` and multiplies it by its slice of
``C``'s columns into output tile t, with no barrier between the two products (a rank slice of z
needs only that slice of B). Dense maps are split over their inputs the same way, which gives a
GEMV many programs. The sum over ``s`` is left to the kernel that reads the output: with
``S <= 8`` inductor unrolls it into that kernel (the RMSNorm after a residual sum, the rotary
embedding, the MLP's activation), so the step launches one kernel per projection, dense or
factored. The same split-K idea as split-K GEMMs (e.g. CUTLASS's), with the reduction moved into
the consumer.

Ranks are split into slices of ``BLOCK_R`` (a power of two >= 16, ``tl.dot``'s least), the inputs of
a dense map likewise; ``S`` is the most slices any map has, and a map with fewer writes zeros for
the rest. Where Triton cannot run (CPU tensors, no Triton) :func:`reference_partial_products` gives
the same sums with torch operations; ``TRITON_INTERPRET=1`` runs the kernel on CPU tensors
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
BLOCK_K = 64  # inputs per step of a factored slice's B x
# per output tile: first and end output column, first and end rank (dense: input) of the map,
# offset and row stride of its C (dense: its W) in the buffer it lives in, 1 for a dense map
TILE_FIELDS = 7


def triton_runs_on(x: Tensor) -> bool:
    if triton is None:
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _partial_products_kernel(
        x_ptr, x_stride, stack_ptr, stack_stride, coef_ptr, tiles_ptr, out_ptr, M, N,
        K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # K (the input width) is a compile-time constant: fixed per projection, and Triton 3.6's
        # interpreter cannot loop to a runtime bound
        t, s = tl.program_id(0), tl.program_id(1)
        tile = tiles_ptr + t * 7
        o0, o1 = tl.load(tile), tl.load(tile + 1)
        r0, r1 = tl.load(tile + 2), tl.load(tile + 3)
        c_base, c_stride, dense = tl.load(tile + 4).to(tl.int64), tl.load(tile + 5), tl.load(tile + 6)
        rows = tl.arange(0, BLOCK_M)
        ranks = r0 + s * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = o0 + tl.arange(0, BLOCK_N)
        row_ok, rank_ok, col_ok = rows < M, ranks < r1, cols < o1
        if dense:  # z = x[:, K_s]; the map's W rows sit in the stack
            z = tl.load(
                x_ptr + rows[:, None] * x_stride + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0
            )
            c = tl.load(
                stack_ptr + c_base + (cols - o0)[:, None] * c_stride + ranks[None, :],
                mask=col_ok[:, None] & rank_ok[None, :],
                other=0.0,
            )
        else:  # z = x B[R_s]ᵀ; B's rows sit in the stack, C in the coefficient buffer
            acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                xk = tl.load(
                    x_ptr + rows[:, None] * x_stride + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
                )
                bk = tl.load(
                    stack_ptr + ranks[:, None] * stack_stride + ks[None, :],
                    mask=rank_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                acc += tl.dot(xk, tl.trans(bk))
            z = acc.to(x_ptr.dtype.element_ty)  # rounded as the basis GEMM's output is
            c = tl.load(
                coef_ptr + c_base + (cols - o0)[:, None] * c_stride + (ranks - r0)[None, :],
                mask=col_ok[:, None] & rank_ok[None, :],
                other=0.0,
            )
        p = tl.dot(z, tl.trans(c))
        out = out_ptr + s * M * N + rows[:, None] * N + cols[None, :]
        tl.store(out, p, mask=row_ok[:, None] & col_ok[None, :])


def plan_tiles(maps: list[tuple[int, int, int, int, bool]], m: int) -> tuple[Tensor, int, int]:
    """The tile table of one input's maps, and its ``BLOCK_R`` and ``S``.

    ``maps``: per map, in output order, ``(n, first, width, c_offset, dense)``: its n outputs, its
    first row in the stack (dense: W's, factored: B's), its rank ``width`` (dense: ignored, the m
    inputs) and where its C starts in the coefficient buffer (dense: ignored). Returns the int32
    table ``[T, 7]`` (``TILE_FIELDS``), ``BLOCK_R`` and the slice count ``S <= MAX_SLICES``."""
    widest = max(m if dense else width for _, _, width, _, dense in maps)
    block_r = max(16, triton_next_power_of_2(-(-widest // MAX_SLICES)))
    rows, start = [], 0
    for n, first, width, c_offset, dense in maps:
        for o in range(0, n, BLOCK_N):
            if dense:  # ranks are W's m inputs; W row (first + o) starts at (first + o) * m in the stack
                rows.append((start + o, start + n, 0, m, (first + o) * m, m, 1))
            else:  # ranks first..first+width of the stack; C [n, width] row o starts at c_offset + o * width
                rows.append((start + o, start + n, first, first + width, c_offset + o * width, width, 0))
        start += n
    return torch.tensor(rows, dtype=torch.int32), block_r, -(-widest // block_r)


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@torch.library.custom_op("weightpca::partial_products", mutates_args=())
def partial_products(
    x: Tensor, stack: Tensor, coefs: Tensor, tiles: Tensor, n_out: int, block_r: int, slices: int
) -> Tensor:
    """``P [S, M, N]`` (float32) of ``x [M, m]``: see the module docstring; ``stack`` holds the dense
    maps' W rows and the factored maps' B rows, ``coefs`` the factored maps' C, flattened; ``tiles``
    from :func:`plan_tiles`. A custom op, so that ``torch.compile`` calls the kernel as it is and
    fuses the sum over S into the op that reads it."""
    m = x.shape[-1]
    if not triton_runs_on(x):
        return reference_partial_products(x, stack, coefs, tiles, n_out, block_r, slices)
    out = x.new_empty((slices, x.shape[0], n_out), dtype=torch.float32)
    block_m = max(16, triton_next_power_of_2(x.shape[0]))
    _partial_products_kernel[(tiles.shape[0], slices)](
        x, x.stride(0), stack, stack.stride(0), coefs, tiles, out, x.shape[0], n_out,
        K=m, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_R=block_r, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    return out


@partial_products.register_fake
def _(x, stack, coefs, tiles, n_out, block_r, slices):
    return x.new_empty((slices, x.shape[0], n_out), dtype=torch.float32)


def reference_partial_products(
    x: Tensor, stack: Tensor, coefs: Tensor, tiles: Tensor, n_out: int, block_r: int, slices: int
) -> Tensor:
    """What the kernel computes, with torch operations, tile by tile and slice by slice (float32)."""
    out = x.new_zeros((slices, x.shape[0], n_out), dtype=torch.float32)
    for o0, o1, r0, r1, c_base, c_stride, dense in tiles.tolist():
        cols = min(BLOCK_N, o1 - o0)
        for s in range(slices):
            lo, hi = r0 + s * block_r, min(r0 + (s + 1) * block_r, r1)
            if lo >= hi:
                continue
            if dense:
                z = x[:, lo:hi].float()
                c = stack.reshape(-1)[c_base : c_base + cols * c_stride].view(cols, c_stride)[:, lo:hi]
            else:
                z = (x.float() @ stack[lo:hi].float().t()).to(x.dtype).float()
                c = coefs[c_base : c_base + cols * c_stride].view(cols, c_stride)[:, lo - r0 : hi - r0]
            out[s, :, o0 : o0 + cols] = z @ c.float().t()
    return out
