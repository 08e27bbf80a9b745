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

MODES = ("separate", "shared_kv", "cross_layer", "activation_aware")


def rank_for_threshold(s: np.ndarray, threshold: float) -> int:
    """sklearn's rule for a float n_components; threshold >= 1 keeps every component."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"variance threshold {threshold} must be in (0, 1]")
    if threshold >= 1.0:
        return len(s)
    ratio = s**2 / np.sum(s**2)
    return min(int(np.searchsorted(np.cumsum(ratio), threshold, side="right")) + 1, len(s))


@dataclass
class PCABasis:
    """Centred thin SVD of a sample matrix: X - mean = U S Vt."""

    mean: np.ndarray  # [m]
    s: np.ndarray  # [min(n, m)]
    vt: np.ndarray  # [min(n, m), m]

    @classmethod
    def fit(cls, x: np.ndarray) -> "PCABasis":
        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        return cls(mean, s, vt)

    def reconstruct(self, x: np.ndarray, r: int) -> np.ndarray:
        """inverse_transform(transform(x)) with r components."""
        v = self.vt[:r]
        return (np.asarray(x, dtype=np.float64) - self.mean) @ v.T @ v + self.mean


@dataclass
class WhitenedBasis:
    """SVD of W L for the activation-aware mode (L: Cholesky factor of the input second moment)."""

    u_s: np.ndarray  # [n, r_max] = U S
    vt_linv: np.ndarray  # [r_max, m] = Vt L⁻¹
    s: np.ndarray

    @classmethod
    def fit(cls, w: np.ndarray, chol: np.ndarray) -> "WhitenedBasis":
        w = np.asarray(w, dtype=np.float64)
        u, s, vt = np.linalg.svd(w @ chol, full_matrices=False)
        # Vt L⁻¹ without forming L⁻¹: solve Lᵀ Z = Vtᵀ  ->  Z = L⁻ᵀ Vtᵀ, Zᵀ = Vt L⁻¹
        vt_linv = np.linalg.solve(chol.T, vt.T).T
        return cls(u * s, vt_linv, s)

    def reconstruct(self, r: int) -> np.ndarray:
        return self.u_s[:, :r] @ self.vt_linv[:r]


def input_cholesky(second_moment: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Lower Cholesky factor of C + δI, δ = eps · mean(diag C): keeps C invertible when inputs are rank-deficient."""
    c = np.asarray(second_moment, dtype=np.float64)
    delta = eps * float(np.mean(np.diag(c)))
    return np.linalg.cholesky(c + delta * np.eye(len(c)))


def pca_params(n_rows: int, m: int, r: int) -> int:
    return n_rows * r + r * m + m


