"""Save a Hugging Face target modified at one (mode, threshold) with save_pretrained."""

from pathlib import Path

import torch

from weightpca.io import apply_umask
from weightpca.logs import job_log
from weightpca.surgery import SweepPlan
from weightpca.targets import input_moments, load_target

with job_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.config["threads"]["surgery"])  # snakemake.threads: cores reserved (cpu_slots)
    if snakemake.params.kind == "gpt":
        raise ValueError("surgery.export: save_pretrained export is for Hugging Face targets only")
    s, mode = snakemake.params.settings, snakemake.wildcards.mode
    target, _, calib, window = load_target("hf", dict(snakemake.input.items()), 1, s["calib_tokens"], s["window"])
    moments = input_moments(target, calib, window) if mode == "activation_aware" else None
    plan = SweepPlan(mode, [target.get_qkv(i) for i in range(target.n_layers)], moments)
    weights, info = plan.weights_at(float(snakemake.wildcards.threshold))
    for i, w in enumerate(weights):
        target.set_qkv(i, w)
    out = Path(snakemake.output.config).parent
    target.model.save_pretrained(out)
    target.tokenizer.save_pretrained(out)
    apply_umask(out)
    print(info)
