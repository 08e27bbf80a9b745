"""Rank-k factorisation of D's embedding: wte [V, k], scale_up [k, d], scale_down [d, k]."""

from weightpca.factorize import factorize_embedding
from weightpca.io import load_npy, save_tensors, write_json
from weightpca.logs import job_log

with job_log(snakemake.log[0]):
    tensors, info = factorize_embedding(
        load_npy(snakemake.input.wte), int(snakemake.wildcards.k), snakemake.params.centered
    )
    save_tensors(snakemake.output.embedding, tensors)
    write_json(snakemake.output.info, info)
    print(info)
