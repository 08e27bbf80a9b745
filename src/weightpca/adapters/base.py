"""The one interface between weightpca and a model family: where its matrices are, and how it runs.

A :class:`ModelAdapter` wraps a loaded model and its tokenizer. Per layer it
names every linear matrix by *role* (``q k v o gate up down``; our GPT:
``q k v o fc proj``) as a :class:`Matrix`: the module that holds it and,
for fused modules, its row block. It says which roles read the same input
(``SHARED_INPUT``: calibration statistics are gathered once per input), and
runs the model: logits, encode/decode, greedy continuation, and a forward
with an explicit key/value cache (:meth:`ModelAdapter.cached_logits`, over a
:class:`KVCache`: what the speed measurements run and the ONNX export
traces), in which the matrices of one input are applied by :meth:`ModelAdapter.project`
(one stacked GEMM once ``weightpca.compress.fuse_shared_inputs`` has fused them). Subclasses set
the class attributes and the few methods marked below; everything else (read
a matrix, write one, patch and restore) is written once here.

Weights travel as ``W [n_out, n_in]`` float64 numpy arrays (``nn.Linear``
convention, ``y = x Wᵀ``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class AdapterError(ValueError):
    """A model weightpca has no adapter for, or one without the layout its adapter expects."""


@dataclass(frozen=True)
class Matrix:
    """One linear matrix of a layer: ``model.get_submodule(path).weight[rows]``.

    ``rows`` is the row block of a fused module (our GPT's q/k/v in ``c_attn``), None for the whole weight.
    """

    layer: int
    role: str
    path: str
    rows: slice | None = None

    @property
    def name(self) -> str:
        """ "<layer>.<role>": the key of this matrix in plans, factors and rank maps."""
        return f"{self.layer}.{self.role}"


class KVCache:
    """Every layer's keys and values, ``[L, B, H_kv, S, D]``, for forwards of ``T`` new tokens at a time.

    - growing (``capacity`` None): ``update`` concatenates; ``keys``/``values`` hold exactly the
      positions seen and the next position is their length. Its shapes follow its inputs, so an
      exported graph (ONNX) takes the past as inputs and returns the present;
    - static (``capacity`` S): preallocated buffers written in place at ``position`` (a 0-dim long
      tensor, ``index_copy_``) and attended to in full under a mask of the positions written: every
      step has the same shapes and no host-side value, so a decode step can be captured once as a
      CUDA graph and replayed.

    A forward computes its ``positions`` and ``mask`` once and hands the positions to every layer's
    ``update``: per-layer work is kernels a decode step launches once per layer.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, static: bool = False):
        self.keys, self.values, self.static = keys, values, static
        self.position = torch.zeros((), dtype=torch.long, device=keys.device)  # static: the next position
        self._new_k: list[torch.Tensor] = []
        self._new_v: list[torch.Tensor] = []

    @classmethod
    def empty(cls, shape: tuple[int, int, int], batch: int, dtype, device, capacity: int | None = None):
        """``shape`` = (layers, kv heads, head dim) (``ModelAdapter.kv_shape``)."""
        n_layers, heads, dim = shape
        size = (n_layers, batch, heads, capacity or 0, dim)
        make = lambda: torch.zeros(size, dtype=dtype, device=device)  # noqa: E731
        return cls(make(), make(), static=capacity is not None)

    def positions(self, t: int) -> torch.Tensor:
        """``[T]`` positions of the next ``t`` tokens."""
        offset = torch.arange(t, device=self.keys.device)
        return self.position + offset if self.static else self.keys.shape[3] + offset

    def mask(self, t: int) -> torch.Tensor | None:
        """``[T, S_total]`` additive mask in the cache's dtype (0 where the query at position p may attend to
        key position j <= p, the dtype's lowest value elsewhere; static: over the whole buffer, so only
        positions already written). Additive, built once per forward: attention would otherwise turn a
        boolean mask into this in every layer. None for a forward that fills a whole static cache (``T`` =
        its capacity, so from position 0): plain causal attention, which ``attend`` runs without a mask
        (the fused kernels of a prompt's prefill)."""
        if self.static and self.keys.shape[3] == t:
            return None
        total = self.keys.shape[3] if self.static else self.keys.shape[3] + t
        keys = torch.arange(total, device=self.keys.device)
        allowed = keys.unsqueeze(0) <= self.positions(t).unsqueeze(1)
        zero = torch.zeros((), dtype=self.keys.dtype, device=self.keys.device)
        return torch.where(allowed, zero, torch.finfo(self.keys.dtype).min)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None):
        """This layer's new keys/values ``[B, H_kv, T, D]`` stored (static: at ``positions``, the forward's
        ``positions(T)``, computed here when not given); returns every key and value to attend to."""
        if self.static:
            where = self.positions(k.shape[2]) if positions is None else positions
            self.keys[layer].index_copy_(2, where, k.to(self.keys.dtype))
            self.values[layer].index_copy_(2, where, v.to(self.values.dtype))
            return self.keys[layer], self.values[layer]
        k_all = torch.cat([self.keys[layer], k.to(self.keys.dtype)], dim=2)
        v_all = torch.cat([self.values[layer], v.to(self.values.dtype)], dim=2)
        self._new_k.append(k_all)
        self._new_v.append(v_all)
        return k_all, v_all

    def advance(self, t: int) -> None:
        """After a forward of ``t`` tokens: the next position moves on (static, in place) or the keys and
        values become what the forward attended to (growing)."""
        if self.static:
            self.position.add_(t)
        else:
            self.keys, self.values = torch.stack(self._new_k), torch.stack(self._new_v)
            self._new_k, self._new_v = [], []


