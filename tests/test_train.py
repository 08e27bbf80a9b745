import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from weightpca.adapters import GPTAdapter
from weightpca.io import WeightFileError, load_tensors, save_tensors
from weightpca.train import TrainingDiverged, TrainSettings, build_model, lr_at

from conftest import REPO, TRAIN_IN_SUBPROCESS, kill_training_at, metrics_but_wall_time, tiny_run, train_files, train_to


def weights(out):
    return load_tensors(Path(out) / "model.safetensors")


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_trains_and_writes_artifacts(tiny_data, tmp_path):
    s = train_to(tiny_run(max_steps=12), tiny_data, tmp_path / "out", tmp_path / "work")
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "metrics.csv", "summary.json"}
    assert not (tmp_path / "work").exists()  # in-progress state removed after success
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,tokens,lr") and [r.split(",")[0] for r in rows[1:]] == ["4", "8", "12"]
    assert s["steps"] == 12 and s["tokens_seen"] == 12 * 4 * 16
    assert s["final_val_ppl"] == pytest.approx(math.exp(s["final_val_loss"]))
    assert s["final_val_ppl"] < 384  # better than a uniform guess after 12 steps
    model = GPTAdapter.load(out / "model.safetensors", out / "config.json").model
    assert model.config.vocab_size == 384


def test_cpu_run_bitwise_repeatable(tiny_data, tmp_path):
    train_to(tiny_run(), tiny_data, tmp_path / "a", tmp_path / "wa")
    train_to(tiny_run(), tiny_data, tmp_path / "b", tmp_path / "wb")
    assert_bitwise_equal(weights(tmp_path / "a"), weights(tmp_path / "b"))
    train_to(tiny_run(seed=1), tiny_data, tmp_path / "c", tmp_path / "wc")
    assert not torch.equal(
        weights(tmp_path / "a")["transformer.wte.weight"], weights(tmp_path / "c")["transformer.wte.weight"]
    )


def test_kill_9_then_resume_is_bitwise_equal(tiny_data, tmp_path):
    run = tiny_run(max_steps=60, checkpoint_every=5, eval_every=20)
    train_to(run, tiny_data, tmp_path / "ref", tmp_path / "wref")

    args = json.dumps([run, str(tiny_data), str(tmp_path / "out"), str(tmp_path / "work")])
    kill_training_at(args, "step", 17)  # between the checkpoints of steps 15 and 20
    latest = tmp_path / "work" / "ckpt" / "LATEST"
    assert not (tmp_path / "out" / "model.safetensors").exists()
    killed_at = int(latest.read_text().strip().split("_")[1])
    assert killed_at == 15

    done = subprocess.run([sys.executable, "-c", TRAIN_IN_SUBPROCESS, args], capture_output=True, text=True, check=True)
    assert f"(step {killed_at})" in done.stdout
    assert_bitwise_equal(weights(tmp_path / "ref"), weights(tmp_path / "out"))
    # metrics of the resumed run equal the uninterrupted run's (wall time aside)
    assert metrics_but_wall_time(tmp_path / "ref") == metrics_but_wall_time(tmp_path / "out")


def test_checkpoint_of_other_settings_is_not_resumed(tiny_data, tmp_path):
    """A checkpoint written under run A resumes A; run B (another lr) in the same work folder starts at 0."""
    from weightpca.checkpoint import save_checkpoint
    from weightpca.train import resume, setup

    data, _ = train_files(tiny_data, tmp_path / "unused")
    run_a = tiny_run(max_steps=8, checkpoint_every=4)
    run_b = tiny_run(max_steps=8, checkpoint_every=4, lr=1e-3)
    work = tmp_path / "work"
    a = setup(run_a, data, work)
    progress = resume(a)
    assert progress.step == 0
    progress.step = 4
    save_checkpoint(a.ckpt_root, a.model, a.opt, a.sampler.generator, progress, a.chash)

    assert resume(setup(run_a, data, work)).step == 4  # the same settings resume
    b = setup(run_b, data, work)
    assert b.chash != a.chash
    assert resume(b).step == 0
    assert not (work / "ckpt").exists()  # A's stale state is cleared for B


def test_wrong_shape_checkpoint_refused_naming_tensor(tiny_data, tmp_path):
    train_to(tiny_run(max_steps=4), tiny_data, tmp_path / "out", tmp_path / "work")
    w = weights(tmp_path / "out")
    w["transformer.h.1.attn.c_attn.weight"] = torch.zeros(48, 8)
    save_tensors(tmp_path / "out" / "model.safetensors", w)
    with pytest.raises(WeightFileError, match=r"transformer\.h\.1\.attn\.c_attn\.weight.*\(48, 8\)"):
        GPTAdapter.load(tmp_path / "out" / "model.safetensors", tmp_path / "out" / "config.json").model


def test_truncated_weights_refused(tiny_data, tmp_path):
    train_to(tiny_run(max_steps=4), tiny_data, tmp_path / "out", tmp_path / "work")
    path = tmp_path / "out" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightFileError, match="model.safetensors"):
        GPTAdapter.load(path, tmp_path / "out" / "config.json").model


