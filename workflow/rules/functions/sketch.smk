"""Input functions and file lists of the sketch stage (workflow/rules/sketch.smk)."""


def sketch_size(k):
    """r = sketch.r_factor · k, the sketch size the folder name states (fit_range may use fewer)."""
    return SKETCH["r_factor"] * int(k)


def sketch_files(pattern, methods=None):
    """``pattern`` (an output or benchmark of rule sketch) for every configured method, k and centring."""
    if not SKETCH["enabled"]:
        return []
    return [
        expand(pattern, method=m, k=k, r=sketch_size(k), centering=c)[0]
        for m in methods or SKETCH["methods"]
        for k in SKETCH["ks"]
        for c in SKETCH["centerings"]
    ]


def sketch_inputs(wildcards):
    inputs = {"snapshots": baseline_output("snapshots")}
    if wildcards.method != "exact":
        inputs["optimum"] = expand(
            rules.sketch.output.errors,
            method="exact",
            k=wildcards.k,
            r=sketch_size(wildcards.k),
            centering=wildcards.centering,
        )[0]
    return inputs
