"""The tiny config/ci.yaml DAG end to end, in a scratch folder."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from conftest import REPO, snakemake

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def ci_results(ci_dag):
    return ci_dag


def test_dag_produces_every_artifact(ci_results):
    results, _ = ci_results
    data = results / "data" / "shakespeare"
    meta = json.loads((data / "meta.json").read_text())
    assert meta["vocab_size"] == 512 and meta["dtype"] == "uint16"
    assert (data / "train.bin").stat().st_size == 2 * meta["train_tokens"]
    assert len(meta["split"]["val_works"]) == 4
    summary = json.loads((results / "train/D/seed7/summary.json").read_text())
    assert summary["steps"] == 30 and summary["threads"] == 1
    assert (results / "benchmarks/train/D/seed7.tsv").is_file()
    assert (results / "logs/train/D/seed7.log").read_text()
    manifest = json.loads((results / "extract/D/manifest.json").read_text())
    assert manifest["wte.npy"]["shape"] == [512, 32]
    wte = np.load(results / "extract/D/wte.npy", allow_pickle=False)
    attn = load_file(str(results / "extract/D/attention.safetensors"))
    model = load_file(str(results / "train/D/seed7/model.safetensors"))
    assert np.array_equal(wte, model["transformer.wte.weight"].numpy())
    assert sorted(attn) == sorted(f"layer{i}.{m}" for i in range(2) for m in "qkv")
    fused = model["transformer.h.1.attn.c_attn.weight"]
    assert (attn["layer1.k"] == fused[32:64]).all() and attn["layer1.v"].shape == (32, 32)


def test_rerun_is_a_no_op(ci_results):
    results, cfg = ci_results
    done = snakemake(results.parent, "-n", "--cores", "1", "all", configfile=cfg)
    assert "Nothing to be done" in done.stdout + done.stderr


def test_factorisation_branch_artifacts(ci_results):
    import pandas as pd

    results, _ = ci_results
    spectrum = json.loads((results / "pca/spectrum.json").read_text())
    assert len(spectrum["singular_values"]) == 32 and set(spectrum["relative_error"]) == {"4", "16"}
    emb = load_file(str(results / "pca/k4/embedding.safetensors"))
    assert emb["transformer.wte.weight"].shape == (512, 4) and emb["scale_up"].shape == (4, 32)
    params = pd.read_csv(results / "pca/params.csv")
    assert set(params.model) == {"this config", "gpt2-small"}
    runs = pd.read_csv(results / "train/summary.csv")
    assert len(runs) == 1 + 2 * 3  # D + (A, B, C) at k = 4, 16, one seed
    b = runs[(runs.variant == "B") & (runs.k == 4)].iloc[0]
    assert b.steps == 10 and b.embedding_params == 512 * 4 + 2 * 4 * 32
    cmp = pd.read_csv(results / "train/comparisons.csv")
    assert set(cmp.comparison) == {"A vs C", "A vs D", "B vs A", "B vs D"}
    assert (cmp.verdict == "one seed: no interval").all()


def scheduled_jobs(stdout: str) -> list[tuple[str, str]]:
    """(rule, wildcards) of every job in a dry run's output."""
    jobs, rule = [], None
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith(("rule ", "localrule ")):
            rule, wildcards = line.split()[1].rstrip(":"), ""
            jobs.append([rule, wildcards])
        elif line.startswith("wildcards:") and jobs:
            jobs[-1][1] = line.split(":", 1)[1].strip()
    return [tuple(j) for j in jobs]


def test_changing_one_rank_reruns_only_that_branch(ci_results, tmp_path):
    results, cfg = ci_results
    import yaml

    changed = yaml.safe_load(cfg.read_text())
    changed["experiment"]["rank_overrides"] = [{"k": 16, "train": {"lr": 0.002}}]
    new_cfg = tmp_path / "changed.yaml"
    new_cfg.write_text(yaml.safe_dump(changed))
    done = snakemake(results.parent, "-n", "--cores", "1", "all", configfile=new_cfg)
    jobs = scheduled_jobs(done.stdout)
    trained = sorted(w for r, w in jobs if r == "train_variant")
    assert trained == sorted(f"k=16, variant={v}, seed=7" for v in "ABC"), jobs
    assert sorted({r for r, _ in jobs}) == ["all", "report", "train_summary", "train_variant"], jobs


