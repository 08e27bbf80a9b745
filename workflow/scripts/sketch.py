"""One sketch method on D's snapshots: W.npy and errors.json (per-sample errors, time, memory)."""

import json
from pathlib import Path

from weightpca.evaluate import resolve_device
from weightpca.logs import job_log
from weightpca.resources import use_threads
from weightpca.sketch import SafetensorsSamples, run_method

with job_log(snakemake.log[0]):
    use_threads(snakemake.config["threads"]["sketch"])  # snakemake.threads: cores reserved (cpu_slots)
    p = snakemake.params
    optimum = json.loads(Path(snakemake.input.optimum).read_text()) if "optimum" in snakemake.input.keys() else None
    with SafetensorsSamples(sorted(Path(snakemake.input.snapshots).glob("*.safetensors"))) as src:
        report = run_method(
            snakemake.wildcards.method,
            src,
            p.k,
            p.r,
            snakemake.output.W,
            snakemake.output.errors,
            p.centered,
            p.block,
            p.seed,
            optimum,
            pilot_blocks=p.pilot_blocks,
            device=resolve_device(snakemake.config["device"]),
        )
    print({k: v for k, v in report.items() if not isinstance(v, list)})
