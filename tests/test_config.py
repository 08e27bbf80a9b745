"""The shipped configurations are valid (bad ones: tests/reliability/test_bad_configs.py)."""

from conftest import snakemake, write_config


def test_default_and_ci_configs_are_valid(tmp_path):
    for name in ("config/config.yaml", "config/ci.yaml", "config/wikitext103.yaml"):
        cfg = write_config(tmp_path / "ok.yaml", base=name)
        done = snakemake(tmp_path, "-n", "--cores", "1", configfile=cfg)
        assert "train_baseline" in done.stdout
