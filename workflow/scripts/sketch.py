"""One sketch method on D's snapshots: W.npy and errors.json (per-sample errors, time, memory)."""

import json
from pathlib import Path

import torch

from weightpca.logs import job_log
from weightpca.sketch import SafetensorsSamples, run_method
from weightpca.train import resolve_device

with job_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    w = snakemake.wildcards
    src = SafetensorsSamples(sorted(Path(snakemake.input.snapshots).glob("*.safetensors")))
    optimum = json.loads(Path(snakemake.input.optimum).read_text()) if "optimum" in snakemake.input.keys() else None
    report = run_method(w.method, src, int(w.k), int(w.r), Path(snakemake.output.errors).parent,
                        w.centering == "centered", snakemake.params.block, snakemake.params.seed, optimum,
                        pilot_blocks=snakemake.params.pilot_blocks,
                        device=resolve_device(snakemake.config["device"]))
    print({k: v for k, v in report.items() if not isinstance(v, list)})
