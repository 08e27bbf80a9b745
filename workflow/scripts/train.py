"""Train one model run with the one training loop (weightpca.train)."""

from pathlib import Path

from weightpca.logs import job_log
from weightpca.train import TokenFiles, TrainOutputs, train, train_distributed

with job_log(snakemake.log[0]):
    # W&B settings travel outside params: changing them must not retrain anything
    run = dict(snakemake.params.run, wandb=dict(snakemake.config["wandb"], dir=snakemake.params.wandb_dir))
    out = snakemake.output
    args = dict(
        data=TokenFiles(Path(snakemake.input.meta), Path(snakemake.input.train), Path(snakemake.input.val)),
        outputs=TrainOutputs(
            Path(out.model),
            Path(out.config),
            Path(out.metrics),
            Path(out.summary),
            Path(out.snapshots) if hasattr(out, "snapshots") else None,
        ),
        work_dir=snakemake.params.work_dir,
        device=snakemake.config["device"],
        threads=snakemake.config["threads"]["train"],
    )
    # a job given several GPUs (resources gpu=N, e.g. from profiles/slurm) trains with DDP, one process each
    gpus = int(getattr(snakemake.resources, "gpu", 0) or 0)
    summary = train_distributed(run, nproc=gpus, **args) if gpus > 1 else train(run, **args)
    if hasattr(out, "snapshots"):
        # D declares the folder even when snapshots are off (sketch disabled)
        Path(out.snapshots).mkdir(exist_ok=True)
    print(summary)
