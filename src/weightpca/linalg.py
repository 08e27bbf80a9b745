"""The linear algebra of every stage, once: SVDs, PCA and whitened bases, input Cholesky, rank rules, counts.

Conventions: a weight ``W [n, m]`` is an ``nn.Linear`` weight (n output rows
of dimension m, ``y = x Wᵀ``); a sample matrix ``X [n, m]`` has one sample
per row. Everything is numpy in float64 unless a ``dtype`` says otherwise,
except :func:`best_rank_approximation`, which works on torch tensors in place
of training (the regulariser's judge).

Best rank-r approximation (Eckart & Young, 1936, "The approximation of one
matrix by another of lower rank", Psychometrika 1(3)): with the thin SVD
``W = U S Vt`` (S descending), ``W_r = U_r S_r Vt_r`` minimises
``||W − Ŵ||_F`` over rank-r Ŵ, with ``||W − W_r||_F² = Σ_{i>r} s_i²``.

Weight-only PCA (rows as samples) is scikit-learn's
``PCA(n_components=t, svd_solver='full')``: centre the rows, ``X − 1 μᵀ``,
take its thin SVD and keep the smallest rank :func:`rank_for_threshold`
whose explained-variance ratio exceeds t; ``inverse_transform(transform(W))``
is then ``U_r S_r Vt_r + 1 μᵀ`` (:class:`PCABasis`).

Activation-aware (whitened) truncation minimises the error of a layer's
*outputs* on calibration inputs x (rows of ``X [N, m]``) rather than of its
weights: with ``C = XᵀX / N = L Lᵀ`` (:func:`input_cholesky`),
``||X Wᵀ − X Ŵᵀ||_F² / N = ||(W − Ŵ) L||_F²``, so the best rank-r Ŵ is
``(W L)_r L⁻¹`` (:class:`WhitenedBasis`; the whitening of SVD-LLM, Wang et
al. 2024, "SVD-LLM: Truncation-aware Singular Value Decomposition for Large
Language Model Compression"; ASVD, Yuan et al. 2023, scales by activations
in the same spirit).

Parameters of a factored rank-r ``W [n, m]``: ``n r + r m`` (coefficients
and basis), plus ``m`` for PCA's mean row (:func:`factored_params`); a basis
shared by several matrices is counted once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# ---------------------------------------------------------------- decompositions


def exact_svd(x: np.ndarray, centered: bool = False):
    """(mean [m] or None, U [n, r], S [r], Vt [r, m]) of x [n, m] by LAPACK in float64, r = min(n, m).

    ``centered``: the SVD of ``x − 1 μᵀ`` with μ the mean row (PCA of the rows).
    Exact to rounding: for matrices small enough that accuracy, not speed, decides
    (the token embedding, once per run).
    """
    w = np.asarray(x, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"expected a [n, m] matrix, got shape {w.shape}")
    mean = w.mean(axis=0) if centered else None
    u, s, vt = np.linalg.svd(w - mean if centered else w, full_matrices=False)
    return mean, u, s, vt


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
    """SVD of W L for the activation-aware truncation (L: Cholesky factor of the input second moment)."""

    u_s: np.ndarray  # [n, r_max] = U S
    vt_linv: np.ndarray  # [r_max, m] = Vt L⁻¹
    s: np.ndarray

    @classmethod
    def fit(cls, w: np.ndarray, chol: np.ndarray, chol_inv: np.ndarray, dtype=np.float64) -> "WhitenedBasis":
        """``chol_inv`` = L⁻¹, computed once per input: matrices that share an input share L."""
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


def lower_inverse(chol: np.ndarray) -> np.ndarray:
    """L⁻¹ of a lower-triangular L (LAPACK trtri: 5x faster than a general inverse at 1536 × 1536)."""
    from scipy.linalg import lapack

    inv, info = lapack.dtrtri(np.asarray(chol, dtype=np.float64), lower=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"triangular inverse failed (LAPACK dtrtri info {info})")
    return inv


@torch.no_grad()
def best_rank_approximation(w: torch.Tensor, r: int) -> torch.Tensor:
    """W_r = U_r S_r Vt_r of a torch matrix [n, m] (SVD in float64), in W's dtype and device."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vh[:r]).to(w.dtype)


# ---------------------------------------------------------------- rank rules and counts


def rank_for_threshold(s: np.ndarray, threshold: float) -> int:
    """sklearn's rule for a float n_components; threshold >= 1 keeps every component.

    The smallest r with ``Σ_{i<=r} s_i² / Σ s_i² > t``:
    ``searchsorted(cumsum(s² / Σs²), t, side='right') + 1``. sklearn reads the
    integer 1 as one component; a sweep's 1.0 is the identity.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"variance threshold {threshold} must be in (0, 1]")
    if threshold >= 1.0:
        return len(s)
    ratio = s**2 / np.sum(s**2)
    return min(int(np.searchsorted(np.cumsum(ratio), threshold, side="right")) + 1, len(s))


def rank_for_fraction(shape: tuple[int, int], fraction: float) -> int:
    """A fraction of a matrix's full rank: max(1, round(f · min(n, m)))."""
    return max(1, round(fraction * min(shape)))


def factored_params(n: int, m: int, r: int, mean: bool = False) -> int:
    """Parameters of ``W [n, m]`` stored at rank r: coefficients n·r, basis r·m, PCA's mean row m."""
    return n * r + r * m + (m if mean else 0)


def relative_error(s: np.ndarray, k: int, total_norm: float) -> float:
    """||W − W_k||_F / ||W||_F from the tail singular values (Eckart–Young)."""
    return float(np.sqrt(np.sum(s[k:] ** 2)) / total_norm)