# SDPA's kernels, in order of preference, for a masked (decode) call on CUDA whose query heads share
# key/value heads (their rows attended as one head's, see attend). cuDNN's, which SDPA would otherwise
# pick, is slower there: in a CUDA graph on an H200 (benchmarks/decode_ops_bench.py, docs/speed.md),
# SmolLM2's shape (3 query rows per key/value head) 6.9 us per call at batch 1 against the memory-
# efficient kernel's 5.9, 10.9 against 7.0 at batch 64; without grouping (a 1.7B shape, 32 heads of
# their own) cuDNN is the faster (3.7 against 5.9 us at batch 1), so ungrouped calls keep SDPA's choice.
GROUPED_ATTENTION = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None = None):
    """Softmax attention of ``q [B, H, T, D]`` over ``k, v [B, H_kv, S, D]`` under the additive ``mask [T, S]``
    (None: causal, T = S); grouped query heads (H = n H_kv) share their key/value head. Returns ``[B, T, H·D]``.

    Under a mask, the n query heads of one key/value head are attended as n·T query rows of that head
    (``q`` viewed ``[B, H_kv, n·T, D]``, the mask's rows repeated n times; at T = 1 it broadcasts): keys
    and values are read in place, never copied to H heads, and the ops stay plain (reshape, SDPA) for ONNX.
    On CUDA a masked call of grouped heads prefers the memory-efficient kernel (``GROUPED_ATTENTION``)."""
    b, h, t, d = q.shape
    if mask is None:  # no mask: SDPA may take its flash kernel, grouped heads read in place
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return y.transpose(1, 2).reshape(b, t, h * d)
    n = h // k.shape[1]
    if n > 1:
        q = q.reshape(b, k.shape[1], n * t, d)
        mask = mask if t == 1 else mask.repeat(n, 1)
    with sdpa_kernel(GROUPED_ATTENTION, set_priority=True) if q.is_cuda and n > 1 else contextlib.nullcontext():
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return y.reshape(b, h, t, d).transpose(1, 2).reshape(b, t, h * d)


