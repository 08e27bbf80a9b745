"""A low-rank-promoting regulariser for training, and the rank-truncation sweep that judges it.

Spectral concentration of a weight matrix A [m, n] with singular values σ:

    ratio(A) = trace((AᵀA)²) / trace(AᵀA)² = Σσ⁴ / (Σσ²)²  ∈ [1/rank(A), 1],

1 exactly for a rank-one matrix, 1/n for an orthogonal n × n one, and
invariant to the scale of A. It needs no SVD: with the smaller Gram matrix
G (AᵀA [n, n] if n ≤ m, else AAᵀ [m, m]) the numerator is ||G||_F² and the
denominator ||A||_F⁴, so the cost is one m·n·min(m, n) product. The
alternative is the normalised nuclear norm

    nuclear(A) = ||A||_* / ||A||_F = Σσ / sqrt(Σσ²)  ∈ [1, sqrt(rank(A))],

the convex surrogate of rank (Fazel 2002, "Matrix rank minimization with
applications"), which needs the singular values (one SVD per matrix and step).

Training adds ``−λ · mean ratio`` (concentrate the spectrum) or
``+λ · mean nuclear`` (shrink it) over the targeted matrices to the loss
(``train.lowrank_reg``). Targets, by the GPT adapter's roles: ``attn`` =
W_q, W_k, W_v and the attention output (q, k, v, o); ``mlp`` = the MLP's
two matrices (fc, proj).

The judge is :func:`truncate`: every targeted matrix replaced by its best
rank-r approximation (Eckart–Young), r = max(1, round(f · min(m, n))) for a
fraction f of its full rank; a factored matrix keeps r(m + n) parameters
instead of m·n.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .adapters import GPTAdapter
from .evaluate import evaluate
from .linalg import best_rank_approximation, factored_params, rank_for_fraction
from .model import GPT

KINDS = ("ratio", "nuclear")
TARGETS = ("attn", "mlp")
TARGET_GROUPS = {"qkv": "attn", "o": "attn", "mlp": "mlp"}  # the adapter's matrix groups of each target


def spectral_ratio(a: torch.Tensor) -> torch.Tensor:
    """Σσ⁴ / (Σσ²)² of a [m, n] matrix via the smaller Gram matrix (differentiable, no SVD)."""
    gram = a.T @ a if a.shape[1] <= a.shape[0] else a @ a.T
    return gram.square().sum() / gram.diagonal().sum().square()


def nuclear_ratio(a: torch.Tensor) -> torch.Tensor:
    """Σσ / sqrt(Σσ²) of a [m, n] matrix (one SVD)."""
    return torch.linalg.svdvals(a).sum() / a.square().sum().sqrt()


STATISTICS = {"ratio": spectral_ratio, "nuclear": nuclear_ratio}


def _targeted(model: GPT, targets) -> tuple[GPTAdapter, list]:
    """(adapter, targeted matrices) of our GPT: ``attn`` its q, k, v, o; ``mlp`` its fc, proj."""
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"lowrank_reg.targets: unknown {sorted(unknown)}; choose from {list(TARGETS)}")
    adapter = GPTAdapter(model)
    groups = [g for g in ("qkv", "o", "mlp") if TARGET_GROUPS[g] in targets]
    return adapter, adapter.matrices(adapter.roles(groups))


def target_matrices(model: GPT, targets) -> dict[str, torch.Tensor]:
    """Name ("<layer>.<role>") -> weight (a view into the parameter, so gradients flow) of every targeted matrix."""
    adapter, matrices = _targeted(model, targets)
    return {m.name: adapter.weight_view(m) for m in matrices}


def mean_statistic(model: GPT, kind: str, targets) -> torch.Tensor:
    """Mean of ``kind``'s statistic over the targeted matrices, in float32."""
    if kind not in KINDS:
        raise ValueError(f"lowrank_reg.kind '{kind}': choose from {list(KINDS)}")
    stat = STATISTICS[kind]
    values = [stat(w.float()) for w in target_matrices(model, targets).values()]
    return torch.stack(values).mean()


def penalty(model: GPT, reg: dict) -> torch.Tensor:
    """The term added to the loss: −λ·mean ratio (kind ratio) or +λ·mean nuclear (kind nuclear)."""
    sign = -1.0 if reg["kind"] == "ratio" else 1.0
    return sign * reg["lambda"] * mean_statistic(model, reg["kind"], reg["targets"])


def active(reg: dict | None) -> bool:
    """Whether a run's ``lowrank_reg`` changes training (λ = 0 is exactly the unregularised run)."""
    return bool(reg) and reg["lambda"] != 0


# ---------------------------------------------------------------- truncation


@torch.no_grad()
def truncated(model: GPT, targets, fraction: float) -> tuple[dict[str, torch.Tensor], dict]:
    """(name -> rank-r SVD truncation of every targeted matrix that loses rank, parameter counts).

    ``params_kept`` counts the whole model with each truncated matrix stored
    factored, r(m + n), where that is smaller than m·n; ``target_params_kept``
    and ``target_params_full`` the targeted matrices alone. The model is not changed.
    """
    weights, kept, full = {}, 0, 0
    for name, w in target_matrices(model, targets).items():
        m, n = w.shape
        r = rank_for_fraction((m, n), fraction)
        if r < min(m, n):
            weights[name] = best_rank_approximation(w, r)
        kept += min(factored_params(m, n, r), m * n)
        full += m * n
    total = model.num_params()
    return weights, {
        "params_kept": total - full + kept,
        "params_total": total,
        "target_params_kept": kept,
        "target_params_full": full,
    }


@torch.no_grad()
def truncate(model: GPT, targets, fraction: float) -> dict:
    """Replace every targeted matrix by its rank-r SVD truncation in place; returns :func:`truncated`'s counts."""
    weights, counts = truncated(model, targets, fraction)
    adapter = GPTAdapter(model)
    for name, w in weights.items():
        adapter.set_weight(adapter.matrix(name), w)
    return counts


@torch.no_grad()
def rank_sweep(model: GPT, windows: np.ndarray, fractions, targets, batch_size: int, device: str = "cpu") -> list[dict]:
    """Validation loss and parameters at each fraction of full rank; the model is restored after each."""
    adapter, rows = GPTAdapter(model), []
    for fraction in sorted(fractions, reverse=True):
        weights, counts = truncated(model, targets, fraction)
        with adapter.patched(weights):
            loss, _ = evaluate(model, windows, batch_size, device)
            stat = {kind: float(mean_statistic(model, kind, targets)) for kind in KINDS}
        rows.append(
            {
                "fraction": fraction,
                "val_loss": loss,
                "val_ppl": math.exp(loss),
                **counts,
                "spectral_ratio": stat["ratio"],
                "nuclear_ratio": stat["nuclear"],
            }
        )
    return rows
