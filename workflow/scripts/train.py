"""Train one model run with the one training loop (weightpca.train)."""

from pathlib import Path

from weightpca.logs import job_log
from weightpca.train import train, train_distributed

with job_log(snakemake.log[0]):
    # W&B settings travel outside params: changing them must not retrain anything
    run = dict(snakemake.params.run, wandb=dict(snakemake.config["wandb"], dir=snakemake.params.wandb_dir))
    args = dict(
        data_dir=Path(snakemake.input.meta).parent,
        out_dir=Path(snakemake.output.model).parent,
        work_dir=snakemake.params.work_dir,
        device=snakemake.config["device"],
        threads=snakemake.threads,
    )
    # a job given several GPUs (resources gpu=N, e.g. from profiles/slurm) trains with DDP, one process each
    gpus = int(getattr(snakemake.resources, "gpu", 0) or 0)
    summary = train_distributed(run, nproc=gpus, **args) if gpus > 1 else train(run, **args)
    if hasattr(snakemake.output, "snapshots"):
        # D declares the folder even when snapshots are off (sketch disabled)
        Path(snakemake.output.snapshots).mkdir(exist_ok=True)
    print(summary)
