"""Streaming-sketch PCA over D's flattened weight snapshots, per method, k and centring."""


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
    params:
        block=SKETCH["block"],
        pilot_blocks=SKETCH["pilot_blocks"],
        seed=SKETCH["seed"],
    script:
        "../scripts/sketch.py"