def test_surgery_tables(ci_results):
    import pandas as pd

    results, _ = ci_results
    # SmolLM2 sweeps the default's two modes of its own (targets.smollm2.modes)
    modes = {
        "gpt": ("separate", "shared_kv", "cross_layer", "activation_aware"),
        "smollm2": ("separate", "activation_aware"),
    }
    assert not (results / "surgery/smollm2/shared_kv.csv").exists()
    for target in ("gpt", "smollm2"):
        for mode in modes[target]:
            table = pd.read_csv(results / f"surgery/{target}/{mode}.csv")
            grid = table[table.source == "grid"]
            assert list(grid.threshold) == [1.0, 0.7] and set(table.source) <= {"grid", "refine"}
            full, cut = grid.iloc[0], grid.iloc[1]
            assert abs(full.ppl - full.base_ppl) / full.base_ppl < 1e-4
            assert full.params_fraction > cut.params_fraction
            timing = json.loads((results / f"surgery/{target}/{mode}.json").read_text())
            assert timing["eval_tokens"] == 256 and timing["sweep_cost_ratio"] >= 1.0
    smol = pd.read_csv(results / "surgery/smollm2/separate.csv")
    # SmolLM2-135M: 30 layers, q 576x576, k and v 192x576 (grouped-query)
    assert smol.iloc[0].dense_q == 30 * 576 * 576 and smol.iloc[0].dense_kv == 30 * 2 * 192 * 576
    assert 5 < smol.iloc[0].base_ppl < 200  # a trained LM on Shakespeare, not noise


def test_whole_model_tables(ci_results):
    """Every allocation x removed fraction on our D, within its budget, every matrix type factored."""
    import pandas as pd

    results, _ = ci_results
    assert not (results / "surgery/smollm2/whole").exists()  # whole_model: false for this target
    for mode in ("activation_aware", "shared_kv"):
        table = pd.read_csv(results / f"surgery/gpt/whole/{mode}.csv")
        grid = table[(table.source == "grid") & ~table.refit]
        assert sorted(zip(grid.allocation, grid.removed)) == sorted(
            (a, r) for a in ("threshold", "uniform", "calibrated") for r in (0.1, 0.3)
        )
        # refit: the calibrated grid again, at the same ranks (only the whitened mode can be refit)
        refit = table[table.refit].set_index("removed")
        if mode == "shared_kv":
            assert refit.empty
        else:
            assert set(refit.allocation) == {"calibrated"} and sorted(refit.index) == [0.1, 0.3]
            plain = grid[grid.allocation == "calibrated"].set_index("removed")
            assert (refit.ranks == plain.ranks.loc[refit.index]).all()
            assert (refit.params_kept == plain.params_kept.loc[refit.index]).all()
        reachable = table[table.reachable]
        assert (reachable.fraction_kept <= 1 - reachable.removed + 1e-12).all()
        assert {"mean_rank_q", "mean_rank_v", "mean_rank_o", "mean_rank_fc", "mean_rank_proj"} <= set(table.columns)
        info = json.loads((results / f"surgery/gpt/whole/{mode}.json").read_text())
        assert (
            info["groups"] == {"activation_aware": 12, "shared_kv": 10}[mode]
            and len(info["sensitivity"]) == info["groups"]
        )
    frontier = pd.read_csv(results / "surgery/gpt/whole/frontier.csv")
    assert len(frontier) == (3 + 1 + 3) * 3  # (allocations, + refit calibrated; shared_kv's) x tolerances


