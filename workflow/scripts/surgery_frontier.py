"""One target's compression frontier: per mode and tolerance, the fewest q/k/v parameters within tolerance."""

import pandas as pd

from weightpca.io import write_csv
from weightpca.logs import job_log
from weightpca.surgery import frontier_row

with job_log(snakemake.log[0]):
    rows = []
    for mode, path in zip(snakemake.params.modes, snakemake.input, strict=True):
        points = pd.read_csv(path).to_dict("records")
        rows += [
            dict(target=snakemake.wildcards.target, mode=mode, **frontier_row(points, tol))
            for tol in snakemake.params.tolerances
        ]
    table = pd.DataFrame(rows)
    write_csv(snakemake.output[0], table)
    print(table.to_string(index=False))
