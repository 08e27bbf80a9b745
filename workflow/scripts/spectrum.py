"""Singular-value spectrum of D's embedding and the error at every configured rank."""

from weightpca.factorize import spectrum_report
from weightpca.io import load_npy, write_json
from weightpca.logs import job_log

with job_log(snakemake.log[0]):
    report = spectrum_report(load_npy(snakemake.input.wte), snakemake.params.ranks, snakemake.params.centered)
    write_json(snakemake.output[0], report)
    print({k: report[k] for k in ("relative_error", "energy_kept")})
