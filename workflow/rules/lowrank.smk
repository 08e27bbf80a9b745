"""The low-rank regulariser's λ sweep: D-shaped models per λ and seed, then a rank-truncation sweep each."""


rule train_lowrank:
    input:
        meta=rules.tokenize.output.meta,
        train=rules.tokenize.output.train,
        val=rules.tokenize.output.val,
    output:
        model=f"{RESULTS}/lowrank/lambda{{lam}}/seed{{seed}}/model.safetensors",
        config=f"{RESULTS}/lowrank/lambda{{lam}}/seed{{seed}}/config.json",
        metrics=f"{RESULTS}/lowrank/lambda{{lam}}/seed{{seed}}/metrics.csv",
        summary=f"{RESULTS}/lowrank/lambda{{lam}}/seed{{seed}}/summary.json",
    log:
        f"{LOGS}/lowrank/lambda{{lam}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/lowrank/lambda{{lam}}/seed{{seed}}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: config["threads"]["train"]
    params:
        run=lowrank_run,
        work_dir=lambda w: f"{RESULTS}/lowrank/lambda{w.lam}/seed{w.seed}/_work",
        wandb_dir=f"{RESULTS}/wandb",
    script:
        "../scripts/train.py"


rule lowrank_sweep:
    input:
        model=rules.train_lowrank.output.model,
        config=rules.train_lowrank.output.config,
        meta=rules.tokenize.output.meta,
        val=rules.tokenize.output.val,
    output:
        sweep=f"{RESULTS}/lowrank/lambda{{lam}}/seed{{seed}}/sweep.csv",
    log:
        f"{LOGS}/lowrank/lambda{{lam}}/seed{{seed}}_sweep.log",
    conda:
        "../../envs/train.yaml"
    threads: config["threads"]["train"]
    params:
        targets=LOWRANK["targets"],
        fractions=LOWRANK["fractions"],
        eval_tokens=lowrank_train()["eval_tokens"],
        batch_size=lowrank_train()["batch_size"],
    script:
        "../scripts/lowrank_sweep.py"
