"""Rank-k factorisation of a token embedding by SVD / PCA.

For ``W = wte [V, d]`` with thin SVD ``W = U S Vh`` (``U [V, r]``, ``S [r]``,
``Vh [r, d]``, ``r = min(V, d)``, singular values descending; LAPACK's, by
``weightpca.linalg.exact_svd``), the best rank-k approximation in Frobenius
(and spectral) norm is ``W_k = U_k S_k Vh_k`` (Eckart & Young, 1936, "The
approximation of one matrix by another of lower rank", Psychometrika 1(3)),
with error

    ||W - W_k||_F = sqrt(sum_{i > k} s_i^2).

The factorised GPT (``weightpca.model``) stores it as
``wte [V, k] = U_k S_k``, ``scale_up [k, d] = Vh_k`` and
``scale_down [d, k] = Vh_kᵀ``, so that input embeddings are rows of ``W_k`` and
output logits are ``h W_kᵀ``: the factorised model reproduces ``W_k`` exactly.

Centred PCA (``centered=True``) factorises ``W - 1 μᵀ`` with ``μ [d]`` the mean
row, and keeps ``μ`` separately as the model's ``embd_bias`` (added to every
input embedding). On the output side ``h·μ`` is the same for every token and
cancels in the softmax, so a centred factorisation at k = d reproduces the
original model's probabilities exactly, and at k < d it is the rank-k PCA of
the embedding rows.
"""

from __future__ import annotations

import numpy as np
import torch

from .linalg import exact_svd, relative_error


def truncate(u: np.ndarray, s: np.ndarray, vh: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The factorised model's embedding tensors for rank k."""
    if not 1 <= k <= len(s):
        raise ValueError(f"rank k={k} must be in 1..{len(s)} (min(V, d) of the embedding)")
    return {
        "transformer.wte.weight": u[:, :k] * s[:k],  # [V, k]
        "scale_up": vh[:k],  # [k, d]
        "scale_down": vh[:k].T,  # [d, k]
    }


def spectrum_report(wte: np.ndarray, ranks: list[int], centered: bool) -> dict:
    """Singular values, cumulative energy and the relative error at every rank in ``ranks``."""
    mean, _, s, _ = exact_svd(wte, centered)
    total = float(np.linalg.norm(np.asarray(wte, dtype=np.float64)))
    energy = np.cumsum(s**2) / np.sum(s**2)
    return {
        "shape": list(np.shape(wte)),
        "centered": centered,
        "singular_values": s.tolist(),
        "cumulative_energy": energy.tolist(),
        "relative_error": {str(k): relative_error(s, k, total) for k in ranks},
        "energy_kept": {str(k): float(energy[k - 1]) for k in ranks},
    }


def factorize_embedding(wte: np.ndarray, k: int, centered: bool = False):
    """(tensors for the factorised model, info) for one rank k."""
    mean, u, s, vh = exact_svd(wte, centered)
    tensors = {name: torch.from_numpy(np.ascontiguousarray(a)).float() for name, a in truncate(u, s, vh, k).items()}
    if centered:
        tensors["embd_bias"] = torch.from_numpy(mean).float()
    total = float(np.linalg.norm(np.asarray(wte, dtype=np.float64)))
    info = {
        "k": k,
        "centered": centered,
        "shape": list(np.shape(wte)),
        "relative_error": relative_error(s, k, total),
        "energy_kept": float(np.sum(s[:k] ** 2) / np.sum(s**2)),
    }
    return tensors, info
