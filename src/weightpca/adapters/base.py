"""The one interface between weightpca and a model family: where its matrices are, and how it runs.

A :class:`ModelAdapter` wraps a loaded model and its tokenizer. Per layer it
names every linear matrix by *role* (``q k v o gate up down``; our GPT:
``q k v o fc proj``) as a :class:`Matrix`: the module that holds it and,
for fused modules, its row block. It says which roles read the same input
(``SHARED_INPUT``: calibration statistics are gathered once per input), and
runs the model: logits, encode/decode, greedy continuation. Subclasses set
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


class ModelAdapter:
    """A model of one family with its tokenizer. Subclasses define the class attributes and
    :meth:`layer_matrices`, :meth:`logits`, :meth:`encode`, :meth:`decode`, :meth:`greedy`,
    :meth:`load`, :meth:`empty_model` and :meth:`expected_shapes`."""

    family: str = ""  # the kind recorded in a compressed model's compress.json
    ROLES: tuple[str, ...] = ()  # every matrix role of a layer, in module order
    SHARED_INPUT: tuple[tuple[str, ...], ...] = ()  # roles that read one input (q/k/v; gate/up)
    GROUPS: dict[str, tuple[str, ...]] = {}  # config names of matrix groups -> roles (qkv, o, mlp)
    LAYERS: str = ""  # the module list of the transformer layers (layer i is f"{LAYERS}.{i}")

    def __init__(self, model: nn.Module, tokenizer=None):
        # the model's train/eval mode is left alone (the loaders return models in eval mode)
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.n_layers = self.count_layers(model)
        self.max_len = self.context_length(model)

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

    # ---- written once for every family
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
