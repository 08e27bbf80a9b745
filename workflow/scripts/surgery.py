"""One surgery sweep: perplexity, ranks and parameters at every threshold of one mode."""

import pandas as pd

from weightpca.evaluate import resolve_device
from weightpca.io import write_csv, write_json
from weightpca.logs import job_log
from weightpca.resources import use_threads
from weightpca.surgery import run_sweep
from weightpca.targets import load_target

with job_log(snakemake.log[0]):
    use_threads(snakemake.config["threads"]["surgery"])  # snakemake.threads: cores reserved (cpu_slots)
    s = snakemake.params.settings
    device = resolve_device(snakemake.config["device"])
    target, val, calib, window = load_target(
        snakemake.params.kind,
        dict(snakemake.input.items()),
        s["eval_tokens"],
        s["calib_tokens"],
        s["window"],
        device,
    )
    rows, timing = run_sweep(
        target,
        snakemake.wildcards.mode,
        s["thresholds"],
        val,
        window,
        calib_tokens=calib,
        prompt=s["prompt"],
        gen_tokens=s["gen_tokens"],
        tolerances=s["tolerances"],
        refine=s["refine"],
    )
    table = pd.DataFrame(rows)
    table.insert(0, "mode", snakemake.wildcards.mode)
    table.insert(0, "target", snakemake.wildcards.target)
    write_csv(snakemake.output.table, table)
    write_json(
        snakemake.output.timing,
        dict(
            timing,
            target=snakemake.wildcards.target,
            mode=snakemake.wildcards.mode,
            note=snakemake.params.note,
            eval_tokens=int(len(val) - 1),
            window=window,
            threads=snakemake.config["threads"]["surgery"],
            device=device,
        ),
    )
    print(table.drop(columns=["ranks", "continuation"]).to_string(index=False))
    print(timing)
