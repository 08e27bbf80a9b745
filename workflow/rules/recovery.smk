"""Recovery: compress points fine-tuned back, against the dense original fine-tuned the same way; a Hugging Face
target's token files through its own tokenizer."""


include: "functions/recovery.smk"


rule tokenize_target:
    input:
        config=rules.prepare_hf_target.output.config,
        train_text=rules.prepare_corpus.output.train,
        val_text=rules.prepare_corpus.output.val,
    output:
        meta=f"{RESULTS}/models/{{target}}/tokens/meta.json",
        train=f"{RESULTS}/models/{{target}}/tokens/train.bin",
        val=f"{RESULTS}/models/{{target}}/tokens/val.bin",
    log:
        f"{LOGS}/tokenize_target/{{target}}.log",
    benchmark:
        f"{BENCH}/tokenize_target/{{target}}.tsv"
    conda:
        "../../envs/surgery.yaml"
    threads: cpu_slots("tokenize")
    script:
        "../scripts/tokenize_target.py"


rule recovery_point:
    input:
        unpack(recovery_point_inputs),
    output:
        model=f"{RESULTS}/recovery/{{target}}/{{point}}/seed{{seed}}/model.safetensors",
        config=f"{RESULTS}/recovery/{{target}}/{{point}}/seed{{seed}}/config.json",
        metrics=f"{RESULTS}/recovery/{{target}}/{{point}}/seed{{seed}}/metrics.csv",
        summary=f"{RESULTS}/recovery/{{target}}/{{point}}/seed{{seed}}/summary.json",
        record=f"{RESULTS}/recovery/{{target}}/{{point}}/seed{{seed}}/recovery.json",
        recovered=f"{RESULTS}/recovery/{{target}}/{{point}}/seed{{seed}}/recovered/model.safetensors",
    log:
        f"{LOGS}/recovery/{{target}}/{{point}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/recovery/{{target}}/{{point}}/seed{{seed}}.tsv"
    conda:
        "../../envs/surgery.yaml"
    threads: cpu_slots("train")
    params:
        kind=lambda w: surgery_target(w.target)["kind"],
        run=lambda w: runs.recovery_run(config, w.target, w.point, int(w.seed)),
        work_dir=lambda w: f"{RESULTS}/recovery/{w.target}/{w.point}/seed{w.seed}/_work",
        wandb_dir=f"{RESULTS}/wandb",
    script:
        "../scripts/recovery.py"


rule recovery_control:
    input:
        unpack(recovery_tokens),
    output:
        model=f"{RESULTS}/recovery/{{target}}/dense/seed{{seed}}/model.safetensors",
        config=f"{RESULTS}/recovery/{{target}}/dense/seed{{seed}}/config.json",
        metrics=f"{RESULTS}/recovery/{{target}}/dense/seed{{seed}}/metrics.csv",
        summary=f"{RESULTS}/recovery/{{target}}/dense/seed{{seed}}/summary.json",
        record=f"{RESULTS}/recovery/{{target}}/dense/seed{{seed}}/recovery.json",
    log:
        f"{LOGS}/recovery/{{target}}/dense/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/recovery/{{target}}/dense/seed{{seed}}.tsv"
    conda:
        "../../envs/surgery.yaml"
    threads: cpu_slots("train")
    params:
        kind=lambda w: surgery_target(w.target)["kind"],
        run=lambda w: runs.recovery_run(config, w.target, "dense", int(w.seed)),
        work_dir=lambda w: f"{RESULTS}/recovery/{w.target}/dense/seed{w.seed}/_work",
        wandb_dir=f"{RESULTS}/wandb",
    script:
        "../scripts/recovery.py"


rule recovery_table:
    input:
        unpack(recovery_files),
    output:
        f"{RESULTS}/recovery/{{target}}/recovery.csv",
    log:
        f"{LOGS}/recovery_table/{{target}}.log",
    benchmark:
        f"{BENCH}/recovery_table/{{target}}.tsv"
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/recovery_table.py"
