"""Whole-model compression of one target and mode: perplexity per allocation rule and removed fraction."""

import pandas as pd

from weightpca.evaluate import resolve_device
from weightpca.io import write_csv, write_json
from weightpca.logs import job_log
from weightpca.resources import use_threads
from weightpca.surgery import run_budget_sweep
from weightpca.targets import load_target

with job_log(snakemake.log[0]):
    use_threads(snakemake.config["threads"]["surgery"])  # snakemake.threads: cores reserved (cpu_slots)
    s = snakemake.params.settings
    device = resolve_device(snakemake.config["device"])
    target, val, calib, window = load_target(
        snakemake.params.kind, dict(snakemake.input.items()), s["eval_tokens"], s["calib_tokens"], s["window"], device
    )
    rows, info = run_budget_sweep(
        target,
        snakemake.wildcards.mode,
        target.roles(s["matrices"]),
        s["allocation"],
        s["removed"],
        val,
        window,
        calib_tokens=calib,
        sensitivity_tokens=calib[: s["sensitivity_tokens"] + 1],
        trial_keep=s["trial_keep"],
        tolerances=s["tolerances"],
        refine=s["refine"],
        refit=s["refit"],
        refit_ridge=s["refit_ridge"],
    )
    table = pd.DataFrame(rows)
    table.insert(0, "target", snakemake.wildcards.target)
    write_csv(snakemake.output.table, table)
    write_json(
        snakemake.output.info,
        dict(
            info,
            target=snakemake.wildcards.target,
            mode=snakemake.wildcards.mode,
            matrices=s["matrices"],
            eval_tokens=int(len(val) - 1),
            device=device,
        ),
    )
    print(table.drop(columns=["ranks"], errors="ignore").to_string(index=False))
