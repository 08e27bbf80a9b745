"""weightpca.plan: the groups each mode builds, rank maps, and one plan over every matrix of a model."""

import numpy as np
import pytest

from weightpca.plan import Plan, mode_groups, model_plan

from test_surgery import decaying, tiny_llama

NAMES = [f"{i}.{r}" for i in range(2) for r in ("q", "k", "v", "o")]


def test_modes_only_differ_in_their_groups():
    keys = {
        mode: [(g.key, g.members, g.kind) for g in mode_groups(mode, NAMES)]
        for mode in ("separate", "shared_kv", "cross_layer", "activation_aware")
    }
    assert keys["separate"] == [(n, (n,), "pca") for n in NAMES]
    assert keys["activation_aware"] == [(n, (n,), "whitened") for n in NAMES]
    assert keys["shared_kv"] == [
        ("0.q", ("0.q",), "pca"),
        ("0.kv", ("0.k", "0.v"), "pca"),
        ("0.o", ("0.o",), "pca"),
        ("1.q", ("1.q",), "pca"),
        ("1.kv", ("1.k", "1.v"), "pca"),
        ("1.o", ("1.o",), "pca"),
    ]
    assert keys["cross_layer"][1] == ("kv", ("0.k", "0.v", "1.k", "1.v"), "pca")
    assert [k for k, _, _ in keys["cross_layer"]] == ["0.q", "kv", "0.o", "1.q", "1.o"]


def test_a_rank_map_sets_each_groups_rank_and_its_parameters():
    weights = {n: decaying(16 if n.endswith(("k", "v")) else 24, 24, seed=i) for i, n in enumerate(NAMES)}
    plan = Plan(mode_groups("shared_kv", NAMES), weights)
    ranks = plan.ranks({"0.kv": 3, "1.q": 2})
    assert ranks["0.kv"] == 3 and ranks["1.q"] == 2 and ranks["0.q"] == 24  # left out: every component
    params = plan.params({"0.kv": 3})
    assert params["0.kv"] == (16 + 16) * 3 + 3 * 24 + 24  # both members' coefficients, one basis and mean
    factors = plan.factors({"0.kv": 3})
    assert np.shares_memory(factors["0.k"].basis, factors["0.v"].basis) and factors["0.k"].coef.shape == (16, 3)
    np.testing.assert_allclose(plan.weights({})["1.o"], weights["1.o"], atol=1e-9)  # full rank: the weights
    with pytest.raises(ValueError, match="rank 40 for 0.q: must be in 1..24"):
        plan.ranks({"0.q": 40})


def test_a_model_plan_covers_every_matrix_and_whitens_by_shared_inputs():
    from weightpca.adapters import LlamaAdapter

    model, tok = tiny_llama(None)
    adapter = LlamaAdapter(model.eval(), tok)
    tokens = np.random.default_rng(0).integers(0, 27, 200)
    plan = model_plan(adapter, "activation_aware", calib_tokens=tokens, window=32)
    assert plan.names == [f"{i}.{r}" for i in range(2) for r in adapter.ROLES]
    # full rank reproduces every matrix, the MLP's included
    for name, w in plan.weights(1.0).items():
        np.testing.assert_allclose(w, adapter.weight(adapter.matrix(name)), atol=1e-4)
    with pytest.raises(ValueError, match="activation_aware needs calibration tokens"):
        model_plan(adapter, "activation_aware")
