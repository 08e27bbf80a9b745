"""Helpers shared by every rule: config validation, paths, run settings."""

from snakemake.utils import validate

from weightpca.config import check_config

# refuse a bad config before any job is scheduled
validate(config, "../../config/schema.yaml")
check_config(config)

RESULTS = "results"
DATA = f"{RESULTS}/data/{config['corpus']['name']}"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"


wildcard_constraints:
    seed=r"\d+",
    k=r"\d+",
    variant="A|B|C",


def baseline_run(wildcards):
    """Settings of one baseline D run; a change here reruns exactly that run and its consumers."""
    seed = int(wildcards.seed)
    return {
        "name": f"D/seed{seed}",
        "group": "D",
        "seed": seed,
        "model": config["model"],
        "train": config["train"],
        "init": {},
        "freeze": {},
    }


def baseline_seed():
    """The seed whose D feeds the downstream stages (the first listed)."""
    return config["baseline"]["seeds"][0]


def all_outputs():
    seeds = config["baseline"]["seeds"]
    return [
        f"{DATA}/meta.json",
        *expand(f"{RESULTS}/train/D/seed{{seed}}/summary.json", seed=seeds),
        f"{RESULTS}/extract/D/manifest.json",
    ]
