"""Malformed configurations: each refused before any job starts, with a message naming the key or file."""

import re

import pytest

from conftest import REMOVE, snakemake, write_config

BAD = [
    # (id, overrides, expected message)
    ("wrong type lr", {"train.lr": "fast"}, r"'fast' is not of type 'number'[\s\S]*\['train'\]\['lr'\]"),
    (
        "negative lr",
        {"train.lr": -0.001},
        r"-0.001 is less than or equal to the minimum of 0[\s\S]*\['train'\]\['lr'\]",
    ),
    ("unknown train key", {"train.lrr": 0.1}, r"'lrr' was unexpected"),
    ("unknown top-level key", {"trian": {}}, r"'trian' was unexpected"),
    ("missing required key", {"train.batch_size": REMOVE}, r"'batch_size' is a required property"),
    ("fractional layers", {"model.n_layer": 2.5}, r"\['model'\]\['n_layer'\]"),
    ("k > d in model", {"model.n_embd_wte": 64}, r"model\.n_embd_wte \(64\) must not exceed model\.n_embd \(32\)"),
    ("heads do not divide d", {"model.n_head": 3}, r"model\.n_embd \(32\) must be divisible by model\.n_head \(3\)"),
    ("rank k >= d", {"factorize.ranks": [4, 32]}, r"factorize\.ranks: k=32 must be smaller than model\.n_embd \(32\)"),
    ("rank not an integer", {"factorize.ranks": [4.5]}, r"4\.5 is not of type 'integer'"),
    ("ranks empty", {"factorize.ranks": []}, r"\[\] should be non-empty|\[\] is too short"),
    ("unknown variant", {"experiment.variants.E": {}}, r"'E' was unexpected"),
    (
        "override of unknown rank",
        {"experiment.rank_overrides": [{"k": 8}]},
        r"experiment\.rank_overrides\[0\]\.k = 8 is not one of factorize\.ranks",
    ),
    ("threshold above 1", {"surgery.thresholds": [1.0, 1.5]}, r"1\.5 is greater than the maximum of 1"),
    ("threshold zero", {"surgery.thresholds": [0.0]}, r"0\.0 is less than or equal to the minimum of 0"),
    ("unknown surgery mode", {"surgery.modes": ["joint"]}, r"'joint' is not one of"),
    (
        "model id format",
        {"surgery.targets.tiny": {"kind": "hf", "model_id": "not a model id"}},
        r"'not a model id' does not match",
    ),
    ("hf target without id or path", {"surgery.targets.tiny": {"kind": "hf"}}, r"\['surgery'\]\['targets'\]\['tiny'\]"),
    (
        "target path missing",
        {"surgery.targets.tiny": {"kind": "hf", "path": "/nonexistent/model"}},
        r"surgery\.targets\.tiny\.path: /nonexistent/model: folder does not exist",
    ),
    (
        "compress point of unknown target",
        {"compress.points": [{"name": "p", "target": "tiny", "mode": "separate", "threshold": 0.9}]},
        r"compress\.points\[0\] \(p\): target 'tiny' is not in surgery\.targets",
    ),
    (
        "compress tolerance without surgery",
        {"surgery.enabled": False},
        r"compress\.points\[0\] \(aa_tol5\): a tolerance is read from the surgery frontier, but surgery\.enabled is "
        r"false; give a threshold instead, or set compress\.enabled: false",
    ),
    (
        "compress tolerance not swept",
        {"compress.points": [{"name": "p", "target": "gpt", "mode": "separate", "tolerance": 0.2}]},
        r"compress\.points\[0\] \(p\): tolerance 0\.2 is not one of surgery\.tolerances",
    ),
    (
        "compress point with threshold and tolerance",
        {"compress.points": [{"name": "p", "target": "gpt", "mode": "separate", "threshold": 0.9, "tolerance": 0.05}]},
        r"is valid under each of|should not be valid under|\['compress'\]\['points'\]",
    ),
    (
        "compress without q/k/v",
        {
            "compress.points": [
                {"name": "p", "target": "gpt", "mode": "separate", "threshold": 0.9, "matrices": ["mlp"]}
            ]
        },
        r"\['compress'\]\['points'\]\[0\]\['matrices'\]|does not contain",
    ),
    (
        "whole-model point at an unswept fraction",
        {
            "compress.points": [
                {"name": "p", "target": "gpt", "mode": "activation_aware", "removed": 0.25, "allocation": "uniform"}
            ]
        },
        r"compress\.points\[0\] \(p\): removed 0\.25 is not one of surgery\.whole_model\.removed",
    ),
    (
        "refit point of an allocation not refit",
        {
            "compress.points": [
                {
                    "name": "p",
                    "target": "gpt",
                    "mode": "activation_aware",
                    "removed": 0.3,
                    "allocation": "uniform",
                    "refit": True,
                }
            ]
        },
        r"refit needs mode activation_aware and its allocation in surgery\.whole_model\.refit \['calibrated'\]",
    ),
    (
        "refit of an allocation not measured",
        {"surgery.whole_model.allocation": ["uniform"], "compress.enabled": False},
        r"surgery\.whole_model\.refit \(gpt\): \['calibrated'\] not in surgery\.whole_model\.allocation",
    ),
    (
        "recovery recipe of a target without a recovered point",
        {"recovery.target_train": {"smollm2": {"lr": 0.001}}},
        r"recovery\.target_train: \['smollm2'\] recover no point",
    ),
    (
        "whole-model point at a tolerance its target does not bisect",
        {
            "surgery.targets.gpt.whole_model": {"removed": [0.1, 0.3], "refit": ["calibrated"], "tolerances": [0.1]},
            "compress.points": [
                {
                    "name": "w5",
                    "target": "gpt",
                    "mode": "activation_aware",
                    "allocation": "calibrated",
                    "tolerance": 0.05,
                }
            ],
            "recovery.enabled": False,
        },
        r"tolerance 0\.05 is not one of the whole-model tolerances of target gpt \[0\.1\]",
    ),
    (
        "tolerance point of a mode its target does not sweep",
        {
            "surgery.targets.gpt.modes": ["separate"],
            "compress.points": [{"name": "aa", "target": "gpt", "mode": "activation_aware", "tolerance": 0.05}],
            "recovery.enabled": False,
        },
        r"mode 'activation_aware' is not swept for target gpt \(its modes \['separate'\]\); add it to "
        r"surgery\.targets\.gpt\.modes",
    ),
    (
        "sensitivity probes shorter than one evaluation window",
        {"surgery.sensitivity.layer_tokens": 128},
        r"surgery\.sensitivity\.layer_tokens \(128\) is shorter than one evaluation window of target smollm2 "
        r"\(surgery\.window = 256\); give at least 256, or null",
    ),
    ("unknown W&B mode", {"wandb.mode": "sometimes"}, r"'sometimes' is not one of[\s\S]*\['wandb'\]\['mode'\]"),
    (
        "corpus archive missing",
        {"corpus.archive": "/nonexistent/shakespeare.tar.gz"},
        r"corpus\.archive: file '/nonexistent/shakespeare\.tar\.gz' does not exist",
    ),
    ("unknown corpus source", {"corpus.source": "ftp"}, r"'ftp' is not one of"),
    (
        "vocab too large for dtype",
        {"tokenizer.vocab_size": 70000, "tokenizer.dtype": "uint16"},
        r"tokenizer\.vocab_size \(70000\) does not fit tokenizer\.dtype uint16",
    ),
    (
        "warmup beyond budget",
        {"train.warmup_steps": 1000},
        r"train\.warmup_steps \(1000\) exceeds train\.max_steps \(30\)",
    ),
    ("sketch k >= snapshots", {"sketch.ks": [6]}, r"sketch\.ks: k=6 must be smaller than the number of snapshots \(6"),
    ("sketch without exact", {"sketch.methods": ["srht"]}, r"sketch\.methods must include 'exact'"),
    ("bad device", {"device": "tpu"}, r"'tpu' does not match[\s\S]*\['device'\]"),
]


