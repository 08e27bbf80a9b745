"""The shipped configurations are valid (bad ones: tests/reliability/test_bad_configs.py)."""

from conftest import snakemake, write_config


def test_default_and_preset_configs_are_valid(tmp_path):
    for name in ("config/config.yaml", "config/ci.yaml", "config/gpt2.yaml", "config/gpu-smoke.yaml"):
        cfg = write_config(tmp_path / "ok.yaml", base=name)
        done = snakemake(tmp_path, "-n", "--cores", "1", configfile=cfg)
        assert "train_baseline" in done.stdout
        # gpt2.yaml drops the default's SmolLM2 target with `smollm2: null`
        assert ("results/surgery/smollm2/" in done.stdout) == (name != "config/gpt2.yaml")
        assert "results/compress/" in done.stdout
        assert ("results/surgery/tinyllama/" in done.stdout) == (name == "config/gpt2.yaml")
        # SmolLM2's q/k/v in two modes of its own (targets.smollm2.modes; the GPU preset: all four), D in all four
        assert "results/surgery/gpt/shared_kv.csv" in done.stdout
        assert ("results/surgery/smollm2/shared_kv.csv" in done.stdout) == (name == "config/gpu-smoke.yaml")
        assert ("results/surgery/smollm2/separate.csv" in done.stdout) == (name != "config/gpt2.yaml")
        # the GPU preset recovers SmolLM2 on its own tokens, at 10, 20 and 30 % removed, two seeds
        gpu = name == "config/gpu-smoke.yaml"
        assert ("results/models/smollm2/tokens/train.bin" in done.stdout) == gpu
        for point in ("whole10", "whole20", "whole30"):
            for seed in (1, 2):
                assert (f"results/recovery/smollm2/{point}/seed{seed}/recovery.json" in done.stdout) == gpu
