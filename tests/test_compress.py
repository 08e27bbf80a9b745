"""Factored low-rank models: the layer, the factors of every mode, save/reload, refusals, one operating point."""

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from weightpca.adapters import GPTAdapter, LlamaAdapter
from weightpca.adapters.base import add_linear
from weightpca.compress import (
    RELOAD_TOLERANCE,
    CompressedModelError,
    LowRankLinear,
    balance_factors,
    concurrent_linears,
    count_parameters,
    export_point,
    factorize_model,
    frontier_threshold,
    load_compressed,
    save_compressed,
    storage_dtype,
    unique_tensors,
    whole_model_ranks,
)
from weightpca.linalg import PCABasis, WhitenedBasis, input_cholesky
from weightpca.plan import MODES, model_plan
from weightpca.targets import perplexity

from test_surgery import decaying, qkv_plan, tiny_llama

TOKENS = np.random.default_rng(0).integers(0, 27, 300)


def linear(weight, bias=None) -> torch.nn.Linear:
    """An nn.Linear holding ``weight [n, m]`` (and ``bias [n]``)."""
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def plan_factors(target, mode, threshold, groups, tokens, window):
    """Every matrix of ``groups`` factored by ``mode`` at one threshold (what export_point stores)."""
    return model_plan(target, mode, target.roles(groups), tokens, window).factors(threshold)


def test_lowrank_linear_is_the_dense_reconstruction_with_its_mean():
    w = decaying(24, 16, seed=1) + 5.0  # a large mean row: dropping it would show
    basis = PCABasis.fit(w)
    r = 5
    coef, vt, mean = (torch.tensor(a, dtype=torch.float64) for a in (basis.scores[:, :r], basis.vt[:r], basis.mean))
    bias = torch.randn(24, dtype=torch.float64)
    layer = LowRankLinear(linear(vt), linear(coef, bias), torch.nn.Parameter(mean))
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    dense = torch.tensor(basis.reconstruct(r))
    assert layer(x).shape == (3, 7, 24) and layer.rank == r
    torch.testing.assert_close(layer(x), F.linear(x, dense, bias))
    torch.testing.assert_close(layer.dense_weight(), dense)
    without_mean = LowRankLinear(linear(vt), linear(coef, bias), None)
    assert (without_mean(x) - layer(x)).abs().max() > 1.0
    # a residual added by the coefficient GEMM itself (no bias, no mean) or after it
    residual = torch.randn(3, 7, 24, dtype=torch.float64)
    plain = LowRankLinear(linear(vt), linear(coef), None)
    for m in (layer, plain):
        torch.testing.assert_close(add_linear(residual, m, x), residual + m(x))
    torch.testing.assert_close(add_linear(residual, linear(dense), x), residual + F.linear(x, dense))


