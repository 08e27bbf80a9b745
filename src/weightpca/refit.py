"""Refit: each matrix's factors fitted to the inputs the *compressed* model feeds it, so that its outputs stay
close to the original layer's.

A truncation chosen independently per matrix (``plan.Plan``) fits ``W_r`` to the original inputs ``X``. Inside
the compressed model, a matrix sees ``X̃``: inputs already changed by every truncation before it. Refitting
asks the matrix to reproduce the *original* outputs from those inputs (the research notes' question: can the
weights that remain be adjusted so that the layer's outputs stay close on real inputs?):

    min_{rank W' ≤ r}  ‖X Wᵀ − X̃ W'ᵀ‖²_F / N  +  δ ‖W' − W‖²_F         X, X̃: [N, m] (tokens × inputs)

The ridge δ pulls W' towards W where the calibration tokens do not determine it (fewer tokens than inputs, or
directions the inputs never take). With A = X̃ᵀX̃ / N + δI and B = W XᵀX̃ / N + δW, the objective is

    tr(W' A W'ᵀ) − 2 tr(B W'ᵀ) + const  =  ‖(W' − W*) L‖²_F + const,     W* = B A⁻¹,  A = L Lᵀ,

so the best rank-r W' is the whitened truncation (``linalg.WhitenedBasis``) of W* in the metric L:
``W' = [W* L]_r L⁻¹`` (Eckart–Young). Where X̃ = X (nothing upstream changed), W* = W and the refit is the
plain activation-aware truncation; the refit only adds what upstream errors make worth correcting. SVD-LLM
(Wang et al. 2024) updates its factors sequentially with the same idea; this form keeps each matrix's rank.

The model is walked one layer at a time (like SliceGPT's and SVD-LLM's layer-wise passes): the arguments
the model gives its first layer are captured per calibration window, then each layer runs on two streams
of hidden states, the original model's and the compressed one's. Within a layer, the matrices are refit in
the order of their inputs (``adapter.SHARED_INPUT``: q/k/v, then o, gate/up, down), each stage seeing the
inputs that the stages before it produce. Cost: about (stages + 2) layer passes per layer over the
calibration tokens, one SVD per matrix.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from .linalg import WhitenedBasis, input_cholesky, lower_inverse
from .plan import Plan
from .targets import calibration_windows


class _Captured(Exception):
    """Raised by the first layer's hook: its arguments are all a capture needs."""


@torch.no_grad()
def first_layer_arguments(adapter, tokens: np.ndarray, window: int) -> list[tuple[tuple, dict]]:
    """Per window, the (args, kwargs) the model passes its first layer (hidden states first; masks, positions)."""
    captured = []

    def hook(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    handle = adapter.layer_module(0).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for x in calibration_windows(tokens, window):
            try:
                adapter.logits(x)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _run_layer(layer, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, *args[1:], **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _layer_pass(layer, hiddens, arguments, modules=()) -> tuple[list[torch.Tensor], dict]:
    """The layer on every window's hidden states: its outputs, and the inputs each of ``modules`` saw
    (module -> one [N, m] tensor over all windows)."""
    seen: dict = {m: [] for m in modules}
    handles = [
        m.register_forward_pre_hook(lambda mod, a: seen[mod].append(a[0].reshape(-1, a[0].shape[-1]).float()))
        for m in modules
    ]
    try:
        outs = [_run_layer(layer, h, args, kwargs) for h, (args, kwargs) in zip(hiddens, arguments)]
    finally:
        for h in handles:
            h.remove()
    return outs, {m: torch.cat(v) for m, v in seen.items()}


def input_metric(x: torch.Tensor, x_tilde: torch.Tensor, ridge: float):
    """What every matrix reading one input shares (module docstring): (XᵀX̃ / N, δ, A, L, L⁻¹) with
    A = X̃ᵀX̃ / N + δI, δ = ridge · mean(diag X̃ᵀX̃ / N) and L its Cholesky factor, for original inputs
    x [N, m] and compressed inputs x_tilde [N, m]. Computed once per input: q/k/v (and gate/up) share it."""
    n_tokens = x.shape[0]
    gram = (x_tilde.T @ x_tilde).double().cpu().numpy() / n_tokens  # X̃ᵀX̃ / N [m, m]
    cross = (x.T @ x_tilde).double().cpu().numpy() / n_tokens  # XᵀX̃ / N [m, m]
    delta = ridge * float(np.mean(np.diag(gram)))
    a = gram + delta * np.eye(len(gram))
    chol = input_cholesky(a, eps=1e-9)
    return cross, delta, a, chol, lower_inverse(chol)


def refit_target(w: np.ndarray, cross: np.ndarray, delta: float, a: np.ndarray) -> np.ndarray:
    """W* = B A⁻¹ for one matrix W [n, m], B = W XᵀX̃ / N + δW (:func:`input_metric`). Solved with A
    itself: L may carry a larger ridge where A is nearly singular, and W* must not."""
    b = w @ cross + delta * w
    return np.linalg.solve(a.T, b.T).T  # A symmetric


def refit_plan(
    adapter, plan: Plan, ranks: dict[str, int], tokens: np.ndarray, window: int, ridge: float = 0.01, progress=print
) -> Plan:
    """A copy of ``plan`` whose bases are refit (module docstring) for the rank map ``ranks``; its
    ``weights(ranks)`` and ``factors(ranks)`` are the refit model's. Every group must be whitened (one matrix
    each: the activation_aware mode). The model is left as it was."""
    weight_only = [g.key for g in plan.groups if g.kind != "whitened"]
    if weight_only:
        raise ValueError(
            f"refit fits whitened factors to their inputs; groups {weight_only[:3]} are weight-only PCA "
            "(use mode activation_aware, or leave refit off for this mode)"
        )
    in_plan = set(plan.names)
    arguments = first_layer_arguments(adapter, tokens, window)
    dense = [args[0] for args, _ in arguments]
    compressed = [h.clone() for h in dense]
    bases = dict(plan.bases)
    for i in range(adapter.n_layers):
        layer = adapter.layer_module(i)
        stages: dict = {}  # input module -> names of this layer's matrices that read it, in input order
        for m in adapter.layer_matrices(i).values():
            if m.name in in_plan:
                stages.setdefault(adapter.input_module(m), []).append(m.name)
        # a layer with nothing to refit still carries both streams on to the next
        next_dense, original_inputs = _layer_pass(layer, dense, arguments, list(stages))
        layer_weights: dict[str, np.ndarray] = {}
        for module, names in stages.items():
            with adapter.patched(layer_weights):
                _, seen = _layer_pass(layer, compressed, arguments, [module])
            cross, delta, a, chol, chol_inv = input_metric(original_inputs[module], seen[module], ridge)
            for name in names:  # a whitened group's key is its one matrix's name
                w_star = refit_target(adapter.weight(adapter.matrix(name)), cross, delta, a)
                bases[name] = WhitenedBasis.fit(w_star, chol, chol_inv)
                layer_weights[name] = bases[name].reconstruct(ranks[name])
        with adapter.patched(layer_weights):
            compressed, _ = _layer_pass(layer, compressed, arguments)
        dense = next_dense
        progress(f"refit: layer {i} ({len(layer_weights)} matrices)")
    refit = copy.copy(plan)
    refit.bases = bases
    return refit
