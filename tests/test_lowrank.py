"""The low-rank regulariser: exact values against an SVD, gradients, λ = 0, and the truncation sweep."""

import math

import numpy as np
import pytest
import torch

from weightpca.io import load_tensors
from weightpca.lowrank import (
    mean_statistic,
    nuclear_ratio,
    rank_sweep,
    spectral_ratio,
    target_matrices,
    truncate,
)
from weightpca.model import GPT, GPTConfig

from conftest import tiny_run, train_to


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (16, 16), (40, 3)])
def test_ratio_and_nuclear_match_the_singular_values(shape):
    torch.manual_seed(sum(shape))
    a = torch.randn(*shape, dtype=torch.float64) * torch.logspace(0, -2, shape[1], dtype=torch.float64)
    s = torch.linalg.svdvals(a)
    torch.testing.assert_close(spectral_ratio(a), (s**4).sum() / (s**2).sum() ** 2)
    torch.testing.assert_close(nuclear_ratio(a), s.sum() / (s**2).sum().sqrt())


def test_ratio_extremes():
    torch.manual_seed(0)
    u, v = torch.randn(9, 1, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64)
    assert spectral_ratio(3.0 * u @ v).item() == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    assert spectral_ratio(q).item() == pytest.approx(1 / 12)
    assert nuclear_ratio(q).item() == pytest.approx(math.sqrt(12))
    assert spectral_ratio(5.0 * q).item() == pytest.approx(1 / 12)  # scale-free


@pytest.mark.parametrize("stat", [spectral_ratio, nuclear_ratio])
def test_gradient_matches_finite_differences(stat):
    torch.manual_seed(1)
    a = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(stat, (a,), eps=1e-6, atol=1e-7)


def small_model(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, **kw))


def test_targets_are_views_of_the_parameters():
    m = small_model()
    mats = target_matrices(m, ["attn", "mlp"])
    assert len(mats) == 2 * 6 and mats["0.k"].shape == (16, 16) and mats["1.fc"].shape == (64, 16)
    mean_statistic(m, "ratio", ["attn"]).backward()
    assert m.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0
    assert m.transformer.h[0].mlp.c_fc.weight.grad is None
    with pytest.raises(ValueError, match="unknown"):
        target_matrices(m, ["embedding"])


def test_truncate_keeps_the_rank_and_counts_parameters():
    m = small_model()
    counts = truncate(m, ["attn", "mlp"], 0.25)
    mats = target_matrices(m, ["attn", "mlp"])
    for name, w in mats.items():
        # 0.25 * min(m, n) = 4; float32 storage leaves noise far below rtol
        assert torch.linalg.matrix_rank(w.detach(), rtol=1e-4).item() == 4, name
    # q, k, v, c_proj: 16x16 -> 4*32; c_fc 64x16 and c_proj 16x64 -> 4*80, per layer
    assert counts["target_params_kept"] == 2 * (4 * 4 * 32 + 2 * 4 * 80)
    assert counts["target_params_full"] == 2 * (4 * 256 + 2 * 1024)
    assert counts["params_total"] - counts["params_kept"] == counts["target_params_full"] - counts["target_params_kept"]


def test_full_rank_sweep_point_is_the_model(tiny_data, tmp_path):
    import contextlib

    from weightpca.adapters import GPTAdapter
    from weightpca.evaluate import evaluate
    from weightpca.io import read_json
    from weightpca.tokens import eval_windows, open_tokens

    train_to(tiny_run(), tiny_data, tmp_path / "m", tmp_path / "w")
    model = GPTAdapter.load(tmp_path / "m" / "model.safetensors", tmp_path / "m" / "config.json").model
    meta = read_json(tiny_data / "meta.json")
    windows = eval_windows(open_tokens(tiny_data / "val.bin", meta), 16, 1024)
    rows = rank_sweep(model, windows, [0.25, 1.0, 0.5], ["attn", "mlp"], batch_size=8)
    assert [r["fraction"] for r in rows] == [1.0, 0.5, 0.25]
    full, _ = evaluate(model, windows, 8, "cpu", contextlib.nullcontext)  # model restored after the sweep
    assert rows[0]["val_loss"] == pytest.approx(full, abs=1e-6)
    assert rows[0]["params_kept"] == rows[0]["params_total"]
    assert rows[2]["params_kept"] < rows[1]["params_kept"] < rows[0]["params_kept"]
    assert rows[2]["val_loss"] > rows[0]["val_loss"]