def test_concurrent_linears_are_the_separate_linears_and_trace_with_their_shapes():
    """The coefficient GEMMs of a fused group (run on streams at once on CUDA; CPU here): each output is
    its own linear map of its slice of the stacked product, and the op's registered shapes are right."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, 5, 30, generator=gen, dtype=torch.float64)
    slices = [z[..., :8], z[..., 8:20], z[..., 20:]]  # column slices: strided views, as FusedProjection gives
    weights = [torch.randn(n, s.shape[-1], generator=gen, dtype=torch.float64) for n, s in zip((7, 3, 11), slices)]
    biases = [None, torch.randn(3, generator=gen, dtype=torch.float64), None]
    out = concurrent_linears(slices, weights, biases)
    for y, s, w, b in zip(out, slices, weights, biases, strict=True):
        torch.testing.assert_close(y, F.linear(s, w, b))
    torch.library.opcheck(concurrent_linears, (slices, weights, biases))  # the fake (compile-time) shapes too


def test_activation_aware_factors_fold_the_whitening():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((20, 16))
    x = rng.standard_normal((500, 16)) * np.linspace(0.1, 3.0, 16)
    chol = input_cholesky(x.T @ x / len(x))
    basis = WhitenedBasis.fit(w, chol, np.linalg.inv(chol))
    layer = LowRankLinear(linear(torch.tensor(basis.vt_linv[:6])), linear(torch.tensor(basis.u_s[:, :6])))
    torch.testing.assert_close(layer.dense_weight(), torch.tensor(basis.reconstruct(6)))


@pytest.mark.parametrize("mode", MODES)
def test_factors_of_every_mode_equal_the_surgery_reconstruction(mode):
    lw = [
        {"q": decaying(24, 24, 3 * i), "k": decaying(8, 24, 3 * i + 1), "v": decaying(8, 24, 3 * i + 2)}
        for i in range(3)
    ]
    moments = [np.cov(np.random.default_rng(i).standard_normal((200, 24)), rowvar=False) for i in range(3)]
    plan = qkv_plan(mode, lw, moments)
    weights = plan.weights(0.7)
    for name, f in plan.factors(0.7).items():
        np.testing.assert_allclose(f.coef @ f.basis + (f.mean if f.mean is not None else 0), weights[name], atol=1e-10)
    keys = {f.key for f in plan.factors(0.7).values()}
    assert len(keys) == {"separate": 9, "shared_kv": 6, "cross_layer": 4, "activation_aware": 9}[mode]


def tiny_target():
    model, tok = tiny_llama(None)
    return LlamaAdapter(model.eval(), tok)


def test_shared_basis_is_stored_and_counted_once(tmp_path):
    target = tiny_target()
    factors = plan_factors(target, "cross_layer", 0.5, ["qkv"], TOKENS, 32)
    model, spec = factorize_model(target, factors)
    kv = [m for i in range(2) for m in (model.model.layers[i].self_attn.k_proj, model.model.layers[i].self_attn.v_proj)]
    assert all(m.basis is kv[0].basis and m.row_mean is kv[0].row_mean for m in kv)  # one basis, all layers
    rank, width = kv[0].basis.weight.shape
    own = sum(m.coef.weight.numel() for m in kv)
    dense_kv = sum(m.out_features * width for m in kv)
    q_diff = sum(
        target.model.model.layers[i].self_attn.q_proj.weight.numel()
        - model.model.layers[i].self_attn.q_proj.coef.weight.numel()
        - model.model.layers[i].self_attn.q_proj.basis.weight.numel()
        - width
        for i in range(2)
    )
    assert count_parameters(model) == count_parameters(target.model) - dense_kv + own + rank * width + width - q_diff
    tensors, aliases = unique_tensors(model)
    assert sum(name.endswith("basis.weight") and ("k_proj" in name or "v_proj" in name) for name in tensors) == 1
    assert len([a for a in aliases if a.endswith((".basis.weight", ".row_mean"))]) == 2 * 4 - 2
    save_compressed(model, spec, tmp_path, "hf", target.model.config.to_dict())
    reloaded = load_compressed(tmp_path)
    assert reloaded.model.layers[1].self_attn.v_proj.basis is reloaded.model.layers[0].self_attn.k_proj.basis


@pytest.mark.parametrize("groups", [["qkv"], ["qkv", "o", "mlp"]])
def test_tiny_llama_round_trip_same_logits_and_generate(tmp_path, groups):
    target = tiny_target()
    x = torch.tensor(TOKENS[:40])[None]
    factors = plan_factors(target, "shared_kv", 0.6, groups, TOKENS, 32)
    model, spec = factorize_model(target, factors)
    save_compressed(model, spec, tmp_path, "hf", target.model.config.to_dict())
    reloaded = load_compressed(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=0)
    out = reloaded.generate(x[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)
    assert count_parameters(reloaded) < count_parameters(target.model)
    assert not list(tmp_path.glob("*.bin"))


def test_gpt_round_trip_with_fused_qkv(tmp_path, tiny_data):
    from weightpca.io import read_json

    from conftest import tiny_run, train_to

    train_to(tiny_run(max_steps=6), tiny_data, tmp_path / "d", tmp_path / "w")
    target = GPTAdapter.load(
        tmp_path / "d" / "model.safetensors", tmp_path / "d" / "config.json", tiny_data / "tokenizer.json"
    )
    tokens = np.asarray(TOKENS % 300)
    factors = plan_factors(target, "activation_aware", 0.5, ["qkv", "o", "mlp"], tokens, 16)
    compressed, spec = factorize_model(target, factors)
    assert [p["kind"] for p in spec[0]["parts"]] == ["lowrank"] * 3  # c_attn: q, k, v blocks
    save_compressed(compressed, spec, tmp_path / "c", "gpt", read_json(tmp_path / "d" / "config.json"))
    reloaded = load_compressed(tmp_path / "c")
    x = torch.tensor(tokens[:16])[None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x)[0], compressed(x)[0], rtol=0, atol=0)


def saved_point(tmp_path):
    target = tiny_target()
    model, spec = factorize_model(target, plan_factors(target, "separate", 0.5, ["qkv"], TOKENS, 32))
    save_compressed(model, spec, tmp_path, "hf", target.model.config.to_dict())
    return tmp_path


def test_malformed_folders_are_refused_naming_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = saved_point(tmp_path / "missing")
    weights = load_file(folder / "model.safetensors")
    name = next(k for k in weights if k.endswith("v_proj.coef.weight"))
    save_file({k: v for k, v in weights.items() if k != name}, folder / "model.safetensors")
    with pytest.raises(CompressedModelError, match=rf"model\.safetensors: missing tensors \['{name}'\]"):
        load_compressed(folder)

    folder = saved_point(tmp_path / "shape")
    info = json.loads((folder / "compress.json").read_text())
    info["modules"][0]["parts"][0]["rank"] += 1
    (folder / "compress.json").write_text(json.dumps(info))
    with pytest.raises(CompressedModelError, match=r"model\.safetensors: tensor '.*' has shape"):
        load_compressed(folder)

    folder = saved_point(tmp_path / "pickle")
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(CompressedModelError, match=r"pytorch_model\.bin: pickled weight files are refused"):
        load_compressed(folder)


def test_export_point_agrees_with_the_reconstruction_and_is_smaller(tmp_path):
    target = tiny_target()
    before = perplexity(target, TOKENS, 32)
    record = export_point(
        target,
        "activation_aware",
        0.6,
        ["qkv", "o", "mlp"],
        TOKENS,
        TOKENS,
        32,
        tmp_path,
        target.model.config.to_dict(),
        "abc",
        progress=lambda *_: None,
    )
    assert record["loaded_vs_reconstructed"] <= 1e-3 and record["ppl_reconstructed"] != pytest.approx(before)
    assert record["bytes_factored"] < record["bytes_dense"] and record["params_factored"] < record["params_dense"]
    assert perplexity(target, TOKENS, 32) == pytest.approx(before, rel=1e-6)  # the target is restored


def test_a_bfloat16_export_is_half_the_bytes_and_reloads_in_its_dtype(tmp_path):
    """compress.dtype: stored in bfloat16, both byte counts in bfloat16; reloaded in its own dtype, or upcast
    for a CPU evaluation, within bfloat16's tolerance of the float32 reconstruction."""
    target = tiny_target()
    common = ("activation_aware", 0.6, ["qkv", "o", "mlp"], TOKENS, TOKENS, 32)
    cfg, quiet = target.model.config.to_dict(), lambda *_: None
    f32 = export_point(target, *common, tmp_path / "f32", cfg, "abc", progress=quiet)
    bf16 = export_point(target, *common, tmp_path / "bf16", cfg, "abc", progress=quiet, dtype=torch.bfloat16)
    assert (f32["dtype"], bf16["dtype"], bf16["eval_dtype"]) == ("float32", "bfloat16", "float32")
    assert bf16["params_factored"] == f32["params_factored"]
    # two bytes less per parameter (the files' headers, a few KiB here, about the same)
    for which in ("dense", "factored"):
        saved = f32[f"bytes_{which}"] - bf16[f"bytes_{which}"]
        assert saved == pytest.approx(2 * f32[f"params_{which}"], rel=0.02)
    assert bf16["loaded_vs_reconstructed"] <= bf16["reload_tolerance"] == RELOAD_TOLERANCE[torch.bfloat16]
    assert bf16["loaded_vs_reconstructed"] > f32["loaded_vs_reconstructed"]  # the rounding shows
    assert {p.dtype for p in load_compressed(tmp_path / "bf16").parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_compressed(tmp_path / "bf16", dtype=torch.float32).parameters()} == {torch.float32}
    assert storage_dtype("auto", {"dtype": "bfloat16"}) == torch.bfloat16
    assert storage_dtype("auto", {"torch_dtype": "float16"}) == torch.float16
    assert storage_dtype("auto", {}) == torch.float32 and storage_dtype("auto", {}, "bfloat16") == torch.bfloat16
    assert storage_dtype("float32", {"dtype": "bfloat16"}) == torch.float32
    with pytest.raises(ValueError, match="export dtype 'int8'"):
        storage_dtype("auto", {"dtype": "int8"})


