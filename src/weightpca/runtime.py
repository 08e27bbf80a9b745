"""A stock runtime for exported models: an ONNX file that ONNX Runtime runs without weightpca or torch.

``export_onnx`` traces a model's forward with an explicit key/value cache (the adapter's
``cached_logits`` over a growing ``KVCache``: the function the speed measurements decode with), so a
factored matrix is two MatMuls in the graph and nothing else in it is weightpca's. The graph:

- inputs ``input_ids`` int64 ``[batch, tokens]``, ``past_keys`` and ``past_values`` float32
  ``[layers, batch, kv_heads, past, head_dim]`` (``past`` = 0 for a prefill);
- outputs ``logits`` ``[batch, tokens, vocab]``, ``present_keys`` and ``present_values``
  ``[layers, batch, kv_heads, past + tokens, head_dim]``, the next call's past.

Beside it, ``<name>.json`` holds what a caller needs to build an empty past (layers, kv_heads,
head_dim), the vocabulary size and the longest sequence. ``ort_runner.py`` (next to this module, and
importing neither weightpca nor torch) loads such a file with onnxruntime alone: it checks logits
and times prefill and KV-cache decode; ``run_onnx`` starts it in a process whose import path holds
onnxruntime and numpy and nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .adapters import KVCache, ModelAdapter

OPSET = 17
# onnxruntime's float32 logits against PyTorch's, relative to the largest |logit|: both compute in float32,
# in other orders (measured: about 1e-6 on our GPT and a tiny Llama)
LOGITS_TOLERANCE = 1e-4
RUNNER = Path(__file__).with_name("ort_runner.py")


class CachedForward(nn.Module):
    """``(input_ids, past_keys, past_values) -> (logits, present_keys, present_values)`` of an adapter's model."""

    def __init__(self, adapter: ModelAdapter):
        super().__init__()
        self.model = adapter.model
        self._adapter = (adapter,)  # not a submodule: its model is already registered above

    def forward(self, input_ids: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor):
        cache = KVCache(past_keys, past_values)
        logits = self._adapter[0].cached_logits(input_ids, cache)
        return logits, cache.keys, cache.values


def export_onnx(adapter: ModelAdapter, path) -> dict:
    """Write ``path`` (ONNX, float32) and its ``.json``; returns the json's content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = adapter.model.float().eval()
    n_layers, heads, head_dim = adapter.kv_shape()
    device = next(model.parameters()).device
    ids = torch.zeros(2, 3, dtype=torch.long, device=device)
    past = torch.zeros(n_layers, 2, heads, 4, head_dim, device=device)
    with torch.no_grad():
        torch.onnx.export(
            CachedForward(adapter),
            (ids, past, past),
            str(path),
            input_names=["input_ids", "past_keys", "past_values"],
            output_names=["logits", "present_keys", "present_values"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "tokens"},
                "past_keys": {1: "batch", 3: "past"},
                "past_values": {1: "batch", 3: "past"},
                "logits": {0: "batch", 1: "tokens"},
                "present_keys": {1: "batch", 3: "sequence"},
                "present_values": {1: "batch", 3: "sequence"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    meta = dict(
        layers=n_layers,
        kv_heads=heads,
        head_dim=head_dim,
        vocab_size=int(model.config.vocab_size),
        max_len=int(adapter.max_len),
        dtype="float32",
        opset=OPSET,
        bytes=path.stat().st_size,
    )
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return meta


def stock_path(folder: Path) -> Path:
    """``folder`` filled with links to onnxruntime and numpy alone (their packages and bundled libraries):
    the whole import path of a process started with ``python -S`` (no site-packages, so neither the
    editable install of weightpca nor torch)."""
    import numpy
    import onnxruntime

    folder.mkdir(parents=True, exist_ok=True)
    for module in (onnxruntime, numpy):
        package = Path(module.__file__).resolve().parent
        for source in [package, *package.parent.glob(f"{package.name}.libs")]:
            link = folder / source.name
            if not link.exists():
                link.symlink_to(source, target_is_directory=True)
    return folder


def run_onnx(path, request: dict, threads: int = 1) -> dict:
    """``ort_runner.py`` on ``path`` in a process whose import path holds onnxruntime and numpy only
    (``stock_path``); ``request`` as the runner documents (token ids to score, regimes to time). Returns
    its JSON answer."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
        env.update(PYTHONPATH=str(stock_path(Path(tmp))), OMP_NUM_THREADS=str(threads))
        # started from the export's folder: nothing of the repository is on the path
        done = subprocess.run(
            [sys.executable, "-S", str(RUNNER), str(Path(path).resolve()), json.dumps(dict(request, threads=threads))],
            capture_output=True,
            text=True,
            env=env,
            cwd=Path(path).resolve().parent,
        )
    if done.returncode:
        raise RuntimeError(f"onnxruntime on {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_logits(adapter: ModelAdapter, path, ids: np.ndarray, threads: int = 1, timing: dict | None = None) -> dict:
    """The ONNX model's logits of ``ids [B, T]`` (prefill of T - 2 tokens, then two single-token steps
    through its returned cache) against the PyTorch model's full forward: max |difference| over max
    |logit|. ``timing``: regimes the same runner process also times (its ``prefill`` and ``decode``
    answers are returned), so the session is loaded once."""
    answer = run_onnx(path, dict(timing or {}, logits=ids.tolist()), threads)
    with torch.no_grad():
        reference = adapter.logits(torch.from_numpy(ids)).float().cpu().numpy()
    got = np.asarray(answer["logits"], dtype=np.float32)
    error = float(np.abs(got - reference).max() / np.abs(reference).max())
    return dict(
        relative_error=error,
        imported=answer["imported"],
        tokens=ids.shape,
        prefill=answer["prefill"],
        decode=answer["decode"],
    )
