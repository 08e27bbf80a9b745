"""Ranks under a whole-model budget: each rule keeps within it; the calibrated rule finds a planted sensitivity."""

import numpy as np
import pytest

from weightpca.allocation import allocate, measure_weights, model_params, trial_ranks, weighted_damage
from weightpca.plan import Plan, mode_groups


def planted(n=48, m=32, seed=0):
    """Four matrices with the same slowly decaying spectrum; only "0.v" matters to the (synthetic) loss."""
    rng = np.random.default_rng(seed)
    s = 0.93 ** np.arange(m)
    weights = {}
    for i, name in enumerate(["0.q", "0.k", "0.v", "0.o"]):
        u, _ = np.linalg.qr(rng.standard_normal((n, m)))
        v, _ = np.linalg.qr(rng.standard_normal((m, m)))
        weights[name] = (u * s) @ v.T
    cost = {"0.q": 0.01, "0.k": 0.01, "0.v": 1.0, "0.o": 0.01}  # loss per unit of squared error

    def loss_with(replaced):
        return 2.0 + sum(cost[k] * np.sum((weights[k] - w) ** 2) for k, w in replaced.items())

    return Plan(mode_groups("separate", list(weights)), weights), weights, loss_with


def test_every_rule_keeps_within_the_budget():
    plan, weights, loss_with = planted()
    total = 10_000 + sum(w.size for w in weights.values())  # an embedding the plan does not touch
    damage = weighted_damage(plan, measure_weights(plan, loss_with, 0.5, progress=lambda *_: None))
    for rule in ("threshold", "uniform", "calibrated"):
        for removed in (0.05, 0.2, 0.3):
            ranks = allocate(plan, total, removed, rule, damage)
            assert model_params(plan, total, ranks) <= (1 - removed) * total, (rule, removed)
            # and it is not a trivially small model: within one rank step of the budget for uniform/threshold
            assert model_params(plan, total, ranks) > (1 - removed - 0.1) * total, (rule, removed)
    assert allocate(plan, total, 0.9, "uniform") is None  # beyond what these matrices can give


def test_calibrated_gives_the_sensitive_matrix_more_rank_and_a_lower_loss():
    plan, weights, loss_with = planted()
    total = sum(w.size for w in weights.values())
    weights = measure_weights(plan, loss_with, 0.5, progress=lambda *_: None)
    # the measurement recovers the planted costs (PCA's centring aside, the error is the spectrum's tail)
    assert weights["0.v"] == pytest.approx(100 * weights["0.q"], rel=0.05)
    damage = weighted_damage(plan, weights)
    for removed in (0.2, 0.4):
        uniform = allocate(plan, total, removed, "uniform")
        calibrated = allocate(plan, total, removed, "calibrated", damage)
        assert calibrated["0.v"] > uniform["0.v"]
        assert model_params(plan, total, calibrated) <= model_params(plan, total, uniform) + 48 + 32
        loss = {name: loss_with(plan.weights(ranks)) for name, ranks in (("u", uniform), ("c", calibrated))}
        assert loss["c"] < loss["u"]


def test_trial_ranks_keep_the_asked_fraction():
    plan, weights, _ = planted()
    ranks = trial_ranks(plan, 0.5)
    # PCA of a 48 x 32 matrix at rank r stores 48 r + 32 r + 32: the largest r within half of 1536 is 9
    assert set(ranks.values()) == {9}
    with pytest.raises(ValueError, match="unknown allocation 'greedy'"):
        allocate(plan, 10_000, 0.1, "greedy")
    with pytest.raises(ValueError, match="needs each group's estimated damage"):
        allocate(plan, 10_000, 0.1, "calibrated")


def test_budget_sweep_on_a_tiny_llama_keeps_each_budget_and_restores_the_model():
    from weightpca.adapters import LlamaAdapter
    from weightpca.surgery import budget_frontier, run_budget_sweep, whole_model_params
    from weightpca.targets import perplexity

    from test_surgery import tiny_llama

    model, tok = tiny_llama(None)
    target = LlamaAdapter(model.eval(), tok)
    tokens = np.random.default_rng(0).integers(0, 27, 300)
    before = perplexity(target, tokens, 32)
    rows, info = run_budget_sweep(
        target,
        "activation_aware",
        None,
        ["threshold", "uniform", "calibrated"],
        [0.05, 0.2],
        tokens,
        32,
        calib_tokens=tokens,
        sensitivity_tokens=tokens[:65],
        tolerances=[0.5],
        refine=2,
        refit=["calibrated"],
        progress=lambda *_: None,
    )
    assert perplexity(target, tokens, 32) == pytest.approx(before, rel=1e-6)  # restored
    total = whole_model_params(model)
    assert info["params_total"] == total and info["groups"] == 2 * 7 and len(info["sensitivity"]) == 14
    for r in rows:
        assert r["reachable"] and r["params_kept"] <= (1 - r["removed"]) * total
        assert r["base_ppl"] == pytest.approx(before)
    assert {(r["allocation"], r["removed"], r["refit"]) for r in rows if r["source"] == "grid"} == {
        (a, f, False) for a in ("threshold", "uniform", "calibrated") for f in (0.05, 0.2)
    } | {("calibrated", f, True) for f in (0.05, 0.2)}
    # refit keeps the calibrated ranks and changes the factors (hence the perplexity)
    for f in (0.05, 0.2):
        plain, refit = (
            next(r for r in rows if r["allocation"] == "calibrated" and r["removed"] == f and r["refit"] == on)
            for on in (False, True)
        )
        assert refit["ranks"] == plain["ranks"] and refit["ppl"] != plain["ppl"]
    assert info["refit_s"] > 0
    frontier = budget_frontier(rows, 0.5)
    assert {(f["allocation"], f["refit"]) for f in frontier} == {
        ("threshold", False),
        ("uniform", False),
        ("calibrated", False),
        ("calibrated", True),
    }
    for f in frontier:
        if f["within"]:
            assert f["ppl_ratio"] <= 1.5


def test_weights_without_a_measurable_increase_fall_back_to_the_relative_error():
    """A loss that no truncation changes gives no evidence: every weight alike, never zero (which would let
    the allocation take every matrix to rank 1)."""
    plan, weights, _ = planted()
    flat = measure_weights(plan, lambda replaced: 2.0, 0.5, progress=lambda *_: None)
    assert set(flat.values()) == {1.0}
    total = sum(w.size for w in weights.values())
    ranks = allocate(plan, total, 0.2, "calibrated", weighted_damage(plan, flat))
    assert min(ranks.values()) > 1
