"""benchmarks/train_bench.py's --profile breakdown, on the CPU (its CUDA path: docs/gpu.md)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, kill_training_at


def test_train_bench_profile_splits_the_step_by_kind(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks/train_bench.py"),
            "--config",
            "config/ci.yaml",
            "--batch",
            "2",
            "--block",
            "16",
            "--vocab",
            "512",
            "--paths",
            "eager",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--device",
            "cpu",
            "--profile",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = json.loads(out.read_text())
    kinds = result["profile"]["ms_per_step"]
    assert set(kinds) == {"matmul", "attention", "other"}
    assert kinds["matmul"] > 0 and kinds["attention"] > 0 and kinds["other"] > 0
    top = result["profile"]["top_other"]
    assert 0 < len(top) <= 10 and all(a[0] >= b[0] for a, b in zip(top, top[1:]))
    assert not any(name.startswith(("aten::mm", "aten::addmm")) for _, _, name in top)
    assert "ms/step: matmul" in done.stdout


def tiny_llama_folder(tmp_path):
    """A tiny Llama saved as a Hugging Face folder, with a validation and a train text of its alphabet."""
    from test_surgery import tiny_llama

    model, tok = tiny_llama(None)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    text = "".join(chr(97 + (i * 7) % 26) + (" " if i % 5 == 4 else "") for i in range(6000))
    (tmp_path / "val.txt").write_text(text)
    (tmp_path / "train.txt").write_text(text[::-1])


def test_whole_model_bench_on_a_tiny_llama_folder(tmp_path):
    """The GPU preset's whole-model script (docs/whole_model.md) end to end on the CPU: every rule at every
    fraction, the refit rows, the markdown table with their columns."""
    tiny_llama_folder(tmp_path)
    out = tmp_path / "whole.json"
    args = ["--eval-tokens", "128", "--calib-tokens", "256", "--sensitivity-tokens", "64", "--window", "32"]
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/whole_model_bench.py"), str(tmp_path / "model"), *args]
        + ["--val-text", str(tmp_path / "val.txt"), "--train-text", str(tmp_path / "train.txt")]
        + ["--removed", "0.1", "0.3", "--refit", "calibrated", "--device", "cpu", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    grid = [r for r in result["rows"]["activation_aware"] if r["source"] == "grid"]
    assert sorted((r["allocation"], r["refit"], r["removed"]) for r in grid) == sorted(
        [(a, False, f) for a in ("threshold", "uniform", "calibrated") for f in (0.1, 0.3)]
        + [("calibrated", True, f) for f in (0.1, 0.3)]
    )
    assert result["eval_tokens"] == 128 and result["calib_tokens"] == 256
    assert "| removed | threshold | uniform | calibrated | calibrated + refit |" in done.stdout


BENCH_IN_SUBPROCESS = """
import json, runpy, sys
sys.argv = json.loads(sys.argv[1])
runpy.run_path(sys.argv[0], run_name="__main__")
"""

RECOVERY_PRESET = """
surgery: {eval_tokens: 128, calib_tokens: 256, window: 32, whole_model: {sensitivity_tokens: 64}}
recovery:
  seeds: [1, 2]
  target_train:
    smollm2: {max_steps: 6, batch_size: 2, warmup_steps: 1, eval_every: 3, eval_windows: 2, checkpoint_every: 3}
