"""The one place models are scored: device choice, perplexity (models load through weightpca.adapters).

Every stage that evaluates a model (training's periodic and final
evaluation, surgery, the low-rank truncation sweep) calls
:func:`mean_loss` on fixed windows from :func:`weightpca.tokens.eval_windows`:

    loss = (1 / N) Σ_windows Σ_t  −log softmax(logits(x_{<t}))[x_t],     N = number of targets

with the logits cast to float32 before the softmax, so a bf16 forward pass
still sums its loss in float32. Perplexity is exp(loss).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from .model import GPT


def resolve_device(requested: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; an explicit CUDA request without one is an error."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{requested}' requested but CUDA is not available; use 'auto' or 'cpu'")
    return requested


@torch.no_grad()
def mean_loss(
    forward, windows: np.ndarray, batch_size: int, device, autocast=contextlib.nullcontext
) -> tuple[float, float]:
    """(mean next-token cross-entropy, mean of a per-token statistic) over windows [N, T+1].

    ``forward(x [B, T]) -> (logits [B, T, V], statistic)``, where statistic is
    a per-token sum that rides along (``cos_target`` for our GPT) or None.
    """
    total, stat_total, count = 0.0, 0.0, 0
    for i in range(0, len(windows), batch_size):
        xy = torch.as_tensor(windows[i : i + batch_size]).to(device)
        x, y = xy[:, :-1], xy[:, 1:]
        with autocast():
            logits, stat = forward(x, y)
        total += torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), y.reshape(-1).to(logits.device), reduction="sum"
        ).item()
        if stat is not None:
            stat_total += stat.item()
        count += y.numel()
    return total / count, stat_total / count


def evaluate(
    model: torch.nn.Module, windows: np.ndarray, batch_size: int, device, autocast=contextlib.nullcontext
) -> tuple[float, float]:
    """(mean next-token cross-entropy, mean cos_target) of a model over fixed [N, T+1] windows.

    cos_target is the seed experiments' ln_f diagnostic of our GPT: the
    cosine between the final hidden state mapped into token space (``h @
    scale_down`` for a factorised model, ``h`` otherwise) and the target
    token's embedding row. Any other model (``model(x) -> (logits, _)``, the
    training loop's contract) has no such diagnostic: NaN.
    """
    if not isinstance(model, GPT):
        forward = lambda x, y: (model(x)[0], None)  # noqa: E731
    else:
        wte = model.transformer.wte.weight

        def forward(x, y):
            z = model.token_space(model.hidden_states(x))
            with torch.autocast(z.device.type, enabled=False):  # the diagnostic in float32
                cos = torch.nn.functional.cosine_similarity(z.float(), wte[y].float(), dim=-1).sum()
            return torch.nn.functional.linear(z, wte), cos

    was_training = model.training
    model.eval()
    try:
        loss, cos = mean_loss(forward, windows, batch_size, device, autocast)
        return loss, cos if isinstance(model, GPT) else float("nan")
    finally:
        model.train(was_training)


@contextlib.contextmanager
def uniform_attention(model: GPT):
    """Every head of ``model`` attends uniformly to its causal prefix inside the block; weights unchanged.

    The attention ablation of the baseline check: if perplexity barely moves,
    the model does not use its attention, and compressing W_q/W_k (which only
    shape the attention pattern) cannot show an effect.
    """
    blocks = [b.attn for b in model.transformer.h]
    for attn in blocks:
        attn.uniform = True
    try:
        yield model
    finally:
        for attn in blocks:
            attn.uniform = False


def perplexity(logits, windows: np.ndarray, batch_size: int, device) -> float:
    """exp(mean next-token cross-entropy) of ``logits(x) -> [B, T, V]`` over windows [N, T+1]."""
    loss, _ = mean_loss(lambda x, y: (logits(x), None), windows, batch_size, device)
    return math.exp(loss)
