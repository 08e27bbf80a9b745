"""Extract the matrices later stages analyse from a trained GPT checkpoint.

``c_attn.weight`` is the fused ``[3d, d]`` projection of nn.Linear
(``y = x Wᵀ``); its row blocks are W_q = rows ``[0, d)``, W_k = ``[d, 2d)``,
W_v = ``[2d, 3d)``, each ``[d_out = d, d_in = d]``, so ``q = x W_qᵀ``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .io import save_npy, save_tensors, write_json
from .model import GPT


def split_qkv(c_attn_weight: torch.Tensor, n_embd: int) -> dict[str, torch.Tensor]:
    if tuple(c_attn_weight.shape) != (3 * n_embd, n_embd):
        raise ValueError(f"c_attn.weight has shape {tuple(c_attn_weight.shape)}, "
                         f"expected (3*{n_embd}, {n_embd})")
    q, k, v = c_attn_weight.split(n_embd, dim=0)
    return {"q": q, "k": k, "v": v}


def extract_weights(model: GPT, wte_path, attention_path, manifest_path) -> dict:
    """Write the token embedding [V, k_or_d] (.npy), the attention matrices (safetensors,
    ``layer{i}.{q,k,v}``) and a manifest (JSON) naming both files with their shapes."""
    d = model.config.n_embd
    wte = model.transformer.wte.weight.detach().float().cpu()
    tensors = {}
    for i, block in enumerate(model.transformer.h):
        for name, w in split_qkv(block.attn.c_attn.weight.detach().float().cpu(), d).items():
            tensors[f"layer{i}.{name}"] = w
    save_npy(wte_path, wte.numpy())
    save_tensors(attention_path, tensors)
    manifest = {
        Path(wte_path).name: {"shape": list(wte.shape), "dtype": "float32"},
        Path(attention_path).name: {k: list(v.shape) for k, v in tensors.items()},
        "convention": "W is [d_out, d_in] (nn.Linear); q = x @ W_q.T",
        "model": model.config.to_dict(),
    }
    write_json(manifest_path, manifest)
    return manifest
