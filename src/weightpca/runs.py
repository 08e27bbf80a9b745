"""Run specs: the settings of every training run of the DAG, built from the validated config.

A run spec is the plain dict :func:`weightpca.train.train` takes:

    {"name", "group", "seed", "model": {...}, "train": {...}, "init": {...}, "freeze": {...}}

The workflow passes it to the training rules as ``params:``, so Snakemake
reruns exactly the runs whose spec changed (and what consumes them). Input
files (``init``) are paths the rules declare; this module only places them.
"""

from __future__ import annotations


def snapshot_every(config: dict) -> int:
    """D's weight-snapshot interval: the sketch stage's samples (0 when that stage is off)."""
    sketch = config["sketch"]
    return sketch["snapshot_every"] if sketch["enabled"] else 0


def baseline_name(seed: int) -> str:
    return f"D/seed{seed}"


def variant_name(variant: str, k: int, seed: int) -> str:
    return f"k{k}/{variant}/seed{seed}"


def baseline_run(config: dict, seed: int) -> dict:
    """Baseline D at one seed: the config's model and train blocks."""
    return {
        "name": baseline_name(seed),
        "group": "D",
        "seed": seed,
        "model": config["model"],
        "train": dict(config["train"], snapshot_every=snapshot_every(config)),
        "init": {},
        "freeze": {},
    }


def variant_settings(config: dict, variant: str, k: int) -> tuple[dict, bool, bool, bool]:
    """(train settings, freeze_wte, freeze_scale, tie_scale) of one variant at rank k.

    Layers, later winning: the train block, the variant's settings, then the
    rank's entry in experiment.rank_overrides.
    """
    v = config["experiment"]["variants"][variant]
    over = next((o for o in config["experiment"].get("rank_overrides", []) if o["k"] == k), {})
    train = {**config["train"], **v.get("train", {}), **over.get("train", {})}

    def flag(key):
        return over.get(key, v.get(key, False))

    return train, flag("freeze_wte"), flag("freeze_scale"), flag("tie_scale")


def variant_init(variant: str, embedding: str, baseline_model: str) -> dict:
    """Files a variant starts from: A and B the PCA embedding at its rank, B also D's other weights."""
    init = {}
    if variant in ("A", "B"):
        init["embedding"] = embedding
    if variant == "B":
        init["model"] = baseline_model
    return init


def variant_run(config: dict, variant: str, k: int, seed: int, embedding: str, baseline_model: str) -> dict:
    """One A/B/C run at rank k; only this rank's overrides reach it.

    ``embedding`` is the factorisation at rank k, ``baseline_model`` D's
    weights (B's initialisation); a variant uses only the files it needs.
    """
    train, freeze_wte, freeze_scale, tie_scale = variant_settings(config, variant, k)
    model = dict(config["model"], n_embd_wte=k, tie_scale=tie_scale, embd_bias=config["factorize"]["centered"])
    return {
        "name": variant_name(variant, k, seed),
        "group": f"k{k}",
        "seed": seed,
        "model": model,
        "train": train,
        "init": variant_init(variant, embedding, baseline_model),
        "freeze": {"wte": freeze_wte, "scale": freeze_scale},
    }


def lowrank_train(config: dict) -> dict:
    """D's train block with the λ sweep's overrides (the penalty itself is added per λ)."""
    return {**config["train"], **config["lowrank"].get("train", {})}


def lambda_label(lam) -> str:
    """λ as it appears in run names and paths: a float's repr (0.0, 0.05, 1e-05)."""
    return repr(float(lam))


def lowrank_run(config: dict, lam, seed: int) -> dict:
    """One D-shaped run of the λ sweep: D's train block, the sweep's overrides, the penalty at λ.

    Every λ of a seed starts from the same weights and sees the same batches
    (both follow the seed), so λ = 0 is the control.
    """
    lr = config["lowrank"]
    reg = {"kind": lr["kind"], "lambda": lam, "targets": lr["targets"]}
    return {
        "name": f"lowrank/lambda{lambda_label(lam)}/seed{seed}",
        "group": "lowrank",
        "seed": seed,
        "model": config["model"],
        "train": {**lowrank_train(config), "lowrank_reg": reg},
        "init": {},
        "freeze": {},
    }


def recovery_run(config: dict, target: str, point: str, seed: int) -> dict:
    """One run of a recovery: a compress point, or ``point`` "dense" (the control: the original). Both
    take the train block with the recipe's overrides (``recovery.train``, then the target's own in
    ``recovery.target_train``) and the seed, hence the same batches; the recipe's lora, distill and balance are
    part of the run, so that changing them retrains (checkpoints included). Our GPT trains at its own
    block size; a Hugging Face target on windows of ``surgery.window`` tokens, evaluated on its surgery
    evaluation tokens (the first of its val.bin: the tokens its sweep measured)."""
    rec, surgery = config["recovery"], config["surgery"]
    train = {**config["train"], **rec["train"], **rec["target_train"].get(target, {})}
    model = config["model"]
    own = surgery["targets"][target]
    if own["kind"] != "gpt":
        model = {"block_size": surgery["window"]}
        train["eval_tokens"] = own.get("eval_tokens") or surgery["eval_tokens"]
    return {
        "name": f"recovery/{target}/{point}/seed{seed}",
        "group": "recovery",
        "seed": seed,
        "model": model,
        "train": train,
        "recipe": {"lora": rec["lora"], "distill": rec["distill"], "balance": rec["balance"]},
        "init": {},
        "freeze": {},
    }
