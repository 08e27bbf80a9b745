import numpy as np
import pytest
import torch

from weightpca.factorize import factorize_embedding, spectrum_report
from weightpca.io import save_tensors
from weightpca.linalg import exact_svd
from weightpca.model import GPT, GPTConfig
from weightpca.tables import compare_variants, param_table, run_table
from weightpca.train import build_model, load_embedding

from conftest import tiny_run


def matrix_with_spectrum(V, d, s, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((V, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (u * s) @ v.T


def test_known_spectrum_and_eckart_young():
    s = np.array([10.0, 5, 3, 2, 1, 0.5, 0.25, 0.1])
    w = matrix_with_spectrum(40, 8, s)
    rep = spectrum_report(w, [1, 3, 7], centered=False)
    np.testing.assert_allclose(rep["singular_values"], s, rtol=1e-10)
    for k in (1, 3, 7):
        tensors, info = factorize_embedding(w, k)
        w_k = tensors["transformer.wte.weight"].double().numpy() @ tensors["scale_up"].double().numpy()
        err = np.linalg.norm(w - w_k)
        # the error of the truncation is the norm of the tail singular values ...
        assert err == pytest.approx(np.sqrt(np.sum(s[k:] ** 2)), rel=1e-5)
        assert info["relative_error"] == pytest.approx(rep["relative_error"][str(k)])
        assert rep["relative_error"][str(k)] == pytest.approx(err / np.linalg.norm(w), rel=1e-5)
        # ... and no other rank-k matrix does better (a random rank-k competitor)
        rng = np.random.default_rng(k)
        other = (w @ rng.standard_normal((8, k))) @ np.linalg.pinv(w @ rng.standard_normal((8, k))) @ w
        assert np.linalg.norm(w - other) >= err - 1e-9
    assert rep["cumulative_energy"][-1] == pytest.approx(1.0)
    assert rep["energy_kept"]["3"] == pytest.approx(np.sum(s[:3] ** 2) / np.sum(s**2))


def test_scale_matrices_consistent():
    w = np.random.default_rng(1).standard_normal((50, 12))
    t, _ = factorize_embedding(w, 5)
    assert t["transformer.wte.weight"].shape == (50, 5) and t["scale_up"].shape == (5, 12)
    torch.testing.assert_close(t["scale_down"], t["scale_up"].T)
    torch.testing.assert_close(t["scale_up"] @ t["scale_up"].T, torch.eye(5), atol=1e-5, rtol=0)


def test_centered_pca_keeps_mean_row():
    w = np.random.default_rng(2).standard_normal((60, 10)) + 3.0
    mean, _, s_c, _ = exact_svd(w, centered=True)
    np.testing.assert_allclose(mean, w.mean(0))
    t, info = factorize_embedding(w, 4, centered=True)
    rec = t["transformer.wte.weight"].double().numpy() @ t["scale_up"].double().numpy() + mean
    assert np.linalg.norm(w - rec) == pytest.approx(np.sqrt(np.sum(s_c[4:] ** 2)), rel=1e-5)
    # centring removes the large mean direction: better than plain SVD at the same k
    assert info["relative_error"] < factorize_embedding(w, 4)[1]["relative_error"]


def _trained_d(tiny_data, tmp_path):
    from weightpca.adapters import GPTAdapter

    from conftest import train_to

    train_to(tiny_run(max_steps=8), tiny_data, tmp_path / "d", tmp_path / "wd")
    return GPTAdapter.load(tmp_path / "d" / "model.safetensors", tmp_path / "d" / "config.json").model


@pytest.mark.parametrize("centered", [False, True])
def test_pca_init_at_k_equal_d_reproduces_d(tiny_data, tmp_path, centered):
    d_model = _trained_d(tiny_data, tmp_path)
    wte = d_model.transformer.wte.weight.detach().numpy()
    tensors, _ = factorize_embedding(wte, 16, centered=centered)
    save_tensors(tmp_path / "emb.safetensors", tensors)
    run = tiny_run()
    run["model"] = dict(run["model"], n_embd_wte=16, embd_bias=centered)
    run["init"] = {"model": str(tmp_path / "d" / "model.safetensors"), "embedding": str(tmp_path / "emb.safetensors")}
    fact = build_model(run, 384).eval()
    idx = torch.randint(384, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, fac = d_model.eval()(idx)[0], fact(idx)[0]
    if centered:  # logits differ by h·mean, the same for every token: probabilities equal
        ref, fac = ref.log_softmax(-1), fac.log_softmax(-1)
    torch.testing.assert_close(fac, ref, atol=2e-4, rtol=1e-4)


def test_pca_init_at_k_below_d_computes_truncated_embedding(tiny_data, tmp_path):
    d_model = _trained_d(tiny_data, tmp_path)
    wte = d_model.transformer.wte.weight.detach().double().numpy()
    tensors, _ = factorize_embedding(wte, 4)
    u, s, vh = np.linalg.svd(wte, full_matrices=False)
    w4 = torch.from_numpy((u[:, :4] * s[:4]) @ vh[:4]).float()
    plain = GPT(GPTConfig(vocab_size=384, block_size=16, n_layer=2, n_head=2, n_embd=16))
    plain.load_state_dict(dict(d_model.state_dict(), **{"transformer.wte.weight": w4}))
    fact = GPT(GPTConfig(vocab_size=384, block_size=16, n_layer=2, n_head=2, n_embd=16, n_embd_wte=4))
    own = fact.state_dict()
    fact.load_state_dict(
        {**own, **{k: v for k, v in d_model.state_dict().items() if k in own and k != "transformer.wte.weight"}}
    )
    save_tensors(tmp_path / "e.safetensors", tensors)
    load_embedding(fact, tmp_path / "e.safetensors")
    idx = torch.randint(384, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fact.eval()(idx)[0], plain.eval()(idx)[0], atol=2e-4, rtol=1e-4)


def test_freeze_flags_really_freeze(tiny_data, tmp_path):
    from conftest import train_to

    w = np.random.default_rng(0).standard_normal((384, 16)).astype(np.float32)
    tensors, _ = factorize_embedding(w, 4)
    save_tensors(tmp_path / "e.safetensors", tensors)
    run = tiny_run(max_steps=6)
    run["model"] = dict(run["model"], n_embd_wte=4)
    run["init"] = {"embedding": str(tmp_path / "e.safetensors")}
    run["freeze"] = {"wte": True, "scale": True}
    train_to(run, tiny_data, tmp_path / "out", tmp_path / "work")
    from weightpca.io import load_tensors

    out = load_tensors(tmp_path / "out" / "model.safetensors")
    for name in ("transformer.wte.weight", "scale_up", "scale_down"):
        assert torch.equal(out[name], tensors[name]), name
    before = build_model(dict(run, freeze={}), 384).state_dict()
    assert not torch.equal(out["transformer.h.0.attn.c_attn.weight"], before["transformer.h.0.attn.c_attn.weight"])
    # the same run without freezing moves the embedding
    train_to(dict(run, freeze={}), tiny_data, tmp_path / "out2", tmp_path / "work2")
    assert not torch.equal(load_tensors(tmp_path / "out2" / "model.safetensors")["scale_up"], tensors["scale_up"])


def test_param_table_counts():
    t = param_table(dict(block_size=128, n_layer=4, n_head=4, n_embd=128, bias=False), 8192, [16, 64])
    ours = t[t.model == "this config"].set_index("k")
    assert ours.loc["full", "embedding_params"] == 8192 * 128
    assert ours.loc[16, "embedding_params"] == 8192 * 16 + 2 * 16 * 128
    gpt2 = t[t.model == "gpt2-small"].set_index("k")
    assert gpt2.loc["full", "total_params"] == 124_439_808
    assert gpt2.loc[128, "embedding_params"] == 50257 * 128 + 2 * 128 * 768
    assert gpt2.loc[128, "total_params"] == 124_439_808 - 50257 * 768 + 50257 * 128 + 2 * 128 * 768


def test_compare_variants_verdicts(tmp_path):
    import json

    def summary(name, seed, ppl):
        p = tmp_path / f"{name.replace('/', '_')}.json"
        p.write_text(
            json.dumps(
                dict(
                    name=name,
                    seed=seed,
                    final_val_loss=np.log(ppl),
                    final_val_ppl=ppl,
                    best_val_ppl=ppl,
                    tokens_seen=1,
                    steps=1,
                    params=1,
                    embedding_params=1,
                    wall_s=1.0,
                )
            )
        )
        return p

    paths = [summary("D/seed1", 1, 100.0)]
    for seed, (a, b, c) in {1: (110, 101, 150), 2: (112, 99, 160), 3: (111, 100, 155)}.items():
        paths += [
            summary(f"k8/A/seed{seed}", seed, a),
            summary(f"k8/B/seed{seed}", seed, b),
            summary(f"k8/C/seed{seed}", seed, c),
        ]
    cmp = compare_variants(run_table(paths)).set_index("comparison")
    # A − C = −40, −48, −44: mean −44, s = 4, t(0.975, 2) = 4.3027 -> ±9.94
    assert cmp.loc["A vs C", "diff_mean"] == pytest.approx(-44.0)
    assert cmp.loc["A vs C", "ci95_low"] == pytest.approx(-44.0 - 4.302652729749464 * 4 / np.sqrt(3))
    assert cmp.loc["A vs C", "ci95_high"] == pytest.approx(-44.0 + 4.302652729749464 * 4 / np.sqrt(3))
    assert cmp.loc["A vs C", "verdict"] == "A better than C"
    assert cmp.loc["A vs D", "verdict"] == "A worse than D" and cmp.loc["A vs D", "d_seeds"] == 1
    assert cmp.loc["B vs D", "verdict"] == "not distinguishable"  # +1, −1, 0
    # two seeds of A − C (−40, −48): t(0.975, 1) = 12.71 makes the interval contain 0
    two = compare_variants(run_table([p for p in paths if "seed3" not in p.name])).set_index("comparison")
    assert two.loc["A vs C", "verdict"] == "not distinguishable"
    assert two.loc["A vs C", "ci95_high"] > 0 > two.loc["A vs C", "ci95_low"]