def add_product(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``residual + x Wᵀ`` as one GEMM (``addmm`` over the flattened leading dims)."""
    flat = torch.addmm(residual.reshape(-1, residual.shape[-1]), x.reshape(-1, x.shape[-1]), weight.t())
    return flat.view(residual.shape)


def add_linear(residual: torch.Tensor, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``residual + module(x)``, the sum done by the GEMM itself (``addmm``: C + A Bᵀ in one kernel instead
    of a GEMM and an add) when ``module`` is a bias-free ``nn.Linear`` or has its own ``add_to``
    (a factored matrix: its last GEMM adds). Not under ``torch.compile``, which fuses a plain sum into
    the next kernel that reads it (the next RMSNorm), and a plain GEMM is faster than ``addmm`` at decode
    sizes (H200, SmolLM2's o: 3.4 against 4.4 us at batch 1, benchmarks/decode_ops_bench.py)."""
    if torch.compiler.is_compiling():
        return residual + module(x)
    if type(module) is nn.Linear and module.bias is None:
        return add_product(residual, x, module.weight)
    if hasattr(module, "add_to"):
        return module.add_to(residual, x)
    return residual + module(x)


class ModelAdapter:
    """A model of one family with its tokenizer. Subclasses define the class attributes and
    :meth:`layer_matrices`, :meth:`logits`, :meth:`encode`, :meth:`decode`, :meth:`greedy`,
    :meth:`kv_shape`, :meth:`cached_logits`, :meth:`load`, :meth:`empty_model` and
    :meth:`expected_shapes`."""

    family: str = ""  # the kind recorded in a compressed model's compress.json
    ROLES: tuple[str, ...] = ()  # every matrix role of a layer, in module order
    SHARED_INPUT: tuple[tuple[str, ...], ...] = ()  # roles that read one input (q/k/v; gate/up)
    RESIDUAL_INPUT: tuple[str, ...] = ()  # roles whose output the cached forward adds to the residual (o, down)
    GROUPS: dict[str, tuple[str, ...]] = {}  # config names of matrix groups -> roles (qkv, o, mlp)
    LAYERS: str = ""  # the module list of the transformer layers (layer i is f"{LAYERS}.{i}")

    def __init__(self, model: nn.Module, tokenizer=None):
        # the model's train/eval mode is left alone (the loaders return models in eval mode)
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.n_layers = self.count_layers(model)
        self.max_len = self.context_length(model)
        # (layer, SHARED_INPUT roles) -> a module giving their outputs from one stacked GEMM (see project)
        self.fused: dict[tuple[int, tuple[str, ...]], nn.Module] = {}

    # ---- what a subclass defines
    @staticmethod
    def count_layers(model: nn.Module) -> int:
        raise NotImplementedError

    @staticmethod
    def context_length(model: nn.Module) -> int:
        raise NotImplementedError

    def layer_matrices(self, i: int) -> dict[str, Matrix]:
        """Role -> Matrix of layer i, every role in ``ROLES``."""
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, T, V] of token ids x [B, T]."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def greedy(self, prompt_ids: list[int], n_new: int, stop_at_eos: bool = True) -> list[int]:
        """The ``n_new`` (fewer if it stops at the end-of-text token) greedy next tokens after a prompt."""
        raise NotImplementedError

    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head dim): the shape of a :class:`KVCache` of this model."""
        raise NotImplementedError

    def cached_logits(self, ids: torch.Tensor, cache: KVCache, last: bool = False) -> torch.Tensor:
        """Logits ``[B, T, V]`` of tokens ``ids [B, T]`` at the cache's next positions, attending to what it
        holds; their keys and values are stored and the cache advanced. Equal to :meth:`logits` of the
        whole sequence at those positions. Built from the model's own modules (factored ones included),
        the matrices of one input through :meth:`project`. ``last``: only the last position's logits
        ``[B, 1, V]`` (a prefill that only needs the next token skips the others' output layer)."""
        raise NotImplementedError

    # ---- written once for every family
    def project(self, i: int, roles: tuple[str, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs ``x Wᵀ`` of layer i's matrices ``roles`` (a ``SHARED_INPUT`` group) on their input:
        from the group's fused module when there is one (``self.fused``), else from each matrix's module
        (a fused module of several row blocks, our GPT's ``c_attn``, run once and sliced)."""
        fused = self.fused.get((i, roles))
        if fused is not None:
            return fused(x)
        layer, outputs, result = self.layer_matrices(i), {}, []
        for r in roles:
            m = layer[r]
            if m.path not in outputs:
                outputs[m.path] = self.module(m)(x)
            result.append(outputs[m.path] if m.rows is None else outputs[m.path][..., m.rows])
        return tuple(result)

    def add_project(self, i: int, role: str, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + x Wᵀ`` of layer i's matrix ``role`` (a ``RESIDUAL_INPUT`` role): from its fused
        module when there is one, else :func:`add_linear` of its module."""
        fused = self.fused.get((i, (role,)))
        if fused is not None:
            return fused.add_to(residual, x)
        return add_linear(residual, self.module(self.layer_matrices(i)[role]), x)

    def roles(self, groups=None) -> list[str]:
        """The roles of config matrix groups (``[qkv, o, mlp]``); every role when ``groups`` is None."""
        if groups is None:
            return list(self.ROLES)
        unknown = [g for g in groups if g not in self.GROUPS]
        if unknown:
            raise ValueError(f"matrices {list(groups)}: unknown {unknown}; choose from {list(self.GROUPS)}")
        chosen = {r for g in groups for r in self.GROUPS[g]}
        return [r for r in self.ROLES if r in chosen]

    def matrices(self, roles=None) -> list[Matrix]:
        """Every matrix of ``roles`` (default all), layer by layer, in ``ROLES`` order within a layer."""
        wanted = self.ROLES if roles is None else roles
        out = []
        for i in range(self.n_layers):
            layer = self.layer_matrices(i)
            out += [layer[r] for r in self.ROLES if r in wanted]
        return out

    def layer_module(self, i: int) -> nn.Module:
        """Layer i: called with the hidden states (and what the model passes it), it returns the next ones."""
        return self.model.get_submodule(f"{self.LAYERS}.{i}")

    def matrix(self, name: str) -> Matrix:
        i, role = name.split(".", 1)
        return self.layer_matrices(int(i))[role]

    def module(self, m: Matrix) -> nn.Module:
        return self.model.get_submodule(m.path)

    def weight_view(self, m: Matrix) -> torch.Tensor:
        """The matrix as a view of its parameter (gradients flow through it)."""
        w = self.module(m).weight
        return w if m.rows is None else w[m.rows]

    def weight(self, m: Matrix) -> np.ndarray:
        return self.weight_view(m).detach().double().cpu().numpy()

    @torch.no_grad()
    def set_weight(self, m: Matrix, value: np.ndarray | torch.Tensor) -> None:
        w = self.weight_view(m)
        w.copy_(torch.as_tensor(value).to(w.device, w.dtype))

    def input_module(self, m: Matrix) -> nn.Module:
        """The module whose input is this matrix's input (the first of its ``SHARED_INPUT`` roles)."""
        for roles in self.SHARED_INPUT:
            if m.role in roles:
                return self.module(self.layer_matrices(m.layer)[roles[0]])
        return self.module(m)

    @contextlib.contextmanager
    def patched(self, weights: dict[str, np.ndarray]):
        """The model with the matrices named in ``weights`` ("<layer>.<role>") replaced; restored after."""
        matrices = [self.matrix(name) for name in weights]
        originals = [self.weight_view(m).detach().clone() for m in matrices]
        try:
            for m, w in zip(matrices, weights.values()):
                self.set_weight(m, w)
            yield self
        finally:
            for m, w in zip(matrices, originals):
                self.set_weight(m, w)

    # ---- loading, for every family
    @classmethod
    def load(cls, *args, **kwargs) -> "ModelAdapter":
        raise NotImplementedError

    @staticmethod
    def empty_model(folder) -> nn.Module:
        """A freshly built model of the architecture saved in ``folder`` (config.json), weights unset."""
        raise NotImplementedError

    @staticmethod
    def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape of every matrix a checkpoint of this config must hold (from config.json)."""
        raise NotImplementedError


class CausalLM(nn.Module):
    """An adapter's model under the training loop's contract (weightpca.train): ``forward(x)`` gives
    ``(logits [B, T, V], None)``, ``forward(x, y)`` gives ``(None, mean next-token cross-entropy)``
    with the logits in float32. Its state dict is the wrapped model's under ``model.``."""

    def __init__(self, adapter: ModelAdapter):
        super().__init__()
        self.model = adapter.model
        self._logits = adapter.logits  # the family's forward (a bound method: not a registered submodule)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        logits = self._logits(x)
        if y is None:
            return logits, None
        return None, nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
