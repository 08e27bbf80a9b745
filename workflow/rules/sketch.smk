"""Streaming-sketch PCA over D's flattened weight snapshots, per method, k and centring."""


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


rule sketch:
    input:
        unpack(sketch_inputs),
    output:
        errors=f"{RESULTS}/sketch/{{method}}/k{{k}}_r{{r}}_{{centering}}/errors.json",
        W=f"{RESULTS}/sketch/{{method}}/k{{k}}_r{{r}}_{{centering}}/W.npy",
    log:
        f"{LOGS}/sketch/{{method}}/k{{k}}_r{{r}}_{{centering}}.log",
    benchmark:
        f"{BENCH}/sketch/{{method}}/k{{k}}_r{{r}}_{{centering}}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: config["threads"]["sketch"]
    params:
        k=lambda w: int(w.k),
        r=lambda w: sketch_size(w.k),
        centered=lambda w: w.centering == "centered",
        block=SKETCH["block"],
        pilot_blocks=SKETCH["pilot_blocks"],
        seed=SKETCH["seed"],
    script:
        "../scripts/sketch.py"
