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
        speed=lambda w: {
            **COMPRESS["speed"],
            **compress_point(w.target, w.point).get("speed", {}),
        },
        own_dtype=lambda w: surgery_target(w.target).get("dtype"),
        # params, not config reads in the script: changing them reruns the exports
        dtype=COMPRESS["dtype"],
        rank_multiple=COMPRESS["rank_multiple"],
    script:
        "../scripts/compress.py"


rule onnx:
    input:
        unpack(onnx_inputs),
    output:
        factored=f"{RESULTS}/compress/{{target}}/{{point}}/onnx/factored.onnx",
        dense=f"{RESULTS}/compress/{{target}}/{{point}}/onnx/dense.onnx",
        record=f"{RESULTS}/compress/{{target}}/{{point}}/onnx/onnx.json",
    log:
        f"{LOGS}/onnx/{{target}}/{{point}}.log",
    benchmark:
        f"{BENCH}/onnx/{{target}}/{{point}}.tsv"
    conda:
        "../../envs/surgery.yaml"
    threads: cpu_slots("surgery")
    params:
        kind=lambda w: surgery_target(w.target)["kind"],
        speed=lambda w: {
            **COMPRESS["speed"],
            **compress_point(w.target, w.point).get("speed", {}),
        },
    script:
        "../scripts/onnx.py"
