"""A GPT language model with an optional factorised token embedding.

Follows nanoGPT (karpathy/nanoGPT) in shape and naming: pre-LayerNorm blocks,
a fused query/key/value projection ``c_attn``, GELU MLP, learned positions and
an output head tied to the token embedding.

Factorised embedding (the seed experiments' design). With ``n_embd_wte = k``
the token embedding is a ``[V, k]`` table and two matrices move between the
k-dimensional token space and the d-dimensional residual stream::

    x      = wte[idx] @ scale_up          # [B, T, k] @ [k, d] -> [B, T, d]
    logits = (h @ scale_down) @ wte.T     # [B, T, d] @ [d, k] @ [k, V]

so the effective embedding is ``wte @ scale_up`` (rank <= k). ``scale_down`` is
its own parameter unless ``tie_scale`` is set, in which case it is
``scale_up.T``. With the PCA initialisation ``wte = U_k S_k``,
``scale_up = Vh_k`` and ``scale_down = Vh_k.T`` the model computes exactly the
logits of a plain GPT whose embedding is the rank-k truncation
``W_k = U_k S_k Vh_k`` (see ``weightpca.factorize``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

from .cross_entropy import linear_cross_entropy


@dataclass
class GPTConfig:
    vocab_size: int = 8192
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    n_embd_wte: int | None = None  # k; None = plain [V, d] embedding
    tie_scale: bool = False  # scale_down = scale_up.T
    embd_bias: bool = False  # a learned [d] vector added to every token embedding (centred PCA's mean row)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if self.n_embd_wte is not None and not 0 < self.n_embd_wte <= self.n_embd:
            raise ValueError(f"model.n_embd_wte (k={self.n_embd_wte}) must be in 1..n_embd ({self.n_embd})")

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def factorized(self) -> bool:
        return self.n_embd_wte is not None


def padded_vocab(vocab_size: int, multiple: int = 1) -> int:
    """The model's vocabulary: the tokenizer's, rounded up to a multiple (64 speeds the head up on GPUs)."""
    return -(-vocab_size // multiple) * multiple


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        # rows [0:d] are W_q, [d:2d] W_k, [2d:3d] W_v (weightpca.adapters.gpt maps them)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # an ablation, never trained with: every head attends uniformly to its
        # causal prefix (scores set to zero before the softmax), see
        # weightpca.evaluate.uniform_attention
        self.uniform = False

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # [B, T, C] -> [B, n_head, T, head_dim]
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.uniform:
            # softmax of all-zero scores over positions <= t: the mean of v over the prefix
            counts = torch.arange(1, T + 1, device=v.device, dtype=v.dtype).view(1, 1, T, 1)
            y = v.cumsum(dim=2) / counts
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        d, k = config.n_embd, config.n_embd_wte or config.n_embd
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, k),
                wpe=nn.Embedding(config.block_size, d),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(d, bias=config.bias),
            )
        )
        if config.factorized:
            self.scale_up = nn.Parameter(torch.empty(k, d))
            self.scale_down = None if config.tie_scale else nn.Parameter(torch.empty(d, k))
        if config.embd_bias:
            self.embd_bias = nn.Parameter(torch.zeros(d))
        self.apply(self._init_weights)
        if config.factorized:
            # orthogonal-ish random init keeps the residual stream's scale
            # independent of k (std 1/sqrt(k) per entry)
            nn.init.normal_(self.scale_up, mean=0.0, std=1.0 / math.sqrt(k))
            if self.scale_down is not None:
                nn.init.normal_(self.scale_down, mean=0.0, std=1.0 / math.sqrt(d))
        # GPT-2's scaled init of the residual projections
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def scale_down_matrix(self) -> torch.Tensor:
        """[d, k]: maps the final hidden state back into token-embedding space."""
        return self.scale_up.t() if self.scale_down is None else self.scale_down

    def num_params(self, exclude_positions: bool = False) -> int:
        """Trainable-or-not parameter count; the head is tied so counts nothing."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_positions:
            n -= self.transformer.wpe.weight.numel()
        return n

    def embedding_params(self) -> int:
        """Parameters of the token embedding path: wte (+ scale matrices)."""
        n = self.transformer.wte.weight.numel()
        if self.config.embd_bias:
            n += self.embd_bias.numel()
        if self.config.factorized:
            n += self.scale_up.numel()
            if self.scale_down is not None:
                n += self.scale_down.numel()
        return n

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T] -> final hidden state after ln_f, [B, T, d]."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} > model.block_size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        tok = self.transformer.wte(idx)
        if self.config.factorized:
            tok = tok @ self.scale_up
        if self.config.embd_bias:
            tok = tok + self.embd_bias
        x = self.transformer.drop(tok + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    def token_space(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden state [.., d] in token-embedding space [.., k] (identity when not factorised)."""
        return h @ self.scale_down_matrix() if self.config.factorized else h

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.token_space(h), self.transformer.wte.weight)  # tied head

    def forward(self, idx, targets=None):
        """idx [B, T] -> (logits [B, T, V], None); with targets [B, T], (None, mean cross-entropy).

        Training gets the loss alone: with gradients on, the head and its
        loss are one op that turns the [B, T, V] logits into their gradient
        in the forward pass (weightpca.cross_entropy), so no pass over them
        is left for the backward; without gradients (evaluation) the plain
        cross-entropy of the float32 logits.
        """
        h = self.hidden_states(idx)
        if targets is None:
            return self.logits_from_hidden(h), None
        if torch.is_grad_enabled():
            h = self.token_space(h)
            return None, linear_cross_entropy(
                h.reshape(-1, h.size(-1)), self.transformer.wte.weight, targets.reshape(-1)
            )
        logits = self.logits_from_hidden(h)
        return None, F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))

    def set_frozen(self, freeze_wte: bool = False, freeze_scale: bool = False) -> None:
        self.transformer.wte.weight.requires_grad_(not freeze_wte)
        if freeze_scale:
            if not self.config.factorized:
                raise ValueError("freeze_scale needs a factorised model (model.n_embd_wte set)")
            self.scale_up.requires_grad_(False)
            if self.scale_down is not None:
                self.scale_down.requires_grad_(False)
            if self.config.embd_bias:
                self.embd_bias.requires_grad_(False)
