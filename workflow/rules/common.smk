"""Shared by every stage: config validation, result paths and wildcard constraints.

Each stage's input functions live in workflow/rules/functions/<stage>.smk,
included by that stage's rule file; run settings come from weightpca.runs."""

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

from snakemake.exceptions import WorkflowError

from weightpca import runs
from weightpca.config import check_config, target_modes, target_whole_model
from weightpca.hf_folder import check_hf_folder, fingerprint as hf_fingerprint
from weightpca.slurm import check_status_command, default_site_names

# refuse a bad config before any job is scheduled
validate(config, "../../config/schema.yaml")
# config files merge key by key, so a preset removes a target of the default by setting it to null
config["surgery"]["targets"] = {
    name: t for name, t in config["surgery"]["targets"].items() if t is not None
}
check_config(config)

# profiles/slurm reads partition and account from these variables (weightpca.slurm)
default_site_names()


onstart:
    # before the first sbatch: a status command that cannot answer would hang the run
    plugin = workflow.executor_plugin
    if plugin is not None and plugin.name == "slurm":
        check_status_command(workflow.executor_settings.status_command)


RESULTS = "results"
DATA = f"{RESULTS}/data/{config['corpus']['name']}"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"


SURGERY = config["surgery"]
COMPRESS = config["compress"]
SKETCH = config["sketch"]
LOWRANK = config["lowrank"]


wildcard_constraints:
    seed=r"\d+",
    k=r"\d+",
    variant="A|B|C",
    mode="|".join(
        dict.fromkeys(
            SURGERY["modes"]
            + [m for t in SURGERY["targets"] for m in target_modes(SURGERY, t)]
            + SURGERY["whole_model"]["modes"]
        )
    )
    or "none",
    point="|".join(p["name"] for p in COMPRESS["points"]) or "none",
    target="|".join(SURGERY["targets"]) or "none",
    threshold=r"[01](\.\d+)?",
    method="|".join(SKETCH["methods"]) or "none",
    r=r"\d+",
    centering="centered|uncentered",
    lam=r"[0-9][0-9.e+-]*",


def baseline_seed():
    """The seed whose D feeds the downstream stages (the first listed)."""
    return config["baseline"]["seeds"][0]


def cpu_slots(kind):
    """Snakemake cores a job of ``kind`` (a key of config.threads) reserves.

    The job computes with config.threads[kind] threads. Run locally with
    --cores above this machine's CPU count (the README's --cores 8 on a
    2-core laptop), it reserves that many cores per thread, so that no more
    threads run than there are CPUs: oversubscribed, every job slows down and
    baseline D, which a dozen later runs wait for, finishes last. On a cluster
    (non-local execution) a job's cores are its own.
    """
    threads = config["threads"][kind]

    def slots(wildcards):
        try:
            cores = workflow.cores
        except WorkflowError:  # no --cores given (e.g. a dry run)
            return threads
        if workflow.non_local_exec:
            return threads
        return threads * max(1, cores // len(os.sched_getaffinity(0)))

    return slots
