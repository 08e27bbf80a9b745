"""Attention surgery: replace W_q, W_k, W_v by low-rank PCA reconstructions, and measure what it costs.

The decompositions are ``weightpca.linalg``'s and the groups of matrices
that share a basis are ``weightpca.plan``'s; the modes differ only in those
groups (``plan.mode_groups``). Q always gets its own basis, so every mode
touches the same matrices:

- ``separate``: W_q, W_k, W_v each their own PCA (the reference method,
  scikit-learn's ``PCA(n_components=t, svd_solver='full')``);
- ``shared_kv``: per layer one PCA of ``vstack(W_k, W_v)``, both row blocks
  reconstructed in that basis (the reference finding);
- ``cross_layer``: one PCA of the K and V rows of *all* layers, a basis shared
  across layers;
- ``activation_aware``: each matrix truncated in the metric of its
  calibration inputs, ``(W L)_r L⁻¹`` with ``L Lᵀ = XᵀX / N``; the rank at
  threshold t is the smallest keeping a fraction t of the output energy on
  the calibration data.

One decomposition per group serves every threshold of a sweep; a threshold
sets every group's rank by ``linalg.rank_for_threshold``, and t = 1.0 means
"keep every component". Parameters of a factored form of rank r for
``W [n, m]``: PCA ``n r + r m + m`` (scores, components, mean),
activation-aware ``n r + r m``; a basis shared by several matrices is
counted once.
"""

from __future__ import annotations

import time

import numpy as np

from .plan import MODES, Plan, model_plan
from .targets import perplexity

__all__ = ["MODES", "frontier_bracket", "frontier_row", "qkv_info", "run_sensitivity", "run_sweep"]

QKV = ("q", "k", "v")
LABELS = ("q", "k", "v", "kv")  # a group's matrix types: one role, or K and V sharing a basis


def _labels(plan: Plan) -> dict[str, str]:
    """Group key -> its matrix type: one role, or "kv" for K and V sharing a basis."""
    out = {}
    for g in plan.groups:
        roles = {name.split(".", 1)[1] for name in g.members}
        out[g.key] = "kv" if roles == {"k", "v"} else roles.pop()
    return out


