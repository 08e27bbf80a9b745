"""Split the corpus into train.txt / val.txt (by work for Shakespeare)."""

from pathlib import Path

from weightpca.corpus import prepare_corpus
from weightpca.logs import job_log

with job_log(snakemake.log[0]):
    archive = snakemake.input.get("archive") or None
    info = prepare_corpus(snakemake.params.corpus, Path(snakemake.output.split).parent, archive)
    print(info)
