"""The workflow passes `snakemake --lint` and `snakefmt --check`."""

import subprocess
import sys

from conftest import REPO, snakemake, write_config


def test_snakemake_lint_clean(tmp_path):
    cfg = write_config(tmp_path / "ci.yaml")
    done = snakemake(tmp_path, "--lint", configfile=cfg, check=False)
    assert done.returncode == 0 and "Congratulations" in done.stdout + done.stderr, done.stdout


def test_snakefmt_clean():
    done = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow/rules"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