def test_recovery_table_against_the_dense_control(ci_results):
    """Per seed: the recovered whole30 point and the dense control of that seed, both after the same steps;
    the recovered model exported factored and reloaded."""
    import pandas as pd

    from weightpca.compress import load_compressed

    results, _ = ci_results
    table = pd.read_csv(results / "recovery/gpt/recovery.csv")
    assert sorted(table.seed) == [1, 2] and set(table.point) == {"whole30"} and (table.steps == 8).all()
    for r in table.itertuples():
        control = json.loads((results / f"recovery/gpt/dense/seed{r.seed}/recovery.json").read_text())
        point = json.loads((results / f"recovery/gpt/whole30/seed{r.seed}/recovery.json").read_text())
        assert (r.control_after, r.ppl_after, r.ppl_before) == (
            control["ppl_after"],
            point["ppl_after"],
            point["ppl_before"],
        )
        assert r.ratio_to_control == pytest.approx(r.ppl_after / r.control_after)
        assert point["val_tokens"] == control["val_tokens"] and not control["compressed"]
        assert abs(r.ppl_loaded / r.ppl_after - 1) <= 1e-3
        model = load_compressed(results / f"recovery/gpt/whole30/seed{r.seed}/recovered")
        assert sum(p.numel() for p in model.parameters()) == point["params"]
    whole = json.loads((results / "compress/gpt/whole30/compress.json").read_text())
    assert table.fraction_kept.iloc[0] == pytest.approx(whole["params_factored"] / whole["params_dense"])
    # the dense control starts from the original: its "before" is D's own perplexity on those tokens
    assert table.control_before.nunique() == 1


def test_an_onnx_export_runs_in_onnxruntime_without_weightpca(ci_results):
    """ci.yaml's whole30 point (onnx: true): both models exported, run by onnxruntime in a process that can
    import neither weightpca nor torch, logits equal to PyTorch's, every regime timed."""
    results, _ = ci_results
    folder = results / "compress/gpt/whole30/onnx"
    o = json.loads((folder / "onnx.json").read_text())
    for name in ("dense", "factored"):
        assert o[name]["imported"] == {"weightpca": False, "torch": False}
        assert o[name]["relative_error"] <= o["logits_tolerance"] == 1e-4
        assert o[name]["bytes"] == (folder / f"{name}.onnx").stat().st_size
    assert o["factored"]["bytes"] < o["dense"]["bytes"]
    assert [r["regime"] for r in o["regimes"]] == ["prefill 1x32", "prefill 2x32", "decode batch 1", "decode batch 2"]
    assert all(r["dense_tokens_per_s"] > 0 and r["factored_tokens_per_s"] > 0 for r in o["regimes"])


def test_compressed_exports_are_smaller_reload_and_are_timed(ci_results):
    import pandas as pd

    results, _ = ci_results
    for target, point in (("gpt", "aa_tol5"), ("smollm2", "aa_t99"), ("gpt", "whole30")):
        folder = results / f"compress/{target}/{point}"
        record = json.loads((folder / "compress.json").read_text())
        assert record["bytes_factored"] < record["bytes_dense"]
        assert record["bytes_factored"] == (folder / "model.safetensors").stat().st_size
        # stored in the model's own dtype (SmolLM2's target says bfloat16), evaluated in float32 on the CPU
        assert record["dtype"] == ("bfloat16" if target == "smollm2" else "float32")
        assert record["eval_dtype"] == "float32"
        assert abs(record["ppl_loaded"] / record["ppl_reconstructed"] - 1) <= record["reload_tolerance"]
        assert record["reload_tolerance"] == (2e-2 if target == "smollm2" else 1e-3)
        assert record["params_factored"] < record["params_dense"] and record["matrices_factored"] > 0
        for model in ("dense", "factored"):
            speed = record["speed"][model]
            assert speed["device"].startswith("cpu") and speed["dtype"] == "float32"
            # ci.yaml's regimes: prefill 1 x 64 and 2 x 64 (capped at D's 32 positions), decode batches 1 and 2
            context = 32 if target == "gpt" else 64
            assert [(r["batch"], r["context"]) for r in speed["prefill"]] == [(1, context), (2, context)]
            assert [r["batch"] for r in speed["decode"]] == [1, 2]
            for r in speed["prefill"] + speed["decode"]:
                assert r["tokens_per_s"] > 0 and len(r["seconds"]) == r["repeats"] == 2
                assert 0 < r["bound_tokens_per_s"] < float("inf")
            assert not any(r["cuda_graph"] for r in speed["decode"])
    smol = json.loads((results / "compress/smollm2/aa_t99/compress.json").read_text())
    # bfloat16: half of float32's bytes for both (the ratio of the two unchanged by the dtype)
    assert smol["bytes_dense"] < 0.51 * smol["params_dense"] * 4
    gpt = json.loads((results / "compress/gpt/aa_tol5/compress.json").read_text())
    frontier = pd.read_csv(results / "surgery/gpt/frontier.csv")
    row = frontier[(frontier["mode"] == "activation_aware") & (frontier.tolerance == 0.05)].iloc[0]
    assert gpt["threshold"] == row.threshold and gpt["matrices"] == ["qkv", "o", "mlp"]
    # a whole-model point: the calibrated ranks of the sweep's 30 % point, refit, every matrix type factored
    whole = json.loads((results / "compress/gpt/whole30/compress.json").read_text())
    sweep = pd.read_csv(results / "surgery/gpt/whole/activation_aware.csv")
    row = sweep[(sweep.allocation == "calibrated") & (sweep.removed == 0.3) & (sweep.source == "grid") & sweep.refit]
    row = row.iloc[0]
    assert whole["refit"]
    assert whole["params_factored"] == row.params_kept and whole["params_factored"] <= 0.7 * whole["params_dense"]
    assert whole["ppl_reconstructed"] == pytest.approx(row.ppl, rel=1e-6) and whole["matrices"] == ["qkv", "o", "mlp"]
    assert whole["bytes_factored"] < 0.72 * whole["bytes_dense"]
    # the benchmark script re-measures an export from its folder
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks/compress_bench.py"),
            str(results / "compress/gpt/aa_tol5"),
            "--prefill",
            "1x16",
            "2x8",
            "--decode-batches",
            "1",
            "2",
            "--new-tokens",
            "2",
            "--repeats",
            "1",
            "--device",
            "cpu",
        ],
        cwd=results.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for regime in ("prefill 1x16", "prefill 2x8", "decode batch 1", "decode batch 2"):
        assert f"| {regime} |" in done.stdout


