"""Write wte and per-layer W_q, W_k, W_v of D's final checkpoint."""

from pathlib import Path

from weightpca.extract import extract_weights
from weightpca.logs import job_log
from weightpca.train import load_model

with job_log(snakemake.log[0]):
    model = load_model(snakemake.input.model, snakemake.input.config)
    manifest = extract_weights(model, Path(snakemake.output.manifest).parent)
    print(manifest["attention.safetensors"])
