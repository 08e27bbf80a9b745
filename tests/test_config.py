"""A bad config is refused before any job runs, with a message naming the key."""

import re

import pytest

from conftest import snakemake, write_config


@pytest.mark.parametrize("overrides,message", [
    ({"train.lr": "fast"}, r"'fast' is not of type 'number'[\s\S]*\['train'\]\['lr'\]"),
    ({"train.lrr": 0.1}, r"'lrr' was unexpected"),
    ({"model.n_layer": 2.5}, r"\['model'\]\['n_layer'\]"),
    ({"model.n_embd_wte": 64}, r"model\.n_embd_wte \(64\) must not exceed model\.n_embd \(32\)"),
    ({"tokenizer.vocab_size": 70000, "tokenizer.dtype": "uint16"},
     r"tokenizer\.vocab_size \(70000\) does not fit tokenizer\.dtype uint16"),
    ({"wandb.mode": "sometimes"}, r"\['wandb'\]\['mode'\]"),
    ({"corpus.archive": "/nonexistent/shakespeare.tar.gz"}, r"corpus\.archive: file '/nonexistent"),
    ({"model.n_head": 3}, r"model\.n_embd \(32\) must be divisible by model\.n_head \(3\)"),
])
def test_bad_config_refused_before_any_job(tmp_path, overrides, message):
    cfg = write_config(tmp_path / "bad.yaml", **overrides)
    done = snakemake(tmp_path, "-n", "--cores", "1", configfile=cfg, check=False)
    assert done.returncode != 0
    assert re.search(message, done.stdout + done.stderr), done.stderr
    assert not (tmp_path / "results").exists()


def test_default_and_ci_configs_are_valid(tmp_path):
    for name in ("config/config.yaml", "config/ci.yaml", "config/wikitext103.yaml"):
        cfg = write_config(tmp_path / "ok.yaml", base=name)
        done = snakemake(tmp_path, "-n", "--cores", "1", configfile=cfg)
        assert "train_baseline" in done.stdout
