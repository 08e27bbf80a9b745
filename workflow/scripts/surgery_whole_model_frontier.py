"""One target's whole-model frontier: per mode, allocation and tolerance, the largest removal within tolerance."""

import pandas as pd

from weightpca.io import write_csv
from weightpca.logs import job_log
from weightpca.surgery import budget_frontier

with job_log(snakemake.log[0]):
    rows = pd.concat([pd.read_csv(p) for p in snakemake.input], ignore_index=True).to_dict("records")
    table = pd.DataFrame(
        [
            dict(target=snakemake.wildcards.target, **r)
            for tol in snakemake.params.tolerances
            for r in budget_frontier(rows, tol)
        ]
    )
    write_csv(snakemake.output[0], table)
    print(table.to_string(index=False))
