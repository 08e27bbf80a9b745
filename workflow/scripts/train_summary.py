"""One row per training run, and the A/B/C/D comparisons per rank."""

from weightpca.io import write_csv
from weightpca.logs import job_log
from weightpca.tables import compare_variants, run_table

with job_log(snakemake.log[0]):
    runs = run_table(snakemake.input)
    comparisons = compare_variants(runs)
    for table, path in ((runs, snakemake.output.runs), (comparisons, snakemake.output.comparisons)):
        write_csv(path, table)
    print(runs.to_string(index=False))
    print(comparisons.to_string(index=False))