def test_lambda_zero_is_bitwise_the_unregularised_run(tiny_data, tmp_path):
    reg = {"kind": "ratio", "lambda": 0.0, "targets": ["attn", "mlp"]}
    plain = train_to(tiny_run(), tiny_data, tmp_path / "a", tmp_path / "wa")
    zero = train_to(tiny_run(lowrank_reg=reg), tiny_data, tmp_path / "b", tmp_path / "wb")
    a, b = load_tensors(tmp_path / "a" / "model.safetensors"), load_tensors(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert zero["final_val_loss"] == plain["final_val_loss"]
    assert plain["final_lowrank_value"] == "" and 0 < zero["final_lowrank_value"] < 1
    header = (tmp_path / "b" / "metrics.csv").read_text().splitlines()[0]
    assert "lowrank_value" in header


@pytest.mark.parametrize("kind", ["ratio", "nuclear"])
def test_penalty_concentrates_the_spectrum(tiny_data, tmp_path, kind):
    """Training with λ > 0 ends with a more concentrated spectrum than the control from the same init."""
    reg0 = {"kind": kind, "lambda": 0.0, "targets": ["attn", "mlp"]}
    reg = dict(reg0, **{"lambda": 2.0})
    control = train_to(tiny_run(max_steps=24, lowrank_reg=reg0), tiny_data, tmp_path / "c", tmp_path / "wc")
    penalised = train_to(tiny_run(max_steps=24, lowrank_reg=reg), tiny_data, tmp_path / "p", tmp_path / "wp")
    if kind == "ratio":
        assert penalised["final_lowrank_value"] > 1.2 * control["final_lowrank_value"]
    else:
        assert penalised["final_lowrank_value"] < 0.95 * control["final_lowrank_value"]
    assert np.isfinite(penalised["final_val_loss"])


def test_training_gradient_at_positive_lambda_matches_finite_differences():
    """The gradient optimizer_step applies at λ > 0 (cross-entropy plus penalty, through the λ ≠ 0 path)
    equals central differences of the full loss; and the penalty's share is not negligible. The penalty is
    computed in float32 (as in training), hence a step of 1e-3 and tolerances of 1e-3 relative, 2e-5 absolute."""
    import contextlib

    from weightpca.lowrank import penalty
    from weightpca.train import TrainSettings, optimizer_step

    m = small_model().double()
    reg = {"kind": "ratio", "lambda": 3.0, "targets": ["attn", "mlp"]}
    t = TrainSettings.from_dict(dict(tiny_run()["train"], grad_clip=0.0, lowrank_reg=reg))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(64, (2, 16), generator=g), torch.randint(64, (2, 16), generator=g)

    def cross_entropy(x, y):  # in float64 (the model's own loss casts logits to float32)
        return None, torch.nn.functional.cross_entropy(
            m.logits_from_hidden(m.hidden_states(x)).reshape(-1, 64), y.reshape(-1)
        )

    class OneBatch:
        def next(self):
            return x, y

    class Capture:  # an optimizer that records the gradients it is asked to apply
        grads = {}

        def step(self):
            self.grads.update({n: p.grad.clone() for n, p in m.named_parameters()})

        def zero_grad(self, set_to_none=True):
            m.zero_grad(set_to_none=set_to_none)

    opt = Capture()
    optimizer_step(cross_entropy, m, opt, OneBatch(), t, contextlib.nullcontext)

    def full_loss():
        return (cross_entropy(x, y)[1] + penalty(m, reg)).item()

    params = dict(m.named_parameters())
    eps = 1e-3
    for name, idx in [
        ("transformer.h.0.attn.c_attn.weight", (20, 3)),
        ("transformer.h.1.attn.c_proj.weight", (4, 9)),
        ("transformer.h.1.mlp.c_fc.weight", (30, 7)),
    ]:
        p = params[name]
        with torch.no_grad():
            p[idx] += eps
            up = full_loss()
            p[idx] -= 2 * eps
            down = full_loss()
            p[idx] += eps
        numeric = (up - down) / (2 * eps)
        assert opt.grads[name][idx].item() == pytest.approx(numeric, rel=1e-3, abs=2e-5), name
        m.zero_grad()
        cross_entropy(x, y)[1].backward()
        assert abs(opt.grads[name][idx].item() - p.grad[idx].item()) > 0.1 * abs(numeric), name
