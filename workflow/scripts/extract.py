"""Write wte and per-layer W_q, W_k, W_v of D's final checkpoint."""

from pathlib import Path

from weightpca.adapters import GPTAdapter
from weightpca.extract import extract_weights
from weightpca.logs import job_log

with job_log(snakemake.log[0]):
    model = GPTAdapter.load(snakemake.input.model, snakemake.input.config).model
    out = snakemake.output
    manifest = extract_weights(model, out.wte, out.attention, out.manifest)
    print(manifest[Path(out.attention).name])
