"""Truncate every targeted matrix of one λ-sweep model to each fraction of its rank; sweep.csv."""

import pandas as pd

from weightpca import adapters
from weightpca.evaluate import resolve_device
from weightpca.io import read_json, write_csv
from weightpca.logs import job_log
from weightpca.lowrank import rank_sweep
from weightpca.resources import use_threads
from weightpca.tokens import eval_windows, open_tokens

with job_log(snakemake.log[0]):
    use_threads(snakemake.config["threads"]["train"])  # snakemake.threads: cores reserved (cpu_slots)
    device = resolve_device(snakemake.config["device"])
    model = adapters.load("gpt", snakemake.input.model, snakemake.input.config, device).model
    meta = read_json(snakemake.input.meta)
    windows = eval_windows(
        open_tokens(snakemake.input.val, meta), model.config.block_size, snakemake.params.eval_tokens
    )
    p = snakemake.params
    rows = rank_sweep(model, windows, p.fractions, p.targets, p.batch_size, device)
    table = pd.DataFrame(rows)
    table.insert(0, "seed", p.seed)
    table.insert(0, "lambda", float(p.lam))
    write_csv(snakemake.output.sweep, table)
    print(table.to_string(index=False))
