"""PCA/SVD factorisation of D's token embedding, one branch per rank k."""


include: "functions/factorize.smk"


rule spectrum:
    input:
        wte=rules.extract_baseline.output.wte,
    output:
        f"{RESULTS}/pca/spectrum.json",
    log:
        f"{LOGS}/spectrum.log",
    benchmark:
        f"{BENCH}/spectrum.tsv"
    conda:
        "../../envs/train.yaml"
    params:
        ranks=config["factorize"]["ranks"],
        centered=config["factorize"]["centered"],
    script:
        "../scripts/spectrum.py"


rule factorize:
    input:
        wte=rules.extract_baseline.output.wte,
    output:
        embedding=f"{RESULTS}/pca/k{{k}}/embedding.safetensors",
        info=f"{RESULTS}/pca/k{{k}}/factorization.json",
    log:
        f"{LOGS}/factorize/k{{k}}.log",
    benchmark:
        f"{BENCH}/factorize/k{{k}}.tsv"
    # short, and A/B at this rank wait for it
    priority: 10
    conda:
        "../../envs/train.yaml"
    params:
        centered=config["factorize"]["centered"],
    script:
        "../scripts/factorize.py"


rule param_table:
    input:
        meta=rules.tokenize.output.meta,
    output:
        f"{RESULTS}/pca/params.csv",
    log:
        f"{LOGS}/param_table.log",
    benchmark:
        f"{BENCH}/param_table.tsv"
    conda:
        "../../envs/train.yaml"
    params:
        model=config["model"],
        ranks=config["factorize"]["ranks"],
        centered=config["factorize"]["centered"],
    script:
        "../scripts/param_table.py"
