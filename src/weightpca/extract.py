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


def extract_weights(model: GPT, out_dir) -> dict:
    """Write wte.npy [V, k_or_d], attention.safetensors (layer{i}.{q,k,v}) and manifest.json."""
    out_dir = Path(out_dir)
    d = model.config.n_embd
    wte = model.transformer.wte.weight.detach().float().cpu()
    tensors = {}
    for i, block in enumerate(model.transformer.h):
        for name, w in split_qkv(block.attn.c_attn.weight.detach().float().cpu(), d).items():
            tensors[f"layer{i}.{name}"] = w
    save_npy(out_dir / "wte.npy", wte.numpy())
    save_tensors(out_dir / "attention.safetensors", tensors)
    manifest = {
        "wte.npy": {"shape": list(wte.shape), "dtype": "float32"},
        "attention.safetensors": {k: list(v.shape) for k, v in tensors.items()},
        "convention": "W is [d_out, d_in] (nn.Linear); q = x @ W_q.T",
        "model": model.config.to_dict(),
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest
