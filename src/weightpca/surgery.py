"""Attention surgery: replace W_q, W_k, W_v by low-rank PCA reconstructions.

Reference method (weight-only PCA, rows as samples). For a weight matrix
``W [n, m]`` (an ``nn.Linear`` weight, n output rows of dimension m) scikit-
learn's ``PCA(n_components=t, svd_solver='full')`` centres the rows,
``X = W - 1 μᵀ`` with ``μ = mean of the rows``, takes the thin SVD
``X = U S Vt`` and keeps the smallest rank

    r(t) = searchsorted(cumsum(S² / ΣS²), t, side='right') + 1

whose explained-variance ratio exceeds t; ``inverse_transform(transform(W))``
is then ``W_r = X Vt_rᵀ Vt_r + 1 μᵀ``. Here one SVD per matrix (or group)
serves every threshold of a sweep, and t = 1.0 means "keep every component"
(sklearn reads the integer 1 as one component; a sweep's 1.0 is the identity).

Modes differ in how K and V are compressed; Q always gets its own PCA (or,
in ``activation_aware``, its own activation-weighted SVD), so every mode
touches the same matrices:

- ``separate``: W_q, W_k, W_v each their own PCA (the reference method);
- ``shared_kv``: per layer one PCA of ``vstack(W_k, W_v)``, both rows blocks
  reconstructed in that basis (the reference finding);
- ``cross_layer``: one PCA of the K and V rows of *all* layers, a basis shared
  across layers;
- ``activation_aware``: minimise the error of the layer's *outputs* on
  calibration inputs x (rows of X [N, m]) rather than of the weights: with
  ``C = XᵀX / N = L Lᵀ`` (Cholesky), ``||X Wᵀ − X Ŵᵀ||_F² / N = ||(W − Ŵ) L||_F²``,
  so the best rank-r Ŵ is ``(W L)_r L⁻¹`` with ``(W L)_r`` the truncated SVD
  (the whitening of SVD-LLM, Wang et al. 2024, "SVD-LLM: Truncation-aware
  Singular Value Decomposition for Large Language Model Compression"; ASVD,
  Yuan et al. 2023, scales by activations in the same spirit). The rank at
  threshold t is the smallest keeping a fraction t of ``Σ S²`` of ``W L``,
  i.e. of the output energy on the calibration data.

Parameters of a factored form of rank r for ``W [n, m]``: PCA ``n r + r m + m``
(scores, components, mean), activation-aware ``n r + r m``; a basis shared by
several matrices is counted once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .targets import input_moments, perplexity

MODES = ("separate", "shared_kv", "cross_layer", "activation_aware")


def rank_for_threshold(s: np.ndarray, threshold: float) -> int:
    """sklearn's rule for a float n_components; threshold >= 1 keeps every component."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"variance threshold {threshold} must be in (0, 1]")
    if threshold >= 1.0:
        return len(s)
    ratio = s**2 / np.sum(s**2)
    return min(int(np.searchsorted(np.cumsum(ratio), threshold, side="right")) + 1, len(s))


