import numpy as np
import pytest
import torch

from weightpca.adapters import Matrix, ModelAdapter
from weightpca.plan import MODES, Plan, mode_groups
from weightpca.surgery import qkv_info, run_sweep

THRESHOLDS = [0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]


def decaying(n, m, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, m)) * (0.85 ** np.arange(m)) + rng.standard_normal(m)


def layers(n_layers=3, d=24, kv=8, seed=0):
    return [
        {
            "q": decaying(d, d, seed + 3 * i),
            "k": decaying(kv, d, seed + 3 * i + 1),
            "v": decaying(kv, d, seed + 3 * i + 2),
        }
        for i in range(n_layers)
    ]


def qkv_plan(mode, lw, moments=None, dtype=np.float64) -> Plan:
    """The plan of one mode over q/k/v of layers ``lw``; ``moments[i]``: layer i's shared input moment."""
    weights = {f"{i}.{n}": w[n] for i, w in enumerate(lw) for n in "qkv"}
    per_matrix = {name: moments[int(name.split(".")[0])] for name in weights} if moments else None
    return Plan(mode_groups(mode, list(weights)), weights, per_matrix, dtype)


def by_layer(weights: dict, n_layers: int) -> list[dict]:
    return [{n: weights[f"{i}.{n}"] for n in "qkv"} for i in range(n_layers)]


def weights_at(plan: Plan, t: float, n_layers: int):
    return by_layer(plan.weights(t), n_layers), qkv_info(plan, t, n_layers)


def test_modes_identity_at_one_and_parameter_counts():
    lw = layers()
    moments = [np.cov(np.random.default_rng(i).standard_normal((200, 24)), rowvar=False) for i in range(3)]
    for mode in MODES:
        out, info = weights_at(qkv_plan(mode, lw, moments), 1.0, 3)
        for a, b in zip(out, lw):
            for n in "qkv":
                np.testing.assert_allclose(a[n], b[n], atol=1e-9)
        assert info["dense_kv"] == 3 * 2 * 8 * 24 and info["dense_q"] == 3 * 24 * 24
    _, sep = weights_at(qkv_plan("separate", lw), 0.5, 3)
    _, kv = weights_at(qkv_plan("shared_kv", lw), 0.5, 3)
    _, cross = weights_at(qkv_plan("cross_layer", lw), 0.5, 3)
    assert sep["params_q"] == kv["params_q"] == cross["params_q"]  # Q is treated alike
    r = [int(x) for x in kv["ranks"]["kv"]]
    assert kv["params_kv"] == sum(16 * ri + ri * 24 + 24 for ri in r)
    rc = cross["ranks"]["kv"][0]
    assert len(set(cross["ranks"]["kv"])) == 1 and cross["params_kv"] == 3 * 16 * rc + rc * 24 + 24


def test_unknown_mode_refused():
    with pytest.raises(ValueError, match="unknown surgery mode 'joint'"):
        qkv_plan("joint", layers())