@pytest.mark.parametrize("eval_every,checkpoint_every", [(4, 4), (8, 2)])
def test_divergence_stops_with_step_and_keeps_checkpoint(
    tiny_data, tmp_path, monkeypatch, eval_every, checkpoint_every
):
    import weightpca.train as train_module
    from weightpca.checkpoint import latest_checkpoint, load_checkpoint
    from weightpca.train import config_hash, make_optimizer

    # a sane learning rate for 6 steps, then an absurd one
    monkeypatch.setattr(train_module, "lr_at", lambda step, t: 1e-3 if step < 6 else 1e6)
    run = tiny_run(max_steps=40, grad_clip=0.0, eval_every=eval_every, checkpoint_every=checkpoint_every)
    with pytest.raises(TrainingDiverged, match=r"step \d+.*last good checkpoint"):
        train_to(run, tiny_data, tmp_path / "out", tmp_path / "work")
    assert not (tmp_path / "out").exists()
    ckpt = latest_checkpoint(tmp_path / "work" / "ckpt", config_hash(run))
    assert ckpt is not None  # the last checkpoint before the loss went non-finite
    model = build_model(run, 384)
    load_checkpoint(ckpt, model, make_optimizer(model, TrainSettings.from_dict(run["train"])), torch.Generator())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_init_from_model_and_embedding(tiny_data, tmp_path):
    train_to(tiny_run(max_steps=4), tiny_data, tmp_path / "d", tmp_path / "wd")
    run = tiny_run()
    run["init"] = {"model": str(tmp_path / "d" / "model.safetensors")}
    m = build_model(run, 384)
    d = weights(tmp_path / "d")
    assert torch.equal(m.state_dict()["transformer.h.0.mlp.c_fc.weight"], d["transformer.h.0.mlp.c_fc.weight"])
    bad = dict(run, model=dict(run["model"], n_layer=3))
    with pytest.raises(WeightFileError, match="missing tensors"):
        build_model(bad, 384)


def test_lr_schedule():
    t = TrainSettings.from_dict(dict(tiny_run()["train"], lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110))
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55) and lr_at(110, t) == pytest.approx(0.1)


