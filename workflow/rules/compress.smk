"""Chosen operating points exported as factored models, reloaded, checked and timed."""


include: "functions/compress.smk"


rule compress:
    input:
        unpack(compress_inputs),
    output:
        weights=f"{RESULTS}/compress/{{target}}/{{point}}/model.safetensors",
        config=f"{RESULTS}/compress/{{target}}/{{point}}/config.json",
        record=f"{RESULTS}/compress/{{target}}/{{point}}/compress.json",
    log:
        f"{LOGS}/compress/{{target}}/{{point}}.log",
    benchmark:
        f"{BENCH}/compress/{{target}}/{{point}}.tsv"
    conda:
        "../../envs/surgery.yaml"
    threads: cpu_slots("surgery")
    params:
        kind=lambda w: surgery_target(w.target)["kind"],
        point=lambda w: compress_point(w.target, w.point),
        settings=lambda w: compress_settings(w.target, w.point),
        timing={k: COMPRESS[k] for k in ("context", "new_tokens", "repeats")},
    script:
        "../scripts/compress.py"
