"""FlatAdamW (weightpca.flat_adamw) against torch.optim.AdamW + clip_grad_norm_."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from weightpca.flat_adamw import FlatAdamW
from weightpca.model import GPT, GPTConfig

LR, BETAS, WD = 1e-2, (0.9, 0.95), 0.1
# gradient scales per step: Adam is nearly blind to a constant scale, so a varying one makes a wrong
# clip factor move the weights elsewhere
SCALES = (1.0, 30.0, 0.3, 100.0, 3.0)


def tiny_gpt(bias: bool = True) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=48, n_layer=2, n_head=2, n_embd=16, bias=bias))


def torch_adamw(model: GPT) -> torch.optim.AdamW:
    """train.make_optimizer's groups, torch's reference (for-loop) implementation."""
    params = list(model.parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": WD},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=LR,
        betas=BETAS,
        foreach=False,
    )


def give_gradients(opt: FlatAdamW, model: GPT, ref: GPT, scale: float, gen: torch.Generator) -> None:
    """The same random gradients to both: bf16 values for the linear weights (as their bf16 matmuls make them)."""
    for buf in opt.buffers:
        for name, leaf in zip(buf.names, buf.leaves):
            g = torch.randn(leaf.shape, generator=gen) * scale
            g = g.to(leaf.dtype)
            leaf.grad = g
            ref.get_parameter(name).grad = g.float().clone()  # clip_grad_norm_ rewrites it in place


def synthetic_steps(max_norm: float) -> dict:
    """FlatAdamW and torch AdamW + clip_grad_norm_ after len(SCALES) steps of the same gradients:
    largest weight difference, largest copy-vs-rounded-weight difference in bf16 ulps, and the
    difference to torch AdamW without clipping (to show that clipping acted)."""
    model = tiny_gpt()
    ref, unclipped = copy.deepcopy(model), copy.deepcopy(model)
    opt = FlatAdamW(model, LR, BETAS, WD, max_norm)
    ref_opt, free_opt = torch_adamw(ref), torch_adamw(unclipped)
    gen = torch.Generator().manual_seed(1)
    for scale in SCALES:
        give_gradients(opt, model, ref, scale, gen)
        for p, q in zip(unclipped.parameters(), ref.parameters()):
            p.grad = q.grad.clone()
        if max_norm:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        ref_opt.step()
        free_opt.step()
        opt.step()
        opt.zero_grad()
    weight_err = max((p - q).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
    unclipped_gap = max((p - q).abs().max().item() for p, q in zip(model.parameters(), unclipped.parameters()))
    copy_ulps = 0.0
    for buf in opt.buffers:
        if buf.copy is not None:
            for p, c in zip(buf.params, buf.views(buf.copy)):
                want = p.detach().to(torch.bfloat16).float()
                ulp = torch.finfo(torch.bfloat16).eps * want.abs().clamp_min(1e-30)
                copy_ulps = max(copy_ulps, ((c.float() - want).abs() / ulp).max().item())
    return {
        "weight_err": weight_err,
        "unclipped_gap": unclipped_gap,
        "copy_ulps": copy_ulps,
        "step": float(opt.state[next(model.parameters())]["step"]),
    }


@pytest.mark.parametrize("max_norm", [2.0, 0.0])
def test_update_equals_torch_adamw_with_clipping(max_norm):
    r = synthetic_steps(max_norm)
    assert r["weight_err"] <= 1e-6, r
    assert r["copy_ulps"] == 0.0, r  # the copy is the weight rounded to nearest bf16
    assert r["step"] == len(SCALES)
    if max_norm:
        assert r["unclipped_gap"] > 1e-3, r  # the clip factor changed the steps


INTERPRETED = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_flat_adamw import synthetic_steps
print(json.dumps([synthetic_steps(m) for m in (2.0, 0.0)]))
"""


