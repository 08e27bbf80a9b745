"""Load a Hugging Face causal LM once (GGUF, hub id or folder) and save it as safetensors."""

from pathlib import Path

from weightpca.logs import job_log
from weightpca.resources import use_threads
from weightpca.targets import prepare_hf_model

with job_log(snakemake.log[0]):
    use_threads(snakemake.config["threads"]["surgery"])  # snakemake.threads: cores reserved (cpu_slots)
    t = snakemake.params.target
    source = snakemake.input.get("gguf") or t.get("path") or t["model_id"]
    info = prepare_hf_model(source, Path(snakemake.output.config).parent)
    print(info)
