"""Hugging Face Llama-style causal LMs: ``model.layers[i].self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``.

Loaded with ``trust_remote_code`` off, always: only architectures that
transformers implements itself (``MODEL_TYPES``, checked against its classes
in tests/test_hf_folder.py).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
from torch import nn

from .. import decode_attention
from .base import AdapterError, KVCache, Matrix, ModelAdapter, attend

# model_type values whose transformers class has this layout
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
# those whose forward ``cached_logits`` writes out (Gemma scales its embeddings and soft-caps its logits)
CACHED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_ATTN = ("q", "k", "v", "o")
_MLP = ("gate", "up", "down")


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Llama-style ``RMSNorm`` module (``weight``, ``variance_epsilon``) applied as one op: ``x / sqrt(mean(x²)
    + eps) · weight`` (``torch.nn.functional.rms_norm``, reducing in float32 as the module does, which
    instead runs six elementwise kernels and two casts). In an ONNX export the module itself: opset 17 has no
    RMSNorm, and the exporter does not decompose it."""
    if torch.onnx.is_in_onnx_export():
        return norm(x)
    return nn.functional.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def rotation_sines(sin: torch.Tensor) -> torch.Tensor:
    """The rotary sines ``[.., D]`` (two equal halves) with the first half negated, for :func:`rotate`."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of ``x [.., D]``, in Hugging Face's half-split layout: ``x cos + rotate_half(x) sin``
    with ``rotate_half(x) = (-x₂, x₁)`` = ``roll(x, D/2)`` times the signs in ``signed_sin``
    (:func:`rotation_sines`): three kernels (a product, a roll, a fused multiply-add) instead of five."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


@contextlib.contextmanager
def gguf_parsed_once():
    """Inside: the ``gguf`` package's file reader and tensor-name map are built once per argument.

    Why: transformers (5.x) opens a GGUF file three times to load a model with its tokenizer (config,
    tokenizer, weights), and each ``GGUFReader`` parses the whole vocabulary field by field (~12 s
    for SmolLM2's on a 2-core CPU); it also rebuilds the tensor-name map once per submodule (~400
    times, ~16 s). Both are pure functions of their arguments and read-only afterwards, so caching
    them changes nothing but the time (checked once: SmolLM2's prepared weights and tokenizer are
    byte-identical with and without it, 48 s against 26 s). Outside the block the package is as it
    was."""
    try:
        import gguf
    except ImportError:  # transformers names the missing package itself
        yield
        return
    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(saved[0])
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(saved[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


class LlamaAdapter(ModelAdapter):
    family = "hf"
    ROLES = _ATTN + _MLP
    SHARED_INPUT = (("q", "k", "v"), ("gate", "up"))
    RESIDUAL_INPUT = ("o", "down")
    GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "mlp": _MLP}
    LAYERS = "model.layers"

    def __init__(self, model: nn.Module, tokenizer=None):
        try:
            for i, layer in enumerate(model.model.layers):
                for role in self.ROLES:
                    model.get_submodule(self._path(i, role))
        except AttributeError as e:
            raise AdapterError(
                f"{type(model).__name__} has no model.layers[i].self_attn.{{q,k,v,o}}_proj and "
                f"mlp.{{gate,up,down}}_proj (a Llama-style model is needed): {e}"
            ) from e
        super().__init__(model, tokenizer)

    @staticmethod
    def _path(i: int, role: str) -> str:
        return f"model.layers.{i}.{'self_attn' if role in _ATTN else 'mlp'}.{role}_proj"

    @staticmethod
    def count_layers(model: nn.Module) -> int:
        return len(model.model.layers)

    @staticmethod
    def context_length(model: nn.Module) -> int:
        return getattr(model.config, "max_position_embeddings", 2048)

    def layer_matrices(self, i: int) -> dict[str, Matrix]:
        return {r: Matrix(i, r, self._path(i, r)) for r in self.ROLES}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x.to(self.device), use_cache=False).logits

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], n_new: int, stop_at_eos: bool = True) -> list[int]:
        """``generate`` with its KV cache; ``stop_at_eos=False`` always makes ``n_new`` tokens (timing)."""
        pad = self.tokenizer.eos_token_id if self.tokenizer is not None else 0
        out = self.model.generate(
            torch.tensor([prompt_ids], device=self.device),
            max_new_tokens=n_new,
            do_sample=False,
            pad_token_id=pad,
            **({} if stop_at_eos else {"min_new_tokens": n_new}),
        )
        return out[0, len(prompt_ids) :].tolist()

    def kv_shape(self) -> tuple[int, int, int]:
        cfg = self.model.config
        heads = cfg.num_attention_heads
        return (
            cfg.num_hidden_layers,
            cfg.num_key_value_heads or heads,
            getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads),
        )

    def cached_logits(self, ids: torch.Tensor, cache: KVCache, last: bool = False) -> torch.Tensor:
        """The decoder layer written out with its own modules (norms, projections, rotary embedding, the
        MLP's activation), attention over ``cache``; Qwen3's per-head q/k norms included.

        Written in few kernels, since a decode step at small batch is as slow as the kernels it launches:
        RMSNorm as one fused op (``rms_norm``), the rotary embedding as three (``rotate``), positions, mask
        and sines once per forward, the residual sums inside the o and down GEMMs (``add_project``); a
        decode step's attention on CUDA (one new token, a static cache, 16-bit floats) as one kernel that
        also rotates the query and key and stores the key and value (``weightpca.decode_attention``)."""
        kind = self.model.config.model_type
        if kind not in CACHED_MODEL_TYPES:
            raise AdapterError(
                f"model type {kind!r}: its cached forward is not written out (only {', '.join(CACHED_MODEL_TYPES)})"
            )
        body = self.model.model
        b, t = ids.shape
        _, _, head_dim = self.kv_shape()
        h = body.embed_tokens(ids)
        positions = cache.positions(t)
        cos, sin = body.rotary_emb(h, positions.unsqueeze(0).expand(b, t))
        cos, sin = cos.unsqueeze(2), rotation_sines(sin).unsqueeze(2)  # [B, T, 1, D]: over the heads
        # a decode step on CUDA: each layer's cache write and attention one kernel (decode_attention)
        one_kernel = t == 1 and cache.static and decode_attention.runs_on(h)
        mask = None if one_kernel else cache.mask(t)
        for i, layer in enumerate(body.layers):
            a, x = layer.self_attn, rms_norm(layer.input_layernorm, h)
            q, k, v = (y.reshape(b, t, -1, head_dim) for y in self.project(i, ("q", "k", "v"), x))
            if hasattr(a, "q_norm"):
                q, k = rms_norm(a.q_norm, q), rms_norm(a.k_norm, k)
            if one_kernel:  # the key and value stored in the static cache by the kernel
                new = (q.reshape(b, -1), k.reshape(b, -1), v.reshape(b, -1), cos[:, 0, 0], sin[:, 0, 0])
                y = decode_attention.decode_attention(
                    *new, cache.keys[i], cache.values[i], cache.position, a.scaling
                ).view(b, 1, -1)
            else:
                k, v = cache.update(i, rotate(k, cos, sin).transpose(1, 2), v.transpose(1, 2), positions)
                y = attend(rotate(q, cos, sin).transpose(1, 2), k, v, mask, a.scaling)
            h = self.add_project(i, "o", h, y)
            gate, up = self.project(i, ("gate", "up"), rms_norm(layer.post_attention_layernorm, h))
            h = self.add_project(i, "down", h, layer.mlp.act_fn(gate) * up)
        cache.advance(t)
        return self.model.lm_head(rms_norm(body.norm, h[:, -1:] if last else h))

    @classmethod
    def load(cls, path_or_id: str, gguf_file: str | None = None, device: str = "cpu") -> "LlamaAdapter":
        """The model in float32 with its tokenizer, from a local folder, a GGUF file in it, or a hub id."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        local = Path(path_or_id)
        if (
            local.exists()
            and not any(local.glob("*.safetensors"))
            and not any(local.glob("*.bin"))
            and not (gguf_file and (local / gguf_file).is_file())
        ):
            raise AdapterError(f"{local}: no model weights (*.safetensors, *.bin or the GGUF file) in this folder")
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        with gguf_parsed_once() if gguf_file else contextlib.nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=False, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                path_or_id, dtype=torch.float32, trust_remote_code=False, **kwargs
            )
        return cls(model.to(device).eval(), tokenizer)

    @staticmethod
    def empty_model(folder) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)

    @staticmethod
    def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or hidden // heads
        inner = cfg["intermediate_size"]
        rows = {
            "q": (heads * head_dim, hidden),
            "k": (kv_heads * head_dim, hidden),
            "v": (kv_heads * head_dim, hidden),
            "o": (hidden, heads * head_dim),
            "gate": (inner, hidden),
            "up": (inner, hidden),
            "down": (hidden, inner),
        }
        return {
            f"{LlamaAdapter._path(i, r)}.weight": shape
            for i in range(cfg["num_hidden_layers"])
            for r, shape in rows.items()
        }