@pytest.mark.parametrize("overrides,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_refused_before_any_job(tmp_path, overrides, message):
    cfg = write_config(tmp_path / "bad.yaml", **overrides)
    # the file replaces config/config.yaml instead of being merged over it, so
    # that a missing key stays missing
    done = snakemake(tmp_path, "-n", "--cores", "1", "--replace-workflow-config", configfile=cfg, check=False)
    assert done.returncode != 0
    assert re.search(message, done.stdout + done.stderr), done.stdout + done.stderr
    assert not (tmp_path / "results").exists()


def test_yaml_syntax_error_refused(tmp_path):
    # Snakemake parses --configfile itself, before the workflow runs, and its
    # message does not repeat the path (the one file given on the command line)
    bad = tmp_path / "broken.yaml"
    bad.write_text("train:\n  lr: [0.1\n")
    done = snakemake(tmp_path, "-n", "--cores", "1", configfile=bad, check=False)
    assert done.returncode != 0
    assert "Config file is not valid JSON or YAML" in done.stdout + done.stderr
    assert not (tmp_path / "results").exists()


def test_missing_config_file_named(tmp_path):
    done = snakemake(tmp_path, "-n", "--cores", "1", configfile=tmp_path / "nope.yaml", check=False)
    assert done.returncode != 0 and "nope.yaml" in done.stdout + done.stderr