def _stopwatch(timing: dict[str, float]):
    """``timed(key, fn, *args)``: ``fn(*args)``, its wall time added to ``timing[key]``."""

    def timed(key, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        timing[key] += time.perf_counter() - t0
        return out

    return timed


def qkv_info(plan: Plan, threshold: float, n_layers: int) -> dict:
    """Ranks and parameter counts of a q/k/v plan at one threshold, without reconstructing (cheap).

    ``ranks``: per matrix type (q, k, v, or kv for a shared K/V basis) the
    rank of each layer's basis (a basis shared across layers is listed once
    per layer); parameters split into q and k/v, factored and dense.
    """
    ranks_of, params, dense = plan.ranks(threshold), plan.params(threshold), plan.dense_params()
    group_of = {name: g.key for g in plan.groups for name in g.members}
    label = _labels(plan)
    ranks = {name: [] for name in LABELS}
    for i in range(n_layers):
        for key in dict.fromkeys(group_of[f"{i}.{r}"] for r in QKV):
            ranks[label[key]].append(ranks_of[key])
    part = lambda counts, q: sum(v for k, v in counts.items() if (label[k] == "q") == q)  # noqa: E731
    info = {
        "ranks": {k: v for k, v in ranks.items() if v},
        "params_q": part(params, True),
        "params_kv": part(params, False),
        "dense_q": part(dense, True),
        "dense_kv": part(dense, False),
    }
    info["params_kept"] = info["params_q"] + info["params_kv"]
    info["params_dense"] = info["dense_q"] + info["dense_kv"]
    return info


def frontier_bracket(points: list[dict], tolerance: float) -> tuple[dict | None, dict | None]:
    """(inside, below): the lowest-threshold point within ``1 + tolerance`` of the base perplexity, and the
    nearest evaluated point below its threshold (outside the tolerance, since ``inside`` is the lowest).

    The frontier lies between them; ``below`` is None when every lower threshold is within tolerance.
    """
    inside = [p for p in points if p["ppl_ratio"] <= 1 + tolerance]
    if not inside:
        return None, None
    high = min(inside, key=lambda p: p["threshold"])
    lower = [p for p in points if p["threshold"] < high["threshold"]]
    return high, (max(lower, key=lambda p: p["threshold"]) if lower else None)


def frontier_row(points: list[dict], tolerance: float) -> dict:
    """The fewest q/k/v parameters of one mode within ``(1 + tolerance) ×`` the base perplexity.

    Only compressed points count (factored form smaller than dense,
    ``params_fraction < 1``). ``within`` says whether one is inside the
    tolerance: then the row is that point, and its bracket the nearest
    measured point with fewer parameters outside the tolerance (NaN when
    there is none). Otherwise the row is the compressed point with the lowest
    perplexity and its bracket the least compressed point.
    """
    nan = float("nan")
    compressed = [p for p in points if p["params_fraction"] < 1.0]
    within = [p for p in compressed if p["ppl_ratio"] <= 1 + tolerance]
    if within:
        best = min(within, key=lambda p: (p["params_fraction"], p["ppl_ratio"]))
        outside = [
            p for p in points if p["params_fraction"] < best["params_fraction"] and p["ppl_ratio"] > 1 + tolerance
        ]
        bracket = max(outside, key=lambda p: p["params_fraction"]) if outside else None
    else:
        best = min(compressed, key=lambda p: p["ppl_ratio"]) if compressed else None
        bracket = max(compressed, key=lambda p: p["params_fraction"]) if compressed else None
    pick = lambda p, key: p[key] if p is not None else nan  # noqa: E731
    return dict(
        tolerance=tolerance,
        within=bool(within),
        threshold=pick(best, "threshold"),
        params_fraction=pick(best, "params_fraction"),
        ppl=pick(best, "ppl"),
        ppl_ratio=pick(best, "ppl_ratio"),
        bracket_threshold=pick(bracket, "threshold"),
        bracket_params_fraction=pick(bracket, "params_fraction"),
        bracket_ppl_ratio=pick(bracket, "ppl_ratio"),
        points=len(points),
    )


def run_sweep(
    target,
    mode: str,
    thresholds,
    eval_tokens: np.ndarray,
    window: int,
    calib_tokens: np.ndarray | None = None,
    prompt: str | None = None,
    gen_tokens: int = 0,
    tolerances=(),
    refine: int = 0,
    progress=print,
    dtype=np.float32,
) -> tuple[list[dict], dict]:
    """Perplexity at every threshold of one mode, then refined toward each tolerance's frontier.

    Returns (rows, timing); the model is restored after. One decomposition
    per matrix/group serves every threshold. Grid points (``source`` "grid")
    get a greedy continuation of ``prompt``. Then, per tolerance, up to
    ``refine`` more points (``source`` "refine") bisect between the
    lowest-threshold point within tolerance and the point below it
    (``frontier_bracket``), each at the threshold whose factored parameter
    count is midway between theirs (``Plan.threshold_for_params``), so
    the frontier is located to about 2^-refine of that bracket's parameters.
    A bracket whose lower point is not compressed (factored form at least
    dense) holds no compressed point and is not refined. Thresholds whose
    ranks equal an evaluated point's reuse its perplexity.
    ``timing['sweep_cost_ratio']`` is (evaluations + decompositions +
    reconstructions + calibration) / evaluations alone.
    """
    timing = dict(eval_s=0.0, calib_s=0.0, decompose_s=0.0, reconstruct_s=0.0, generate_s=0.0)
    prompt_ids = target.encode(prompt) if prompt and gen_tokens else None
    timed = _stopwatch(timing)

    base_ppl = timed("eval_s", perplexity, target, eval_tokens, window)
    plan = model_plan(target, mode, QKV, calib_tokens, window, dtype, timed)
    rows: list[dict] = []
    by_ranks: dict[str, dict] = {}
    timing["evaluations"] = 1

    def measure(t: float, source: str) -> dict:
        info = qkv_info(plan, t, target.n_layers)
        ranks = ";".join(f"{k}:{','.join(map(str, v))}" for k, v in info["ranks"].items())
        if ranks in by_ranks and t < 1.0:  # same model as a point already evaluated
            row = dict(by_ranks[ranks], threshold=t, source=source)
            rows.append(row)
            return row
        # at 1.0 too: the check below tests the decomposition
        weights = timed("reconstruct_s", plan.weights, t, np.float32)
        text = ""
        with target.patched(weights):
            ppl = timed("eval_s", perplexity, target, eval_tokens, window)
            if prompt_ids is not None and source == "grid":
                text = target.decode(timed("generate_s", target.greedy, prompt_ids, gen_tokens))
        timing["evaluations"] += 1
        # what a compressed model would store: the factored form where it is
        # smaller than the dense matrices (near full rank it is not)
        kept = min(info["params_kept"], info["params_dense"])
        ranks_of = info["ranks"]
        row = dict(
            threshold=t,
            source=source,
            ppl=ppl,
            ppl_ratio=ppl / base_ppl,
            base_ppl=base_ppl,
            params_kept=kept,
            params_factored=info["params_kept"],
            params_dense=info["params_dense"],
            params_fraction=kept / info["params_dense"],
            params_q=info["params_q"],
            params_kv=info["params_kv"],
            dense_q=info["dense_q"],
            dense_kv=info["dense_kv"],
            mean_rank_q=float(np.mean(ranks_of["q"])),
            mean_rank_kv=float(np.mean(ranks_of["kv"] if "kv" in ranks_of else ranks_of["k"] + ranks_of["v"])),
            ranks=ranks,
            continuation=text,
        )
        rows.append(row)
        by_ranks.setdefault(ranks, row)
        progress(
            f"{mode} t={t:.6g} ({source}): ppl {ppl:.3f} ({ppl / base_ppl:.3f}x), "
            f"params {row['params_fraction']:.3f} of dense"
        )
        if t >= 1.0 and abs(ppl - base_ppl) / base_ppl >= 1e-4:
            raise AssertionError(
                f"{mode}: the full-rank reconstruction (threshold 1.0) gave perplexity {ppl} but the "
                f"unmodified model {base_ppl}: the decomposition does not reproduce the weights"
            )
        return row

    for t in thresholds:
        measure(t, "grid")
    for tolerance in tolerances:
        for _ in range(refine):
            high, low = frontier_bracket(rows, tolerance)
            if high is None or low is None or low["params_factored"] >= low["params_dense"]:
                break
            goal = (min(high["params_factored"], high["params_dense"]) + low["params_factored"]) / 2
            t = plan.threshold_for_params(goal, low["threshold"], high["threshold"])
            if t is None:
                break
            measure(t, "refine")
    timing["sweep_cost_ratio"] = (
        timing["eval_s"] + timing["calib_s"] + timing["reconstruct_s"] + timing["decompose_s"]
    ) / timing["eval_s"]
    timing["base_ppl"] = base_ppl
    return rows, timing


def run_sensitivity(
    target,
    thresholds,
    eval_tokens: np.ndarray,
    window: int,
    tolerance: float,
    roles=QKV,
    combined: bool = False,
    layer_tokens: int | None = None,
    progress=print,
    dtype=np.float32,
) -> list[dict]:
    """Which matrix types and layers carry the loss of the ``separate`` mode (weight-only PCA per matrix).

    Rows (``scope``):
    - "type": one matrix type of ``roles`` (q, k, v, o, and the MLP's) compressed in every layer, the
      others left dense, at every threshold below 1.0;
    - "layer": the most damaging type (largest Σ log perplexity ratio over
      those thresholds) compressed in one layer at a time, at the highest
      threshold where that type alone leaves ``1 + tolerance`` (the lowest
      threshold if it never does): where its damage begins;
    - "all" (only with ``combined``): every type of ``roles`` in every layer, which is the
      ``separate`` sweep's own point at that threshold when ``roles`` is q, k, v.
    Each matrix keeps the rank the ``separate`` sweep gives it at that
    threshold. The one-layer points are evaluated on the first
    ``layer_tokens`` tokens (None: all), their ratio to the unmodified model
    on those same tokens: that scan costs one evaluation per layer. The
    model is restored after.
    """
    roles = list(roles)
    everywhere = list(range(target.n_layers))
    layer_eval = eval_tokens[: layer_tokens + 1] if layer_tokens else eval_tokens
    base = {"all": perplexity(target, eval_tokens, window)}
    base["layer"] = perplexity(target, layer_eval, window) if layer_tokens else base["all"]
    plan = model_plan(target, "separate", roles, dtype=dtype)
    levels = sorted((t for t in thresholds if t < 1.0), reverse=True)
    if not levels:
        raise ValueError("sensitivity needs a threshold below 1.0 in surgery.thresholds")
    compressed = {t: (plan.weights(t, np.float32), plan.ranks(t)) for t in levels}
    rows = []

    def measure(scope: str, types: list[str], layers: list[int], t: float) -> None:
        weights, ranks_of = compressed[t]
        names = [f"{i}.{n}" for i in layers for n in types]
        tokens, base_ppl = (layer_eval, base["layer"]) if scope == "layer" else (eval_tokens, base["all"])
        with target.patched({name: weights[name] for name in names}):
            ppl = perplexity(target, tokens, window)
        rows.append(
            dict(
                scope=scope,
                matrices="+".join(types),
                layer=layers[0] if scope == "layer" else "all",
                threshold=t,
                ppl=ppl,
                ppl_ratio=ppl / base_ppl,
                base_ppl=base_ppl,
                eval_tokens=len(tokens) - 1,
                mean_rank=float(np.mean([ranks_of[name] for name in names])),
            )
        )
        progress(
            f"sensitivity {scope} {rows[-1]['matrices']} layer {rows[-1]['layer']} t={t:g}: "
            f"ppl {ppl:.3f} ({ppl / base_ppl:.3f}x)"
        )

    for t in levels:
        for role in roles:
            measure("type", [role], everywhere, t)
        if combined:
            measure("all", roles, everywhere, t)
    damage = {
        n: sum(np.log(r["ppl_ratio"]) for r in rows if r["scope"] == "type" and r["matrices"] == n) for n in roles
    }
    worst = max(damage, key=damage.get)
    leaving = [
        r["threshold"]
        for r in rows
        if r["scope"] == "type" and r["matrices"] == worst and r["ppl_ratio"] > 1 + tolerance
    ]
    at = max(leaving) if leaving else levels[-1]
    for i in everywhere:
        measure("layer", [worst], [i], at)
    return rows


def whole_model_params(model) -> int:
    """Every parameter of a model, a tied (shared) tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def run_budget_sweep(
    target,
    mode: str,
    roles,
    allocations,
    removed,
    eval_tokens: np.ndarray,
    window: int,
    calib_tokens: np.ndarray | None = None,
    sensitivity_tokens: np.ndarray | None = None,
    trial_keep: float = 0.5,
    tolerances=(),
    refine: int = 0,
    refit=(),
    refit_ridge: float = 0.01,
    progress=print,
    dtype=np.float32,
) -> tuple[list[dict], dict]:
    """Perplexity of whole-model compression at each removed fraction, per allocation rule.

    Every matrix of ``roles`` is grouped by ``mode`` (one plan, decomposed once); for each rule of
    ``allocations`` (``weightpca.allocation``) and each fraction of ``removed`` the ranks that keep at most
    ``(1 − removed)`` of the model's parameters are evaluated on ``eval_tokens``. The ``calibrated`` rule
    first measures the weight of every matrix role and layer on ``sensitivity_tokens`` (train-split
    tokens, not the evaluation's), each role and each layer truncated to ``trial_keep`` of its dense
    parameters (``allocation.measure_weights``). Then, per rule and
    tolerance, ``refine`` bisection steps on the removed fraction locate the largest removal within
    ``(1 + tolerance)`` × the base perplexity (``source`` "refine"). Each rule of ``refit`` is measured
    again at every fraction of ``removed`` with its factors refit to the inputs the compressed model feeds
    them (``weightpca.refit``, ridge ``refit_ridge``, on ``calib_tokens``; rows with ``refit`` true, no
    bisection: a refit repeats every decomposition and a few layer passes over the calibration tokens; a
    mode with weight-only bases is not refit). Returns (rows, info); the model is restored after.
    """
    from .allocation import allocate, format_ranks, group_costs, measure_weights, model_params, weighted_damage
    from .refit import refit_plan

    unknown = [r for r in refit if r not in allocations]
    if unknown:
        raise ValueError(f"refit {unknown}: each must be one of the allocations measured ({list(allocations)})")
    timing = dict(eval_s=0.0, calib_s=0.0, decompose_s=0.0, sensitivity_s=0.0, refit_s=0.0)
    timed = _stopwatch(timing)

    total = whole_model_params(target.model)
    base_ppl = timed("eval_s", perplexity, target, eval_tokens, window)
    plan = model_plan(target, mode, roles, calib_tokens, window, dtype, timed)
    if refit and any(g.kind != "whitened" for g in plan.groups):
        progress(f"refit: {mode} has weight-only bases; refit fits whitened factors, so {mode} is not refit")
        refit = ()
    weights_of, damage = None, None
    if "calibrated" in allocations:
        if sensitivity_tokens is None:
            raise ValueError("the calibrated allocation needs sensitivity tokens (surgery.calib_tokens)")

        def loss_with(weights):
            with target.patched(weights):
                return float(np.log(perplexity(target, sensitivity_tokens, window)))

        weights_of = timed("sensitivity_s", measure_weights, plan, loss_with, trial_keep, progress)
        damage = weighted_damage(plan, weights_of)
    role_of = {name: name.split(".", 1)[1] for name in plan.names}
    costs = group_costs(plan)
    rows: list[dict] = []

    def measure(rule: str, fraction: float, source: str, refit: bool = False) -> dict:
        ranks = allocate(plan, total, fraction, rule, damage)
        row = dict(
            mode=mode,
            allocation=rule,
            refit=refit,
            removed=fraction,
            source=source,
            base_ppl=base_ppl,
            params_total=total,
        )
        if ranks is None:  # even rank 1 everywhere keeps more
            rows.append(dict(row, reachable=False, ppl=float("nan"), ppl_ratio=float("nan")))
            return rows[-1]
        fitted = (
            timed("refit_s", refit_plan, target, plan, ranks, calib_tokens, window, refit_ridge, progress)
            if refit
            else plan
        )
        with target.patched(fitted.weights(ranks, np.float32)):
            ppl = timed("eval_s", perplexity, target, eval_tokens, window)
        kept = model_params(plan, total, ranks, costs)
        by_role: dict[str, list[int]] = {}
        for g in plan.groups:
            for name in g.members:
                by_role.setdefault(role_of[name], []).append(ranks[g.key])
        row.update(
            reachable=True,
            ppl=ppl,
            ppl_ratio=ppl / base_ppl,
            params_kept=kept,
            fraction_kept=kept / total,
            **{f"mean_rank_{r}": float(np.mean(v)) for r, v in by_role.items()},
            ranks=format_ranks(ranks),
        )
        rows.append(row)
        progress(
            f"{mode} {rule}{' refit' if refit else ''} removed {fraction:.3f}: ppl {ppl:.3f} ({ppl / base_ppl:.3f}x), "
            f"{kept / total:.3f} of the model kept"
        )
        return row

    for rule in allocations:
        for fraction in removed:
            measure(rule, fraction, "grid")
        for tolerance in tolerances:
            points = [r for r in rows if r["allocation"] == rule and not r["refit"] and r["reachable"]]
            inside = [r["removed"] for r in points if r["ppl_ratio"] <= 1 + tolerance]
            outside = [r["removed"] for r in points if r["ppl_ratio"] > 1 + tolerance]
            lo, hi = max(inside, default=0.0), min((x for x in outside if x > max(inside, default=0.0)), default=None)
            for _ in range(refine if hi is not None else 0):
                mid = (lo + hi) / 2
                row = measure(rule, mid, "refine")
                if row["reachable"] and row["ppl_ratio"] <= 1 + tolerance:
                    lo = mid
                else:
                    hi = mid
    for rule in refit:
        for fraction in removed:
            measure(rule, fraction, "grid", refit=True)
    info = dict(
        timing,
        base_ppl=base_ppl,
        params_total=total,
        groups=len(plan.groups),
        sensitivity=weights_of if weights_of is not None else {},
    )
    return rows, info


def budget_frontier(rows: list[dict], tolerance: float) -> list[dict]:
    """Per (mode, allocation, refit): the largest measured removal within ``(1 + tolerance)`` × base
    perplexity, and the smallest measured removal beyond it that leaves the tolerance (its bracket; NaN if
    none)."""
    nan = float("nan")
    out = []
    variant = lambda r: (r["mode"], r["allocation"], bool(r["refit"]))  # noqa: E731
    for key in dict.fromkeys(variant(r) for r in rows):
        points = [r for r in rows if variant(r) == key and r["reachable"]]
        inside = [r for r in points if r["ppl_ratio"] <= 1 + tolerance]
        best = max(inside, key=lambda r: r["removed"]) if inside else None
        beyond = [
            r for r in points if r["ppl_ratio"] > 1 + tolerance and r["removed"] > (best["removed"] if best else -1)
        ]
        bracket = min(beyond, key=lambda r: r["removed"]) if beyond else None
        out.append(
            dict(
                mode=key[0],
                allocation=key[1],
                refit=key[2],
                tolerance=tolerance,
                within=best is not None,
                removed=best["removed"] if best else 0.0,
                ppl_ratio=best["ppl_ratio"] if best else nan,
                bracket_removed=bracket["removed"] if bracket else nan,
                bracket_ppl_ratio=bracket["ppl_ratio"] if bracket else nan,
            )
        )
    return out
