"""The fused head + loss (weightpca.cross_entropy) and the training step's clipping against plain torch."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from weightpca.cross_entropy import cross_entropy_grad_, linear_cross_entropy
from weightpca.model import GPT, GPTConfig
from weightpca.train import clip_and_step


def reference(h, weight, targets, scale):
    """Loss and gradients of ``scale · F.cross_entropy(h Wᵀ)`` by autograd."""
    h, weight = h.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = F.cross_entropy(F.linear(h, weight).float(), targets)
    (loss * scale).backward()
    return loss.detach(), h.grad, weight.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_linear_cross_entropy_equals_autograd(dtype, tol):
    torch.manual_seed(0)
    n, d, v = 50, 16, 1001
    h = torch.randn(n, d, dtype=dtype)
    weight = torch.randn(v, d, dtype=dtype) * 0.5
    targets = torch.randint(0, v, (n,))
    # the incoming gradient is 1 / grad_accum in training: it must scale both products
    scale = 0.2
    ref_loss, ref_dh, ref_dw = reference(h, weight, targets, scale)

    h_, w_ = h.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h_, w_, targets)
    (loss * scale).backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) <= tol * ref_loss.item()
    for got, want in ((h_.grad, ref_dh), (w_.grad, ref_dw)):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= tol * want.abs().max()


def test_gpt_training_loss_equals_evaluation_loss():
    """The model's training path (fused op) and its no-grad path (plain cross-entropy) agree, gradients too."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32, n_embd_wte=8)).double()
    x, y = torch.randint(0, 96, (3, 16)), torch.randint(0, 96, (3, 16))
    _, loss = model(x, y)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits, _ = model(x)
    plain = F.cross_entropy(logits.reshape(-1, 96).float(), y.reshape(-1))
    plain.backward()
    with torch.no_grad():
        assert model(x, y)[1].item() == pytest.approx(plain.item(), rel=1e-6)
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)
    for n, p in model.named_parameters():
        assert (fused[n] - p.grad).abs().max() <= 1e-6 * p.grad.abs().max(), n


def test_cross_entropy_grad_refuses_mismatched_targets():
    with pytest.raises(ValueError, match="do not match"):
        cross_entropy_grad_(torch.zeros(4, 10), torch.zeros(5, dtype=torch.long))


TRITON_CHECK = r"""
import json, sys, torch, torch.nn.functional as F
from weightpca import cross_entropy as ce
assert ce._triton_runs_on(torch.zeros(1)), "the interpreter is not active"
out = []
torch.manual_seed(0)
# a row shorter than one block, one of several blocks with a ragged end, and bf16 logits
for n, v, dtype in [(5, 300, torch.float32), (7, 2 * ce.BLOCK + 13, torch.float32), (6, 1000, torch.bfloat16)]:
    z = (torch.randn(n, v) * 4).to(dtype)
    t = torch.randint(0, v, (n,))
    t[0] = v - 1  # the last column of a ragged block
    zz = z.float().requires_grad_()
    ref = F.cross_entropy(zz, t, reduction="none")
    ref.mean().backward()
    g = z.clone()
    loss = ce.cross_entropy_grad_(g, t)
    # G rounded once to the logits' dtype, as autograd's cast does: bf16 within one rounding step;
    # float32 within 1e-5 (the log-sum-exp over 16k terms is summed in another order, and G = exp(z - lse))
    want = zz.grad.to(dtype).float()
    ulp = (torch.finfo(dtype).eps if dtype == torch.bfloat16 else 1e-5) * want.abs().max().item()
    out.append({"v": v, "loss_err": (loss - ref.detach()).abs().max().item(),
                "grad_err": (g.float() - want).abs().max().item(), "ulp": ulp})
print(json.dumps(out))
"""


def test_triton_kernel_in_the_cpu_interpreter():
    """The GPU kernel itself, run by Triton's interpreter: per-row losses and G against autograd."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert case["loss_err"] <= 1e-4, case
        assert case["grad_err"] <= case["ulp"], case


@pytest.mark.parametrize("max_norm", [0.5, 0.0])
def test_clip_and_step_equals_clip_grad_norm_then_adamw(max_norm):
    """Clipping folded into the fused kernel moves the weights as clip_grad_norm_ + AdamW do.

    Adam is nearly blind to a constant gradient scale, so the losses' scale
    changes from step to step: a wrong clip factor would then move the
    weights elsewhere (checked against a run without clipping).
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.LayerNorm(20), torch.nn.Linear(20, 3))
    twin, unclipped = copy.deepcopy(model), copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    free = torch.optim.AdamW(unclipped.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    for scale in (1.0, 30.0, 0.3, 100.0, 3.0):
        x = torch.randn(8, 12)
        for m in (model, twin, unclipped):
            ((m(x) ** 2).sum() * scale).backward()
        assert torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]) > 0.5  # 0.5 really clips
        clip_and_step(opt, max_norm)
        if max_norm:
            torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm)
        ref.step(), free.step()
        opt.zero_grad(), ref.zero_grad(), free.zero_grad()

    def gap(a, b):
        return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))

    assert gap(model, twin) <= 1e-6
    if max_norm:
        assert gap(model, unclipped) > 1e-3
