"""Train the tokenizer on the train split and write token memmaps + meta.json."""

import os
from pathlib import Path

from weightpca.logs import job_log

os.environ["RAYON_NUM_THREADS"] = str(snakemake.config["threads"]["tokenize"])  # tokenizers' thread pool
from weightpca.tokens import build_tokenized_corpus  # noqa: E402

with job_log(snakemake.log[0]):
    meta = build_tokenized_corpus(
        snakemake.params.tokenizer,
        snakemake.input.train,
        snakemake.input.val,
        snakemake.input.split,
        Path(snakemake.output.meta).parent,
    )
    print({k: meta[k] for k in ("vocab_size", "dtype", "train_tokens", "val_tokens")})
