"""Our GPT (weightpca.model): q/k/v are row blocks of each block's fused ``c_attn``; the MLP is c_fc, c_proj.

``transformer.h[i].attn.c_attn.weight`` is the fused ``[3d, d]`` projection
(``y = x Wᵀ``): W_q = rows ``[0, d)``, W_k = ``[d, 2d)``, W_v = ``[2d, 3d)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..io import check_state_dict, load_tensors, read_json
from ..model import GPT, GPTConfig
from .base import KVCache, Matrix, ModelAdapter, attend


class GPTAdapter(ModelAdapter):
    family = "gpt"
    ROLES = ("q", "k", "v", "o", "fc", "proj")
    SHARED_INPUT = (("q", "k", "v"),)
    GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "mlp": ("fc", "proj")}
    LAYERS = "transformer.h"

    @staticmethod
    def count_layers(model: nn.Module) -> int:
        return model.config.n_layer

    @staticmethod
    def context_length(model: nn.Module) -> int:
        return model.config.block_size

    def layer_matrices(self, i: int) -> dict[str, Matrix]:
        d, block = self.model.config.n_embd, f"transformer.h.{i}"
        fused = {r: Matrix(i, r, f"{block}.attn.c_attn", slice(j * d, (j + 1) * d)) for j, r in enumerate("qkv")}
        return {
            **fused,
            "o": Matrix(i, "o", f"{block}.attn.c_proj"),
            "fc": Matrix(i, "fc", f"{block}.mlp.c_fc"),
            "proj": Matrix(i, "proj", f"{block}.mlp.c_proj"),
        }

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.device))[0]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], n_new: int, stop_at_eos: bool = True) -> list[int]:
        """Recomputes the last ``block_size`` tokens per new token (our GPT has no KV cache, nor an end token)."""
        ids = torch.tensor([prompt_ids], device=self.device)
        for _ in range(n_new):
            nxt = self.logits(ids[:, -self.max_len :])[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        return ids[0, len(prompt_ids) :].tolist()

    def kv_shape(self) -> tuple[int, int, int]:
        c = self.model.config
        return c.n_layer, c.n_head, c.n_embd // c.n_head

    def cached_logits(self, ids: torch.Tensor, cache: KVCache, last: bool = False) -> torch.Tensor:
        """``GPT.forward`` written out block by block, attention over ``cache`` (positions below
        ``block_size``: the learned position embedding ends there)."""
        gpt, (b, t) = self.model, ids.shape
        c, tr = gpt.config, gpt.transformer
        _, heads, head_dim = self.kv_shape()
        tok = tr.wte(ids)
        if c.factorized:
            tok = tok @ gpt.scale_up
        if c.embd_bias:
            tok = tok + gpt.embd_bias
        positions = cache.positions(t)
        x = tok + tr.wpe(positions)
        mask = cache.mask(t)
        for i, block in enumerate(tr.h):
            qkv = self.project(i, self.SHARED_INPUT[0], block.ln_1(x))
            q, k, v = (z.reshape(b, t, heads, head_dim).transpose(1, 2) for z in qkv)
            k, v = cache.update(i, k, v, positions)
            x = x + block.attn.c_proj(attend(q, k, v, mask))
            x = x + block.mlp(block.ln_2(x))
        cache.advance(t)
        return gpt.logits_from_hidden(tr.ln_f(x[:, -1:] if last else x))

    @classmethod
    def load(cls, model_path, config_path, tokenizer_path=None, device: str = "cpu") -> "GPTAdapter":
        """A trained model from its safetensors weights and config.json; refuses mismatched tensors."""
        model = GPT(GPTConfig.from_dict(read_json(config_path)["model"]))
        weights = load_tensors(model_path)
        check_state_dict(weights, model.state_dict(), model_path)
        model.load_state_dict(weights)
        tokenizer = None
        if tokenizer_path is not None:
            from ..tokens import load_tokenizer

            tokenizer = load_tokenizer(tokenizer_path)
        return cls(model.to(device).eval(), tokenizer)

    @staticmethod
    def empty_model(folder) -> nn.Module:
        return GPT(GPTConfig.from_dict(read_json(Path(folder) / "config.json")["model"]))

    @staticmethod
    def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
        d, shapes = cfg["n_embd"], {}
        for i in range(cfg["n_layer"]):
            block = f"transformer.h.{i}"
            shapes.update(
                {
                    f"{block}.attn.c_attn.weight": (3 * d, d),
                    f"{block}.attn.c_proj.weight": (d, d),
                    f"{block}.mlp.c_fc.weight": (4 * d, d),
                    f"{block}.mlp.c_proj.weight": (d, 4 * d),
                }
            )
        return shapes
