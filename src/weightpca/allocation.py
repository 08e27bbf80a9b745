"""Ranks for every group of a plan under one whole-model parameter budget.

A model of ``P`` parameters (all of them: embeddings included, a tied matrix
counted once) has its plan's groups stored factored where that is smaller
than dense: a group at rank r costs ``params_g(r) = min(factored_g(r),
dense_g)`` (``linalg.factored_params``; a basis shared by several matrices
once), so the whole model keeps

    P(r) = P − Σ_g dense_g + Σ_g params_g(r_g).

``removed`` is the fraction of ``P`` a budget takes away: ``P(r) ≤ (1 −
removed) P``. Three rules choose the ranks:

- ``threshold``: one variance threshold for every group (the sweep's rule,
  ``linalg.rank_for_threshold``), the largest threshold within the budget;
- ``uniform``: every group keeps the same fraction of its dense parameters
  (SVD-LLM's rule, Wang et al. 2024), the largest fraction within the budget;
- ``calibrated``: the ranks minimise an estimate of the loss increase,

      ΔL(r) = Σ_g w_g · Σ_{i > r_g} s_{g,i}² / Σ_i s_{g,i}²,

  subject to the budget: each group's relative truncation error (for a
  whitened basis, of its outputs on the calibration inputs: the truncation
  loss SVD-LLM v2 allocates from) weighted by a measured sensitivity
  ``w_g = w_role · w_layer`` (:func:`measure_weights`: every matrix of one
  role, then of one layer, truncated together at a trial rank, and the loss
  increase divided by the relative error removed). The problem separates
  over groups given a Lagrange multiplier λ: each group takes the rank
  minimising its term of ΔL plus ``λ params_g(r)`` (dense included), and
  bisection on λ finds the smallest ΔL within the budget (Everett 1963, "Generalized
  Lagrange multiplier method for solving problems of optimum allocation of
  resources"; ASVD, Yuan et al. 2023, allocates from measured sensitivity in
  the same spirit).

Every rule returns a rank map (group key -> rank), the plan's per-group
allocation.
"""

from __future__ import annotations

import numpy as np

from .linalg import factored_params
from .plan import Plan

ALLOCATIONS = ("threshold", "uniform", "calibrated")


def group_costs(plan: Plan) -> dict[str, tuple[np.ndarray, int]]:
    """Group key -> (params_g(r) for r = 1..full as an array, dense_g)."""
    dense = plan.dense_params()
    out = {}
    for g in plan.groups:
        rows = sum(plan.shapes[n][0] for n in g.members)
        m = plan.shapes[g.members[0]][1]
        ranks = np.arange(1, len(plan.bases[g.key].s) + 1, dtype=np.int64)
        factored = factored_params(rows, m, ranks, mean=g.kind == "pca")  # elementwise over the ranks
        out[g.key] = (np.minimum(factored, dense[g.key]), dense[g.key])
    return out


def model_params(plan: Plan, total: int, ranks: dict[str, int], costs=None) -> int:
    """Whole-model parameters with every group at its rank, stored factored where that is smaller
    (``costs``: :func:`group_costs` of the plan, when already computed)."""
    costs = group_costs(plan) if costs is None else costs
    return total - sum(d for _, d in costs.values()) + sum(int(c[ranks[k] - 1]) for k, (c, _) in costs.items())


def _largest_within(value_to_ranks, budget_fn, low: float, high: float, steps: int = 50):
    """Ranks at the largest value in [low, high] whose ranks fit the budget (the count grows with the value)."""
    if not budget_fn(value_to_ranks(low)):
        return None
    if budget_fn(value_to_ranks(high)):
        return value_to_ranks(high)
    for _ in range(steps):
        mid = (low + high) / 2
        if budget_fn(value_to_ranks(mid)):
            low = mid
        else:
            high = mid
    return value_to_ranks(low)


def allocate(plan: Plan, total: int, removed: float, rule: str, damage: dict[str, np.ndarray] | None = None):
    """Rank map of ``rule`` that keeps at most ``(1 − removed) total`` whole-model parameters, or None where
    even every group at rank 1 keeps more (the budget is out of reach of these matrices).

    ``damage`` (the calibrated rule): group key -> the estimated loss increase of the group at rank
    r = 1..full (:func:`weighted_damage`)."""
    if rule not in ALLOCATIONS:
        raise ValueError(f"unknown allocation '{rule}'; choose from {', '.join(ALLOCATIONS)}")
    budget = (1 - removed) * total
    costs = group_costs(plan)
    fits = lambda ranks: model_params(plan, total, ranks, costs) <= budget  # noqa: E731
    if rule == "threshold":
        smallest = 1e-9  # every group at rank 1
        return _largest_within(lambda t: plan.ranks(max(t, smallest)), fits, smallest, 1.0)
    if rule == "uniform":
        return _largest_within(lambda keep: _ranks_keeping(costs, keep), fits, 0.0, 1.0)
    if damage is None:
        raise ValueError("the calibrated allocation needs each group's estimated damage (weighted_damage)")

    def at_multiplier(log_lam: float) -> dict[str, int]:
        lam = np.exp(log_lam)
        return {k: int(np.argmin(damage[k] + lam * c)) + 1 for k, (c, _) in costs.items()}

    # λ large: every group at rank 1; λ tiny: every group at full rank: bisection on log λ, descending
    return _largest_within(lambda x: at_multiplier(-x), fits, -60.0, 60.0, steps=80)


