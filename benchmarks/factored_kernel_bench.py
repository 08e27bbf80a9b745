"""How fast one factored matrix ``y = C (B x)`` can run at decode sizes in a single kernel, on CUDA.

    python benchmarks/factored_kernel_bench.py MODEL_FOLDER [--removed 0.2] [--rank-multiple 64] \\
        [--roles gate q down] [--batches 1 64] --json out.json

Why: a decode step of a small model costs its kernels' latencies (docs/speed.md), and a factored
matrix run as two GEMMs costs two latencies where the dense one costs one. This asks whether any
one-kernel design closes that gap. For each role's map at MODEL_FOLDER's shape (its config.json;
weights are random) and the rank ``speed_bench.py --removed`` gives it, at each batch ``M`` (x is
``[M, m]``, B ``[r, m]``, C ``[n, r]``), every op below is timed inside a CUDA graph as
decode_ops_bench.py times ops (median per call of back-to-back copies, launch gaps included):

- ``cublas_dense``: ``x Wᵀ`` for a dense ``W [n, m]``; ``cublas_two``: ``(x Bᵀ) Cᵀ``, two GEMMs;
- ``src_dense`` / ``src_factored``: ``weightpca.partial_products``'s kernel for one map of either
  kind, at output tile widths 32/64, ``num_warps`` 2/4/8 and ``num_stages`` 1/3;
- ``atomic``: program (t, s, j) multiplies input slice ``K_s`` by rank slice ``R_j`` of B, that by
  output tile t's columns ``C[T_t, R_j]``, and adds the product into a zeroed float32 output with
  atomic adds (the zeroing is timed with it): one round of loads per program, no loop;
- ``rank_split``: program (t, j) computes ``z_j = x B[R_j, :]ᵀ`` over all m inputs (a static loop),
  then ``z_j C[T_t, R_j]ᵀ`` into partial j (the partials' sum over j is left out, as
  partial_products leaves its sum to the op that reads it).

Each design's result is checked against the exact product before it is timed (``rel_err``: the
largest error over the largest output); a configuration the device cannot launch (shared memory) is
recorded as skipped. CUDA only; tests/test_benchmarks.py runs the two kernels in
Triton's CPU interpreter against the exact product.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from decode_ops_bench import graph_microseconds, layer_shapes, shape_arguments  # noqa: E402

from weightpca import partial_products as pp  # noqa: E402
from weightpca.compress import DTYPES  # noqa: E402

if pp.triton is not None:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources

    @triton.jit
    def _atomic_kernel(
        x, B, C, out, M, N, K, R,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        t, s, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = tl.arange(0, BLOCK_M)
        ks = s * BLOCK_K + tl.arange(0, BLOCK_K)
        rs = j * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        xs = tl.load(x + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        b = tl.load(B + rs[:, None] * K + ks[None, :], mask=(rs[:, None] < R) & (ks[None, :] < K), other=0.0)
        c = tl.load(C + cols[:, None] * R + rs[None, :], mask=(cols[:, None] < N) & (rs[None, :] < R), other=0.0)
        z = tl.dot(xs, tl.trans(b)).to(x.dtype.element_ty)  # rounded as a GEMM's output is
        done = (rows[:, None] < M) & (cols[None, :] < N)
        tl.atomic_add(out + rows[:, None] * N + cols[None, :], tl.dot(z, tl.trans(c)), mask=done, sem="relaxed")

    @triton.jit
    def _rank_split_kernel(
        x, B, C, out, M, N, K: tl.constexpr, R,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        t, j = tl.program_id(0), tl.program_id(1)
        rows = tl.arange(0, BLOCK_M)
        rs = j * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        # C's tile does not depend on z: loaded first, so its latency overlaps the loop's
        c = tl.load(C + cols[:, None] * R + rs[None, :], mask=(cols[:, None] < N) & (rs[None, :] < R), other=0.0)
        z = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
        for k0 in tl.static_range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            xs = tl.load(x + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
            b = tl.load(B + rs[:, None] * K + ks[None, :], mask=(rs[:, None] < R) & (ks[None, :] < K), other=0.0)
            z += tl.dot(xs, tl.trans(b))
        p = tl.dot(z.to(x.dtype.element_ty), tl.trans(c))
        tl.store(out + j * M * N + rows[:, None] * N + cols[None, :], p, mask=(rows[:, None] < M) & (cols[None, :] < N))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def atomic_op(x, B, C, block_n, block_k, block_r, warps=4):
    """The atomic design as a callable (zeroing included) and its float32 output ``[M, n]``."""
    (M, m), (r, n) = x.shape, (B.shape[0], C.shape[0])
    out = x.new_zeros((M, n), dtype=torch.float32)
    grid = (cdiv(n, block_n), cdiv(m, block_k), cdiv(r, block_r))

    def op():
        out.zero_()
        _atomic_kernel[grid](
            x, B, C, out, M, n, m, r, BLOCK_M=pp.dot_block(M), BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
            num_warps=warps,
        )  # fmt: skip

    return op, lambda: out


def rank_split_op(x, B, C, block_n, block_k, block_r, warps=4, stages=1):
    """The rank-split design as a callable and the sum of its partials ``[M, n]``."""
    (M, m), (r, n) = x.shape, (B.shape[0], C.shape[0])
    parts = x.new_empty((cdiv(r, block_r), M, n), dtype=torch.float32)

    def op():
        _rank_split_kernel[(cdiv(n, block_n), parts.shape[0])](
            x, B, C, parts, M, n, m, r, BLOCK_M=pp.dot_block(M), BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip

    return op, lambda: parts.sum(0)


def src_op(x, W_or_B, C, block_n, warps, stages):
    """partial_products' kernel for one map (dense when C is None) and the sum of its partials."""
    M, m = x.shape
    default, pp.BLOCK_N = pp.BLOCK_N, block_n  # plan_tiles reads the module's tile width
    try:
        if C is None:
            n, stack, coefs = W_or_B.shape[0], W_or_B, W_or_B.new_empty(0)
            tiles, block_k, slices, max_rank = pp.plan_tiles([(n, 0, 0, 0, True)], m)
        else:
            n, stack, coefs = C.shape[0], W_or_B, C.reshape(-1)
            tiles, block_k, slices, max_rank = pp.plan_tiles([(n, 0, W_or_B.shape[0], 0, False)], m)
    finally:
        pp.BLOCK_N = default
    tiles, parts = tiles.to(x.device), x.new_empty((slices, M, n), dtype=torch.float32)

    def op():
        pp._partial_products_kernel[(tiles.shape[0], slices)](
            x, x.stride(0), stack, stack.stride(0), coefs, tiles, parts, M, n, m, MAX_RANK=max_rank,
            BLOCK_M=pp.dot_block(M), BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=pp.BLOCK_R, num_warps=warps,
            num_stages=stages,
        )  # fmt: skip

    return op, lambda: parts.sum(0)


