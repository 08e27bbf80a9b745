"""Input functions and file lists of the compress stage (workflow/rules/compress.smk)."""


def compress_point(target, name):
    return next(
        p for p in COMPRESS["points"] if (p["target"], p["name"]) == (target, name)
    )


def compress_settings(target, name):
    """The surgery settings an export uses (so that other sweep settings rerun nothing here); a whole-model
    point also the matrices its sweep factored."""
    s = surgery_settings(target)
    settings = {k: s[k] for k in ("eval_tokens", "calib_tokens", "window", "prompt")}
    point = compress_point(target, name)
    if "allocation" in point:
        settings["matrices"] = SURGERY["whole_model"]["matrices"]
        if point.get("refit"):
            settings["refit_ridge"] = SURGERY["whole_model"]["refit_ridge"]
    return settings


def compress_inputs(wildcards):
    """The surgery target's inputs; a whole-model point (one with an allocation) its whole-model table,
    a q/k/v point given by a tolerance its frontier."""
    inputs = surgery_inputs(wildcards)
    point = compress_point(wildcards.target, wildcards.point)
    if "tolerance" in point and "allocation" not in point:
        inputs["frontier"] = expand(
            rules.surgery_frontier.output[0], target=wildcards.target
        )[0]
    if "allocation" in point:
        inputs["whole"] = expand(
            rules.surgery_whole_model.output.table,
            target=wildcards.target,
            mode=point["mode"],
        )[0]
    return inputs


def compress_files(pattern):
    if not COMPRESS["enabled"]:
        return []
    return [
        expand(pattern, target=p["target"], point=p["name"])[0]
        for p in COMPRESS["points"]
    ]


def onnx_files(pattern):
    """``pattern`` (an output or benchmark of the onnx rule) for every compress point with ``onnx: true``."""
    if not COMPRESS["enabled"]:
        return []
    return [
        expand(pattern, target=p["target"], point=p["name"])[0]
        for p in COMPRESS["points"]
        if p.get("onnx")
    ]


def onnx_inputs(wildcards):
    """The point's export (its compress.json names the dense source) and the dense model's files."""
    inputs = {
        "record": expand(rules.compress.output.record, **wildcards)[0],
        "weights": expand(rules.compress.output.weights, **wildcards)[0],
    }
    source = surgery_inputs(wildcards)
    inputs["model"], inputs["model_config"] = source["model"], source["model_config"]
    return inputs