def test_triton_kernels_in_the_cpu_interpreter():
    """The GPU kernels themselves (gradient table, sum of squares, update) run by Triton's interpreter."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    clipped, free = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in (clipped, free):
        assert r["weight_err"] <= 1e-6, r
        # the interpreter rounds float32 -> bf16 by its own rule (ties up, not to even): at most one ulp
        assert r["copy_ulps"] <= 1.0, r
    assert clipped["unclipped_gap"] > 1e-3, clipped


def autocast_steps(grad_accum: int):
    """One step of the model's real forward/backward under bf16 autocast: FlatAdamW's forward on its
    copies against the plain model's (autocast casts its fp32 weights)."""
    model = tiny_gpt()
    ref = copy.deepcopy(model)
    opt = FlatAdamW(model, LR, BETAS, WD, max_norm=1.0, grad_accum=grad_accum)
    forward = opt.forward_fn(model)
    losses = []
    for micro in range(grad_accum):
        x, y = torch.randint(0, 48, (2, 16)), torch.randint(0, 48, (2, 16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, got = forward(opt.leaves(), x, y)
            _, want = ref(x, y)
        (got / grad_accum).backward()
        (want / grad_accum).backward()
        losses.append((got.item(), want.item()))
    return opt, ref, losses


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_forward_on_copies_gives_autocasts_loss_and_gradients(grad_accum):
    """Same loss and the same gradients, bit for bit; with accumulation the bf16 gradients sum in float32."""
    opt, ref, losses = autocast_steps(grad_accum)
    assert all(got == want for got, want in losses)
    for buf in opt.buffers:
        for name, grad in zip(buf.names, opt._grads(buf)):
            want = ref.get_parameter(name).grad
            assert grad.dtype == (torch.bfloat16 if buf.copy is not None and grad_accum == 1 else torch.float32)
            assert torch.equal(grad.float(), want), name
    assert {n for b in opt.buffers if b.copy is not None for n in b.names} == {
        n for n, _ in ref.named_parameters() if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
    }


def test_state_moves_between_torch_adamw_and_flat_adamw(tmp_path):
    """Checkpoints (weightpca.checkpoint's optimizer tensors, through safetensors) load either way round."""
    from weightpca.checkpoint import _load_optimizer, _optimizer_tensors
    from weightpca.io import load_tensors, save_tensors

    gen = torch.Generator().manual_seed(2)
    flat_model = tiny_gpt()
    ref = copy.deepcopy(flat_model)
    opt, ref_opt = FlatAdamW(flat_model, LR, BETAS, WD, max_norm=0.0), torch_adamw(ref)
    for scale in SCALES[:3]:
        give_gradients(opt, flat_model, ref, scale, gen)
        ref_opt.step()
        opt.step()
    for source, target_model, target in (
        (ref_opt, copy.deepcopy(flat_model), "flat"),
        (opt, copy.deepcopy(ref), "torch"),
    ):
        save_tensors(tmp_path / f"{target}.safetensors", _optimizer_tensors(source))
        if target == "flat":
            loaded = FlatAdamW(target_model, LR, BETAS, WD, max_norm=0.0)
        else:
            loaded = torch_adamw(target_model)
        _load_optimizer(loaded, load_tensors(tmp_path / f"{target}.safetensors"))
        mirror = copy.deepcopy(ref)
        mirror_opt = torch_adamw(mirror)
        mirror_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # (loading aliases the tensors)
        # one more step of the same gradient from the loaded state, against the uninterrupted reference
        g = {
            n: torch.randn(p.shape, generator=torch.Generator().manual_seed(3)).bfloat16().float()
            for n, p in mirror.named_parameters()
        }
        for n, p in mirror.named_parameters():
            p.grad = g[n].clone()
        mirror_opt.step()
        if target == "flat":
            assert loaded._step.item() == 3
            for buf in loaded.buffers:
                for name, leaf in zip(buf.names, buf.leaves):
                    leaf.grad = g[name].to(leaf.dtype)
        else:
            for n, p in target_model.named_parameters():
                p.grad = g[n].clone()
        loaded.step()
        for (n, p), q in zip(target_model.named_parameters(), mirror.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6, msg=f"{target}: {n}")


def test_loaded_weights_reach_the_copies():
    """Weights loaded into the model after the optimizer was made: refresh_copies brings the bf16 copy along."""
    model = tiny_gpt()
    opt = FlatAdamW(model, LR, BETAS, WD, max_norm=0.0)
    other = tiny_gpt()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-2.0)
    model.load_state_dict(other.state_dict())
    assert all(p.data_ptr() == v.data_ptr() for b in opt.buffers for p, v in zip(b.params, b.views(b.master)))
    opt.refresh_copies()
    for buf in opt.buffers:
        if buf.copy is not None:
            for name, c in zip(buf.names, buf.views(buf.copy)):
                assert torch.equal(c, other.get_parameter(name).detach().bfloat16())


def test_errors_name_the_fix():
    model = tiny_gpt()
    opt = FlatAdamW(model, LR, BETAS, WD, max_norm=1.0)
    with pytest.raises(RuntimeError, match="no gradient for .*forward_fn"):
        opt.step()
    tied = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="ties a parameter.*flat_adamw: false"):
        FlatAdamW(tied, LR, BETAS, WD, max_norm=1.0)


def test_only_compiled_bf16_single_process_cuda_training_uses_it():
    from weightpca.train import TrainSettings, make_optimizer, uses_flat_adamw

    from conftest import tiny_run

    on = TrainSettings.from_dict(dict(tiny_run()["train"], flat_adamw=True, compile=True))
    assert uses_flat_adamw(on, "cuda")
    assert not uses_flat_adamw(on, "cpu")
    assert not uses_flat_adamw(on, "cuda", world=2)
    for change in (
        {"flat_adamw": False},
        {"compile": False},
        {"dtype": "float32"},
        {"lowrank_reg": {"kind": "nuclear", "lambda": 0.1}},
    ):
        settings = dict(tiny_run()["train"], **{"flat_adamw": True, "compile": True, **change})
        assert not uses_flat_adamw(TrainSettings.from_dict(settings), "cuda"), change
    assert type(make_optimizer(tiny_gpt(), on)) is torch.optim.AdamW  # a CPU model
