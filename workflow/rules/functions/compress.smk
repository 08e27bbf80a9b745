"""Input functions and file lists of the compress stage (workflow/rules/compress.smk)."""


def compress_point(target, name):
    return next(
        p for p in COMPRESS["points"] if (p["target"], p["name"]) == (target, name)
    )


def compress_settings(target):
    """The surgery settings an export uses (so that other sweep settings rerun nothing here)."""
    s = surgery_settings(target)
    return {k: s[k] for k in ("eval_tokens", "calib_tokens", "window", "prompt")}


def compress_inputs(wildcards):
    """The surgery target's inputs, and its frontier where the point is given by a tolerance."""
    inputs = surgery_inputs(wildcards)
    if "tolerance" in compress_point(wildcards.target, wildcards.point):
        inputs["frontier"] = expand(
            rules.surgery_frontier.output[0], target=wildcards.target
        )[0]
    return inputs


def compress_files(pattern):
    if not COMPRESS["enabled"]:
        return []
    return [
        expand(pattern, target=p["target"], point=p["name"])[0]
        for p in COMPRESS["points"]
    ]
