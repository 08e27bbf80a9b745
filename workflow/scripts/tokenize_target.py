"""A Hugging Face target's token files (train.bin, val.bin, meta.json) of the corpus, through its own tokenizer."""

from pathlib import Path

from weightpca import adapters
from weightpca.logs import job_log
from weightpca.targets import write_target_tokens

with job_log(snakemake.log[0]):
    target = adapters.load("hf", Path(snakemake.input.config).parent)
    meta = write_target_tokens(
        target, snakemake.input.train_text, snakemake.input.val_text, Path(snakemake.output.meta).parent
    )
    print(meta)