def designs(x, W, B, C):
    """Every (name, op, result) the bench times for one map; ``result()`` is the float32 ``[M, n]``."""
    for block_n, warps, stages in itertools.product((32, 64), (4,), (1, 3)):
        yield (f"src_dense_n{block_n}_w{warps}_s{stages}", *src_op(x, W, None, block_n, warps, stages))
    for block_n, warps, stages in itertools.product((32, 64), (2, 4, 8), (1, 3)):
        yield (f"src_factored_n{block_n}_w{warps}_s{stages}", *src_op(x, B, C, block_n, warps, stages))
    for block_n, block_k, block_r in itertools.product((64, 128, 256), (128, 256), (32, 64)):
        yield (f"atomic_n{block_n}_k{block_k}_r{block_r}_w4", *atomic_op(x, B, C, block_n, block_k, block_r))
    for block_n, block_r, stages in itertools.product((32, 64, 128), (32, 64), (1, 3)):
        op, result = rank_split_op(x, B, C, block_n, 128, block_r, stages=stages)
        yield f"rank_split_n{block_n}_k128_r{block_r}_w4_s{stages}", op, result


def checked_designs(x, W, B, C):
    """:func:`designs`, each run once and checked against the exact product: ``(name, op, rel_err)``;
    ``(name, None, why)`` for a configuration the device cannot launch."""
    dense = x.float() @ W.float().t()
    factored = (x.float() @ B.float().t()).to(x.dtype).float() @ C.float().t()
    for name, op, result in designs(x, W, B, C):
        try:
            op()
        except OutOfResources as e:  # a tile too large for this shape (shared memory): not a design's result
            yield name, None, f"skipped: {e}"
            continue
        want = dense if name.startswith("src_dense") else factored
        err = ((result() - want).abs().max() / want.abs().max()).item()
        if err > 2e-2:
            raise AssertionError(f"{name}: wrong product (relative error {err:.2g})")
        yield name, op, err


