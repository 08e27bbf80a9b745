"""benchmarks/train_bench.py's --profile breakdown, on the CPU (its CUDA path: docs/gpu.md)."""

import json
import subprocess
import sys

from conftest import REPO


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


def test_whole_model_bench_on_a_tiny_llama_folder(tmp_path):
    """The GPU preset's whole-model script (docs/whole_model.md) end to end on the CPU: every rule at every
    fraction, the refit rows, the markdown table with their columns."""
    from test_surgery import tiny_llama

    model, tok = tiny_llama(None)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    text = "".join(chr(97 + (i * 7) % 26) + (" " if i % 5 == 4 else "") for i in range(6000))
    (tmp_path / "val.txt").write_text(text)
    (tmp_path / "train.txt").write_text(text[::-1])
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
