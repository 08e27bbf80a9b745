"""Write wte and per-layer W_q, W_k, W_v of D's final checkpoint."""

from pathlib import Path

from weightpca.evaluate import load_model
from weightpca.extract import extract_weights
from weightpca.logs import job_log

with job_log(snakemake.log[0]):
    model = load_model(snakemake.input.model, snakemake.input.config)
    out = snakemake.output
    manifest = extract_weights(model, out.wte, out.attention, out.manifest)
    print(manifest[Path(out.attention).name])