def measure(n: int, m: int, r: int, batch: int, dtype, time_op) -> dict:
    """``{op name: us}`` for the two cuBLAS baselines, ``{design: [us, rel_err]}`` for the rest."""
    x = torch.randn(batch, m, device="cuda", dtype=dtype)
    W = torch.randn(n, m, device="cuda", dtype=dtype) / m**0.5
    B = torch.randn(r, m, device="cuda", dtype=dtype) / m**0.5
    C = torch.randn(n, r, device="cuda", dtype=dtype) / r**0.5
    z, y = x.new_empty(batch, r), x.new_empty(batch, n)
    row = dict(
        cublas_dense=time_op(lambda: torch.mm(x, W.t(), out=y)),
        cublas_two=time_op(lambda: (torch.mm(x, B.t(), out=z), torch.mm(z, C.t(), out=y))),
    )
    for name, op, err in checked_designs(x, W, B, C):
        row[name] = err if op is None else [time_op(op), err]
    return row


def best(row: dict, family: str) -> tuple[str, float]:
    """The fastest configuration of one design family in a :func:`measure` row."""
    times = {k: v[0] for k, v in row.items() if k.startswith(family) and isinstance(v, list)}
    name = min(times, key=times.get)
    return name, times[name]


def main() -> None:
    ap = shape_arguments(__doc__.split("\n\n")[0])
    ap.add_argument("--roles", nargs="+", default=["gate", "q", "down"])
    args = ap.parse_args()
    if not torch.cuda.is_available() or pp.triton is None:
        sys.exit("factored_kernel_bench.py times Triton kernels in CUDA graphs: it needs a CUDA device and Triton")
    roles, ranks, _ = layer_shapes(args.folder, args.removed, args.rank_multiple)
    time_op = lambda op: graph_microseconds(op, args.reps, args.repeats)  # noqa: E731
    record = dict(command=" ".join(["python", "benchmarks/factored_kernel_bench.py", *sys.argv[1:]]))
    record.update(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    maps = {role: dict(n=roles[role][0], m=roles[role][1], r=ranks[role]) for role in args.roles}
    record.update(dtype=args.dtype, maps=maps)
    record["batches"] = {}
    torch.manual_seed(0)
    for batch in args.batches:
        for role in args.roles:
            (n, m), r = roles[role], ranks[role]
            row = measure(n, m, r, batch, DTYPES[args.dtype], time_op)
            record["batches"].setdefault(str(batch), {})[role] = row
            summary = {f: best(row, f) for f in ("src_dense", "src_factored", "atomic", "rank_split")}
            line = ", ".join(f"{f} {t:.2f} ({k})" for f, (k, t) in summary.items())
            print(f"batch {batch} {role} [{n}x{m}, rank {r}] us: cublas dense {row['cublas_dense']:.2f}, "
                  f"cublas two {row['cublas_two']:.2f}, {line}", flush=True)  # fmt: skip
            args.json.write_text(json.dumps(record, indent=1))  # what is measured so far survives a kill


if __name__ == "__main__":
    main()
