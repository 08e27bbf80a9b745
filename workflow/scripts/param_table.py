"""Parameter counts per rank, for this config and for GPT-2 small."""

from weightpca.io import read_json, write_csv
from weightpca.logs import job_log
from weightpca.tables import param_table

with job_log(snakemake.log[0]):
    vocab = read_json(snakemake.input.meta)["vocab_size"]
    table = param_table(snakemake.params.model, vocab, snakemake.params.ranks, embd_bias=snakemake.params.centered)
    write_csv(snakemake.output[0], table)
    print(table.to_string(index=False))
