"""Input functions and file lists of the recovery stage (workflow/rules/recovery.smk)."""

RECOVERY = config["recovery"]


def recovery_points():
    """(target, point) of every recovered compress point; none when the stage is off."""
    if not RECOVERY["enabled"]:
        return []
    return [(r["target"], r["point"]) for r in RECOVERY["points"]]


def recovery_targets():
    return list(dict.fromkeys(t for t, _ in recovery_points()))


def recovery_tokens(wildcards):
    """The model's token files and the dense original (the control, and the teacher of a distilling
    recipe): our GPT's corpus tokens and D, or a Hugging Face target's own tokens and its prepared folder.
    """
    if surgery_target(wildcards.target)["kind"] == "gpt":
        return {
            "meta": rules.tokenize.output.meta,
            "train": rules.tokenize.output.train,
            "val": rules.tokenize.output.val,
            "dense_model": baseline_output("model"),
            "dense_config": baseline_output("config"),
        }
    tokens = rules.tokenize_target.output
    prepared = rules.prepare_hf_target.output
    return {
        name: expand(path, target=wildcards.target)[0]
        for name, path in (
            ("meta", tokens.meta),
            ("train", tokens.train),
            ("val", tokens.val),
            ("dense_model", prepared.weights),
            ("dense_config", prepared.config),
        )
    }


def distills_from_control():
    return (RECOVERY["distill"] or {}).get("teacher", "original") == "control"


def recovery_point_inputs(wildcards):
    """The tokens, the dense original, the exported point and, distilling from the control, the trained
    control of the same seed (its teacher)."""
    folder = f"{RESULTS}/compress/{wildcards.target}/{wildcards.point}"
    teacher = {}
    if distills_from_control():
        teacher["teacher"] = expand(
            rules.recovery_control.output.model,
            target=wildcards.target,
            seed=wildcards.seed,
        )[0]
    return {
        **recovery_tokens(wildcards),
        "weights": f"{folder}/model.safetensors",
        "export_config": f"{folder}/config.json",
        "record": f"{folder}/compress.json",
        **teacher,
    }


def recovery_files(wildcards):
    """Every recovery.json of one target: its points', then its controls', every seed."""
    points = [p for t, p in recovery_points() if t == wildcards.target]
    return {
        "points": expand(
            rules.recovery_point.output.record,
            target=wildcards.target,
            point=points,
            seed=RECOVERY["seeds"],
        ),
        "controls": expand(
            rules.recovery_control.output.record,
            target=wildcards.target,
            seed=RECOVERY["seeds"],
        ),
        "compress": [
            f"{RESULTS}/compress/{wildcards.target}/{p}/compress.json" for p in points
        ],
    }


def recovery_outputs():
    return expand(rules.recovery_table.output[0], target=recovery_targets())


def recovery_benchmarks():
    points = recovery_points()
    return [
        *[
            expand(rules.recovery_point.benchmark, target=t, point=p, seed=s)[0]
            for t, p in points
            for s in RECOVERY["seeds"]
        ],
        *expand(
            rules.recovery_control.benchmark,
            target=recovery_targets(),
            seed=RECOVERY["seeds"],
        ),
        *expand(rules.recovery_table.benchmark, target=recovery_targets()),
        *expand(
            rules.tokenize_target.benchmark,
            target=[
                t for t in recovery_targets() if surgery_target(t)["kind"] != "gpt"
            ],
        ),
    ]
