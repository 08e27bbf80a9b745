"""Build every figure and summary.csv/.md from the stages' tables."""

from pathlib import Path

from weightpca.logs import job_log
from weightpca.report import build_report

with job_log(snakemake.log[0]):
    inputs = {k: v for k, v in snakemake.input.items()}
    summary = build_report(inputs, Path(snakemake.output.summary_csv).parent,
                           snakemake.params.bench_root, snakemake.params.notes)
    print(summary.to_string(index=False))
