"""Model adapters: the only code that knows a model family's layout (see ``base.ModelAdapter``).

Adding an architecture is one file here with a ``ModelAdapter`` subclass,
listed in ``ADAPTERS``.
"""

from __future__ import annotations

from torch import nn

from .base import AdapterError, CausalLM, KVCache, Matrix, ModelAdapter
from .gpt import GPTAdapter
from .llama import MODEL_TYPES as LLAMA_MODEL_TYPES
from .llama import LlamaAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {a.family: a for a in (GPTAdapter, LlamaAdapter)}

__all__ = [
    "ADAPTERS",
    "AdapterError",
    "CausalLM",
    "GPTAdapter",
    "KVCache",
    "LLAMA_MODEL_TYPES",
    "LlamaAdapter",
    "Matrix",
    "ModelAdapter",
    "adapter_for",
    "load",
]


def adapter_for(model: nn.Module, tokenizer=None) -> ModelAdapter:
    """The adapter of a loaded model: our GPT by its class, anything else as a Llama-style HF model."""
    from ..model import GPT

    return (GPTAdapter if isinstance(model, GPT) else LlamaAdapter)(model, tokenizer)


def load(kind: str, path, config=None, device: str = "cpu", tokenizer=None) -> ModelAdapter:
    """The one loader. ``kind``: ``gpt`` (weights ``path``, its ``config`` json, optional ``tokenizer``
    file), ``hf`` (a save_pretrained folder or hub id), ``compressed`` (a folder written by
    weightpca.compress.save_compressed)."""
    if kind == "gpt":
        return GPTAdapter.load(path, config, tokenizer, device)
    if kind == "hf":
        return LlamaAdapter.load(str(path), device=device)
    if kind == "compressed":
        from ..compress import load_compressed

        return adapter_for(load_compressed(path, device), tokenizer)
    raise ValueError(f"unknown model kind '{kind}'; choose from gpt, hf, compressed")