def test_nothing_unpickles():
    """No torch.load without weights_only, no allow_pickle=True, no remote code."""
    offenders = []
    for path in [
        *REPO.glob("src/**/*.py"),
        *REPO.glob("workflow/**/*.py"),
        *REPO.glob("workflow/**/*.smk"),
        *REPO.glob("benchmarks/*.py"),
    ]:
        text = path.read_text()
        for m in re.finditer(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in m.group(0):
                offenders.append(f"{path}: {m.group(0)}")
        for bad in ("allow_pickle=True", "trust_remote_code=True", "import pickle", "pickle.load"):
            if bad in text:
                offenders.append(f"{path}: {bad}")
    assert not offenders, offenders


def test_wandb_offline_run_written(tiny_data, tmp_path):
    run = tiny_run(max_steps=4)
    run["wandb"] = {"mode": "offline", "project": "weightpca-test", "dir": str(tmp_path / "wb")}
    train_to(run, tiny_data, tmp_path / "out", tmp_path / "work")
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_ddp_two_processes_match_one_process_at_twice_the_batch(tiny_data, tmp_path):
    """torchrun + gloo on 2 CPU processes: each rank trains on its half of the same global batch,
    so the weights match one process at batch 2b (up to the all-reduce's float rounding)."""
    from weightpca.train import train_distributed

    ddp = train_distributed(
        tiny_run(batch_size=2), *train_files(tiny_data, tmp_path / "ddp"), tmp_path / "wddp", nproc=2, device="cpu"
    )
    single = train_to(tiny_run(batch_size=4), tiny_data, tmp_path / "one", tmp_path / "wone")
    assert ddp["world_size"] == 2 and ddp["tokens_seen"] == single["tokens_seen"]
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert ddp["final_val_loss"] == pytest.approx(single["final_val_loss"], rel=1e-4)
    assert not (tmp_path / "wddp").exists() and not list(tmp_path.glob("*.json"))
    # and a different split of the batch is really different training
    other = train_to(tiny_run(batch_size=2), tiny_data, tmp_path / "half", tmp_path / "whalf")
    assert other["final_val_loss"] != pytest.approx(single["final_val_loss"], rel=1e-4)


def _step_setup(run, device, cuda_graph, **train):
    """Model, optimizer and the loop's step callable for ``run`` (``train`` overrides) on random tokens."""
    import numpy as np

    from weightpca.tokens import BatchSampler
    from weightpca.train import make_optimizer, setup_precision, training_forward, training_step

    t = TrainSettings.from_dict(dict(run["train"], cuda_graph=cuda_graph, **train))
    model = build_model(run, 64).to(device)
    opt = make_optimizer(model, t)
    tokens = np.random.default_rng(0).integers(0, 64, size=5000, dtype=np.uint16)
    sampler = BatchSampler(tokens, t.batch_size, run["model"]["block_size"], 0, device)
    forward, _ = training_forward(model, opt, t, device)
    return model, training_step(forward, model, opt, sampler, t, setup_precision(device, t), device)


def test_static_batches_yield_the_samplers_sequence():
    """What a captured step reads: the sampler's micro-batches, in order, at fixed addresses."""
    import numpy as np

    from weightpca.tokens import BatchSampler
    from weightpca.train import _StaticBatches

    tokens = np.arange(1000, dtype=np.uint16)
    ref, static = BatchSampler(tokens, 2, 8, 5), _StaticBatches(BatchSampler(tokens, 2, 8, 5), grad_accum=3)
    addresses = static.x.data_ptr(), static.y.data_ptr()
    for _ in range(2):
        static.refill()
        for _ in range(3):
            (x, y), (rx, ry) = static.next(), ref.next()
            assert torch.equal(x, rx) and torch.equal(y, ry)
    assert (static.x.data_ptr(), static.y.data_ptr()) == addresses


def test_cuda_graph_setting_is_ignored_on_cpu():
    """train.cuda_graph on a CPU: the same steps as without it (it is CUDA only)."""
    run = tiny_run(grad_accum=2)
    losses = {}
    for graph in (False, True):
        model, step = _step_setup(run, "cpu", graph)
        losses[graph] = [float(step(lr_at(i, TrainSettings.from_dict(run["train"])))) for i in range(4)]
    assert losses[True] == losses[False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_steps_match_uncaptured_steps():
    """A replayed CUDA graph trains as the uncaptured step does: warm-up, capture and replays, lr schedule."""
    run = tiny_run(grad_accum=2, warmup_steps=4)
    t = TrainSettings.from_dict(run["train"])
    result = {}
    for graph in (False, True):
        model, step = _step_setup(run, "cuda", graph)
        losses = [float(step(lr_at(i, t))) for i in range(8)]
        result[graph] = losses, {k: v.float().cpu() for k, v in model.state_dict().items()}
    assert result[True][0] == pytest.approx(result[False][0], rel=1e-3)
    for k, v in result[False][1].items():
        torch.testing.assert_close(result[True][1][k], v, rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_flat_adamw_trains_as_fused_adamw(grad_accum):
    """train.flat_adamw (bf16 copies written by the optimizer, compiled, captured) trains as torch's fused
    AdamW does: same losses, same weights after the steps, bf16 copies equal to the rounded weights."""
    from weightpca.flat_adamw import FlatAdamW

    run = tiny_run(grad_accum=grad_accum, warmup_steps=4, compile=True, cuda_graph=True)
    t = TrainSettings.from_dict(run["train"])
    result = {}
    for flat in (False, True):
        model, step = _step_setup(run, "cuda", True, flat_adamw=flat)
        losses = [float(step(lr_at(i, t))) for i in range(8)]
        result[flat] = losses, {k: v.float().cpu() for k, v in model.state_dict().items()}
        if flat:
            opt = step.opt
            assert isinstance(opt, FlatAdamW)
            for buf in opt.buffers:
                if buf.copy is not None:
                    for p, copy in zip(buf.params, buf.views(buf.copy)):
                        assert torch.equal(copy, p.detach().to(torch.bfloat16))
    assert result[True][0] == pytest.approx(result[False][0], rel=1e-3)
    for k, v in result[False][1].items():
        torch.testing.assert_close(result[True][1][k], v, rtol=1e-3, atol=1e-4, msg=k)


def tiny_llama_lm(vocab_size: int):
    """A 2-layer Llama under the training loop's contract (weightpca.adapters.CausalLM)."""
    from weightpca.adapters import CausalLM, LlamaAdapter

    from test_surgery import tiny_llama

    return CausalLM(LlamaAdapter(tiny_llama(None, vocab_size)[0]))


def test_the_loop_trains_any_module_with_the_contract(tiny_data, tmp_path):
    """A Hugging Face model, not our GPT, through the same loop: it learns, writes the same artifacts, and
    two runs are bitwise equal."""
    run = tiny_run(max_steps=12)
    run["model"] = {"block_size": 16}
    s = train_to(run, tiny_data, tmp_path / "a", tmp_path / "wa", model=tiny_llama_lm(384))
    assert s["steps"] == 12 and s["final_val_ppl"] < 384 and s["params"] > 0
    assert math.isnan(s["attention_ablated_val_ppl"]) and s["embedding_params"] is None
    assert {p.name for p in (tmp_path / "a").iterdir()} == {
        "model.safetensors",
        "config.json",
        "metrics.csv",
        "summary.json",
    }
    first = weights(tmp_path / "a")
    assert any(k.startswith("model.model.layers.1.self_attn.q_proj") for k in first)
    train_to(run, tiny_data, tmp_path / "b", tmp_path / "wb", model=tiny_llama_lm(384))
    assert_bitwise_equal(first, weights(tmp_path / "b"))
    assert not torch.equal(
        first["model.model.layers.0.mlp.up_proj.weight"],
        tiny_llama_lm(384).state_dict()["model.model.layers.0.mlp.up_proj.weight"],
    )
