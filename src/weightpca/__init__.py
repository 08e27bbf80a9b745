"""weightpca: PCA / low-rank compression of transformer weights, the library behind the Snakemake DAG.

Modules (docs/design.md says where new code goes):

- models: adapters (one file per model family: layers, matrices by role, run, load), model (our
  GPT), cross_entropy (its fused head + loss), flat_adamw (its GPU optimizer);
- the maths: linalg (SVDs, PCA and whitened bases, rank rules, counts), plan (groups sharing a
  basis x an allocation of ranks), allocation (rank maps under a whole-model budget), refit (factors
  fitted to the compressed model's inputs);
- data: corpus, tokens;
- training: train (the one loop), checkpoint, runs (run specs from the config), evaluate
  (the one place models are scored);
- stages: extract, factorize, tables (embedding factorisation), targets, surgery (sweeps,
  frontier, sensitivity), compress (factored models), recovery (fine-tuning them back against an
  equally fine-tuned dense control), speed (bytes, memory, timing), sketch
  (streaming-sketch PCA), lowrank (the regulariser and its truncation sweep), report, hf_folder
  (a local model folder checked from its headers);
- plumbing: config, io, logs, resources, slurm.
"""

__version__ = "0.1.0"