def test_ranks_rounded_to_a_multiple_are_the_point_exported(tmp_path):
    """compress.rank_multiple: the nearest multiple, at least one, at most the full rank; counted honestly."""
    target = tiny_target()
    plan = model_plan(target, "activation_aware", None, TOKENS, 32)
    ranks = plan.ranks(0.6)
    rounded = plan.rounded_ranks(0.6, 8)
    full = {g.key: len(plan.bases[g.key].s) for g in plan.groups}
    for key, r in ranks.items():
        assert rounded[key] == min(full[key], max(8, 8 * round(r / 8)))
        assert rounded[key] % 8 == 0 or rounded[key] == full[key]
    assert rounded != ranks
    cfg, quiet = target.model.config.to_dict(), lambda *_: None
    record = export_point(
        target,
        "activation_aware",
        0.6,
        ["qkv", "o", "mlp"],
        TOKENS,
        TOKENS,
        32,
        tmp_path,
        cfg,
        "abc",
        progress=quiet,
        rank_multiple=8,
        plan=plan,
    )
    spec = json.loads((tmp_path / "compress.json").read_text())["modules"]
    smaller = [r for key, r in rounded.items() if r * sum(plan.shapes[key]) < np.prod(plan.shapes[key])]
    assert sorted(p["rank"] for e in spec for p in e["parts"] if p["kind"] == "lowrank") == sorted(smaller)
    assert record["threshold"] == 0.6 and record["rank_multiple"] == 8
    with target.patched(plan.weights(rounded, np.float32)):
        assert record["ppl_reconstructed"] == pytest.approx(perplexity(target, TOKENS, 32), rel=1e-6)


