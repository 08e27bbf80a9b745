"""Checks on the workflow configuration that a JSON schema cannot express.

``config/schema.yaml`` (enforced by ``snakemake.utils.validate``) covers types,
ranges and unknown keys; ``check_config`` covers relations between keys. Both
run when the Snakefile is parsed, before any job starts. Every message names
the key to fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .hf_folder import HFFolderError, check_hf_folder


class ConfigError(ValueError):
    pass


def merged_config(*paths) -> dict:
    """The configuration Snakemake builds from ``config/config.yaml`` and ``--configfile`` presets: each
    file merged over the ones before it, mappings key by key, any other value replaced (for scripts that
    run a stage's library calls outside the workflow, e.g. benchmarks/recovery_bench.py)."""
    import yaml

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    config: dict = {}
    for path in paths:
        config = merge(config, yaml.safe_load(Path(path).read_text()) or {})
    return config


def check_config(config: dict) -> None:
    model, train, tok, corpus = config["model"], config["train"], config["tokenizer"], config["corpus"]
    d = model["n_embd"]
    if d % model["n_head"]:
        raise ConfigError(f"model.n_embd ({d}) must be divisible by model.n_head ({model['n_head']})")
    k = model.get("n_embd_wte")
    if k is not None and k > d:
        raise ConfigError(f"model.n_embd_wte ({k}) must not exceed model.n_embd ({d})")
    if tok["kind"] == "bpe" and tok.get("dtype", "auto") != "auto":
        limit = np.iinfo(np.dtype(tok["dtype"])).max + 1
        if tok["vocab_size"] > limit:
            raise ConfigError(
                f"tokenizer.vocab_size ({tok['vocab_size']}) does not fit tokenizer.dtype "
                f"{tok['dtype']} (at most {limit}); use uint32 or auto"
            )
    if train["min_lr"] > train["lr"]:
        raise ConfigError(f"train.min_lr ({train['min_lr']}) must not exceed train.lr ({train['lr']})")
    if train["warmup_steps"] > train["max_steps"]:
        raise ConfigError(
            f"train.warmup_steps ({train['warmup_steps']}) exceeds train.max_steps ({train['max_steps']})"
        )
    if train.get("compile") and config["device"] == "cpu":
        raise ConfigError("train.compile is CUDA-only; set it false or device to auto/cuda")
    fact = config.get("factorize")
    if fact:
        vocab = tok.get("vocab_size") if tok["kind"] == "bpe" else None
        for k in fact["ranks"]:
            if k >= d:
                raise ConfigError(
                    f"factorize.ranks: k={k} must be smaller than model.n_embd ({d}); "
                    f"a rank-{d} embedding is no compression"
                )
            if vocab is not None and k >= vocab:
                raise ConfigError(f"factorize.ranks: k={k} must be smaller than tokenizer.vocab_size ({vocab})")
        for i, o in enumerate(config["experiment"].get("rank_overrides", [])):
            if o["k"] not in fact["ranks"]:
                raise ConfigError(
                    f"experiment.rank_overrides[{i}].k = {o['k']} is not one of factorize.ranks {fact['ranks']}"
                )
    surgery = config.get("surgery")
    if surgery:
        scans = surgery["enabled"] and surgery["sensitivity"]["enabled"]
        layer_tokens = surgery["sensitivity"]["layer_tokens"] if scans else None
        for name, t in surgery["targets"].items():
            # a target's evaluation window: ours its block size, a Hugging Face model surgery.window
            ours = t["kind"] == "gpt"
            window, key = (model["block_size"], "model.block_size") if ours else (surgery["window"], "surgery.window")
            if layer_tokens is not None and layer_tokens < window:
                raise ConfigError(
                    f"surgery.sensitivity.layer_tokens ({layer_tokens}) is shorter than one evaluation window of "
                    f"target {name} ({key} = {window}); give at least {window}, or null for all its eval_tokens"
                )
            if t["kind"] == "hf" and t.get("path"):
                try:  # headers and config.json only: a job would fail on these much later
                    check_hf_folder(t["path"])
                except HFFolderError as e:
                    raise ConfigError(f"surgery.targets.{name}.path: {e}") from None
    compress = config.get("compress")
    if compress and compress["enabled"]:
        names = [(p["target"], p["name"]) for p in compress["points"]]
        if len(set(names)) != len(names):
            raise ConfigError(f"compress.points: a name is used twice for one target ({names})")
        for i, point in enumerate(compress["points"]):
            where = f"compress.points[{i}] ({point['name']})"
            if not surgery or point["target"] not in surgery["targets"]:
                raise ConfigError(
                    f"{where}: target '{point['target']}' is not in surgery.targets; remove the "
                    f"point from compress.points or set compress.enabled: false"
                )
            if "tolerance" in point:
                if not surgery["enabled"]:
                    raise ConfigError(
                        f"{where}: a tolerance is read from the surgery frontier, but "
                        f"surgery.enabled is false; give a threshold instead, or set "
                        f"compress.enabled: false"
                    )
                listed, key = surgery["tolerances"], "surgery.tolerances"
                if "allocation" in point:  # bisected by the whole-model sweep of its target
                    listed = target_whole_model(surgery, point["target"]).get("tolerances", listed)
                    key = f"the whole-model tolerances of target {point['target']}"
                if point["tolerance"] not in listed:
                    raise ConfigError(f"{where}: tolerance {point['tolerance']} is not one of {key} {listed}")
                modes = target_modes(surgery, point["target"])
                if "allocation" not in point and point["mode"] not in modes:
                    raise ConfigError(
                        f"{where}: mode '{point['mode']}' is not swept for target {point['target']} (its modes "
                        f"{modes}); add it to surgery.targets.{point['target']}.modes or pick one of those"
                    )
            if "allocation" in point:
                _check_whole_model_point(where, point, surgery)
    if surgery and surgery["whole_model"]["enabled"]:
        for name in surgery["targets"]:
            whole = target_whole_model(surgery, name)
            extra = [a for a in whole["refit"] if a not in whole["allocation"]]
            if extra:
                raise ConfigError(
                    f"surgery.whole_model.refit ({name}): {extra} not in surgery.whole_model.allocation "
                    f"{whole['allocation']}; a refit measures an allocation again, so add it there or remove it"
                )
    recovery = config.get("recovery")
    if recovery and recovery["enabled"]:
        points = {(p["target"], p["name"]) for p in compress["points"]} if compress and compress["enabled"] else set()
        for i, r in enumerate(recovery["points"]):
            where = f"recovery.points[{i}] ({r['target']}/{r['point']})"
            if (r["target"], r["point"]) not in points:
                raise ConfigError(
                    f"{where}: no compress point '{r['point']}' of target '{r['target']}' (compress.points, "
                    "compress.enabled); recovery fine-tunes an exported point"
                )
            if r["point"] == "dense":
                raise ConfigError(f"{where}: 'dense' names the control's folder; rename the compress point")
        unknown = sorted(set(recovery["target_train"]) - {r["target"] for r in recovery["points"]})
        if unknown:
            raise ConfigError(
                f"recovery.target_train: {unknown} recover no point (recovery.points); remove them or add a point"
            )
    sketch = config.get("sketch")
    if sketch and sketch["enabled"]:
        n_snapshots = train["max_steps"] // sketch["snapshot_every"]
        for k in sketch["ks"]:
            if k >= n_snapshots:
                raise ConfigError(
                    f"sketch.ks: k={k} must be smaller than the number of snapshots ({n_snapshots} = "
                    f"train.max_steps {train['max_steps']} // sketch.snapshot_every {sketch['snapshot_every']})"
                )
        if sketch["methods"] and "exact" not in sketch["methods"]:
            raise ConfigError("sketch.methods must include 'exact': it is the yardstick of every other method")
    archive = corpus.get("archive")
    if archive and not Path(archive).is_file():
        raise ConfigError(f"corpus.archive: file '{archive}' does not exist")
    if corpus["source"] == "hf_dataset":
        for split, path in (corpus.get("data_files") or {}).items():
            if "://" not in path and not Path(path).is_file():
                raise ConfigError(f"corpus.data_files.{split}: file '{path}' does not exist")


def target_modes(surgery: dict, target: str) -> list[str]:
    """The q/k/v sweep modes of one target: its own `modes`, else surgery.modes."""
    return surgery["targets"][target].get("modes") or surgery["modes"]


def target_whole_model(surgery: dict, target: str) -> dict:
    """surgery.whole_model with the target's own `removed`, `refit` and `tolerances` where its `whole_model`
    sets them (without its own `tolerances`, none: the caller's surgery.tolerances apply)."""
    own = surgery["targets"][target].get("whole_model", True)
    return {**surgery["whole_model"], **(own if isinstance(own, dict) else {})}


def _check_whole_model_point(where: str, point: dict, surgery: dict) -> None:
    """A compress point with an allocation reads the whole-model sweep of its target and mode."""
    whole, target = target_whole_model(surgery, point["target"]), surgery["targets"][point["target"]]
    if not (surgery["enabled"] and whole["enabled"] and target.get("whole_model", True) is not False):
        raise ConfigError(
            f"{where}: a whole-model point reads the whole-model sweep of '{point['target']}', which does not "
            "run (surgery.enabled, surgery.whole_model.enabled, the target's whole_model); enable it or remove "
            "the point"
        )
    for key, listed in (("mode", "modes"), ("allocation", "allocation")):
        if point[key] not in whole[listed]:
            raise ConfigError(f"{where}: {key} '{point[key]}' is not in surgery.whole_model.{listed} {whole[listed]}")
    if "removed" in point and point["removed"] not in whole["removed"]:
        raise ConfigError(
            f"{where}: removed {point['removed']} is not one of surgery.whole_model.removed {whole['removed']} "
            f"(of target {point['target']})"
        )
    if point.get("refit"):
        if "removed" not in point:
            raise ConfigError(f"{where}: refit points are measured at surgery.whole_model.removed; give removed")
        if point["allocation"] not in whole["refit"] or point["mode"] != "activation_aware":
            raise ConfigError(
                f"{where}: refit needs mode activation_aware and its allocation in surgery.whole_model.refit "
                f"{whole['refit']}"
            )
