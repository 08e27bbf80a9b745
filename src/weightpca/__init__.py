"""weightpca: PCA / low-rank compression of transformer weights, the library behind the Snakemake DAG.

Modules: corpus, tokens (data); model, train, checkpoint (the GPT and its one
training loop); extract, factorize, tables (embedding factorisation);
surgery, targets (attention surgery); sketch (streaming-sketch PCA);
report; config, io, logs (plumbing).
"""

__version__ = "0.1.0"
