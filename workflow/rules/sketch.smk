"""Streaming-sketch PCA over D's flattened weight snapshots, per method, k and centring."""


include: "functions/sketch.smk"


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
    threads: cpu_slots("sketch")
    params:
        k=lambda w: int(w.k),
        r=lambda w: sketch_size(w.k),
        centered=lambda w: w.centering == "centered",
        block=SKETCH["block"],
        pilot_blocks=SKETCH["pilot_blocks"],
        seed=SKETCH["seed"],
    script:
        "../scripts/sketch.py"
