"""AdamW over flat fp32 master weights that also writes the bf16 copies the forward pass multiplies with.

Under bf16 autocast each linear layer casts its fp32 weight to bf16 in the
forward pass (a kernel per weight), its bf16 weight gradient is widened to
fp32 in the backward pass (another kernel per weight), and AdamW then reads
fp32 gradients. None of that traffic changes a number: the bf16 weight is
always round(master) and the fp32 gradient always the bf16 one, widened.

:class:`FlatAdamW` keeps the trainable parameters in two flat fp32 buffers
(the model's parameters become views of them): ``matrices``, the weights of
the ``nn.Linear`` layers, which autocast would cast to bf16, and ``others``
(embeddings, layer norms, ...), which it uses in fp32. After each update it
writes the round-to-nearest bf16 copy of ``matrices`` into a flat bf16 tensor.
The training forward (:meth:`FlatAdamW.forward_fn`) runs the model with views
of that copy substituted for its linear weights (``torch.func.functional_call``;
a bf16 weight passes autocast uncast), so their gradients arrive in bf16,
straight from the matmuls. Per buffer, one Triton kernel sums the squared
gradients and one updates every element::

    g ← g / c,    c = max(1, (‖g‖₂ + 1e-6) / max_norm)     # clip_grad_norm_'s rule, ‖g‖ over all parameters
    p ← p · (1 − lr·λ)                                      # decoupled weight decay; λ = 0 for vectors
    m ← β₁·m + (1 − β₁)·g,    v ← β₂·v + (1 − β₂)·g²
    p ← p − lr / (1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)
    copy ← bf16(p)                                          # matrices only

(Loshchilov & Hutter, "Decoupled weight decay regularization", ICLR 2019;
the order of operations is torch.optim.AdamW's.) Each program of a kernel
covers ``BLOCK`` elements of one tensor; it finds that tensor's gradient
through a device table of gradient addresses, rewritten only when autograd
puts a gradient somewhere new (inside a replayed CUDA graph, never), because
laying the gradients out flat costs a pass of its own (compiled, the views'
backward took 0.82 ms per GPT-2 small step on an H100, more than the casts
it replaced). The step's arithmetic is unchanged: the model sees the same
bf16 weights and the optimizer the same gradients; with gradient
accumulation the bf16 gradients of the micro-batches are summed into float32
buffers, as autograd summed them into fp32 ``.grad``.

Where Triton cannot run (CPU tensors) the same update runs in torch
operations; ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors
(tests/test_flat_adamw.py). The optimizer state reads and writes like
``torch.optim.AdamW``'s (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter,
in ``train.make_optimizer``'s parameter order), so checkpoints move between
the two.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .cross_entropy import _triton_runs_on, triton

if triton is not None:
    import triton.language as tl

# elements per program and warps: on an H100 every block of 1024–8192 with 4–16 warps updated GPT-2 small's
# 85M matrix entries at 2.8–3.0 TB/s (measured on flat gradients); the whole update now takes 1.16 ms
BLOCK = 2048
WARPS = 8
# every tensor starts at a multiple of ALIGN elements in the flat buffers (and every gradient at a multiple
# of ALIGN bytes), which the kernels are told: without the hints the update took 1.62 instead of 1.16 ms for
# GPT-2 small on an H100
ALIGN = 16

if triton is not None:

    @triton.jit
    def _chunk_grad(
        grad_ptrs,
        chunk_tensor_ptr,
        chunk_index_ptr,
        tensor_numel_ptr,
        GRAD_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
        ALIGN: tl.constexpr,
        EVEN: tl.constexpr,
    ):
        # this program's chunk: elements [i·BLOCK, (i+1)·BLOCK) of tensor t, read through t's gradient address
        pid = tl.program_id(0)
        t = tl.load(chunk_tensor_ptr + pid)
        local = tl.load(chunk_index_ptr + pid).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        # values read from memory are assumed unaligned and masks ragged, and loads then go one element at
        # a time; the hints (sizes: EVEN, every numel a multiple of ALIGN; addresses: checked by point_at)
        # keep them 16 bytes wide
        numel = tl.load(tensor_numel_ptr + t)
        if EVEN:
            numel = tl.multiple_of(numel, ALIGN)
        mask = local < numel
        if GRAD_BF16:
            grad = tl.multiple_of(tl.load(grad_ptrs + t).to(tl.pointer_type(tl.bfloat16)), ALIGN)
        else:
            grad = tl.multiple_of(tl.load(grad_ptrs + t).to(tl.pointer_type(tl.float32)), ALIGN)
        g = tl.load(grad + local, mask=mask, other=0.0).to(tl.float32)
        return t, local, mask, g

    @triton.jit
    def _sum_squares_kernel(
        grad_ptrs,
        chunk_tensor_ptr,
        chunk_index_ptr,
        tensor_numel_ptr,
        out_ptr,
        GRAD_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
        ALIGN: tl.constexpr,
        EVEN: tl.constexpr,
    ):
        _, _, _, g = _chunk_grad(
            grad_ptrs, chunk_tensor_ptr, chunk_index_ptr, tensor_numel_ptr, GRAD_BF16, BLOCK, ALIGN, EVEN
        )
        tl.store(out_ptr + tl.program_id(0), tl.sum(g * g, 0))

    @triton.jit
    def _adamw_kernel(
        grad_ptrs,
        chunk_tensor_ptr,
        chunk_index_ptr,
        tensor_numel_ptr,
        tensor_start_ptr,
        param_ptr,
        exp_avg_ptr,
        exp_avg_sq_ptr,
        copy_ptr,
        n_decay,
        lr_ptr,
        step_ptr,
        clip_ptr,
        beta1,
        beta2,
        eps,
        weight_decay,
        GRAD_BF16: tl.constexpr,
        WRITE_COPY: tl.constexpr,
        BLOCK: tl.constexpr,
        ALIGN: tl.constexpr,
        EVEN: tl.constexpr,
    ):
        t, local, mask, g = _chunk_grad(
            grad_ptrs, chunk_tensor_ptr, chunk_index_ptr, tensor_numel_ptr, GRAD_BF16, BLOCK, ALIGN, EVEN
        )
        offs = tl.multiple_of(tl.load(tensor_start_ptr + t), ALIGN) + local
        g = g / tl.load(clip_ptr)
        lr = tl.load(lr_ptr)
        step = tl.load(step_ptr)
        p = tl.load(param_ptr + offs, mask=mask, other=0.0)
        m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
        v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
        p = p * (1.0 - lr * tl.where(offs < n_decay, weight_decay, 0.0))
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        bias_correction1 = 1.0 - tl.exp(step * tl.log(beta1))
        bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp(step * tl.log(beta2)))
        p = p - (lr / bias_correction1) * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)
        tl.store(param_ptr + offs, p, mask=mask)
        tl.store(exp_avg_ptr + offs, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
        if WRITE_COPY:
            tl.store(copy_ptr + offs, p.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=mask)


class _FlatBuffer:
    """Parameters laid end to end in one fp32 tensor, the decayed ones (dim ≥ 2) first, with their
    AdamW moments alike; with ``bf16_copy``, a bf16 copy whose views (``leaves``) the forward uses."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], bf16_copy: bool):
        named = sorted(named, key=lambda item: item[1].dim() < 2)  # stable: model order within each part
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.numels = [p.numel() for p in self.params]
        self.even = all(n % ALIGN == 0 for n in self.numels)
        self.starts, end = [], 0
        for n in self.numels:
            self.starts.append(end)
            end += -(-n // ALIGN) * ALIGN  # padded: never read or written
        vector_starts = [s for s, p in zip(self.starts, self.params) if p.dim() < 2]
        self.n_decay = vector_starts[0] if vector_starts else end  # elements below decay
        self.master = torch.zeros(end, dtype=torch.float32, device=self.params[0].device)
        for p, view in zip(self.params, self.views(self.master)):
            view.copy_(p.detach())
            p.data = view
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(self.master), torch.zeros_like(self.master)
        self.copy = self.master.to(torch.bfloat16) if bf16_copy else None
        # what autograd differentiates: views of the bf16 copy, or the parameters themselves
        self.leaves = [v.requires_grad_() for v in self.views(self.copy)] if bf16_copy else self.params
        dev = self.master.device
        chunks = [(t, i) for t, n in enumerate(self.numels) for i in range(-(-n // BLOCK))]
        self.chunk_tensor = torch.tensor([t for t, _ in chunks], dtype=torch.int32, device=dev)
        self.chunk_index = torch.tensor([i for _, i in chunks], dtype=torch.int32, device=dev)
        self.tensor_start = torch.tensor(self.starts, dtype=torch.int64, device=dev)
        self.tensor_numel = torch.tensor(self.numels, dtype=torch.int64, device=dev)
        self.grad_ptrs = torch.zeros(len(self.params), dtype=torch.int64, device=dev)
        self._ptrs: list[int] = []  # what grad_ptrs holds
        self._ptrs_host = None  # kept alive: a captured graph copies from it on every replay

    def views(self, flat: Tensor) -> list[Tensor]:
        return [flat[s : s + n].view(p.shape) for s, n, p in zip(self.starts, self.numels, self.params)]

    def point_at(self, grads: list[Tensor]) -> None:
        """Make ``grad_ptrs`` hold the addresses of ``grads`` (one per parameter, contiguous)."""
        for g, p in zip(grads, self.params):
            if not (g.is_contiguous() and g.shape == p.shape and g.data_ptr() % ALIGN == 0):
                raise RuntimeError(
                    f"FlatAdamW: a gradient of shape {tuple(g.shape)}, strides {g.stride()}, at "
                    f"{g.data_ptr():#x} for a parameter of shape {tuple(p.shape)}; the kernel needs "
                    f"it contiguous and {ALIGN}-byte aligned"
                )
        ptrs = [g.data_ptr() for g in grads]
        if ptrs != self._ptrs:
            host = torch.tensor(ptrs, dtype=torch.int64)
            if self.grad_ptrs.is_cuda:
                host = host.pin_memory()
            self.grad_ptrs.copy_(host, non_blocking=True)
            self._ptrs, self._ptrs_host = ptrs, host


def _linear_weights(model: nn.Module) -> set[str]:
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}


class FlatAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay ``weight_decay`` on parameters with dim ≥ 2, none on vectors)
    with gradient clipping to total 2-norm ``max_norm`` (0: none), over flat master buffers with
    bf16 copies of the linear weights; see the module docstring.

    Train with ``forward = opt.forward_fn(model)`` (compiled: ``forward(opt.leaves(), x, y)``),
    backward, ``opt.step()``, ``opt.zero_grad()``. ``grad_accum`` is the number of backward passes
    per step. Every parameter of ``model`` that requires a gradient moves into the buffers: load
    weights into the model in place (``load_state_dict``, ``copy_``), then :meth:`refresh_copies`.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        max_norm: float,
        grad_accum: int = 1,
        eps: float = 1e-8,
    ):
        every = list(model.named_parameters(remove_duplicate=False))
        if len({id(p) for _, p in every}) != len(every):
            raise ValueError(
                "FlatAdamW: the model ties a parameter to two names; a tied weight cannot be "
                "both a bf16 copy and an fp32 input (use train.flat_adamw: false)"
            )
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        linear = _linear_weights(model)
        parts = [
            ([(n, p) for n, p in named if n in linear], True),
            ([(n, p) for n, p in named if n not in linear], False),
        ]
        groups = [
            {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
        ]
        # torch.optim.AdamW's hyperparameter keys: a checkpoint of ours loaded by it keeps its meaning
        # (a group without decoupled_weight_decay would load as Adam with L2 decay)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            amsgrad=False,
            maximize=False,
            foreach=None,
            capturable=False,
            differentiable=False,
            fused=None,
            decoupled_weight_decay=True,
        )
        super().__init__([g for g in groups if g["params"]], defaults)
        self.buffers = [_FlatBuffer(part, bf16_copy) for part, bf16_copy in parts if part]
        self.max_norm, self.grad_accum, self.weight_decay = max_norm, grad_accum, weight_decay
        device = self.buffers[0].master.device
        self._step = torch.zeros((), dtype=torch.float32, device=device)
        self._lr = torch.tensor(lr, dtype=torch.float32, device=device)
        self._one = torch.ones((), dtype=torch.float32, device=device)
        self._sum_squares = torch.zeros(sum(len(b.chunk_tensor) for b in self.buffers), device=device)
        self._bind_state()
        # several micro-batches: their bf16 gradients are summed in float32, as autograd did into fp32 .grad
        self._grad_sums: dict[int, Tensor] = {}
        copied = [b for b in self.buffers if b.copy is not None]
        if copied and grad_accum > 1:
            buf = copied[0]
            self._sum_flat = torch.zeros_like(buf.master)
            for leaf, sum_view in zip(buf.leaves, buf.views(self._sum_flat)):
                leaf.register_post_accumulate_grad_hook(self._sum_into(sum_view))

    def _sum_into(self, sum_view: Tensor):
        def hook(leaf: Tensor) -> None:
            if id(leaf) in self._grad_sums:
                sum_view.add_(leaf.grad)
            else:
                sum_view.copy_(leaf.grad)
                self._grad_sums[id(leaf)] = sum_view
            leaf.grad = None

        return hook

    def _bind_state(self) -> None:
        """Per-parameter state as torch.optim.AdamW keeps it, as views of the flat buffers."""
        for buf in self.buffers:
            for p, exp_avg, exp_avg_sq in zip(buf.params, buf.views(buf.exp_avg), buf.views(buf.exp_avg_sq)):
                self.state[p] = {"step": self._step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    def forward_fn(self, model: nn.Module):
        """``forward(leaves, x, y)``: ``model(x, y)`` with the bf16 copies as its linear weights."""
        copied = [(b.names, b) for b in self.buffers if b.copy is not None]

        def forward(leaves, x, y):
            params = dict(zip(copied[0][0], leaves)) if copied else {}
            return torch.func.functional_call(model, params, (x, y))

        return forward

    def leaves(self) -> tuple[Tensor, ...]:
        """The bf16 weight views to pass to ``forward_fn``'s function (empty without linear layers)."""
        return tuple(leaf for b in self.buffers if b.copy is not None for leaf in b.leaves)

    @torch.no_grad()
    def refresh_copies(self) -> None:
        """Rewrite the bf16 copies from the masters (after weights were loaded into the model)."""
        for buf in self.buffers:
            if buf.copy is not None:
                buf.copy.copy_(buf.master)

    def _grads(self, buf: _FlatBuffer) -> list[Tensor]:
        if buf.copy is not None and self.grad_accum > 1:
            grads = [self._grad_sums.get(id(leaf)) for leaf in buf.leaves]
        else:
            grads = [leaf.grad for leaf in buf.leaves]
        missing = [n for n, g in zip(buf.names, grads) if g is None]
        if missing:
            raise RuntimeError(
                f"FlatAdamW.step: no gradient for {missing[:3]}{' ...' if len(missing) > 3 else ''};"
                " run the forward from opt.forward_fn(model) and backward first"
            )
        return grads

    def zero_grad(self, set_to_none: bool = True) -> None:
        for buf in self.buffers:
            for leaf in buf.leaves:
                leaf.grad = None
        self._grad_sums.clear()

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("FlatAdamW.step takes no closure")
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        if torch.is_tensor(group["lr"]):  # a captured step reads the learning rate from the device
            self._lr = group["lr"]
        else:
            self._lr.fill_(group["lr"])
        grads = [self._grads(buf) for buf in self.buffers]
        triton_runs = _triton_runs_on(self._step)
        for buf, g in zip(self.buffers, grads):
            if triton_runs:
                buf.point_at(g)
        clip = self._one
        if self.max_norm > 0:
            clip = torch.clamp_min((self._grad_norm(grads, triton_runs) + 1e-6) / self.max_norm, 1.0)
        self._step += 1
        for buf, g in zip(self.buffers, grads):
            if triton_runs:
                bf16 = g[0].dtype == torch.bfloat16
                _adamw_kernel[(len(buf.chunk_tensor),)](
                    buf.grad_ptrs,
                    buf.chunk_tensor,
                    buf.chunk_index,
                    buf.tensor_numel,
                    buf.tensor_start,
                    buf.master,
                    buf.exp_avg,
                    buf.exp_avg_sq,
                    buf.copy if buf.copy is not None else buf.master,
                    buf.n_decay,
                    self._lr,
                    self._step,
                    clip,
                    beta1,
                    beta2,
                    group["eps"],
                    self.weight_decay,
                    GRAD_BF16=bf16,
                    WRITE_COPY=buf.copy is not None,
                    BLOCK=BLOCK,
                    ALIGN=ALIGN,
                    EVEN=buf.even,
                    num_warps=WARPS,
                )
            else:
                self._update_torch(buf, g, clip, beta1, beta2, group["eps"])

    def _grad_norm(self, grads: list[list[Tensor]], triton_runs: bool) -> Tensor:
        if not triton_runs:
            return torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for gs in grads for g in gs])
            )
        start = 0
        for buf, g in zip(self.buffers, grads):
            n = len(buf.chunk_tensor)
            _sum_squares_kernel[(n,)](
                buf.grad_ptrs,
                buf.chunk_tensor,
                buf.chunk_index,
                buf.tensor_numel,
                self._sum_squares[start : start + n],
                GRAD_BF16=g[0].dtype == torch.bfloat16,
                BLOCK=BLOCK,
                ALIGN=ALIGN,
                EVEN=buf.even,
                num_warps=WARPS,
            )
            start += n
        return self._sum_squares.sum().sqrt()

    def _update_torch(
        self, buf: _FlatBuffer, grads: list[Tensor], clip: Tensor, beta1: float, beta2: float, eps: float
    ) -> None:
        """The kernel's update in torch operations (CPU tensors)."""
        bias_correction1 = 1.0 - beta1**self._step
        bias_correction2_sqrt = (1.0 - beta2**self._step).sqrt()
        views = zip(buf.params, grads, buf.views(buf.master), buf.views(buf.exp_avg), buf.views(buf.exp_avg_sq))
        for param, grad, p, m, v in views:
            g = grad.float() / clip
            if param.dim() >= 2:
                p.mul_(1.0 - self._lr * self.weight_decay)
            m.mul_(beta1).add_((1.0 - beta1) * g)
            v.mul_(beta2).add_((1.0 - beta2) * g * g)
            p.sub_((self._lr / bias_correction1) * m / (v.sqrt() / bias_correction2_sqrt + eps))
        if buf.copy is not None:
            buf.copy.copy_(buf.master)

    def state_dict(self):
        sd = super().state_dict()
        # clones: the state tensors are views of shared buffers (safetensors stores no shared storage)
        sd["state"] = {i: {k: v.clone() for k, v in s.items()} for i, s in sd["state"].items()}
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        loaded = {p: dict(self.state[p]) for buf in self.buffers for p in buf.params}
        steps = [float(s["step"]) for s in loaded.values() if "step" in s]
        self._step.fill_(max(steps) if steps else 0.0)
        self._bind_state()
        for p, s in loaded.items():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in s:
                    self.state[p][key].copy_(s[key])
                else:
                    self.state[p][key].zero_()
        self.refresh_copies()