"""


def test_recovery_bench_on_a_tiny_llama_folder_resumes_after_a_kill(tmp_path):
    """The GPU preset's recovery script (docs/recovery.md) on the CPU: the preset's recipe, every point and
    seed against the control of its seed; killed in its first training run, started again, it ends with
    every run once and the same table as a run never stopped."""
    tiny_llama_folder(tmp_path)
    (tmp_path / "preset.yaml").write_text(RECOVERY_PRESET)

    def argv(work):
        return (
            [str(REPO / "benchmarks/recovery_bench.py"), str(tmp_path / "model")]
            + ["--val-text", str(tmp_path / "val.txt"), "--train-text", str(tmp_path / "train.txt")]
            + ["--work", str(work), "--config", str(REPO / "config/config.yaml"), str(tmp_path / "preset.yaml")]
            + ["--removed", "0.1", "0.3", "--device", "cpu", "--json", str(work / "out.json")]
        )

    def bench(work):
        return subprocess.run([sys.executable, *argv(work)], cwd=REPO, capture_output=True, text=True, timeout=600)

    # stopped and killed at step 4 of its first run (the control of seed 1; its checkpoint is step 3's)
    kill_training_at(json.dumps(argv(tmp_path / "killed")), "step", 4, body=BENCH_IN_SUBPROCESS)
    assert not (tmp_path / "killed" / "recovery" / "dense" / "seed1" / "recovery.json").exists()
    assert (tmp_path / "killed" / "compress" / "calibrated30_refit" / "model.safetensors").is_file()
    again = bench(tmp_path / "killed")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming recovery/smollm2/dense/seed1" in again.stdout + again.stderr
    done = bench(tmp_path / "whole")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "whole" / "out.json").read_text())
    rows = result["rows"]
    points = ("calibrated10_refit", "calibrated30_refit")
    assert sorted((r["point"], r["seed"]) for r in rows) == [(p, s) for p in points for s in (1, 2)]
    assert all(r["refit"] and r["ppl_after"] < r["ppl_before"] for r in rows)
    assert all(r["val_tokens"] == 128 and r["steps"] == 6 for r in rows)
    assert rows[0]["fraction_kept"] > rows[-1]["fraction_kept"]
    assert result["tokens_per_run"] == 6 * 2 * 32
    assert "| calibrated | yes | 30% |" in done.stdout
    resumed = json.loads((tmp_path / "killed" / "out.json").read_text())["rows"]
    assert [(r["control_after"], r["ppl_after"]) for r in resumed] == [
        (r["control_after"], r["ppl_after"]) for r in rows
    ]
    # another allocation, unrefit, balanced, one seed, in the same folder: its dense control is reused
    control = tmp_path / "whole" / "recovery" / "dense" / "seed1" / "recovery.json"
    written = control.stat().st_mtime_ns
    other = argv(tmp_path / "whole")[:-1] + [str(tmp_path / "other.json")]
    other += ["--allocation", "uniform", "--no-refit", "--balance", "--seeds", "1"]
    variant = subprocess.run([sys.executable, *other], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert variant.returncode == 0, variant.stderr[-3000:]
    assert control.stat().st_mtime_ns == written
    rows = json.loads((tmp_path / "other.json").read_text())["rows"]
    assert [(r["point"], r["seed"], r["balance"], r["refit"]) for r in rows] == [
        (f"uniform{p}", 1, True, False) for p in (10, 30)
    ]
    assert (tmp_path / "whole" / "recovery" / "uniform30_balanced" / "seed1" / "recovery.json").is_file()


def test_decode_ops_bench_takes_speed_bench_ranks_and_refuses_without_cuda(tmp_path):
    """benchmarks/decode_ops_bench.py times one layer's GEMMs at the ranks speed_bench.py exports (its
    CUDA timing: docs/speed.md); without a CUDA device it says what it needs instead."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from decode_ops_bench import layer_shapes
    from speed_bench import random_models

    tiny_llama_folder(tmp_path)
    roles, ranks, kv = layer_shapes(tmp_path / "model", 0.2, 4)
    _, _, info = random_models(tmp_path / "model", tmp_path / "work", 0.0, 4, torch.float32, removed=0.2)
    assert sorted(set(ranks.values())) == info["ranks"] and set(roles) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert all(r % 4 == 0 and r <= min(roles[role]) for role, r in ranks.items()) and len(kv) == 3
    # its partial_products timings build each projection's tiles right: on the CPU the op is the
    # reference, whose sums must have the projection's outputs' shape and be finite
    from decode_ops_bench import partial_products_us

    ran = []

    def time_op(op):
        ran.append(op().sum(0))
        return 0.0

    us = partial_products_us(roles, ranks, 3, torch.float32, time_op, device="cpu")
    assert set(us) == {"qkv", "o", "gate_up", "down"} and all(set(us[g]) == {"dense", "factored"} for g in us)
    widths = [sum(roles[r][0] for r in group) for group in ("qkv", ["o"], ["gate", "up"], ["down"])]
    assert [y.shape for y in ran] == [(3, w) for w in widths for _ in range(6)]  # 2 kinds x 3 tile widths
    assert all(torch.isfinite(y).all() and y.abs().sum() > 0 for y in ran)
    if not torch.cuda.is_available():
        done = subprocess.run(
            [sys.executable, str(REPO / "benchmarks/decode_ops_bench.py"), str(tmp_path / "model")]
            + ["--json", str(tmp_path / "ops.json")],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 1 and "needs a CUDA device" in done.stderr and not (tmp_path / "ops.json").exists()


FACTORED_KERNELS_CASE = """
import json, sys, torch
sys.path.insert(0, "benchmarks")
from factored_kernel_bench import checked_designs
g = torch.Generator().manual_seed(0)
out = []
# m under one input slice and over several; n, r not multiples of any tile
for batch, n, m, r in [(1, 40, 48, 24), (3, 70, 200, 40)]:
    x, W = torch.randn(batch, m, generator=g).half(), torch.randn(n, m, generator=g).half()
    B, C = torch.randn(r, m, generator=g).half(), torch.randn(n, r, generator=g).half()
    out.append({name: err for name, _, err in checked_designs(x, W, B, C)})
print(json.dumps(out))
"""


def test_factored_kernel_bench_designs_compute_the_product_in_the_cpu_interpreter(tmp_path):
    """benchmarks/factored_kernel_bench.py's one-kernel designs of ``C (B x)`` (atomic adds over
    input and rank slices; rank slices with a loop over the inputs) and partial_products' kernel, run
    in Triton's CPU interpreter (float16: its bfloat16 conversions are wrong), against the exact
    product, at shapes that are no multiple of any tile."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-c", FACTORED_KERNELS_CASE], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for errs in json.loads(done.stdout.strip().splitlines()[-1]):
        families = {name.split("_n")[0] for name in errs}
        assert families == {"src_dense", "src_factored", "atomic", "rank_split"} and len(errs) == 40, errs
        assert max(errs.values()) < 2e-3, errs  # float16 rounding of the partial B x, no more
    import torch

    if not torch.cuda.is_available():  # it times CUDA graphs: elsewhere it says what it needs
        tiny_llama_folder(tmp_path)
        bench = [sys.executable, str(REPO / "benchmarks/factored_kernel_bench.py"), str(tmp_path / "model")]
        done = subprocess.run(bench + ["--json", str(tmp_path / "k.json")], capture_output=True, text=True)
        assert done.returncode == 1 and "needs a CUDA device" in done.stderr and not (tmp_path / "k.json").exists()