def thin_svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U S [n, r], S [r], Vt [r, m]) of x [n, m], r = min(n, m), S descending.

    Computed from the eigendecomposition of the smaller Gram matrix (xᵀx or
    x xᵀ), which is about 2.5x faster than LAPACK's SVD at these sizes. The
    Gram squares the condition number, so singular directions with
    σ_i / σ_1 below ~sqrt(machine epsilon) are inaccurate; they enter every
    reconstruction multiplied by σ_i, so even the full-rank reconstruction
    reproduces the model (every sweep checks it at threshold 1.0; tests
    compare with scikit-learn).
    """
    n, m = x.shape
    if n >= m:
        evals, v = np.linalg.eigh(x.T @ x)
        order = np.argsort(evals)[::-1]
        s = np.sqrt(np.clip(evals[order], 0.0, None))
        v = v[:, order]
        return x @ v, s, v.T
    evals, u = np.linalg.eigh(x @ x.T)
    order = np.argsort(evals)[::-1]
    s = np.sqrt(np.clip(evals[order], 0.0, None))
    u = u[:, order]
    safe = np.where(s > s[0] * np.finfo(x.dtype).eps, s, np.inf)  # null directions -> zero rows
    return u * s, s, (u.T @ x) / safe[:, None]


@dataclass
class PCABasis:
    """Centred thin SVD of a sample matrix: X - 1 μᵀ = U S Vt (rows of X are the samples)."""

    mean: np.ndarray  # [m]
    scores: np.ndarray  # [n, min(n, m)] = U S
    s: np.ndarray  # [min(n, m)]
    vt: np.ndarray  # [min(n, m), m]

    @classmethod
    def fit(cls, x: np.ndarray, dtype=np.float64) -> "PCABasis":
        x = np.asarray(x, dtype=dtype)
        mean = x.mean(axis=0)
        scores, s, vt = thin_svd(x - mean)
        return cls(mean, scores, s, vt)

    def reconstruct(self, r: int) -> np.ndarray:
        """inverse_transform(transform(X)) with r components: U_r S_r Vt_r + μ.

        For the fitted samples (X - μ) Vt_rᵀ Vt_r = U_r S_r Vt_r, which costs
        one [n, r] x [r, m] product instead of two.
        """
        return self.scores[:, :r] @ self.vt[:r] + self.mean


@dataclass
class WhitenedBasis:
    """SVD of W L for the activation-aware mode (L: Cholesky factor of the input second moment)."""

    u_s: np.ndarray  # [n, r_max] = U S
    vt_linv: np.ndarray  # [r_max, m] = Vt L⁻¹
    s: np.ndarray

    @classmethod
    def fit(cls, w: np.ndarray, chol: np.ndarray, chol_inv: np.ndarray, dtype=np.float64) -> "WhitenedBasis":
        """``chol_inv`` = L⁻¹, computed once per layer: q, k and v share their inputs, hence L."""
        w = np.asarray(w, dtype=dtype)
        u_s, s, vt = thin_svd(w @ np.asarray(chol, dtype=dtype))
        return cls(u_s, vt @ np.asarray(chol_inv, dtype=dtype), s)

    def reconstruct(self, r: int) -> np.ndarray:
        return self.u_s[:, :r] @ self.vt_linv[:r]


def input_cholesky(second_moment: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Lower Cholesky factor of C + δI, δ = eps · mean(diag C), raised tenfold until C + δI is positive definite.

    Calibration inputs with fewer tokens than dimensions (or float32 rounding)
    leave C singular or slightly indefinite; the ridge keeps it invertible.
    """
    c = np.asarray(second_moment, dtype=np.float64)
    c = (c + c.T) / 2
    scale = float(np.mean(np.diag(c)))
    if eps == 0.0:
        return np.linalg.cholesky(c)
    for _ in range(12):
        try:
            return np.linalg.cholesky(c + eps * scale * np.eye(len(c)))
        except np.linalg.LinAlgError:
            eps *= 10
    raise np.linalg.LinAlgError("calibration input moment is not positive definite even with a ridge")


def pca_params(n_rows: int, m: int, r: int) -> int:
    return n_rows * r + r * m + m


