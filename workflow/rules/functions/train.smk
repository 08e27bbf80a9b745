"""Input functions and file lists of the train stage (workflow/rules/train.smk)."""


def baseline_output(name):
    """One of baseline D's declared outputs at the seed downstream stages use."""
    return expand(getattr(rules.train_baseline.output, name), seed=baseline_seed())[0]


def variant_spec(wildcards):
    """Settings of one A/B/C run; only this rank's overrides reach it."""
    k = int(wildcards.k)
    return runs.variant_run(
        config,
        wildcards.variant,
        k,
        int(wildcards.seed),
        embedding=expand(rules.factorize.output.embedding, k=k)[0],
        baseline_model=baseline_output("model"),
    )


def variant_inputs(wildcards):
    """The tokenized corpus and the files this variant starts from (see weightpca.runs)."""
    return {
        "meta": rules.tokenize.output.meta,
        "train": rules.tokenize.output.train,
        "val": rules.tokenize.output.val,
        **variant_spec(wildcards)["init"],
    }


def training_files(baseline_pattern, variant_pattern):
    """A pattern of D's (every baseline seed), then of every variant, rank and seed, in that order."""
    e = config["experiment"]
    return [
        *expand(baseline_pattern, seed=config["baseline"]["seeds"]),
        *expand(
            variant_pattern,
            k=config["factorize"]["ranks"],
            variant=list(e["variants"]),
            seed=e["seeds"],
        ),
    ]


def run_summaries():
    """summary.json of D (every seed) and of every variant, rank and seed."""
    return training_files(
        rules.train_baseline.output.summary, rules.train_variant.output.summary
    )


def run_metrics():
    """metrics.csv of every run in run_summaries(), in the same order."""
    return training_files(
        rules.train_baseline.output.metrics, rules.train_variant.output.metrics
    )


def run_names():
    """Run names (D/seed1, k16/A/seed1, ...) of run_summaries(), in the same order."""
    e = config["experiment"]
    return [
        *[runs.baseline_name(s) for s in config["baseline"]["seeds"]],
        *[
            runs.variant_name(v, k, s)
            for k in config["factorize"]["ranks"]
            for v in e["variants"]
            for s in e["seeds"]
        ],
    ]


def training_benchmarks():
    return [
        *training_files(rules.train_baseline.benchmark, rules.train_variant.benchmark),
        rules.train_summary.benchmark,
    ]
