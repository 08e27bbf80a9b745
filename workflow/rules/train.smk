"""Training: baseline D (one run per seed)."""


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
    log:
        f"{LOGS}/train/D/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/train/D/seed{{seed}}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: config["threads"]["train"]
    params:
        run=baseline_run,
        work_dir=lambda w: f"{RESULTS}/train/D/seed{w.seed}/_work",
        wandb_dir=f"{RESULTS}/wandb",
    script:
        "../scripts/train.py"
