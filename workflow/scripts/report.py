"""Build every figure and summary.csv/.md from the stages' tables."""

from weightpca.logs import job_log
from weightpca.report import build_report

with job_log(snakemake.log[0]):
    inputs = {k: v for k, v in snakemake.input.items()}
    outputs = {k: v for k, v in snakemake.output.items()}
    summary = build_report(
        inputs, outputs, snakemake.params.bench_root, snakemake.params.notes, snakemake.params.run_names
    )
    print(summary.to_string(index=False))
