"""What a Slurm run needs settled before its first sbatch: site names and a status command that answers.

Partition and account come from environment variables that the Slurm
profile (profiles/slurm/config.yaml) reads in its resources, so a user names
them without replacing the profile's per-rule GPU and memory requests:

- ``WEIGHTPCA_SLURM_PARTITION``: partition of every job (unset or empty: the
  cluster's default partition);
- ``WEIGHTPCA_SLURM_GPU_PARTITION``: partition of the GPU rules (default: the
  one above);
- ``WEIGHTPCA_SLURM_ACCOUNT``: account of every job (unset or empty: the
  Slurm plugin's default account lookup).
"""

from __future__ import annotations

import os
import subprocess

PARTITION, GPU_PARTITION, ACCOUNT = (
    "WEIGHTPCA_SLURM_PARTITION",
    "WEIGHTPCA_SLURM_GPU_PARTITION",
    "WEIGHTPCA_SLURM_ACCOUNT",
)
SQUEUE_OPTIONS = "--slurm-status-command squeue --slurm-no-account"


class SlurmSetupError(RuntimeError):
    """A Slurm run that would fail or hang after submitting its jobs."""


def default_site_names(environ=os.environ) -> None:
    """Give every site variable a value, so that the profile's "'$VAR'" resources expand to a string.

    An unset variable would stay the literal text "$VAR" (os.path.expandvars
    leaves unknown names alone) and reach sbatch as a partition name.
    """
    environ.setdefault(PARTITION, "")
    environ.setdefault(GPU_PARTITION, environ[PARTITION])
    environ.setdefault(ACCOUNT, "")


def check_status_command(status_command: str | None, run=subprocess.run) -> None:
    """Refuse ``sacct`` as the job status command where sacct cannot answer (no Slurm accounting).

    The Slurm plugin polls sacct for finished jobs; on a cluster without
    accounting sacct fails on every poll and Snakemake waits silently
    forever (seen on the test cluster: a 5-second job, no output for 5
    minutes, deaf to SIGTERM). Asked here once, before any job is submitted.
    """
    if status_command != "sacct":
        return
    why = ""
    try:
        done = run(
            [
                "sacct",
                "-X",
                "--noheader",
                "--parsable2",
                "--format=JobIdRaw,State",
                "--starttime",
                "now-1hours",
                "--endtime",
                "now",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
    except FileNotFoundError:
        why = "sacct is not installed"
    except subprocess.TimeoutExpired:
        why = "sacct did not answer within 60 s"
    if why:
        raise SlurmSetupError(
            f"Slurm job status is read with sacct, but sacct cannot answer on this cluster ({why}), so "
            f"finished jobs would never be noticed. On a cluster without Slurm accounting add "
            f'{SQUEUE_OPTIONS} (README "Run on a Slurm cluster").'
        )
