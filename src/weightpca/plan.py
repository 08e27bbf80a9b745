"""One compression plan for every matrix: groups that share a basis, and an allocation of ranks.

A :class:`Plan` holds

- **groups**: a basis key -> the matrices ("<layer>.<role>", see
  ``weightpca.adapters``) that share one basis. A PCA group fits one
  weight-only PCA to its members' rows stacked (``vstack``); each member keeps
  its own coefficient rows, the basis and mean row are stored once. A
  whitened group is one matrix truncated in the metric of its inputs
  (``weightpca.linalg``). The surgery modes differ only in the groups they
  build (:func:`mode_groups`);
- **an allocation** (an argument, not state): one variance threshold for
  every group (a float; ``linalg.rank_for_threshold`` of each group's
  spectrum), or a rank per group key (a dict, like peft's ``rank_pattern``;
  keys left out keep every component).

Every basis is decomposed once in ``__init__``; the factors, reconstructed
weights and parameter counts of any allocation are then views and sums
(cheap). The sweep, the frontier, the sensitivity scan and the exports all
read a plan.

Parameters of a group at rank r (``linalg.factored_params``): Σ n_i r for
the members' coefficients, plus r m for the basis and m for a PCA mean row,
once per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .linalg import PCABasis, WhitenedBasis, factored_params, input_cholesky, lower_inverse, rank_for_threshold

MODES = ("separate", "shared_kv", "cross_layer", "activation_aware")


@dataclass(frozen=True)
class Group:
    """Matrices sharing one basis: ``kind`` "pca" (weight-only, rows stacked) or "whitened" (one matrix)."""

    key: str
    members: tuple[str, ...]
    kind: str


@dataclass
class Factor:
    """One matrix's factors; matrices with the same ``key`` share ``basis`` and ``mean``."""

    key: str
    coef: np.ndarray  # [n, r]
    basis: np.ndarray  # [r, m]
    mean: np.ndarray | None  # [m]

    def dense(self, dtype=None) -> np.ndarray:
        """``coef @ basis + mean``, computed in ``dtype`` (None: the factors' own). A reconstruction patched
        into a float32 model is computed in float32: half the time of the float64 factors' product, and
        most of a whole-model sweep point's cost besides its evaluation."""
        coef, basis = (self.coef, self.basis) if dtype is None else (self.coef.astype(dtype), self.basis.astype(dtype))
        w = coef @ basis
        return w + self.mean.astype(w.dtype) if self.mean is not None else w


def mode_groups(mode: str, names: list[str]) -> list[Group]:
    """The groups of one surgery mode over matrices ``names`` ("<layer>.<role>", in model order).

    - ``separate``: every matrix its own PCA (the reference method);
    - ``shared_kv``: a layer's K and V one PCA of ``vstack(W_k, W_v)`` (key "<layer>.kv");
    - ``cross_layer``: the K and V rows of *all* layers one PCA (key "kv"), a basis shared across layers;
    - ``activation_aware``: every matrix its own whitened truncation.

    Matrices a mode does not share (Q, the attention output, the MLP) get their own basis of the mode's
    kind, so every mode compresses the same matrices.
    """
    if mode not in MODES:
        raise ValueError(f"unknown surgery mode '{mode}'; choose from {', '.join(MODES)}")
    kind = "whitened" if mode == "activation_aware" else "pca"
    shared: dict[str, list[str]] = {}
    groups: list[Group | str] = []
    for name in names:
        layer, role = name.split(".", 1)
        key = {"shared_kv": f"{layer}.kv", "cross_layer": "kv"}.get(mode) if role in ("k", "v") else None
        if key is None:
            groups.append(Group(name, (name,), kind))
            continue
        if key not in shared:
            shared[key] = []
            groups.append(key)  # the group takes the place of its first member
        shared[key].append(name)
    return [Group(g, tuple(shared[g]), kind) if isinstance(g, str) else g for g in groups]


