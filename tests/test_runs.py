"""Run specs built from the config (weightpca.runs): layering, initialisation files, λ labels."""

import yaml

from weightpca import runs

from conftest import REPO


def config(**changes):
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def test_baseline_snapshots_follow_the_sketch_stage():
    cfg = config()
    d = runs.baseline_run(cfg, 5)
    assert d["name"] == "D/seed5" and d["seed"] == 5 and d["init"] == {}
    assert d["train"]["snapshot_every"] == cfg["sketch"]["snapshot_every"] > 0
    assert runs.baseline_run(config(**{"sketch.enabled": False}), 5)["train"]["snapshot_every"] == 0


def test_variant_settings_layer_train_block_variant_then_rank_override():
    cfg = config(**{"experiment.rank_overrides": [{"k": 64, "train": {"lr": 0.123}, "freeze_wte": True}]})
    b64 = runs.variant_run(cfg, "B", 64, 2, embedding="e64", baseline_model="d")
    b16 = runs.variant_run(cfg, "B", 16, 2, embedding="e16", baseline_model="d")
    a64 = runs.variant_run(cfg, "A", 64, 2, embedding="e64", baseline_model="d")
    assert b64["train"]["lr"] == 0.123 and a64["train"]["lr"] == 0.123  # the rank's override wins
    assert b16["train"]["lr"] == cfg["experiment"]["variants"]["B"]["train"]["lr"]  # the variant's own
    assert b16["train"]["max_steps"] == cfg["experiment"]["variants"]["B"]["train"]["max_steps"]
    assert a64["train"]["max_steps"] == cfg["train"]["max_steps"]  # D's budget
    assert b64["freeze"] == {"wte": True, "scale": False} and b16["freeze"]["wte"] is False
    assert b64["model"]["n_embd_wte"] == 64 and b64["name"] == "k64/B/seed2"


def test_variants_start_from_the_files_they_need():
    cfg = config()
    init = {v: runs.variant_run(cfg, v, 16, 1, embedding="emb", baseline_model="d")["init"] for v in "ABC"}
    assert init == {"A": {"embedding": "emb"}, "B": {"embedding": "emb", "model": "d"}, "C": {}}


def test_lowrank_runs_share_init_and_label_lambda_as_written_in_paths():
    cfg = config(**{"lowrank.lambdas": [0.0, 0.3, 1e-05]})
    assert [runs.lambda_label(x) for x in cfg["lowrank"]["lambdas"]] == ["0.0", "0.3", "1e-05"]
    zero, penalised = runs.lowrank_run(cfg, 0.0, 2), runs.lowrank_run(cfg, 0.3, 2)
    assert penalised["name"] == "lowrank/lambda0.3/seed2"
    assert penalised["train"]["lowrank_reg"] == {"kind": "ratio", "lambda": 0.3, "targets": ["attn", "mlp"]}
    # the control differs only in λ: same seed, model and schedule
    assert zero["seed"] == penalised["seed"] and zero["model"] == penalised["model"]
    assert {k: v for k, v in zero["train"].items() if k != "lowrank_reg"} == {
        k: v for k, v in penalised["train"].items() if k != "lowrank_reg"
    }
    assert zero["train"]["max_steps"] == cfg["lowrank"]["train"]["max_steps"]
