"""The output head and its loss in one op, with the gradient computed in the forward pass.

For hidden states ``h`` [N, d], the tied head ``W`` [V, d] and targets ``t`` [N]::

    z    = h Wᵀ                                      # [N, V] logits
    loss = (1/N) Σ_n (logsumexp(z_n) − z_n[t_n])
    G    = ∂loss/∂z = (softmax(z) − onehot(t)) / N   # [N, V]
    ∂h   = G W,      ∂W = Gᵀ h                       # scaled by the incoming gradient

``F.cross_entropy(h @ W.T)`` computes the same, but its forward pass reads the
[N, V] logits once for the log-sum-exp and its backward pass reads them again
to form G: for GPT-2 small at 12 × 1024 tokens the logits are 12,288 × 50,304
bf16 values (1.2 GB), and that loss was 1.6 ms of a 27 ms H100 step. Here one
Triton program per row reads its row of logits once from memory for an
online max / sum of exponentials (Milakov & Gimelshein, "Online normalizer
calculation for softmax", 2018), then reads it a second time (the rows in
flight are a few MB, within L2) to write G over the logits in place. The
backward pass only multiplies: no [N, V] pass is left in it, and no second
[N, V] buffer is ever allocated. On an H100 the kernel takes 1.13 ms where
the compiled loss forward and backward took 0.76 + 0.87 ms. (The same idea as Liger-Kernel's fused
linear cross-entropy, without its token chunking: chunking made our compiled
step slower, see docs/gpu.md.)

G is rounded to the logits' dtype once, as autograd rounds it when it casts
the float32 gradient of ``F.cross_entropy(logits.float())`` back to bf16; the
loss is accumulated in float32. The incoming gradient (1 / grad_accum) scales
the two small products rather than G, so no extra pass over G is needed.

Where Triton cannot run (CPU tensors, no Triton installed) the same op
computes G with torch operations. ``TRITON_INTERPRET=1`` runs the Triton
kernel on CPU tensors (tests/test_cross_entropy.py checks it there).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch implementation below serves
    triton = None

# columns per block of a row and warps per row: the fastest configuration measured on an H100
# for GPT-2's 12,288 × 50,304 bf16 logits (1.11 ms, against 1.22–1.48 ms for blocks of 2048–16384
# with 4–32 warps; a running max per block, one exp per logit, with L2 eviction hints was faster
# on an H200 but took 1.25 ms on the H100)
BLOCK = 8192
WARPS = 16


def _triton_runs_on(x: Tensor) -> bool:
    if triton is None:
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _cross_entropy_grad_kernel(logits_ptr, row_stride, targets_ptr, loss_ptr, n_cols, scale, BLOCK: tl.constexpr):
        # one program per row n: loss[n] = lse(z_n) - z_n[t_n]; z_n <- scale * (softmax(z_n) - onehot(t_n))
        row = tl.program_id(0).to(tl.int64)
        ptr = logits_ptr + row * row_stride
        target = tl.load(targets_ptr + row)
        cols = tl.arange(0, BLOCK)
        # pass 1: per-lane running max and sum of exp(z - max), combined at the end
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            z = tl.load(ptr + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, z)
            # lanes that have seen only -inf keep s = 0 (exp(-inf - -inf) would be NaN)
            s = tl.where(m_new == float("-inf"), 0.0, s * tl.exp(m - m_new) + tl.exp(z - m_new))
            m = m_new
        row_max = tl.max(m, 0)
        lse = row_max + tl.log(tl.sum(s * tl.exp(m - row_max), 0))
        z_target = tl.load(ptr + target).to(tl.float32)
        tl.store(loss_ptr + row, lse - z_target)
        # pass 2: the gradient, over the logits
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            z = tl.load(ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - tl.where(start + cols == target, 1.0, 0.0)
            tl.store(ptr + start + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_grad_(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-row losses [N] (float32); overwrites ``logits`` [N, V] with ∂(mean loss)/∂logits.

    Uses the Triton kernel where it runs, else torch operations (same maths,
    same single rounding of G to the logits' dtype).
    """
    n, v = logits.shape
    if targets.shape != (n,):
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary")
    if _triton_runs_on(logits):
        loss = torch.empty(n, dtype=torch.float32, device=logits.device)
        _cross_entropy_grad_kernel[(n,)](
            logits, logits.stride(0), targets, loss, v, 1.0 / n, BLOCK=BLOCK, num_warps=WARPS
        )
        return loss
    z = logits.float()  # for float32 logits the same tensor: G is formed in place
    lse = torch.logsumexp(z, dim=1)
    loss = lse - z.gather(1, targets[:, None]).squeeze(1)
    g = z.sub_(lse[:, None]).exp_()
    g[torch.arange(n, device=g.device), targets] -= 1.0
    logits.copy_(g.div_(n))
    return loss


@torch.library.custom_op("weightpca::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    grad_logits = h @ weight.t()
    loss = cross_entropy_grad_(grad_logits, targets).mean()
    return loss, grad_logits


@_linear_cross_entropy.register_fake
def _(h, weight, targets):
    return h.new_empty((), dtype=torch.float32), h.new_empty((h.shape[0], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    h, weight, _ = inputs
    ctx.save_for_backward(h, weight, output[1])


def _backward(ctx, grad_loss, _grad_of_grad_logits):
    h, weight, grad_logits = ctx.saved_tensors
    scale = grad_loss.to(h.dtype)
    return (grad_logits @ weight) * scale, (grad_logits.t() @ h) * scale, None


_linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)
# under autocast the head runs in bf16 (training's only autocast dtype, weightpca.train.setup_precision),
# as F.linear would; h from the final LayerNorm arrives in float32 (CPU autocast: the tests)
for _device in ("cuda", "cpu"):
    torch.library.register_autocast("weightpca::linear_cross_entropy", _device, torch.bfloat16)


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of the logits ``h @ weight.T`` ([N, d] @ [d, V]) against ``targets`` [N].

    Equal to ``F.cross_entropy((h @ weight.T).float(), targets)`` in value
    and in the gradients of ``h`` and ``weight``; for training (it computes
    the gradient whether or not it is needed).
    """
    return _linear_cross_entropy(h, weight, targets)[0]
