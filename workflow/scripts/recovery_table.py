"""One target's recovery.csv: per point and seed, before and after, against the dense control of that seed."""

from weightpca.io import write_csv
from weightpca.logs import job_log
from weightpca.recovery import recovery_table

with job_log(snakemake.log[0]):
    table = recovery_table(snakemake.input.points, snakemake.input.controls, snakemake.input.compress)
    write_csv(snakemake.output[0], table)
    print(table.to_string(index=False))