def test_refit_export_agrees_with_its_refit_reconstruction(tmp_path):
    """A refit whole-model point: the saved factors are the refit ones (not the plan's), reloaded exactly."""
    from weightpca.allocation import trial_ranks
    from weightpca.refit import refit_plan

    target = tiny_target()
    plan = model_plan(target, "activation_aware", None, TOKENS, 32)
    ranks = trial_ranks(plan, 0.5)
    common = (["qkv", "o", "mlp"], TOKENS, TOKENS, 32)
    quiet = lambda *_: None  # noqa: E731
    cfg = target.model.config.to_dict()
    plain = export_point(target, "activation_aware", ranks, *common, tmp_path / "plain", cfg, "abc", progress=quiet)
    refit = export_point(
        target, "activation_aware", ranks, *common, tmp_path / "refit", cfg, "abc", 0.01, progress=quiet
    )
    with target.patched(refit_plan(target, plan, ranks, TOKENS, 32, 0.01, quiet).weights(ranks)):
        assert refit["ppl_reconstructed"] == pytest.approx(perplexity(target, TOKENS, 32), rel=1e-9)
    assert refit["refit"] and not plain["refit"] and refit["ppl_reconstructed"] != plain["ppl_reconstructed"]
    assert refit["loaded_vs_reconstructed"] <= 1e-3 and refit["params_factored"] == plain["params_factored"]
    with pytest.raises(ValueError, match="refit applies to a whole-model point"):
        export_point(target, "activation_aware", 0.9, *common, tmp_path / "t", cfg, "abc", 0.01, progress=quiet)


def test_whole_model_point_by_removed_or_by_tolerance(tmp_path):
    import pandas as pd

    table = pd.DataFrame(
        [
            dict(mode="m", allocation="a", refit=False, removed=0.1, source="grid", reachable=True, ppl_ratio=1.05),
            dict(mode="m", allocation="a", refit=False, removed=0.15, source="refine", reachable=True, ppl_ratio=1.09),
            dict(mode="m", allocation="a", refit=False, removed=0.2, source="grid", reachable=True, ppl_ratio=1.3),
            dict(mode="m", allocation="a", refit=True, removed=0.2, source="grid", reachable=True, ppl_ratio=1.08),
            dict(mode="m", allocation="b", refit=False, removed=0.2, source="grid", reachable=True, ppl_ratio=1.01),
            dict(mode="m", allocation="a", refit=False, removed=0.9, source="grid", reachable=False, ppl_ratio=None),
        ]
    )
    table["ranks"] = [f"0.q:{i + 1}" for i in range(len(table))]
    path = tmp_path / "whole.csv"
    table.to_csv(path, index=False)
    assert whole_model_ranks(path, "m", "a", removed=0.2) == {"0.q": 3}
    assert whole_model_ranks(path, "m", "a", refit=True, removed=0.2) == {"0.q": 4}
    assert whole_model_ranks(path, "m", "a", tolerance=0.1) == {"0.q": 2}  # the bisection's point
    with pytest.raises(ValueError, match="no a point of m within 1% of the base perplexity"):
        whole_model_ranks(path, "m", "a", tolerance=0.01)
    with pytest.raises(ValueError, match="give this compress point one of surgery.whole_model.removed"):
        whole_model_ranks(path, "m", "a", removed=0.3)
    with pytest.raises(ValueError, match="out of reach"):
        whole_model_ranks(path, "m", "a", removed=0.9)
    with pytest.raises(ValueError, match="exactly one of removed and tolerance"):
        whole_model_ranks(path, "m", "a", removed=0.2, tolerance=0.1)


