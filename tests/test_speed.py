"""Speed in the regimes models are run in: prefill batch x context, static-cache greedy decode, bounds."""

import numpy as np
import pytest
import torch
from test_adapters import factored_llama, small_gpt

from weightpca.adapters import GPTAdapter, LlamaAdapter
from weightpca.compress import factorize_model, fuse_shared_inputs, save_compressed
from weightpca.plan import model_plan
from weightpca.speed import Decoder, Prefill, compare, measure, speed_verdict, weight_bytes

from test_surgery import tiny_llama


@pytest.mark.parametrize("family,compile", [("gpt", False), ("factored", False), ("factored", True)])
def test_static_cache_decoder_continues_like_the_full_forward(family, compile):
    """The timed decode loop (compiled by torch.compile or not) makes the full forward's greedy tokens."""
    adapter = GPTAdapter(small_gpt().eval()) if family == "gpt" else factored_llama()
    prompt = torch.from_numpy(np.random.default_rng(2).integers(0, 27, (3, 4)))
    decoder = Decoder(adapter, prompt, 6, torch.float32, graph=True, compile=compile)  # no graph on the CPU
    decoder.run()
    assert decoder.graph is None and int(decoder.steps) == 5
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, adapter.logits(ids)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(decoder.ids, ids[:, -1:])
    decoder.run()  # again from the prompt: the same continuation
    assert torch.equal(decoder.ids, ids[:, -1:])


@pytest.mark.parametrize("family", ["gpt", "factored"])
@pytest.mark.parametrize("fuse", [False, True])
def test_prefill_gives_the_last_positions_logits_again_and_again(family, fuse):
    """The timed prefill (a whole static cache filled: causal attention without a mask; fused
    projections or not) is the full forward's last position, every call."""
    adapter = GPTAdapter(small_gpt().eval()) if family == "gpt" else factored_llama()
    tokens = torch.from_numpy(np.random.default_rng(5).integers(0, 27, (2, 11)))
    with torch.no_grad():
        full = adapter.logits(tokens)[:, -1:]
        if fuse:
            assert fuse_shared_inputs(adapter) == (8 if family == "factored" else 0)
        prefill = Prefill(adapter, tokens, torch.float32, graph=True)
        for _ in range(2):  # the cache rewound each time
            prefill.run()
            torch.testing.assert_close(prefill.logits, full, rtol=1e-4, atol=1e-5)
    assert int(prefill.cache.position) == 11 and prefill.cache.mask(11) is None and prefill.cache.mask(1) is not None


def test_measure_times_every_regime_with_its_bound(tmp_path):
    model, tok = tiny_llama(tmp_path)
    target = LlamaAdapter(model.eval(), tok)
    plan = model_plan(target, "activation_aware", None, np.random.default_rng(0).integers(0, 27, 200), 32)
    factored, spec = factorize_model(target, plan.factors(0.6))
    save_compressed(factored, spec, tmp_path / "c", "hf", model.config.to_dict())
    regimes = dict(prefill=[[1, 20], [2, 100], [1, 20]], decode_batches=[1, 3, 1], prompt=5, new_tokens=6, repeats=2)
    record = measure("compressed", str(tmp_path / "c"), **regimes)
    # (1, 20) once; the context capped at the model's 64 positions
    assert [(r["batch"], r["context"]) for r in record["prefill"]] == [(1, 20), (2, 64)]
    assert [(r["batch"], r["prompt"], r["new_tokens"]) for r in record["decode"]] == [(1, 5, 6), (3, 5, 6)]
    assert record["weight_bytes"] == weight_bytes(factored) and record["dtype"] == "float32"
    assert record["fused_groups"] == 8  # q/k/v, gate/up, o and down of both layers
    bw = record["bandwidth_bytes_per_s"]
    for r in record["prefill"]:
        assert len(r["seconds"]) == r["repeats"] == 2
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["context"] / np.median(r["seconds"]))
        assert r["bound_tokens_per_s"] == pytest.approx(r["batch"] * r["context"] * bw / record["weight_bytes"])
    kv_step = 2 * 2 * 2 * (5 + 3) * 8 * 4  # K and V, 2 layers, 2 heads, prompt + new / 2 positions, dim 8, fp32
    for r in record["decode"]:
        # the 5 steps after the prefill (which made the first token) are timed
        assert r["steps"] == 5 and r["tokens_per_s"] == pytest.approx(r["batch"] * 5 / np.median(r["seconds"]))
        assert r["step_kernels"] is None  # profiled on CUDA only
        assert r["bound_tokens_per_s"] == pytest.approx(
            r["batch"] * bw / (record["weight_bytes"] + r["batch"] * kv_step)
        )
    # in bfloat16: half the weight bytes
    assert (
        measure("compressed", str(tmp_path / "c"), dtype="bfloat16", **regimes)["weight_bytes"] * 2
        == record["weight_bytes"]
    )
    rows = compare(record, record)
    assert [r["regime"] for r in rows] == ["prefill 1x20", "prefill 2x64", "decode batch 1", "decode batch 3"]
    assert all(r["verdict"] == "not distinguishable" and r["speedup"] == 1.0 for r in rows)


def test_speed_verdict_needs_every_repeat_to_win():
    assert speed_verdict([2.0, 2.1], [1.0, 1.9]) == "faster"
    assert speed_verdict([2.0, 2.1], [1.0, 2.05]) == "not distinguishable"
    assert speed_verdict([1.0, 1.1], [1.2, 1.5]) == "slower"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile", [False, True])
def test_captured_prefill_and_decode_replay_the_eager_forward_on_cuda(compile):
    """On CUDA the prefill and the decode step (compiled or not) are CUDA graphs over fused projections:
    replayed, they give the eager forward's logits and greedy tokens; the profiled step launches kernels."""
    adapter = factored_llama()
    adapter.model.cuda()
    adapter.device = torch.device("cuda")
    fuse_shared_inputs(adapter)
    tokens = torch.from_numpy(np.random.default_rng(6).integers(0, 27, (2, 6))).cuda()
    with torch.no_grad():
        ids = tokens
        for _ in range(5):
            ids = torch.cat([ids, adapter.logits(ids)[:, -1:].argmax(-1)], dim=1)
        prefill = Prefill(adapter, tokens, torch.float32, graph=True)
        for _ in range(2):
            prefill.run()
        assert prefill.run.graph is not None
        torch.testing.assert_close(prefill.logits, adapter.logits(tokens)[:, -1:], rtol=1e-3, atol=1e-4)
    decoder = Decoder(adapter, tokens, 5, torch.float32, graph=True, compile=compile)
    for _ in range(2):
        decoder.run()
        assert decoder.graph is not None and int(decoder.steps) == 4
        assert torch.equal(decoder.ids, ids[:, -1:])
    launched = decoder.step_kernels(top=3)
    assert launched["kernels"] >= 2 * len(adapter.model.model.layers) and 0 < launched["kernel_seconds"] < 1
    assert len(launched["top"]) == 3 and all(calls >= 1 for _, calls, _ in launched["top"])
