"""Truncate every targeted matrix of one λ-sweep model to each fraction of its rank; sweep.csv."""

import pandas as pd
import torch

from weightpca.evaluate import load_model, resolve_device
from weightpca.io import atomic_path, read_json
from weightpca.logs import job_log
from weightpca.lowrank import rank_sweep
from weightpca.tokens import eval_windows, open_tokens

with job_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.config["threads"]["train"])  # snakemake.threads: cores reserved (cpu_slots)
    device = resolve_device(snakemake.config["device"])
    model = load_model(snakemake.input.model, snakemake.input.config, device)
    meta = read_json(snakemake.input.meta)
    windows = eval_windows(open_tokens(snakemake.input.val, meta), model.config.block_size,
                           snakemake.params.eval_tokens)
    p = snakemake.params
    rows = rank_sweep(model, windows, p.fractions, p.targets, p.batch_size, device)
    table = pd.DataFrame(rows)
    table.insert(0, "seed", p.seed)
    table.insert(0, "lambda", float(p.lam))
    with atomic_path(snakemake.output.sweep) as tmp:
        table.to_csv(tmp, index=False)
    print(table.to_string(index=False))
