"""What one decode step's pieces cost on CUDA: each op's latency inside a CUDA graph, at a model shape.

    python benchmarks/decode_ops_bench.py MODEL_FOLDER [--removed 0.2] [--rank-multiple 64] \\
        [--dtype bfloat16] [--batches 1 64] [--keys 48] --json out.json

A decode step at small batch costs the sum of its kernels' latencies, not its bytes
(docs/speed.md), so this measures the latency of each kind of op the step launches, the way the
step runs them: ``--reps`` copies of the op captured back to back in one CUDA graph, the graph
replayed ``--repeats`` times, the median per op (launch gaps included). For MODEL_FOLDER's shape
(its ``config.json``; weights are random) at each batch of ``--batches``:

- every GEMM of a layer, dense (q/k/v and gate/up stacked, as ``fuse_shared_inputs`` runs them) and
  factored at the ranks ``speed_bench.py --removed`` gives (stacked bases, then each coefficient
  GEMM): ``F.linear``, and ``addmm`` with a residual for o/down; at batch 1 also a plain Triton GEMV,
  the best of a few tile sizes, when Triton is installed (how far below cuBLAS a GEMV can go);
- masked attention of one query per sequence over ``--keys`` cached positions, grouped heads as
  ``weightpca.adapters.base.attend`` runs it, on each SDPA kernel;
- a layer's factored q/k/v coefficient GEMMs one after the other against ``concurrent_linears``
  (forked onto streams: concurrent branches of the graph);
- with Triton, each projection (q/k/v, o, gate/up, down; dense and factored) as one
  ``weightpca.partial_products`` kernel (its sum over slices is left out: the step fuses it into
  the op that reads it), at a few output tile widths (``BLOCK_N``).

CUDA only (a CUDA graph is what is timed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from speed_bench import cut_rank, whole_model_cut  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from weightpca import partial_products as pp  # noqa: E402
from weightpca.adapters import LlamaAdapter  # noqa: E402
from weightpca.compress import DTYPES, concurrent_linears  # noqa: E402
from weightpca.speed import Captured, timed  # noqa: E402


def graph_microseconds(op, reps: int, repeats: int) -> float:
    """Median microseconds per call of ``op`` with ``reps`` calls captured back to back in one CUDA graph
    (``weightpca.speed.Captured``), the graph replayed ``repeats`` times after its capture."""

    def ops():
        for _ in range(reps):
            op()

    graph = Captured(ops, torch.device("cuda"), graph=True)
    return statistics.median(timed(graph, "cuda", repeats)) / reps * 1e6


def triton_gemv():
    """A plain Triton GEMV ``y = x Wᵀ`` (x ``[M, K]``, M a power of two): one program per ``BLOCK_N`` outputs,
    looping over K; None without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def kernel(x, w, y, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        batch = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            wt = tl.load(w + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < N) & (ks[None, :] < K), other=0.0)
            xt = tl.load(x + batch[:, None] * K + ks[None, :], mask=(batch[:, None] < M) & (ks[None, :] < K), other=0.0)
            acc += tl.sum(xt.to(tl.float32)[:, None, :] * wt.to(tl.float32)[None, :, :], axis=2)
        done = (batch[:, None] < M) & (rows[None, :] < N)
        tl.store(y + batch[:, None] * N + rows[None, :], acc.to(y.dtype.element_ty), mask=done)

    def run(x, w, y, block_n, block_k, warps):
        m, k = x.shape
        grid = (triton.cdiv(w.shape[0], block_n),)
        kernel[grid](x, w, y, m, w.shape[0], k, triton.next_power_of_2(m), block_n, block_k, num_warps=warps)

    return run


def partial_products_us(roles: dict, ranks: dict, batch: int, dtype, time_op, device="cuda") -> dict:
    """Microseconds of one ``partial_products`` kernel per projection of a layer, dense and factored
    (ranks ``ranks``), per output tile width: ``{group: {"dense"|"factored": {block_n: us}}}``.
    ``time_op(op)`` times a call of ``op`` (on a CPU device the op is the torch reference)."""
    groups = dict(qkv=("q", "k", "v"), o=("o",), gate_up=("gate", "up"), down=("down",))
    out, default = {}, pp.BLOCK_N
    try:
        for name, members in groups.items():
            m = roles[members[0]][1]
            x = torch.randn(batch, m, device=device, dtype=dtype)
            for kind in ("dense", "factored"):
                maps, stack, coefs = [], [], []
                for role in members:
                    n, first = roles[role][0], sum(t.shape[0] for t in stack)
                    if kind == "dense":
                        maps.append((n, first, 0, 0, True))
                        stack.append(torch.randn(n, m, device=device, dtype=dtype) / m**0.5)
                    else:
                        rank = ranks[role]
                        maps.append((n, first, rank, sum(c.numel() for c in coefs), False))
                        stack.append(torch.randn(rank, m, device=device, dtype=dtype) / m**0.5)
                        coefs.append(torch.randn(n * rank, device=device, dtype=dtype) / rank**0.5)
                stack = torch.cat(stack)
                coefs = torch.cat(coefs) if coefs else stack.new_empty(0)
                n_out = sum(n for n, *_ in maps)
                times = {}
                for block_n in (32, 64, 128):
                    pp.BLOCK_N = block_n  # read by plan_tiles and by the launch
                    tiles, *blocks = pp.plan_tiles(maps, m)
                    tiles = tiles.to(device)
                    times[block_n] = time_op(
                        lambda: pp.partial_products(x, stack, coefs, tiles, n_out, *blocks)  # noqa: B023
                    )
                out.setdefault(name, {})[kind] = times
    finally:
        pp.BLOCK_N = default
    return out


