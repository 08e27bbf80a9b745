"""Which matrix types (and which layers) carry a target's surgery loss: one type, then one layer, at a time."""

import pandas as pd

from weightpca.evaluate import resolve_device
from weightpca.io import write_csv
from weightpca.logs import job_log
from weightpca.resources import use_threads
from weightpca.surgery import run_sensitivity
from weightpca.targets import load_target

with job_log(snakemake.log[0]):
    use_threads(snakemake.config["threads"]["surgery"])  # snakemake.threads: cores reserved (cpu_slots)
    s = snakemake.params.settings
    target, val, _, window = load_target(
        snakemake.params.kind,
        dict(snakemake.input.items()),
        s["eval_tokens"],
        1,
        s["window"],
        resolve_device(snakemake.config["device"]),
    )
    rows = run_sensitivity(
        target,
        s["thresholds"],
        val,
        window,
        tolerance=max(s["tolerances"]),
        roles=target.roles(s["whole_model"]["matrices"]),
        layer_tokens=s["sensitivity"]["layer_tokens"],
    )
    table = pd.DataFrame(rows)
    table.insert(0, "target", snakemake.wildcards.target)
    write_csv(snakemake.output[0], table)