def test_a_group_not_smaller_factored_is_kept_dense_as_its_reconstruction(tmp_path):
    target = tiny_target()
    factors = plan_factors(target, "separate", 0.999, ["qkv"], TOKENS, 32)  # near full rank
    model, spec = factorize_model(target, factors)
    assert {p["kind"] for e in spec for p in e["parts"]} == {"dense"}
    assert count_parameters(model) == count_parameters(target.model)
    w = model.model.layers[0].self_attn.k_proj.weight.detach().numpy()
    np.testing.assert_allclose(w, factors["0.k"].dense(), atol=1e-6)


def test_frontier_threshold_refuses_a_mode_without_a_point(tmp_path):
    import pandas as pd

    csv = tmp_path / "frontier.csv"
    pd.DataFrame(
        [
            dict(mode="separate", tolerance=0.05, within=False, threshold=0.9, params_fraction=0.7, ppl_ratio=30.0),
            dict(
                mode="activation_aware",
                tolerance=0.05,
                within=True,
                threshold=0.997,
                params_fraction=0.9,
                ppl_ratio=1.04,
            ),
        ]
    ).to_csv(csv, index=False)
    assert frontier_threshold(csv, "activation_aware", 0.05) == 0.997
    with pytest.raises(ValueError, match="separate has no compressed point within 5%.*larger tolerance"):
        frontier_threshold(csv, "separate", 0.05)


def test_factors_are_linear_modules_that_can_be_trained():
    """Tools that look for nn.Linear (peft, torch.compile, ONNX export) see both factors; trainable=True
    gives them gradients, the default freezes them."""
    target = tiny_target()
    factors = plan_factors(target, "shared_kv", 0.6, ["qkv", "o", "mlp"], TOKENS, 32)
    frozen, _ = factorize_model(target, factors)
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if ".basis." in n or ".coef." in n)
    model, _ = factorize_model(target, factors, trainable=True)
    k = model.model.layers[0].self_attn.k_proj
    assert isinstance(k, LowRankLinear) and isinstance(k.basis, torch.nn.Linear) and isinstance(k.coef, torch.nn.Linear)
    x = torch.tensor(TOKENS[:20])[None]
    model.train()
    model(x, labels=x).loss.backward()
    shared = model.model.layers[0].self_attn.v_proj.basis.weight
    assert shared is k.basis.weight and shared.grad is not None and shared.grad.abs().sum() > 0
    assert k.coef.weight.grad.abs().sum() > 0 and k.row_mean.grad is not None


@pytest.mark.parametrize("mode", ["activation_aware", "shared_kv"])
def test_balance_factors_keeps_the_model_and_equalises_each_component(mode):
    """Every rank component's coefficient column and basis row end with equal norms (a shared basis: its
    members' columns stacked), the logits unchanged; activation_aware's ``U S`` / ``Vt L⁻¹`` start far
    from that."""
    target = tiny_target()
    factors = plan_factors(target, mode, 0.6, ["qkv", "o", "mlp"], TOKENS, 32)
    model, _ = factorize_model(target, factors)
    x = torch.tensor(TOKENS[:40])[None]
    with torch.no_grad():
        before = model(x).logits

    def norms(m):
        members = [o for o in model.modules() if isinstance(o, LowRankLinear) and o.basis is m.basis]
        coef = torch.sqrt(sum(o.coef.weight.square().sum(0) for o in members))
        return coef, m.basis.weight.norm(dim=1)

    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    start = [norms(m) for m in layers]
    assert max((c / b).log().abs().max() for c, b in start) > 0.5  # not balanced to begin with
    bases = {id(m.basis) for m in layers}
    assert balance_factors(model) == len(bases) and (mode != "shared_kv" or len(bases) < len(layers))
    for m in layers:
        coef, basis = norms(m)
        torch.testing.assert_close(coef, basis, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=1e-4, atol=1e-4)