def test_sketch_on_snapshots(ci_results):
    results, _ = ci_results
    snapshots = sorted((results / "train/D/seed7/snapshots").glob("*.safetensors"))
    assert [p.name for p in snapshots] == [f"step_{s:08d}.safetensors" for s in (5, 10, 15, 20, 25, 30)]
    errors = {
        m: json.loads((results / f"sketch/{m}/k2_r8_centered/errors.json").read_text())
        for m in ("exact", "seed_srht", "srht", "gaussian")
    }
    n_params = sum(v.numel() for v in load_file(str(snapshots[0])).values())
    assert errors["exact"]["D"] == n_params and errors["exact"]["n_samples"] == 6
    # r = 8 >= 6 samples: the range sketch holds every direction, so the correct sketch is optimal
    assert errors["srht"]["mean_error_ratio_to_optimum"] < 1.01
    assert errors["seed_srht"]["mean_error_ratio_to_optimum"] > 1.5
    W = np.load(results / "sketch/srht/k2_r8_centered/W.npy", allow_pickle=False)
    assert W.shape == (n_params, 2)


def test_lowrank_branch(ci_results):
    """λ ∈ {0, 1} at seed 7: same init, the penalty concentrates the spectrum, sweep.csv per model."""
    import pandas as pd

    results, _ = ci_results
    control = json.loads((results / "lowrank/lambda0.0/seed7/summary.json").read_text())
    penalised = json.loads((results / "lowrank/lambda1.0/seed7/summary.json").read_text())
    assert control["steps"] == penalised["steps"] == 20
    assert penalised["final_lowrank_value"] > control["final_lowrank_value"]
    metrics = pd.read_csv(results / "lowrank/lambda1.0/seed7/metrics.csv")
    assert metrics.lowrank_value.notna().all()
    for lam in ("0.0", "1.0"):
        sweep = pd.read_csv(results / f"lowrank/lambda{lam}/seed7/sweep.csv")
        assert list(sweep.fraction) == [1.0, 0.5, 0.25] and (sweep["lambda"] == float(lam)).all()
        assert sweep.params_kept.is_monotonic_decreasing and sweep.params_kept.iloc[0] == sweep.params_total.iloc[0]
        # the untruncated point is the trained model's own validation loss
        assert sweep.val_loss.iloc[0] == pytest.approx(
            json.loads((results / f"lowrank/lambda{lam}/seed7/summary.json").read_text())["final_val_loss"], rel=1e-5
        )