class SweepPlan:
    """Every decomposition of one mode, computed once; ``weights_at(t)`` is then cheap.

    ``layers`` is a list of {"q": W_q, "k": W_k, "v": W_v} (numpy, [n, m]).
    """

    def __init__(self, mode: str, layers: list[dict[str, np.ndarray]],
                 input_moments: list[np.ndarray] | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown surgery mode '{mode}'; choose from {', '.join(MODES)}")
        if mode == "activation_aware" and input_moments is None:
            raise ValueError("activation_aware needs calibration input moments")
        self.mode = mode
        self.layers = [{k: np.asarray(v, dtype=np.float64) for k, v in lw.items()} for lw in layers]
        started = time.perf_counter()
        self.bases: list[dict] = []
        if mode == "activation_aware":
            for lw, c in zip(self.layers, input_moments):
                chol = input_cholesky(c)
                self.bases.append({name: WhitenedBasis.fit(w, chol) for name, w in lw.items()})
        else:
            shared = None
            if mode == "cross_layer":
                shared = PCABasis.fit(np.vstack([np.vstack([lw["k"], lw["v"]]) for lw in self.layers]))
            for lw in self.layers:
                b = {"q": PCABasis.fit(lw["q"])}
                if mode == "separate":
                    b["k"], b["v"] = PCABasis.fit(lw["k"]), PCABasis.fit(lw["v"])
                elif mode == "shared_kv":
                    b["kv"] = PCABasis.fit(np.vstack([lw["k"], lw["v"]]))
                self.bases.append(b)
            self.shared = shared
        self.decompose_s = time.perf_counter() - started

    def weights_at(self, threshold: float) -> tuple[list[dict[str, np.ndarray]], dict]:
        """Reconstructed q/k/v per layer at one threshold, and its ranks and parameter counts."""
        out, ranks = [], {"q": [], "k": [], "v": [], "kv": []}
        params = {"q": 0, "kv": 0}
        dense = {"q": 0, "kv": 0}
        shared_rank = None
        if self.mode == "cross_layer":
            shared_rank = rank_for_threshold(self.shared.s, threshold)
            m = self.shared.vt.shape[1]
            params["kv"] += shared_rank * m + m  # one basis and mean for all layers
        for lw, b in zip(self.layers, self.bases):
            new = {}
            dense["q"] += lw["q"].size
            dense["kv"] += lw["k"].size + lw["v"].size
            if self.mode == "activation_aware":
                for name in ("q", "k", "v"):
                    r = rank_for_threshold(b[name].s, threshold)
                    new[name] = b[name].reconstruct(r)
                    ranks[name].append(r)
                    n, m = lw[name].shape
                    params["q" if name == "q" else "kv"] += n * r + r * m
            else:
                r = rank_for_threshold(b["q"].s, threshold)
                new["q"] = b["q"].reconstruct(lw["q"], r)
                ranks["q"].append(r)
                params["q"] += pca_params(*lw["q"].shape, r)
                if self.mode == "separate":
                    for name in ("k", "v"):
                        r = rank_for_threshold(b[name].s, threshold)
                        new[name] = b[name].reconstruct(lw[name], r)
                        ranks[name].append(r)
                        params["kv"] += pca_params(*lw[name].shape, r)
                else:
                    basis = b["kv"] if self.mode == "shared_kv" else self.shared
                    r = rank_for_threshold(basis.s, threshold) if shared_rank is None else shared_rank
                    new["k"] = basis.reconstruct(lw["k"], r)
                    new["v"] = basis.reconstruct(lw["v"], r)
                    ranks["kv"].append(r)
                    n_rows = lw["k"].shape[0] + lw["v"].shape[0]
                    m = lw["k"].shape[1]
                    params["kv"] += n_rows * r + (0 if shared_rank is not None else r * m + m)
            out.append(new)
        info = {
            "ranks": {k: v for k, v in ranks.items() if v},
            "params_q": params["q"], "params_kv": params["kv"],
            "dense_q": dense["q"], "dense_kv": dense["kv"],
        }
        info["params_kept"] = params["q"] + params["kv"]
        info["params_dense"] = dense["q"] + dense["kv"]
        return out, info


def run_sweep(target, mode: str, thresholds, eval_tokens: np.ndarray, window: int,
              calib_tokens: np.ndarray | None = None, prompt: str | None = None,
              gen_tokens: int = 0, progress=print) -> tuple[list[dict], dict]:
    """Perplexity (and a greedy continuation) at every threshold of one mode; the model is restored after.

    Returns (rows, timing). One decomposition per matrix/group serves every
    threshold; ``timing['sweep_cost_ratio']`` is (evaluations + decompositions
    + reconstructions + calibration) / evaluations alone.
    """
    from .targets import input_moments, perplexity

    original = [target.get_qkv(i) for i in range(target.n_layers)]
    timing = dict(eval_s=0.0, calib_s=0.0, reconstruct_s=0.0, generate_s=0.0)
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
    plan = SweepPlan(mode, original, moments)
    rows = []
    try:
        for t in thresholds:
            def apply():
                weights, info = plan.weights_at(t)
                for i, w in enumerate(weights):
                    target.set_qkv(i, w)
                return info
            info = timed("reconstruct_s", apply)
            ppl = timed("eval_s", perplexity, target, eval_tokens, window)
            text = ""
            if prompt_ids is not None:
                text = target.decode(timed("generate_s", target.greedy, prompt_ids, gen_tokens))
            ranks = info["ranks"]
            rows.append(dict(
                threshold=t, ppl=ppl, ppl_ratio=ppl / base_ppl, base_ppl=base_ppl,
                params_kept=info["params_kept"], params_dense=info["params_dense"],
                params_fraction=info["params_kept"] / info["params_dense"],
                params_q=info["params_q"], params_kv=info["params_kv"],
                dense_q=info["dense_q"], dense_kv=info["dense_kv"],
                mean_rank_q=float(np.mean(ranks["q"])),
                mean_rank_kv=float(np.mean(ranks["kv"] if "kv" in ranks else ranks["k"] + ranks["v"])),
                ranks=";".join(f"{k}:{','.join(map(str, v))}" for k, v in ranks.items()),
                continuation=text,
            ))
            progress(f"{mode} t={t}: ppl {ppl:.3f} ({ppl / base_ppl:.3f}x), "
                     f"params {info['params_kept'] / info['params_dense']:.3f} of dense")
            if t >= 1.0 and abs(ppl - base_ppl) / base_ppl >= 1e-4:
                raise AssertionError(
                    f"{mode}: threshold 1.0 gave perplexity {ppl} but the unmodified model {base_ppl}"
                )
    finally:
        for i, w in enumerate(original):
            target.set_qkv(i, w)
    timing["decompose_s"] = plan.decompose_s
    timing["sweep_cost_ratio"] = (timing["eval_s"] + timing["calib_s"] + timing["reconstruct_s"]
                                  + plan.decompose_s) / timing["eval_s"]
    timing["base_ppl"] = base_ppl
    return rows, timing
