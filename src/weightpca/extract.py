"""Extract the matrices later stages analyse from a trained GPT checkpoint.

The token embedding ``wte [V, k_or_d]`` and every layer's W_q, W_k, W_v
(``[d_out = d, d_in = d]``, ``nn.Linear`` convention: ``q = x W_qᵀ``), read
through the model's adapter (``weightpca.adapters``).
"""

from __future__ import annotations

from pathlib import Path

from .adapters import GPTAdapter
from .io import save_npy, save_tensors, write_json
from .model import GPT


def extract_weights(model: GPT, wte_path, attention_path, manifest_path) -> dict:
    """Write the token embedding [V, k_or_d] (.npy), the attention matrices (safetensors,
    ``layer{i}.{q,k,v}``) and a manifest (JSON) naming both files with their shapes."""
    adapter = GPTAdapter(model)
    wte = model.transformer.wte.weight.detach().float().cpu()
    tensors = {
        f"layer{m.layer}.{m.role}": adapter.weight_view(m).detach().float().cpu().contiguous()
        for m in adapter.matrices(GPTAdapter.GROUPS["qkv"])
    }
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