def test_jobs_reserve_cores_per_real_cpu(tmp_path):
    """--cores above the CPU count (the README's --cores 8 on a laptop) must not oversubscribe the CPU:
    a one-thread job reserves cores/CPUs of Snakemake's cores, so at most one such job runs per CPU."""
    import os
    import re

    from conftest import write_config

    cfg = write_config(tmp_path / "ci.yaml")
    cpus = len(os.sched_getaffinity(0))
    out = snakemake(tmp_path, "-n", "--cores", str(4 * cpus), "all", configfile=cfg).stdout
    block = re.search(r"rule train_baseline:(.*?)\n\n", out, re.S).group(1)
    assert re.search(r"threads: (\d+)", block).group(1) == str(4)  # 1 thread x (4·cpus // cpus)
    out = snakemake(tmp_path, "-n", "--cores", "1", "all", configfile=cfg).stdout
    block = re.search(r"rule train_baseline:(.*?)\n\n", out, re.S).group(1)
    assert "threads: 1" in block or "threads:" not in block


def test_readme_slurm_command_keeps_every_gpu_request(tmp_path):
    """The README's Slurm command, with only the site names changed, gives every GPU rule its GPU and
    every rule the profile's memory (resolved resources of a dry run)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Run on a Slurm cluster") :]
    block = section[section.index("```sh") + 5 : section.index("```", section.index("```sh") + 5)]
    lines = [line for line in block.strip().splitlines() if line.startswith(("export ", "snakemake "))]
    assert [line.split()[0] for line in lines] == ["export", "snakemake"], block
    site = {"cpu": "cpu-test", "gpu": "gpu-test", "myproject": "acct-test"}
    export = " ".join(re.sub(r"=(\S+)", lambda m: "=" + site[m.group(1)], word) for word in lines[0].split())
    assert export.count("-test") == 3, export
    command = lines[1].replace("snakemake ", f"{sys.executable} -m snakemake --directory {tmp_path} ", 1)
    done = subprocess.run(
        ["bash", "-c", f"{export} && {command} -n"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    jobs = re.findall(r"^(?:local)?rule (\w+):\n(?:.*\n)*?\s+resources: (.*)$", done.stdout, re.M)
    assert jobs, done.stdout[-3000:]
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    gpu_rules = {r for r, res in profile["set-resources"].items() if res.get("gpu")}
    assert {"train_baseline", "train_variant", "surgery", "lowrank_sweep"} <= gpu_rules
    seen = set()
    for rule, text in jobs:
        res = dict(item.split("=", 1) for item in text.split(", "))
        wanted = {**profile["default-resources"], **profile["set-resources"].get(rule, {})}
        assert int(res["mem_mb"]) == wanted["mem_mb"], rule
        assert res["slurm_account"] == "acct-test", rule
        if rule in gpu_rules:
            seen.add(rule)
            assert res.get("gpu") == "1" and res["slurm_partition"] == "gpu-test", (rule, res)
        else:
            assert "gpu" not in res and res["slurm_partition"] == "cpu-test", (rule, res)
    assert gpu_rules & {"train_baseline", "train_variant", "surgery"} <= seen


@pytest.mark.parametrize("teacher", ["original", "control"])
def test_distilling_from_the_control_makes_each_point_wait_for_it(tmp_path, teacher):
    """distill.teacher: control adds the trained control of the point's seed to the point's inputs."""
    import re

    from conftest import write_config

    cfg = write_config(tmp_path / "ci.yaml", **{"recovery.distill": {"weight": 0.5, "teacher": teacher}})
    dag = snakemake(tmp_path, "--dag", "--cores", "1", "all", configfile=cfg).stdout
    labels = dict(re.findall(r'\t(\d+)\[label = "(\w+)', dag))
    edges = {(labels[a], labels[b]) for a, b in re.findall(r"\t(\d+) -> (\d+)", dag)}
    assert (("recovery_control", "recovery_point") in edges) == (teacher == "control")
    assert ("compress", "recovery_point") in edges
