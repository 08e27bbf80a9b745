"""The low-rank regulariser's λ sweep: D-shaped models per λ and seed, then a rank-truncation sweep each."""


include: "functions/lowrank.smk"


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
    threads: cpu_slots("train")
    params:
        run=lambda w: runs.lowrank_run(config, LAMBDAS[w.lam], int(w.seed)),
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
    benchmark:
        f"{BENCH}/lowrank_sweep/lambda{{lam}}/seed{{seed}}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: cpu_slots("train")
    params:
        lam=lambda w: LAMBDAS[w.lam],
        seed=lambda w: int(w.seed),
        targets=LOWRANK["targets"],
        fractions=LOWRANK["fractions"],
        eval_tokens=runs.lowrank_train(config)["eval_tokens"],
        batch_size=runs.lowrank_train(config)["batch_size"],
    script:
        "../scripts/lowrank_sweep.py"
