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


def factored_model(family: str, mode: str):
    """Our GPT or the tiny Llama with every matrix factored in ``mode`` (bases at threshold 0.6)."""
    from weightpca.compress import factorize_model
    from weightpca.plan import model_plan

    target = GPTAdapter(small_gpt().eval()) if family == "gpt" else LlamaAdapter(tiny_llama(None)[0].eval())
    calib = np.random.default_rng(0).integers(0, 27, 200)
    plan = model_plan(target, mode, None, calib, min(32, target.max_len))
    return type(target)(factorize_model(target, plan.factors(0.6))[0].eval())


def factored_llama():
    """The tiny Llama with every matrix factored (shared K/V bases): the cached forward runs its modules."""
    return factored_model("llama", "shared_kv")


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


@pytest.mark.parametrize(
    "family, mode, fused",
    [
        ("llama", None, 8),  # q/k/v, gate/up, o and down of 2 layers, dense
        ("llama", "separate", 8),  # factored, PCA mean rows in the stack
        ("llama", "shared_kv", 8),  # K and V one basis, stacked once
        ("llama", "cross_layer", 6),  # q/k/v share bases across layers: left alone; the rest fused
        ("gpt", None, 0),  # c_attn is one GEMM already
        ("gpt", "activation_aware", 2),  # c_attn's three factored parts
    ],
)
def test_fused_projections_give_the_same_logits_and_hold_the_weights_once(family, mode, fused):
    """Fusing a layer's matrices of one input (one stacked GEMM) leaves the cached forward's logits as
    they were; the members' weights become views of the stack, so the bytes a forward reads are unchanged."""
    from weightpca.adapters import KVCache
    from weightpca.compress import fuse_shared_inputs
    from weightpca.speed import weight_bytes

    if mode is None:
        adapter = GPTAdapter(small_gpt().eval()) if family == "gpt" else LlamaAdapter(tiny_llama(None)[0].eval())
    else:
        adapter = factored_model(family, mode)
    ids = torch.from_numpy(np.random.default_rng(4).integers(0, 27, (2, 7)))

    def cached(last=False):
        cache = KVCache.empty(adapter.kv_shape(), 2, torch.float32, "cpu", 16)
        return adapter.cached_logits(ids, cache, last=last)

    with torch.no_grad():
        before, storage = cached(), weight_bytes(adapter.model)
        assert fuse_shared_inputs(adapter) == fused
        calls = []
        for (_, roles), module in adapter.fused.items():
            if len(roles) > 1:
                module.register_forward_hook(lambda *_: calls.append(1))
            else:  # a group of one adds into the residual
                module.add_to = (lambda add: lambda *a: calls.append(1) or add(*a))(module.add_to)
        torch.testing.assert_close(cached(), before, rtol=1e-5, atol=1e-6)
        assert len(calls) == fused  # the cached forward ran through every fused module
        torch.testing.assert_close(cached(last=True), before[:, -1:], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(adapter.logits(ids), before, rtol=1e-4, atol=1e-5)  # the model's own forward
    tensors = [*adapter.model.parameters(), *adapter.model.buffers(), *(f.weight for f in adapter.fused.values())]
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    assert sum(held.values()) == storage  # the stacks are the members' storage, not copies
    assert weight_bytes(adapter.model) == storage


def test_gguf_parsed_once_reads_a_file_once_inside_and_restores_the_package(tmp_path):
    gguf = pytest.importorskip("gguf")
    from weightpca.adapters.llama import gguf_parsed_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with gguf_parsed_once():
        first = gguf.GGUFReader(str(path))
        assert gguf.GGUFReader(str(path)) is first  # parsed once
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        np.testing.assert_array_equal(first.tensors[0].data, np.arange(12, dtype=np.float32).reshape(3, 4))
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
    assert gguf.GGUFReader(str(path)) is not first
