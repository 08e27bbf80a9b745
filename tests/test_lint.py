"""The workflow passes `snakemake --lint` and `snakefmt --check`; the Python passes `ruff check` and `ruff format`."""

import subprocess
import sys

from conftest import REPO, snakemake, write_config


def test_snakemake_lint_clean(tmp_path):
    cfg = write_config(tmp_path / "ci.yaml")
    done = snakemake(tmp_path, "--lint", configfile=cfg, check=False)
    assert done.returncode == 0 and "Congratulations" in done.stdout + done.stderr, done.stdout


def test_snakefmt_clean():
    done = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow/rules"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_check_clean():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_clean():
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "."], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
