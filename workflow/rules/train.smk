"""Training: baseline D (one run per seed) and the A/B/C variants per rank and seed."""


include: "functions/train.smk"


rule train_baseline:
    input:
        meta=rules.tokenize.output.meta,
        train=rules.tokenize.output.train,
        val=rules.tokenize.output.val,
    output:
        model=f"{RESULTS}/train/D/seed{{seed}}/model.safetensors",
        config=f"{RESULTS}/train/D/seed{{seed}}/config.json",
        metrics=f"{RESULTS}/train/D/seed{{seed}}/metrics.csv",
        summary=f"{RESULTS}/train/D/seed{{seed}}/summary.json",
        snapshots=directory(f"{RESULTS}/train/D/seed{{seed}}/snapshots"),
    log:
        f"{LOGS}/train/D/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/train/D/seed{{seed}}.tsv"
    # a dozen A/B runs, the surgery of our model and the sketch wait for D
    priority: 10
    conda:
        "../../envs/train.yaml"
    threads: cpu_slots("train")
    params:
        run=lambda w: runs.baseline_run(config, int(w.seed)),
        work_dir=lambda w: f"{RESULTS}/train/D/seed{w.seed}/_work",
        wandb_dir=f"{RESULTS}/wandb",
    script:
        "../scripts/train.py"


rule train_variant:
    input:
        unpack(variant_inputs),
    output:
        model=f"{RESULTS}/train/k{{k}}/{{variant}}/seed{{seed}}/model.safetensors",
        config=f"{RESULTS}/train/k{{k}}/{{variant}}/seed{{seed}}/config.json",
        metrics=f"{RESULTS}/train/k{{k}}/{{variant}}/seed{{seed}}/metrics.csv",
        summary=f"{RESULTS}/train/k{{k}}/{{variant}}/seed{{seed}}/summary.json",
    log:
        f"{LOGS}/train/k{{k}}/{{variant}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/train/k{{k}}/{{variant}}/seed{{seed}}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: cpu_slots("train")
    params:
        run=variant_spec,
        work_dir=lambda w: f"{RESULTS}/train/k{w.k}/{w.variant}/seed{w.seed}/_work",
        wandb_dir=f"{RESULTS}/wandb",
    script:
        "../scripts/train.py"


rule train_summary:
    input:
        run_summaries(),
    output:
        runs=f"{RESULTS}/train/summary.csv",
        comparisons=f"{RESULTS}/train/comparisons.csv",
    log:
        f"{LOGS}/train_summary.log",
    benchmark:
        f"{BENCH}/train_summary.tsv"
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/train_summary.py"