class Plan:
    """Every basis of a set of groups, decomposed once.

    ``weights``: name -> ``W [n, m]`` (numpy) of every member. ``moments``:
    name -> the uncentred input second moment ``XᵀX / N [m, m]`` of each
    whitened member; matrices that read one input may pass the same array,
    whose Cholesky factor is then computed once. ``dtype`` is the precision
    of the PCA decompositions: float32 is 2-3x faster and reproduces the
    unmodified model at threshold 1.0 to ~1e-6; float64 matches
    scikit-learn to ~1e-12. Whitened decompositions are always float64:
    L⁻¹ of a nearly singular calibration moment (fewer tokens than
    dimensions) amplifies float32 rounding; the full-rank reconstruction then
    missed SmolLM2 by 1 % (256 calibration tokens).
    """

    def __init__(
        self,
        groups: list[Group],
        weights: dict[str, np.ndarray],
        moments: dict[str, np.ndarray] | None = None,
        dtype=np.float64,
    ):
        self.groups = list(groups)
        self.shapes = {name: np.shape(weights[name]) for g in self.groups for name in g.members}
        self.bases: dict[str, PCABasis | WhitenedBasis] = {}
        self.rows: dict[str, tuple[int, int]] = {}  # member -> its rows in the group's stacked samples
        cholesky: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for g in self.groups:
            if g.kind == "whitened":
                if len(g.members) != 1:
                    raise ValueError(f"group {g.key}: a whitened basis belongs to one matrix")
                name = g.members[0]
                if moments is None or name not in moments:
                    raise ValueError(f"{name}: a whitened truncation needs its calibration input moment")
                c = moments[name]
                if id(c) not in cholesky:
                    chol = input_cholesky(c)
                    cholesky[id(c)] = (chol, lower_inverse(chol))
                self.bases[g.key] = WhitenedBasis.fit(weights[name], *cholesky[id(c)], np.float64)
                self.rows[name] = (0, self.shapes[name][0])
            elif g.kind == "pca":
                stacked = np.vstack([np.asarray(weights[n]) for n in g.members])
                self.bases[g.key] = PCABasis.fit(stacked, dtype)
                start = 0
                for n in g.members:
                    self.rows[n] = (start, start + self.shapes[n][0])
                    start += self.shapes[n][0]
            else:
                raise ValueError(f"group {g.key}: unknown kind '{g.kind}' (pca or whitened)")

    @property
    def names(self) -> list[str]:
        return [n for g in self.groups for n in g.members]

    def ranks(self, allocation: float | dict[str, int]) -> dict[str, int]:
        """Group key -> rank under an allocation (a threshold for all, or a rank per group key)."""
        out = {}
        for g in self.groups:
            s = self.bases[g.key].s
            if isinstance(allocation, dict):
                r = int(allocation.get(g.key, len(s)))
                if not 1 <= r <= len(s):
                    raise ValueError(f"rank {r} for {g.key}: must be in 1..{len(s)}")
            else:
                r = rank_for_threshold(s, allocation)
            out[g.key] = r
        return out

    def rounded_ranks(self, allocation, multiple: int) -> dict[str, int]:
        """Group key -> its rank under ``allocation`` rounded to the nearest multiple of ``multiple``, at
        least one multiple and at most the full rank: shapes GPU matmul kernels tile without remainder."""
        full = {g.key: len(self.bases[g.key].s) for g in self.groups}
        return {
            key: min(full[key], max(multiple, multiple * round(r / multiple)))
            for key, r in self.ranks(allocation).items()
        }

    def params(self, allocation) -> dict[str, int]:
        """Group key -> parameters of its factored form (the basis and mean once)."""
        ranks = self.ranks(allocation)
        out = {}
        for g in self.groups:
            r, m = ranks[g.key], self.shapes[g.members[0]][1]
            rows = sum(self.shapes[n][0] for n in g.members)
            out[g.key] = factored_params(rows, m, r, mean=g.kind == "pca")
        return out

    def dense_params(self) -> dict[str, int]:
        """Group key -> parameters of its members stored dense."""
        return {g.key: sum(int(np.prod(self.shapes[n])) for n in g.members) for g in self.groups}

    def factors(self, allocation) -> dict[str, Factor]:
        """Name -> the matrix's factors (views of the bases: no arithmetic); ``coef @ basis + mean`` is W_r."""
        ranks = self.ranks(allocation)
        out = {}
        for g in self.groups:
            b, r = self.bases[g.key], ranks[g.key]
            for name in g.members:
                start, stop = self.rows[name]
                if g.kind == "whitened":
                    out[name] = Factor(g.key, b.u_s[:, :r], b.vt_linv[:r], None)
                else:
                    out[name] = Factor(g.key, b.scores[start:stop, :r], b.vt[:r], b.mean)
        return {name: out[name] for name in self.names}

    def weights(self, allocation, dtype=None) -> dict[str, np.ndarray]:
        """Name -> reconstructed weight ``coef @ basis + mean`` (PCA: U_r S_r Vt_r + μ; whitened: (W L)_r L⁻¹),
        in ``dtype`` (None: the factors' own; ``Factor.dense``)."""
        return {name: f.dense(dtype) for name, f in self.factors(allocation).items()}

    def params_kept(self, allocation) -> int:
        return sum(self.params(allocation).values())

    def threshold_for_params(self, params: float, low: float, high: float) -> float | None:
        """A threshold in (low, high) whose factored parameter count is nearest ``params`` from above.

        The count is a non-decreasing step function of the threshold, so
        bisection on the threshold finds the step; the answer must have ranks
        (hence a count) strictly between those at ``low`` and ``high``, else
        there is nothing left to measure between them and None is returned.
        """
        count = self.params_kept
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


def calibration_moments(adapter, matrices, tokens, window: int) -> dict[str, np.ndarray]:
    """Name -> input second moment of each matrix, one forward pass over ``tokens``: one hook per distinct
    input module, so matrices that read one input (``adapter.SHARED_INPUT``) share one array."""
    from .targets import input_moments

    inputs = {m.name: adapter.input_module(m) for m in matrices}
    modules = list(dict.fromkeys(inputs.values()))
    by_module = dict(zip(modules, input_moments(adapter, tokens, window, modules)))
    return {name: by_module[module] for name, module in inputs.items()}


def model_plan(
    adapter,
    mode: str,
    roles=None,
    calib_tokens=None,
    window: int = 0,
    dtype=np.float32,
    timed=lambda key, fn, *args: fn(*args),
) -> Plan:
    """The plan of one mode over an adapter's matrices of ``roles`` (default all), calibrated if whitened.

    ``timed(key, fn, *args)`` runs the calibration ("calib_s") and the decompositions ("decompose_s")."""
    matrices = adapter.matrices(roles)
    groups = mode_groups(mode, [m.name for m in matrices])
    moments = None
    if any(g.kind == "whitened" for g in groups):
        if calib_tokens is None:
            raise ValueError(f"{mode} needs calibration tokens (surgery.calib_tokens)")
        moments = timed("calib_s", calibration_moments, adapter, matrices, calib_tokens, window)
    weights = {m.name: adapter.weight(m) for m in matrices}
    return timed("decompose_s", Plan, groups, weights, moments, dtype)