class SweepPlan:
    """Every decomposition of one mode, computed once; ``weights_at(t)`` is then cheap.

    ``layers`` is a list of {"q": W_q, "k": W_k, "v": W_v} (numpy, [n, m]).
    ``dtype`` is the precision of the PCA decompositions: float32 (the sweep's
    default) is 2-3x faster and reproduces the unmodified model at threshold
    1.0 to ~1e-6; float64 matches scikit-learn to ~1e-12. The activation-aware
    decompositions are always float64.
    """

    def __init__(self, mode: str, layers: list[dict[str, np.ndarray]],
                 input_moments: list[np.ndarray] | None = None, dtype=np.float64):
        if mode not in MODES:
            raise ValueError(f"unknown surgery mode '{mode}'; choose from {', '.join(MODES)}")
        if mode == "activation_aware" and input_moments is None:
            raise ValueError("activation_aware needs calibration input moments")
        self.mode = mode
        self.layers = [{k: np.asarray(v) for k, v in lw.items()} for lw in layers]
        self.bases: list[dict] = []
        if mode == "activation_aware":
            # always float64: L⁻¹ of a nearly singular calibration moment (fewer
            # tokens than dimensions) amplifies float32 rounding; the full-rank
            # reconstruction then missed SmolLM2 by 1 % (256 calibration tokens)
            dtype = np.float64
            for lw, c in zip(self.layers, input_moments):
                chol = input_cholesky(c)
                chol_inv = np.linalg.inv(chol)
                self.bases.append({name: WhitenedBasis.fit(w, chol, chol_inv, dtype)
                                   for name, w in lw.items()})
        else:
            shared = None
            if mode == "cross_layer":
                shared = PCABasis.fit(np.vstack([np.vstack([lw["k"], lw["v"]]) for lw in self.layers]), dtype)
            row = 0
            for lw in self.layers:
                b = {"q": PCABasis.fit(lw["q"], dtype), "row": row}
                row += lw["k"].shape[0] + lw["v"].shape[0]
                if mode == "separate":
                    b["k"], b["v"] = PCABasis.fit(lw["k"], dtype), PCABasis.fit(lw["v"], dtype)
                elif mode == "shared_kv":
                    b["kv"] = PCABasis.fit(np.vstack([lw["k"], lw["v"]]), dtype)
                self.bases.append(b)
            self.shared = shared

    def weights_at(self, threshold: float) -> tuple[list[dict[str, np.ndarray]], dict]:
        """Reconstructed q/k/v per layer at one threshold, and its ranks and parameter counts.

        Each matrix is ``coef @ basis + mean`` of its factors (``factors_at``):
        for PCA ``U_r S_r Vt_r + μ``, activation-aware ``(W L)_r L⁻¹``.
        """
        factors, info = self._at(threshold)
        weights = []
        for layer in factors:
            new = {}
            for name, (_, coef, basis, mean) in layer.items():
                w = coef @ basis
                new[name] = w + mean if mean is not None else w
            weights.append(new)
        return weights, info

    def info_at(self, threshold: float) -> dict:
        """Ranks and parameter counts at one threshold, without reconstructing (cheap)."""
        return self._at(threshold)[1]

    def factors_at(self, threshold: float) -> list[dict[str, tuple]]:
        """Per layer, q/k/v as factors ``(basis_key, coef [n, r], basis [r, m], mean [m] or None)``.

        ``coef @ basis + mean`` is the reconstruction ``weights_at`` returns.
        Matrices with the same ``basis_key`` share ``basis`` and ``mean`` (K
        and V of a layer in ``shared_kv``, of every layer in ``cross_layer``),
        which a compressed model stores once.
        """
        return self._at(threshold)[0]

    def threshold_for_params(self, params: float, low: float, high: float) -> float | None:
        """A threshold in (low, high) whose factored parameter count is nearest ``params`` from above.

        The count is a non-decreasing step function of the threshold, so
        bisection on the threshold finds the step; the answer must have ranks
        (hence a count) strictly between those at ``low`` and ``high``, else
        there is nothing left to measure between them and None is returned.
        """
        count = lambda t: self.info_at(t)["params_kept"]  # noqa: E731
        at_low, at_high = count(low), count(high)
        lo, hi = low, high
        for _ in range(60):  # 2⁻⁶⁰ of the interval: below any step of a float threshold
            mid = (lo + hi) / 2
            if mid in (lo, hi):
                break
            if count(mid) < params:
                lo = mid
            else:
                hi = mid
        for t in (hi, lo):
            if at_low < count(t) < at_high:
                return t
        return None

    def _at(self, threshold: float) -> tuple[list[dict[str, tuple]], dict]:
        """Per layer the factors of q, k, v at one threshold (views of the bases: no arithmetic), and info."""
        out, ranks = [], {"q": [], "k": [], "v": [], "kv": []}
        params = {"q": 0, "kv": 0}
        dense = {"q": 0, "kv": 0}
        shared_rank = None
        if self.mode == "cross_layer":
            shared_rank = rank_for_threshold(self.shared.s, threshold)
            m = self.shared.vt.shape[1]
            params["kv"] += shared_rank * m + m  # one basis and mean for all layers
        for i, (lw, b) in enumerate(zip(self.layers, self.bases)):
            layer = {}
            dense["q"] += lw["q"].size
            dense["kv"] += lw["k"].size + lw["v"].size
            if self.mode == "activation_aware":
                for name in ("q", "k", "v"):
                    r = rank_for_threshold(b[name].s, threshold)
                    layer[name] = (f"{i}.{name}", b[name].u_s[:, :r], b[name].vt_linv[:r], None)
                    ranks[name].append(r)
                    n, m = lw[name].shape
                    params["q" if name == "q" else "kv"] += n * r + r * m
            else:
                r = rank_for_threshold(b["q"].s, threshold)
                layer["q"] = (f"{i}.q", b["q"].scores[:, :r], b["q"].vt[:r], b["q"].mean)
                ranks["q"].append(r)
                params["q"] += pca_params(*lw["q"].shape, r)
                if self.mode == "separate":
                    for name in ("k", "v"):
                        r = rank_for_threshold(b[name].s, threshold)
                        layer[name] = (f"{i}.{name}", b[name].scores[:, :r], b[name].vt[:r], b[name].mean)
                        ranks[name].append(r)
                        params["kv"] += pca_params(*lw[name].shape, r)
                else:
                    n_k, n_v = lw["k"].shape[0], lw["v"].shape[0]
                    if self.mode == "shared_kv":
                        basis, start, r, key = b["kv"], 0, rank_for_threshold(b["kv"].s, threshold), f"{i}.kv"
                    else:  # cross_layer: this layer's rows of the all-layer sample matrix
                        basis, start, r, key = self.shared, b["row"], shared_rank, "kv"
                    layer["k"] = (key, basis.scores[start:start + n_k, :r], basis.vt[:r], basis.mean)
                    layer["v"] = (key, basis.scores[start + n_k:start + n_k + n_v, :r], basis.vt[:r], basis.mean)
                    ranks["kv"].append(r)
                    m = lw["k"].shape[1]
                    params["kv"] += (n_k + n_v) * r + (0 if shared_rank is not None else r * m + m)
            out.append(layer)
        info = {
            "ranks": {k: v for k, v in ranks.items() if v},
            "params_q": params["q"], "params_kv": params["kv"],
            "dense_q": dense["q"], "dense_kv": dense["kv"],
        }
        info["params_kept"] = params["q"] + params["kv"]
        info["params_dense"] = dense["q"] + dense["kv"]
        return out, info


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
        outside = [p for p in points if p["params_fraction"] < best["params_fraction"]
                   and p["ppl_ratio"] > 1 + tolerance]
        bracket = max(outside, key=lambda p: p["params_fraction"]) if outside else None
    else:
        best = min(compressed, key=lambda p: p["ppl_ratio"]) if compressed else None
        bracket = max(compressed, key=lambda p: p["params_fraction"]) if compressed else None
    pick = lambda p, key: p[key] if p is not None else nan  # noqa: E731
    return dict(tolerance=tolerance, within=bool(within), threshold=pick(best, "threshold"),
                params_fraction=pick(best, "params_fraction"), ppl=pick(best, "ppl"),
                ppl_ratio=pick(best, "ppl_ratio"), bracket_threshold=pick(bracket, "threshold"),
                bracket_params_fraction=pick(bracket, "params_fraction"),
                bracket_ppl_ratio=pick(bracket, "ppl_ratio"), points=len(points))