def _tail_energy(s: np.ndarray) -> np.ndarray:
    """E(r) = Σ_{i > r} s_i² for r = 1..len(s)."""
    sq = np.asarray(s, dtype=np.float64) ** 2
    return np.concatenate([np.cumsum(sq[::-1])[::-1][1:], [0.0]])


def _ranks_keeping(costs: dict[str, tuple[np.ndarray, int]], keep: float) -> dict[str, int]:
    """Per group the largest rank whose stored form is at most ``keep`` of its dense parameters (at least 1)."""
    return {k: max(1, int(np.searchsorted(c, keep * d, side="right"))) for k, (c, d) in costs.items()}


def trial_ranks(plan: Plan, keep: float) -> dict[str, int]:
    """The uniform rule's ranks at ``keep``: where :func:`measure_weights` truncates each role and layer."""
    return _ranks_keeping(group_costs(plan), keep)


def format_ranks(ranks: dict[str, int]) -> str:
    """A rank map as one table cell, "key:rank;key:rank" (:func:`parse_ranks` reads it back)."""
    return ";".join(f"{k}:{r}" for k, r in ranks.items())


def parse_ranks(cell: str) -> dict[str, int]:
    return {key: int(rank) for key, rank in (item.rsplit(":", 1) for item in cell.split(";"))}


def relative_tails(plan: Plan) -> dict[str, np.ndarray]:
    """Per group ``Σ_{i>r} s_i² / Σ_i s_i²`` for r = 1..full: the relative error of its rank-r truncation
    (for a whitened basis, of its outputs on the calibration inputs; Eckart–Young)."""
    out = {}
    for g in plan.groups:
        tail = _tail_energy(plan.bases[g.key].s)
        total = float(np.sum(np.asarray(plan.bases[g.key].s, dtype=np.float64) ** 2))
        out[g.key] = tail / total if total > 0 else tail
    return out


def measure_weights(plan: Plan, loss_with, keep: float, progress=print) -> dict[str, float]:
    """Per group a weight ``w_g = w_role · w_layer`` of its relative error, from measured loss increases.

    Every matrix of one role (q, k, ..., every layer) is truncated together to ``keep`` of its dense
    parameters (:func:`trial_ranks`), then every matrix of one layer; ``w`` of that role (layer) is the
    loss increase divided by the relative errors it removed, summed. Measuring a whole role or layer at
    once, not a matrix alone, keeps the compounding of many small errors in the measurement (matrix by
    matrix, most increases are below what a few thousand tokens resolve, and an allocation that trusts
    them starves the matrices it cannot see). Layer weights are normalised to mean 1; a weight is at
    least 1 % of the median of its kind, so that nothing is treated as free. ``loss_with(weights)``: the
    calibration loss with the matrices of ``weights`` (name -> array) replaced. One evaluation per role
    and per layer. A basis shared by several matrices (K and V) counts under its first member's role and
    layer.
    """
    base = loss_with({})
    ranks = trial_ranks(plan, keep)
    rel = relative_tails(plan)
    members = {g.key: g.members for g in plan.groups}
    role_of = {g.key: g.members[0].split(".", 1)[1] for g in plan.groups}
    layer_of = {g.key: g.members[0].split(".", 1)[0] for g in plan.groups}

    def weight_of(keys: list[str], label: str) -> float:
        factors = plan.factors({k: ranks[k] for k in keys})
        replaced = {n: factors[n].dense(np.float32) for k in keys for n in members[k]}
        increase = loss_with(replaced) - base
        energy = sum(float(rel[k][ranks[k] - 1]) for k in keys)
        progress(f"weights: {label} truncated to {keep:.0%} of its parameters: loss {increase:+.4g}")
        return max(increase, 0.0) / energy if energy > 0 else 0.0

    def floored(values: dict[str, float]) -> dict[str, float]:
        floor = 0.01 * float(np.median(list(values.values())))
        if floor <= 0:  # (almost) nothing measurable: no evidence to weight by, every weight alike
            return {k: 1.0 for k in values}
        return {k: max(v, floor) for k, v in values.items()}

    roles = list(dict.fromkeys(role_of.values()))
    layers = list(dict.fromkeys(layer_of.values()))
    w_role = floored({r: weight_of([k for k in ranks if role_of[k] == r], f"role {r}") for r in roles})
    w_layer = floored({i: weight_of([k for k in ranks if layer_of[k] == i], f"layer {i}") for i in layers})
    mean_layer = float(np.mean(list(w_layer.values()))) or 1.0
    return {k: w_role[role_of[k]] * w_layer[layer_of[k]] / mean_layer for k in ranks}


def weighted_damage(plan: Plan, weights: dict[str, float]) -> dict[str, np.ndarray]:
    """Per group ``w_g · Σ_{i>r} s_i² / Σ s_i²``: the calibrated rule's estimated loss increase at rank r."""
    rel = relative_tails(plan)
    return {k: weights[k] * rel[k] for k in rel}
