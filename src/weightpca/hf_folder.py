"""A local Hugging Face model folder, checked before any job runs: headers and config.json only.

``check_hf_folder`` reads ``config.json``, the safetensors headers (8-byte
length + JSON) and the names of the tokenizer files, never the weights, and
refuses what a surgery job would otherwise fail on hours later:

- an architecture weightpca has no adapter for (``adapters.LLAMA_MODEL_TYPES``);
- ``auto_map`` (custom model code: weightpca never passes ``trust_remote_code``);
- a safetensors file that is truncated, unreadable, or lacks a linear matrix
  of the shape the config implies (every layer's, as the adapter's
  ``expected_shapes`` lists them: attention q/k/v/o and the MLP);
- no tokenizer files.

It returns the files that define the model, so the workflow can track them
by content (a changed file reruns that target's branch).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from .adapters import LLAMA_MODEL_TYPES, LlamaAdapter
from .io import safetensors_header

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
CONFIG_FILES = ("config.json", "generation_config.json")


class HFFolderError(ValueError):
    """A local model folder that the surgery stage cannot use; the message says what to do."""


def _fail(folder: Path, file: str, what: str, fix: str):
    raise HFFolderError(f"{folder / file}: {what}. {fix}")


def check_hf_folder(folder) -> list[Path]:
    """Refuse a folder a surgery job could not use (see the module docstring); return its model files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HFFolderError(
            f"{folder}: folder does not exist. Set surgery.targets.<name>.path to a folder written by save_pretrained"
        )
    if not (folder / "config.json").is_file():
        _fail(folder, "config.json", "missing", "Save the model with save_pretrained, which writes it")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        _fail(folder, "config.json", f"not valid JSON ({e})", "Restore the file written by save_pretrained")
    if cfg.get("auto_map"):
        _fail(
            folder,
            "config.json",
            f"has auto_map {sorted(cfg['auto_map'])}: the model needs custom code, "
            "which weightpca never runs (trust_remote_code stays off)",
            f"Use a model whose model_type transformers implements itself ({', '.join(LLAMA_MODEL_TYPES)})",
        )
    if cfg.get("model_type") not in LLAMA_MODEL_TYPES:
        _fail(
            folder,
            "config.json",
            f"model_type '{cfg.get('model_type')}' "
            f"({', '.join(cfg.get('architectures') or ['no architectures'])}) has no weightpca adapter "
            "(a Llama-style layout is needed)",
            f"Surgery supports model_type {', '.join(LLAMA_MODEL_TYPES)}",
        )
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        what = (
            "only PyTorch .bin weights, which weightpca does not unpickle"
            if list(folder.glob("*.bin"))
            else "no model weights"
        )
        _fail(folder, "*.safetensors", what, "Save the model with save_pretrained(safe_serialization=True)")
    found = {}
    for path in weights:
        try:
            header, _, _ = safetensors_header(path)
        except (ValueError, KeyError, OSError) as e:
            _fail(
                folder, path.name, f"not a readable safetensors file ({e})", "Copy the file again or re-save the model"
            )
        found.update({k: (tuple(v["shape"]), path.name) for k, v in header.items()})
    for name, shape in LlamaAdapter.expected_shapes(cfg).items():
        if name not in found:
            _fail(
                folder,
                weights[0].name if len(weights) == 1 else "*.safetensors",
                f"no tensor '{name}', which config.json's {cfg['num_hidden_layers']} layers imply",
                "Use the weights saved together with this config.json",
            )
        if found[name][0] != shape:
            _fail(
                folder,
                found[name][1],
                f"tensor '{name}' has shape {list(found[name][0])}, config.json implies {list(shape)}",
                "Use the weights saved together with this config.json",
            )
    if (folder / "tokenizer.json").is_file():
        pass
    elif (folder / "tokenizer.model").is_file():
        if importlib.util.find_spec("sentencepiece") is None:
            _fail(
                folder,
                "tokenizer.model",
                "a sentencepiece tokenizer without tokenizer.json, and the sentencepiece package is not installed",
                "pip install sentencepiece, or save the tokenizer with a fast tokenizer (tokenizer.json)",
            )
    else:
        _fail(
            folder,
            "tokenizer.json",
            "missing (no tokenizer.json or tokenizer.model)",
            "Save the tokenizer into the folder too: tokenizer.save_pretrained(folder)",
        )
    files = [folder / n for n in CONFIG_FILES + TOKENIZER_FILES if (folder / n).is_file()]
    return sorted(files + weights)


@lru_cache(maxsize=None)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(files) -> str:
    """sha256 over the files' names and contents (each hashed once per size and mtime)."""
    h = hashlib.sha256()
    for p in sorted(map(Path, files)):
        st = p.stat()
        h.update(p.name.encode())
        h.update(_file_digest(str(p), st.st_size, st.st_mtime_ns).encode())
    return h.hexdigest()[:16]