def tiny_llama(tmp_path, vocab_size=64, max_positions=64):
    """A 2-layer Llama (grouped-query attention) and a character tokenizer of its first 28 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )
    model = LlamaForCausalLM(cfg)
    vocab = {chr(97 + i): i for i in range(26)} | {"<unk>": 26, " ": 27}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")
    return model, fast


def test_tiny_llama_sweep_and_export_reload(tmp_path):
    from weightpca.adapters import LlamaAdapter
    from weightpca.targets import perplexity

    model, tok = tiny_llama(tmp_path)
    target = LlamaAdapter(model.eval(), tok)
    assert target.weight(target.matrix("0.k")).shape == (16, 32)  # grouped-query: 2 KV heads x 8
    tokens = np.random.default_rng(0).integers(0, 27, 400)
    before = perplexity(target, tokens, 32)
    for mode in MODES:
        rows, timing = run_sweep(
            target,
            mode,
            [1.0, 0.8, 0.5],
            tokens,
            32,
            calib_tokens=tokens,
            prompt="abc",
            gen_tokens=3,
            progress=lambda *_: None,
        )
        assert rows[0]["ppl"] == pytest.approx(before, rel=1e-4)
        assert rows[2]["params_kept"] < rows[0]["params_kept"]
        assert timing["sweep_cost_ratio"] >= 1.0
    assert perplexity(target, tokens, 32) == pytest.approx(before, rel=1e-6)  # restored
    # export a modified model and reload it with from_pretrained
    plan = qkv_plan("shared_kv", [{n: target.weight(target.matrix(f"{i}.{n}")) for n in "qkv"} for i in range(2)])
    for name, w in plan.weights(0.6).items():
        target.set_weight(target.matrix(name), w)
    modified = perplexity(target, tokens, 32)
    assert modified != pytest.approx(before, rel=1e-6)
    model.save_pretrained(tmp_path / "export")
    tok.save_pretrained(tmp_path / "export")
    reloaded = LlamaAdapter.load(str(tmp_path / "export"))
    assert perplexity(reloaded, tokens, 32) == pytest.approx(modified, rel=1e-6)


def test_target_without_qkv_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    from weightpca.adapters import LlamaAdapter
    from weightpca.targets import TargetError

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(TargetError, match="GPT2LMHeadModel has no model.layers"):
        LlamaAdapter(model, None)


def test_folder_without_weights_refused(tmp_path):
    from weightpca.adapters import LlamaAdapter
    from weightpca.targets import TargetError

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TargetError, match="no model weights"):
        LlamaAdapter.load(str(tmp_path))


def test_shared_and_cross_layer_match_sklearn_on_stacked_rows():
    from sklearn.decomposition import PCA

    lw = layers(n_layers=2)
    for t in (0.9, 0.6):
        out, info = weights_at(qkv_plan("shared_kv", lw), t, 2)
        stacked = np.vstack([lw[1]["k"], lw[1]["v"]])
        ref = PCA(n_components=t, svd_solver="full").fit(stacked)
        np.testing.assert_allclose(
            np.vstack([out[1]["k"], out[1]["v"]]), ref.inverse_transform(ref.transform(stacked)), atol=1e-10
        )
        out, info = weights_at(qkv_plan("cross_layer", lw), t, 2)
        every = np.vstack([np.vstack([x["k"], x["v"]]) for x in lw])
        ref = PCA(n_components=t, svd_solver="full").fit(every)
        rec = ref.inverse_transform(ref.transform(every))
        np.testing.assert_allclose(np.vstack([out[1]["k"], out[1]["v"]]), rec[16:32], atol=1e-10)
        assert info["ranks"]["kv"] == [ref.n_components_] * 2


def test_float32_sweep_close_to_float64():
    lw = layers()
    moments = [np.eye(24) + 0.1 for _ in range(3)]
    for mode in MODES:
        lo, info32 = weights_at(qkv_plan(mode, lw, moments, dtype=np.float32), 0.8, 3)
        hi, info64 = weights_at(qkv_plan(mode, lw, moments, dtype=np.float64), 0.8, 3)
        assert info32["ranks"] == info64["ranks"]
        for a, b in zip(lo, hi):
            for n in "qkv":
                np.testing.assert_allclose(a[n], b[n], rtol=1e-4, atol=1e-4 * np.abs(b[n]).max())


def test_full_rank_check_evaluates_the_reconstruction(monkeypatch):
    """Threshold 1.0 evaluates the full-rank reconstruction, not the original weights: a decomposition
    that does not reproduce the weights fails the sweep; a sound one matches to 1e-4 and stores dense."""
    from weightpca import plan
    from weightpca.adapters import LlamaAdapter

    model, tok = tiny_llama(None)
    target = LlamaAdapter(model.eval(), tok)
    tokens = np.random.default_rng(0).integers(0, 27, 300)
    rows, _ = run_sweep(target, "separate", [1.0, 0.5], tokens, 32, progress=lambda *_: None)
    assert rows[0]["ppl_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert rows[0]["params_factored"] > rows[0]["params_dense"] == rows[0]["params_kept"]
    assert rows[0]["params_fraction"] == 1.0 and rows[1]["params_fraction"] < 1.0

    real = plan.Plan.weights

    def sign_flipped(self, t, dtype=None):
        # a decomposition that got the signs of V wrong
        return {name: -w if name.endswith(".v") else w for name, w in real(self, t, dtype).items()}

    monkeypatch.setattr(plan.Plan, "weights", sign_flipped)
    with pytest.raises(AssertionError, match="full-rank reconstruction"):
        run_sweep(target, "separate", [1.0], tokens, 32, progress=lambda *_: None)


class RankTarget(ModelAdapter):
    """A synthetic target whose perplexity is a known function of its weights' ranks.

    perplexity = 10 · exp(Σ α[layer, type] · missing rank), where the missing
    rank of a matrix is its full (centred) rank minus the rank of its current
    centred weights; by default every component of q, k, v costs ``alpha``.
    An adapter without a model: its matrices live in numpy arrays.
    """

    device = torch.device("cpu")
    ROLES = ("q", "k", "v")
    GROUPS = {"qkv": ROLES}

    def __init__(self, d=32, alpha=0.001, n_layers=1, costs=None, roles=ROLES):
        self.n_layers, self.ROLES = n_layers, tuple(roles)
        k = len(self.ROLES)
        self.weights = [{n: decaying(d, d, seed=k * i + j) for j, n in enumerate(self.ROLES)} for i in range(n_layers)]
        self.full = [{n: self.rank(w) for n, w in lw.items()} for lw in self.weights]
        self.costs = costs or {(i, n): alpha for i in range(n_layers) for n in "qkv"}

    @staticmethod
    def rank(w):
        return np.linalg.matrix_rank(w - w.mean(0), tol=1e-3)

    def layer_matrices(self, i):
        return {n: Matrix(i, n, "") for n in self.ROLES}

    def weight_view(self, m):
        return torch.from_numpy(self.weights[m.layer][m.role])

    def set_weight(self, m, value):
        value = value.numpy() if torch.is_tensor(value) else value
        self.weights[m.layer][m.role] = np.array(value, dtype=np.float64)

    def ppl(self):
        return 10.0 * np.exp(
            sum(a * (self.full[i][n] - self.rank(self.weights[i][n])) for (i, n), a in self.costs.items())
        )


def test_bisection_finds_a_planted_frontier(monkeypatch):
    from weightpca import surgery

    target = RankTarget()
    monkeypatch.setattr(surgery, "perplexity", lambda tgt, *_: tgt.ppl())
    plan = qkv_plan("separate", [{n: target.weights[0][n].copy() for n in "qkv"}], dtype=np.float32)
    # every model the threshold can reach: one per distinct step of the parameter count
    grid = np.concatenate([np.linspace(0.01, 0.999, 4000), [1.0]])
    reachable = {}
    for t in grid:
        info = qkv_info(plan, float(t), 1)
        missing = sum(target.full[0][n] - info["ranks"][n][0] for n in "qkv")
        reachable[info["params_kept"]] = dict(
            ratio=float(np.exp(0.001 * missing)), fraction=min(info["params_kept"] / info["params_dense"], 1.0)
        )
    # compressed (r ≤ 15 of 32 per matrix) costs 1.05-1.10x: tolerances inside that range
    for tolerance in (0.06, 0.075, 0.09):
        # the planted answer: fewest parameters within tolerance, and the next reachable model below it
        ok = [v for v in reachable.values() if v["ratio"] <= 1 + tolerance and v["fraction"] < 1]
        best = min(ok, key=lambda v: v["fraction"])
        below = max((v for v in reachable.values() if v["fraction"] < best["fraction"]), key=lambda v: v["fraction"])
        rows, timing = run_sweep(
            target, "separate", [1.0, 0.3], np.zeros(2), 1, tolerances=[tolerance], refine=12, progress=lambda *_: None
        )
        row = surgery.frontier_row(rows, tolerance)
        assert row["within"] and row["ppl_ratio"] <= 1 + tolerance
        assert row["params_fraction"] == pytest.approx(best["fraction"])
        assert row["bracket_params_fraction"] == pytest.approx(below["fraction"])
        assert row["bracket_ppl_ratio"] > 1 + tolerance
        # bisection: about log2(models in the bracket) evaluations, not one per reachable model
        assert timing["evaluations"] <= 2 + 1 + np.ceil(np.log2(len(reachable))) + 1
        assert {r["source"] for r in rows} == {"grid", "refine"}


def test_frontier_row_without_a_compressed_point_within_tolerance():
    from weightpca.surgery import frontier_row

    def point(t, fraction, ratio):
        return dict(threshold=t, params_fraction=fraction, ppl=10 * ratio, ppl_ratio=ratio)

    points = [point(1.0, 1.0, 1.0), point(0.99, 1.0, 1.004), point(0.9, 0.8, 1.3), point(0.5, 0.4, 9.0)]
    row = frontier_row(points, 0.01)
    assert not row["within"]  # 0.99 is within 1 % but not compressed
    assert (row["params_fraction"], row["ppl_ratio"]) == (0.8, 1.3)  # its best compressed point
    row = frontier_row(points, 0.5)
    assert row["within"] and row["params_fraction"] == 0.8
    assert (row["bracket_params_fraction"], row["bracket_ppl_ratio"]) == (0.4, 9.0)
    row = frontier_row(points, 10.0)
    assert row["params_fraction"] == 0.4 and np.isnan(row["bracket_params_fraction"])


def test_sensitivity_reproduces_the_separate_sweep():
    from weightpca.adapters import LlamaAdapter
    from weightpca.surgery import run_sensitivity
    from weightpca.targets import perplexity

    model, tok = tiny_llama(None)
    target = LlamaAdapter(model.eval(), tok)
    tokens = np.random.default_rng(0).integers(0, 27, 300)
    before = perplexity(target, tokens, 32)
    thresholds = [1.0, 0.9, 0.5]
    sweep, _ = run_sweep(target, "separate", thresholds, tokens, 32, progress=lambda *_: None)
    rows = run_sensitivity(
        target, thresholds, tokens, 32, tolerance=0.01, combined=True, layer_tokens=64, progress=lambda *_: None
    )
    assert perplexity(target, tokens, 32) == pytest.approx(before, rel=1e-6)  # restored
    layer_rows = [r for r in rows if r["scope"] == "layer"]
    assert {r["eval_tokens"] for r in layer_rows} == {64} and {r["eval_tokens"] for r in rows[:3]} == {299}
    assert layer_rows[0]["base_ppl"] == pytest.approx(perplexity(target, tokens[:65], 32), rel=1e-6)
    combined = {r["threshold"]: r["ppl"] for r in rows if r["scope"] == "all"}
    assert sorted(combined) == [0.5, 0.9]
    for r in sweep[1:]:
        assert combined[r["threshold"]] == pytest.approx(r["ppl"], rel=1e-6)
        assert r["ppl"] != pytest.approx(before, rel=1e-4)  # the sweep did change the model
    types = [r for r in rows if r["scope"] == "type"]
    assert {(r["matrices"], r["threshold"]) for r in types} == {(n, t) for n in "qkv" for t in (0.9, 0.5)}


def test_sensitivity_localises_the_damaging_matrix_and_layer(monkeypatch):
    from weightpca import surgery

    # only layer 2's v costs anything, and it costs 1 % per component dropped
    target = RankTarget(n_layers=3, costs={(2, "v"): 0.01, (0, "q"): 0.0001})
    monkeypatch.setattr(surgery, "perplexity", lambda tgt, *_: tgt.ppl())
    rows = surgery.run_sensitivity(
        target, [1.0, 0.99, 0.9, 0.5], np.zeros(2), 1, tolerance=0.1, progress=lambda *_: None
    )
    types = {(r["matrices"], r["threshold"]): r["ppl_ratio"] for r in rows if r["scope"] == "type"}
    assert all(types["k", t] == 1.0 for t in (0.99, 0.9, 0.5)) and types["v", 0.5] > types["q", 0.5] > 1.0
    layer_rows = [r for r in rows if r["scope"] == "layer"]
    assert [r["matrices"] for r in layer_rows] == ["v"] * 3 and [r["layer"] for r in layer_rows] == [0, 1, 2]
    # at the highest threshold where v alone leaves the tolerance
    assert layer_rows[0]["threshold"] == max(t for (n, t), x in types.items() if n == "v" and x > 1.1)
    assert [r["ppl_ratio"] > 1.0 for r in layer_rows] == [False, False, True]


def test_sensitivity_covers_every_matrix_type_and_scans_the_worst(monkeypatch):
    """Types beyond q/k/v: a planted damaging MLP matrix (down of layer 1) is the type the layer scan takes."""
    from weightpca import surgery

    roles = ("q", "k", "v", "o", "gate", "up", "down")
    target = RankTarget(n_layers=3, costs={(1, "down"): 0.01, (0, "v"): 0.001}, roles=roles)
    monkeypatch.setattr(surgery, "perplexity", lambda tgt, *_: tgt.ppl())
    rows = surgery.run_sensitivity(
        target, [0.99, 0.9], np.zeros(2), 1, tolerance=0.1, roles=roles, combined=True, progress=lambda *_: None
    )
    types = {(r["matrices"], r["threshold"]): r["ppl_ratio"] for r in rows if r["scope"] == "type"}
    assert set(types) == {(n, t) for n in roles for t in (0.99, 0.9)}
    assert types["down", 0.9] > types["v", 0.9] > 1.0 and types["gate", 0.9] == 1.0
    assert {r["matrices"] for r in rows if r["scope"] == "all"} == {"+".join(roles)}
    layer_rows = [r for r in rows if r["scope"] == "layer"]
    assert [r["matrices"] for r in layer_rows] == ["down"] * 3
    assert [r["ppl_ratio"] > 1.0 for r in layer_rows] == [False, True, False]
