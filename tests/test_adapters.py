"""Model adapters: every linear matrix by role, as views of the right rows; patch and restore; one loader."""

import numpy as np
import pytest
import torch

from weightpca.adapters import GPTAdapter, LlamaAdapter, adapter_for, load
from weightpca.model import GPT, GPTConfig

from test_surgery import tiny_llama


def small_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16))


def test_gpt_matrices_are_the_rows_of_its_modules():
    model = small_gpt()
    adapter = adapter_for(model)
    assert isinstance(adapter, GPTAdapter) and adapter.n_layers == 2 and adapter.max_len == 16
    shapes = {m.name: adapter.weight(m).shape for m in adapter.matrices()}
    assert shapes == {
        f"{i}.{r}": s
        for i in range(2)
        for r, s in [
            ("q", (16, 16)),
            ("k", (16, 16)),
            ("v", (16, 16)),
            ("o", (16, 16)),
            ("fc", (64, 16)),
            ("proj", (16, 64)),
        ]
    }
    fused = model.transformer.h[1].attn.c_attn.weight
    np.testing.assert_array_equal(adapter.weight(adapter.matrix("1.k")), fused[16:32].detach().double().numpy())
    assert adapter.weight_view(adapter.matrix("1.v")).data_ptr() == fused[32:].data_ptr()  # a view, not a copy
    # q, k and v read one input: the fused module
    assert adapter.input_module(adapter.matrix("0.v")) is model.transformer.h[0].attn.c_attn
    assert adapter.roles(["qkv", "mlp"]) == ["q", "k", "v", "fc", "proj"]
    with pytest.raises(ValueError, match=r"unknown \['attn'\]; choose from \['qkv', 'o', 'mlp'\]"):
        adapter.roles(["attn"])
    # what a checkpoint of this config must hold: exactly the modules the matrices live in
    state = model.state_dict()
    for name, shape in GPTAdapter.expected_shapes(model.config.to_dict()).items():
        assert tuple(state[name].shape) == shape


def test_patched_changes_only_the_named_rows_and_restores_them():
    model = small_gpt()
    adapter = GPTAdapter(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 64, (1, 8))
    logits = adapter.logits(x)
    with adapter.patched({"0.k": np.zeros((16, 16)), "1.fc": np.ones((64, 16))}):
        w = model.transformer.h[0].attn.c_attn.weight
        assert w[16:32].abs().sum() == 0 and torch.equal(w[:16], before["transformer.h.0.attn.c_attn.weight"][:16])
        assert not torch.allclose(adapter.logits(x), logits)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(RuntimeError), adapter.patched({"0.q": np.zeros((16, 16))}):
        raise RuntimeError("restored on errors too")
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, before["transformer.h.0.attn.c_attn.weight"])


def test_llama_shares_inputs_and_leaves_the_training_mode_alone():
    model, tok = tiny_llama(None)
    model.train()
    adapter = LlamaAdapter(model, tok)
    assert model.training  # an adapter never switches the mode (training uses adapters too)
    layer = model.model.layers[1]
    assert adapter.input_module(adapter.matrix("1.up")) is layer.mlp.gate_proj
    assert adapter.input_module(adapter.matrix("1.k")) is layer.self_attn.q_proj
    assert adapter.input_module(adapter.matrix("1.down")) is layer.mlp.down_proj
    assert [m.role for m in adapter.matrices(adapter.roles(["mlp"]))] == ["gate", "up", "down"] * 2
    assert adapter.greedy(tok("abc")["input_ids"], 5, stop_at_eos=False).__len__() == 5


def test_the_one_loader_names_the_kinds():
    with pytest.raises(ValueError, match="unknown model kind 'onnx'; choose from gpt, hf, compressed"):
        load("onnx", "x")


def qwen3_tiny():
    """Qwen3's layout: a Llama with per-head q/k RMS norms (its config class from transformers)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    return LlamaAdapter(Qwen3ForCausalLM(cfg).eval())


def factored_llama():
    """The tiny Llama with every matrix factored (shared K/V bases): the cached forward runs its modules."""
    from weightpca.compress import factorize_model
    from weightpca.plan import model_plan

    target = LlamaAdapter(tiny_llama(None)[0].eval())
    calib = np.random.default_rng(0).integers(0, 27, 200)
    plan = model_plan(target, "shared_kv", None, calib, 32)
    return LlamaAdapter(factorize_model(target, plan.factors(0.6))[0].eval())


@pytest.mark.parametrize("family", ["gpt", "llama", "qwen3", "factored"])
@pytest.mark.parametrize("capacity", [None, 24])
def test_cached_logits_equal_the_full_forward(family, capacity):
    """A prefill of 5 tokens then single tokens, through a growing or a static cache, give the full
    forward's logits at every position (grouped-query heads, factored modules, q/k norms included)."""
    from weightpca.adapters import KVCache

    adapter = {
        "gpt": lambda: GPTAdapter(small_gpt().eval()),
        "llama": lambda: LlamaAdapter(tiny_llama(None)[0].eval()),
        "qwen3": qwen3_tiny,
        "factored": factored_llama,
    }[family]()
    ids = torch.from_numpy(np.random.default_rng(3).integers(0, 27, (2, 9)))
    with torch.no_grad():
        full = adapter.logits(ids)
        cache = KVCache.empty(adapter.kv_shape(), 2, torch.float32, "cpu", capacity)
        parts = [adapter.cached_logits(ids[:, :5], cache)]
        parts += [adapter.cached_logits(ids[:, i : i + 1], cache) for i in range(5, 9)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)
    assert cache.keys.shape[3] == (capacity or 9)
    if capacity:
        assert int(cache.position) == 9 and cache.keys[:, :, :, 9:].abs().sum() == 0
