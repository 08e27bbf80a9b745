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