def run_sweep(target, mode: str, thresholds, eval_tokens: np.ndarray, window: int,
              calib_tokens: np.ndarray | None = None, prompt: str | None = None,
              gen_tokens: int = 0, tolerances=(), refine: int = 0, progress=print,
              dtype=np.float32) -> tuple[list[dict], dict]:
    """Perplexity at every threshold of one mode, then refined toward each tolerance's frontier.

    Returns (rows, timing); the model is restored after. One decomposition
    per matrix/group serves every threshold. Grid points (``source`` "grid")
    get a greedy continuation of ``prompt``. Then, per tolerance, up to
    ``refine`` more points (``source`` "refine") bisect between the
    lowest-threshold point within tolerance and the point below it
    (``frontier_bracket``), each at the threshold whose factored parameter
    count is midway between theirs (``SweepPlan.threshold_for_params``), so
    the frontier is located to about 2^-refine of that bracket's parameters.
    A bracket whose lower point is not compressed (factored form at least
    dense) holds no compressed point and is not refined. Thresholds whose
    ranks equal an evaluated point's reuse its perplexity.
    ``timing['sweep_cost_ratio']`` is (evaluations + decompositions +
    reconstructions + calibration) / evaluations alone.
    """
    original = [target.get_qkv(i) for i in range(target.n_layers)]
    timing = dict(eval_s=0.0, calib_s=0.0, decompose_s=0.0, reconstruct_s=0.0, generate_s=0.0)
    prompt_ids = target.encode(prompt) if prompt and gen_tokens else None

    def timed(key, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        timing[key] += time.perf_counter() - t0
        return out

    base_ppl = timed("eval_s", perplexity, target, eval_tokens, window)
    moments = None
    if mode == "activation_aware":
        if calib_tokens is None:
            raise ValueError("activation_aware needs calibration tokens (surgery.calib_tokens)")
        moments = timed("calib_s", input_moments, target, calib_tokens, window)
    plan = timed("decompose_s", SweepPlan, mode, original, moments, dtype)
    rows: list[dict] = []
    by_ranks: dict[str, dict] = {}
    timing["evaluations"] = 1

    def measure(t: float, source: str) -> dict:
        info = plan.info_at(t)
        ranks = ";".join(f"{k}:{','.join(map(str, v))}" for k, v in info["ranks"].items())
        if ranks in by_ranks and t < 1.0:  # same model as a point already evaluated
            row = dict(by_ranks[ranks], threshold=t, source=source)
            rows.append(row)
            return row

        def apply():
            weights, _ = plan.weights_at(t)
            for i, w in enumerate(weights):  # at 1.0 too: the check below tests the decomposition
                target.set_qkv(i, w)
        timed("reconstruct_s", apply)
        ppl = timed("eval_s", perplexity, target, eval_tokens, window)
        timing["evaluations"] += 1
        text = ""
        if prompt_ids is not None and source == "grid":
            text = target.decode(timed("generate_s", target.greedy, prompt_ids, gen_tokens))
        # what a compressed model would store: the factored form where it is
        # smaller than the dense matrices (near full rank it is not)
        kept = min(info["params_kept"], info["params_dense"])
        ranks_of = info["ranks"]
        row = dict(
            threshold=t, source=source, ppl=ppl, ppl_ratio=ppl / base_ppl, base_ppl=base_ppl,
            params_kept=kept, params_factored=info["params_kept"], params_dense=info["params_dense"],
            params_fraction=kept / info["params_dense"],
            params_q=info["params_q"], params_kv=info["params_kv"],
            dense_q=info["dense_q"], dense_kv=info["dense_kv"],
            mean_rank_q=float(np.mean(ranks_of["q"])),
            mean_rank_kv=float(np.mean(ranks_of["kv"] if "kv" in ranks_of else ranks_of["k"] + ranks_of["v"])),
            ranks=ranks, continuation=text,
        )
        rows.append(row)
        by_ranks.setdefault(ranks, row)
        progress(f"{mode} t={t:.6g} ({source}): ppl {ppl:.3f} ({ppl / base_ppl:.3f}x), "
                 f"params {row['params_fraction']:.3f} of dense")
        if t >= 1.0 and abs(ppl - base_ppl) / base_ppl >= 1e-4:
            raise AssertionError(
                f"{mode}: the full-rank reconstruction (threshold 1.0) gave perplexity {ppl} but the "
                f"unmodified model {base_ppl}: the decomposition does not reproduce the weights"
            )
        return row

    try:
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
    finally:
        for i, w in enumerate(original):
            target.set_qkv(i, w)
    timing["sweep_cost_ratio"] = (timing["eval_s"] + timing["calib_s"] + timing["reconstruct_s"]
                                  + timing["decompose_s"]) / timing["eval_s"]
    timing["base_ppl"] = base_ppl
    return rows, timing


def run_sensitivity(target, thresholds, eval_tokens: np.ndarray, window: int, tolerance: float,
                    combined: bool = False, layer_tokens: int | None = None, progress=print,
                    dtype=np.float32) -> list[dict]:
    """Which matrices and layers carry the loss of the ``separate`` mode (weight-only PCA per matrix).

    Rows (``scope``):
    - "type": one matrix type (q, k or v) compressed in every layer, the
      others left dense, at every threshold below 1.0;
    - "layer": the most damaging type (largest Σ log perplexity ratio over
      those thresholds) compressed in one layer at a time, at the highest
      threshold where that type alone leaves ``1 + tolerance`` (the lowest
      threshold if it never does): where its damage begins;
    - "all" (only with ``combined``): q, k and v in every layer, which is the
      ``separate`` sweep's own point at that threshold.
    Each matrix keeps the rank the ``separate`` sweep gives it at that
    threshold. The one-layer points are evaluated on the first
    ``layer_tokens`` tokens (None: all), their ratio to the unmodified model
    on those same tokens: that scan costs one evaluation per layer. The
    model is restored after.
    """
    original = [target.get_qkv(i) for i in range(target.n_layers)]
    everywhere = list(range(target.n_layers))
    layer_eval = eval_tokens[: layer_tokens + 1] if layer_tokens else eval_tokens
    base = {"all": perplexity(target, eval_tokens, window)}
    base["layer"] = perplexity(target, layer_eval, window) if layer_tokens else base["all"]
    plan = SweepPlan("separate", original, None, dtype)
    levels = sorted((t for t in thresholds if t < 1.0), reverse=True)
    if not levels:
        raise ValueError("sensitivity needs a threshold below 1.0 in surgery.thresholds")
    compressed = {t: plan.weights_at(t) for t in levels}
    rows = []

    def measure(scope: str, types: str, layers: list[int], t: float) -> None:
        weights, info = compressed[t]
        for i in layers:
            target.set_qkv(i, {n: weights[i][n] if n in types else original[i][n] for n in "qkv"})
        tokens, base_ppl = (layer_eval, base["layer"]) if scope == "layer" else (eval_tokens, base["all"])
        try:
            ppl = perplexity(target, tokens, window)
        finally:
            for i in layers:
                target.set_qkv(i, original[i])
        ranks = [info["ranks"][n][i] for n in types for i in layers]
        rows.append(dict(scope=scope, matrices=types, layer=layers[0] if scope == "layer" else "all",
                         threshold=t, ppl=ppl, ppl_ratio=ppl / base_ppl, base_ppl=base_ppl,
                         eval_tokens=len(tokens) - 1, mean_rank=float(np.mean(ranks))))
        progress(f"sensitivity {scope} {types} layer {rows[-1]['layer']} t={t:g}: "
                 f"ppl {ppl:.3f} ({ppl / base_ppl:.3f}x)")

    for t in levels:
        for name in "qkv":
            measure("type", name, everywhere, t)
        if combined:
            measure("all", "qkv", everywhere, t)
    damage = {n: sum(np.log(r["ppl_ratio"]) for r in rows if r["scope"] == "type" and r["matrices"] == n)
              for n in "qkv"}
    worst = max(damage, key=damage.get)
    leaving = [r["threshold"] for r in rows if r["scope"] == "type" and r["matrices"] == worst
               and r["ppl_ratio"] > 1 + tolerance]
    at = max(leaving) if leaving else levels[-1]
    for i in everywhere:
        measure("layer", worst, [i], at)
    return rows
