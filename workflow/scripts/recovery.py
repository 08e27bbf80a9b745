"""Fine-tune one model of a recovery (a compress point, or the dense control) with the one training loop."""

from pathlib import Path

from weightpca.io import write_json
from weightpca.logs import job_log
from weightpca.recovery import recover
from weightpca.train import TokenFiles, TrainOutputs

with job_log(snakemake.log[0]):
    # W&B settings travel outside params: changing them must not retrain anything
    run = dict(snakemake.params.run, wandb=dict(snakemake.config["wandb"], dir=snakemake.params.wandb_dir))
    inp, out = snakemake.input, snakemake.output
    export = str(Path(inp.weights).parent) if hasattr(inp, "weights") else None
    record = recover(
        run,
        TokenFiles(Path(inp.meta), Path(inp.train), Path(inp.val)),
        TrainOutputs(Path(out.model), Path(out.config), Path(out.metrics), Path(out.summary), None),
        snakemake.params.work_dir,
        dense=(
            {"kind": "gpt", "model": inp.dense_model, "config": inp.dense_config}
            if snakemake.params.kind == "gpt"
            else {"kind": "hf", "folder": str(Path(inp.dense_config).parent)}
        ),
        export=export,
        recipe=run["recipe"],
        device=snakemake.config["device"],
        threads=snakemake.config["threads"]["train"],
        teacher_weights=inp.teacher if hasattr(inp, "teacher") else None,
    )
    record.update(target=snakemake.wildcards.target, point=Path(out.record).parent.parent.name)
    write_json(out.record, record)
    print(record)
