import pytest
import torch

from weightpca.model import GPT, GPTConfig


def meta_model(**kw):
    with torch.device("meta"):
        return GPT(GPTConfig(**kw))


def test_gpt2_small_parameter_count():
    # the published GPT-2 small count (124.44M incl. positions) with tied head
    m = meta_model(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True)
    assert m.num_params() == 124_439_808
    assert m.embedding_params() == 50257 * 768


@pytest.mark.parametrize("k", [64, 128, 256, 384])
def test_factorised_embedding_counts(k):
    V, d = 50257, 768
    plain = meta_model(vocab_size=V, block_size=1024, n_layer=12, n_head=12, n_embd=d, bias=True)
    fact = meta_model(vocab_size=V, block_size=1024, n_layer=12, n_head=12, n_embd=d, bias=True, n_embd_wte=k)
    assert fact.embedding_params() == V * k + 2 * k * d
    assert fact.num_params() == plain.num_params() - V * d + V * k + 2 * k * d
    tied = meta_model(
        vocab_size=V, block_size=1024, n_layer=12, n_head=12, n_embd=d, bias=True, n_embd_wte=k, tie_scale=True
    )
    assert tied.embedding_params() == V * k + k * d


def test_forward_shapes_and_tied_head():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=100, block_size=8, n_layer=2, n_head=2, n_embd=16))
    idx = torch.randint(100, (3, 8))
    logits, no_loss = m(idx)
    no_logits, loss = m(idx, idx)
    assert logits.shape == (3, 8, 100) and no_loss is None and no_logits is None
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.reshape(-1, 100), idx.reshape(-1)))
    torch.testing.assert_close(logits, reference_logits(m, idx))


def test_factorised_forward_uses_rank_k_embedding():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=100, block_size=8, n_layer=1, n_head=2, n_embd=16, n_embd_wte=4))
    idx = torch.randint(100, (2, 8))
    logits, _ = m(idx)
    assert m.transformer.wte.weight.shape == (100, 4)
    assert m.scale_up.shape == (4, 16) and m.scale_down.shape == (16, 4)
    torch.testing.assert_close(logits, reference_logits(m, idx))


def reference_logits(m: GPT, idx: torch.Tensor) -> torch.Tensor:
    """GPT-2's forward pass written out from the state dict, independently of the module code:
    explicit causal softmax attention, exact GELU, LayerNorm without bias, tied (factorised) head."""
    sd, c = m.state_dict(), m.config
    B, T = idx.shape
    hd = c.n_embd // c.n_head

    def ln(x, w):
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) * w

    tok = sd["transformer.wte.weight"][idx]
    if c.factorized:
        tok = tok @ sd["scale_up"]
    x = tok + sd["transformer.wpe.weight"][:T]
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        h = ln(x, sd[p + "ln_1.weight"])
        q, k, v = (h @ sd[p + "attn.c_attn.weight"].T).split(c.n_embd, dim=-1)
        heads = []
        for j in range(c.n_head):
            s = slice(j * hd, (j + 1) * hd)
            scores = (q[..., s] @ k[..., s].transpose(-1, -2)) / hd**0.5
            heads.append(torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v[..., s])
        x = x + torch.cat(heads, dim=-1) @ sd[p + "attn.c_proj.weight"].T
        u = ln(x, sd[p + "ln_2.weight"]) @ sd[p + "mlp.c_fc.weight"].T
        x = x + (0.5 * u * (1 + torch.erf(u / 2**0.5))) @ sd[p + "mlp.c_proj.weight"].T
    h = ln(x, sd["transformer.ln_f.weight"])
    if c.factorized:
        h = h @ sd["scale_down"]
    return h @ sd["transformer.wte.weight"].T


def test_reference_forward_detects_a_changed_weight():
    """The reference above is sensitive to the weights it reads (so the comparison can fail)."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=100, block_size=8, n_layer=2, n_head=2, n_embd=16))
    idx = torch.randint(100, (2, 8))
    torch.testing.assert_close(m(idx)[0], reference_logits(m, idx))
    with torch.no_grad():
        m.transformer.h[1].attn.c_attn.weight[20, 3] += 0.5  # a key weight of layer 2
    ref = reference_logits(m, idx)
    with torch.no_grad():
        m.transformer.h[1].attn.c_attn.weight[20, 3] -= 0.5
    assert (m(idx)[0] - ref).abs().max() > 1e-4


def test_k_larger_than_d_refused():
    with pytest.raises(ValueError, match="n_embd_wte"):
        GPTConfig(n_embd=32, n_head=2, n_embd_wte=33)


def test_freeze_flags():
    m = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16, n_embd_wte=4))
    m.set_frozen(freeze_wte=True, freeze_scale=True)
    assert not m.transformer.wte.weight.requires_grad
    assert not m.scale_up.requires_grad and not m.scale_down.requires_grad
    with pytest.raises(ValueError, match="factorised"):
        GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16)).set_frozen(freeze_scale=True)


def test_uniform_attention_is_softmax_of_zero_scores():
    """The ablation equals attention whose scores are all zero (uniform over the causal prefix)."""
    from weightpca.evaluate import uniform_attention

    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=100, block_size=8, n_layer=2, n_head=2, n_embd=16)).double()
    with torch.no_grad():  # sharp attention patterns, unlike a fresh init's nearly uniform ones
        for block in m.transformer.h:
            block.attn.c_attn.weight[:32] *= 30
    idx = torch.randint(100, (2, 8))
    normal = m(idx)[0]
    with uniform_attention(m):
        ablated = m(idx)[0]
    torch.testing.assert_close(m(idx)[0], normal)  # restored on exit
    assert (ablated - normal).abs().max() > 1e-3
    # reference: zero the query weights, so every score q·k is 0 and the softmax is uniform
    with torch.no_grad():
        for block in m.transformer.h:
            block.attn.c_attn.weight[:16] = 0
    torch.testing.assert_close(ablated, m(idx)[0])
