"""One compress point and its dense original as ONNX files, run by onnxruntime without weightpca: logits
checked against PyTorch, prefill and KV-cache decode timed on the CPU."""

from pathlib import Path

import numpy as np

from weightpca import adapters
from weightpca.io import write_json
from weightpca.logs import job_log
from weightpca.resources import use_threads
from weightpca.runtime import LOGITS_TOLERANCE, check_logits, export_onnx
from weightpca.speed import compare

with job_log(snakemake.log[0]):
    threads = snakemake.config["threads"]["surgery"]
    use_threads(threads)
    inputs, speed = snakemake.input, snakemake.params.speed
    folder = Path(inputs.record).parent
    models = {
        "factored": adapters.load("compressed", folder),
        "dense": (
            adapters.load("gpt", inputs.model, inputs.model_config)
            if snakemake.params.kind == "gpt"
            else adapters.load("hf", Path(inputs.model_config).parent)
        ),
    }
    ids = np.random.default_rng(0).integers(0, models["dense"].model.config.vocab_size, (2, 24))
    record = {}
    for name, adapter in models.items():
        path = snakemake.output[name]
        meta = export_onnx(adapter, path)
        check = check_logits(adapter, path, ids, threads, speed)  # logits and timing in one runner process
        print(f"{name}: {meta['bytes'] / 2**20:.1f} MiB, logits relative error {check['relative_error']:.2e}")
        if check["relative_error"] > LOGITS_TOLERANCE or any(check["imported"].values()):
            raise AssertionError(
                f"{path}: onnxruntime's logits differ from PyTorch's by {check['relative_error']:.2e} of the "
                f"largest (tolerance {LOGITS_TOLERANCE:g}), or its process could import {check['imported']}"
            )
        record[name] = dict(meta, **check)
    record["regimes"] = compare(record["dense"], record["factored"])
    for row in record["regimes"]:
        print(row)
    write_json(
        snakemake.output.record,
        dict(
            record,
            target=snakemake.wildcards.target,
            point=snakemake.wildcards.point,
            runtime="onnxruntime",
            threads=threads,
            logits_tolerance=LOGITS_TOLERANCE,
        ),
    )
