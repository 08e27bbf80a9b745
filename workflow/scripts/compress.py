"""Export one operating point as a factored model, reload it, check it, and time it against the dense original."""

from pathlib import Path

from weightpca.compress import (
    compute_dtype,
    dtype_name,
    export_point,
    frontier_threshold,
    storage_dtype,
    whole_model_ranks,
)
from weightpca.evaluate import resolve_device
from weightpca.io import read_json, write_json
from weightpca.logs import job_log
from weightpca.resources import use_threads
from weightpca.speed import compare, measure_in_subprocess
from weightpca.targets import load_target

with job_log(snakemake.log[0]):
    threads = snakemake.config["threads"]["surgery"]  # snakemake.threads: cores reserved (cpu_slots)
    use_threads(threads)
    s, point, kind = snakemake.params.settings, snakemake.params.point, snakemake.params.kind
    device = resolve_device(snakemake.config["device"])
    inputs = dict(snakemake.input.items())
    target, val, calib, window = load_target(kind, inputs, s["eval_tokens"], s["calib_tokens"], s["window"], device)
    refit_ridge = None
    if "allocation" in point:  # a whole-model point: the ranks its sweep chose, every matrix it factored
        refit = point.get("refit", False)
        allocation = whole_model_ranks(
            inputs["whole"], point["mode"], point["allocation"], refit, point.get("removed"), point.get("tolerance")
        )
        matrices = s["matrices"]
        refit_ridge = s["refit_ridge"] if refit else None
    else:
        allocation = point.get("threshold") or frontier_threshold(inputs["frontier"], point["mode"], point["tolerance"])
        matrices = point.get("matrices", ["qkv"])
    folder = Path(snakemake.output.record).parent
    model_config = read_json(inputs["model_config"])
    dtype = storage_dtype(snakemake.params.dtype, model_config, snakemake.params.own_dtype)
    record = export_point(
        target,
        point["mode"],
        allocation,
        matrices,
        val,
        calib,
        window,
        folder,
        model_config,
        s["prompt"],
        refit_ridge,
        dtype=dtype,
        rank_multiple=snakemake.params.rank_multiple,
    )
    del target
    # dense original and factored model, each timed in a fresh process on this job's device, in one dtype
    dense = (
        dict(kind="gpt", path=inputs["model"], config=inputs["model_config"])
        if kind == "gpt"
        else dict(kind="hf", path=str(Path(inputs["model_config"]).parent))
    )
    timed = dtype_name(compute_dtype(dtype, device))
    speed = {
        name: measure_in_subprocess(device=device, threads=threads, dtype=timed, **where, **snakemake.params.speed)
        for name, where in (("dense", dense), ("factored", dict(kind="compressed", path=str(folder))))
    }
    for row in compare(speed["dense"], speed["factored"]):
        print(row)
    info = read_json(snakemake.output.record)
    info.update(
        record,
        name=point["name"],
        target=snakemake.wildcards.target,
        tolerance=point.get("tolerance"),
        removed=point.get("removed"),
        allocation=point.get("allocation", "threshold"),
        whole_model="allocation" in point,
        eval_tokens=int(len(val) - 1),
        dense_source=dense,
        speed=speed,
        device=speed["dense"]["device"],
    )
    write_json(snakemake.output.record, info)