def layer_shapes(folder: Path, removed: float, multiple: int) -> tuple[dict, dict, tuple[int, int, int]]:
    """One layer's matrices ``role -> (n_out, n_in)``, the factored model's rank per role
    (``speed_bench.py --removed``'s rule), and the key/value cache's (layers, heads, head dim)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with torch.device("meta"):  # shapes only
        target = LlamaAdapter(AutoModelForCausalLM.from_config(config, trust_remote_code=False))
    cut = whole_model_cut(target, removed)
    roles = {m.role: tuple(target.weight_view(m).shape) for m in target.layer_matrices(0).values()}
    ranks = {role: cut_rank(n, m, cut, multiple) for role, (n, m) in roles.items()}
    return roles, ranks, target.kv_shape()


def shape_arguments(description: str) -> argparse.ArgumentParser:
    """The command line this bench shares with factored_kernel_bench.py: a model folder's shape, the
    ranks of ``speed_bench.py --removed``, the dtype, the batches, the graph's copies and replays."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--removed", type=float, default=0.2)
    ap.add_argument("--rank-multiple", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--reps", type=int, default=50, help="copies of the op captured in one CUDA graph")
    ap.add_argument("--repeats", type=int, default=20, help="replays of the graph")
    ap.add_argument("--json", type=Path, required=True)
    return ap


def main() -> None:
    ap = shape_arguments(__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=48, help="cached positions a decode step attends to")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_ops_bench.py times CUDA graphs: it needs a CUDA device (speed_bench.py measures the CPU)")
    dtype, device = DTYPES[args.dtype], "cuda"
    roles, ranks, (_, kv_heads, head_dim) = layer_shapes(args.folder, args.removed, args.rank_multiple)
    # the dense layer's GEMMs (q/k/v and gate/up stacked), the factored one's: stacked bases, coefficients
    hidden = roles["q"][1]
    gemms = dict(qkv=(sum(roles[r][0] for r in "qkv"), hidden), o=roles["o"])
    gemms |= dict(gate_up=(roles["gate"][0] + roles["up"][0], hidden), down=roles["down"])
    gemms["bases_qkv"] = (ranks["q"] + ranks["k"] + ranks["v"], hidden)
    gemms["bases_gate_up"] = (ranks["gate"] + ranks["up"], hidden)
    for role in ("o", "down"):
        gemms[f"basis_{role}"] = (ranks[role], roles[role][1])
    for role in roles:
        gemms[f"coef_{role}"] = (roles[role][0], ranks[role])
    gemv = triton_gemv()
    time_op = lambda op: graph_microseconds(op, args.reps, args.repeats)  # noqa: E731
    record = dict(command=" ".join(["python", "benchmarks/decode_ops_bench.py", *sys.argv[1:]]), ranks=ranks)
    record.update(device=torch.cuda.get_device_name(), torch=torch.__version__, dtype=args.dtype, batches={})
    for batch in args.batches:
        rows = {}
        for name, (n, m) in gemms.items():
            w = torch.randn(n, m, device=device, dtype=dtype) / m**0.5
            x = torch.randn(batch, m, device=device, dtype=dtype)
            y = torch.empty(batch, n, device=device, dtype=dtype)
            residual = torch.randn(batch, n, device=device, dtype=dtype)
            row = dict(shape=[n, m], linear=time_op(lambda: torch.mm(x, w.t(), out=y)))
            if name in ("o", "down", "coef_o", "coef_down"):
                row["addmm"] = time_op(lambda: torch.addmm(residual, x, w.t(), out=y))
            if gemv is not None and batch == 1:
                exact = x.float() @ w.float().t()
                best = None
                for block_n in (4, 8, 16):
                    for block_k, warps in ((128, 2), (256, 2), (256, 4)):
                        gemv(x, w, y, block_n, block_k, warps)
                        if not torch.allclose(y.float(), exact, rtol=2e-2, atol=2e-2):
                            raise AssertionError(f"triton GEMV {name}: wrong product")
                        t = time_op(lambda: gemv(x, w, y, block_n, block_k, warps))  # noqa: B023
                        if best is None or t < best[0]:
                            best = (t, dict(block_n=block_n, block_k=block_k, warps=warps))
                row["triton_gemv"], row["triton_tiles"] = best
            rows[name] = row
        group = roles["q"][0] // roles["k"][0]  # query heads per key/value head
        q = torch.randn(batch, kv_heads, group, head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(batch, kv_heads, args.keys + 16, head_dim, device=device, dtype=dtype) for _ in "kv")
        mask = torch.zeros(1, args.keys + 16, device=device, dtype=dtype)
        mask[:, args.keys :] = torch.finfo(dtype).min  # a static cache: the positions not yet written
        attention = {}
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
            with sdpa_kernel(backend):
                attention[backend.name] = time_op(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        coefs = [torch.randn(roles[r][0], ranks[r], device=device, dtype=dtype) for r in ("q", "k", "v")]
        inputs = [torch.randn(batch, ranks[r], device=device, dtype=dtype) for r in ("q", "k", "v")]
        outputs = [torch.empty(batch, c.shape[0], device=device, dtype=dtype) for c in coefs]

        def one_after_another():
            for x, c, y in zip(inputs, coefs, outputs):
                torch.mm(x, c.t(), out=y)

        qkv_coefs = dict(
            one_after_another=time_op(one_after_another),
            concurrent_linears=time_op(lambda: concurrent_linears(inputs, coefs, [None] * 3)),
        )
        record["batches"][str(batch)] = dict(gemm_us=rows, attention_us=attention, qkv_coefficients_us=qkv_coefs)
        if pp.triton is not None:
            record["batches"][str(batch)]["partial_products_us"] = partial_products_us(
                roles, ranks, batch, dtype, time_op
            )
        print(json.dumps({batch: record["batches"][str(batch)]}), flush=True)
    args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
