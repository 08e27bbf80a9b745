"""Input functions and file lists of the factorize stage (workflow/rules/factorize.smk)."""


def factorize_benchmarks():
    return [
        rules.extract_baseline.benchmark,
        rules.spectrum.benchmark,
        *expand(rules.factorize.benchmark, k=config["factorize"]["ranks"]),
        rules.param_table.benchmark,
    ]
