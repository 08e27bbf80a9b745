"""Resumable training checkpoints, pickle-free.

A checkpoint is a folder ``ckpt/step_{step:08d}/`` holding

- ``model.safetensors``: the model's state dict;
- ``state.safetensors``: AdamW moments (``opt.{param_index}.{exp_avg|exp_avg_sq|step}``),
  the global torch RNG, the batch sampler's generator and, on CUDA, the CUDA RNG
  (as uint8 tensors), with JSON metadata: step, elapsed seconds, best
  validation loss, the training-loss sum since the last evaluation, the
  checkpoint format and the hash of the run configuration. What follows from
  the step (tokens seen, steps since the last evaluation) is derived, not stored.

It is written under a temporary name and renamed into place, then the text
file ``ckpt/LATEST`` is atomically pointed at it, so a crash at any moment
leaves the previous checkpoint usable. A checkpoint whose config hash differs
from the current run's (the rule's settings changed), or written in another
``FORMAT``, is never resumed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .io import WeightFileError, check_state_dict, load_tensors, save_tensors, write_text

FORMAT = 2  # 1: before tokens and loss_steps were derived from the step


@dataclass
class Progress:
    step: int = 0
    elapsed_s: float = 0.0
    best_val_loss: float = float("inf")
    loss_sum: float = 0.0  # training loss summed since the last evaluation


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for key, val in st.items():
            out[f"opt.{idx}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    return out


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for name, val in tensors.items():
        if name.startswith("opt."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = val
    sd["state"] = state
    opt.load_state_dict(sd)


def save_checkpoint(
    ckpt_root, model, opt, sampler_gen: torch.Generator, progress: Progress, config_hash: str, keep: int = 1
) -> Path:
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step_{progress.step:08d}"
    tmp = ckpt_root / f".tmp_step_{progress.step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors(tmp / "model.safetensors", model.state_dict())
    state = _optimizer_tensors(opt)
    state["rng.torch"] = torch.get_rng_state()
    state["rng.sampler"] = sampler_gen.get_state()
    if torch.cuda.is_available():
        state["rng.cuda"] = torch.cuda.get_rng_state()
    meta = dict(
        step=progress.step,
        elapsed_s=progress.elapsed_s,
        best_val_loss=progress.best_val_loss,
        loss_sum=progress.loss_sum,
        format=FORMAT,
        config_hash=config_hash,
    )
    save_tensors(tmp / "state.safetensors", state, metadata={"progress": json.dumps(meta)})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_text(ckpt_root / "LATEST", final.name + "\n")
    # drop older checkpoints only after LATEST points at the new one
    for old in sorted(ckpt_root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root, config_hash: str) -> Path | None:
    """The checkpoint LATEST points at, if it belongs to this configuration and format."""
    pointer = Path(ckpt_root) / "LATEST"
    if not pointer.is_file():
        return None
    path = Path(ckpt_root) / pointer.read_text().strip()
    state = path / "state.safetensors"
    if not state.is_file():
        return None
    try:
        with safe_open(str(state), framework="pt") as f:
            meta = json.loads(f.metadata()["progress"])
    except Exception as e:  # written atomically, so a bad file was damaged or replaced afterwards
        raise WeightFileError(
            f"{state}: unreadable checkpoint state ({e}); delete {Path(ckpt_root).parent} to restart the run"
        ) from e
    return path if meta["config_hash"] == config_hash and meta.get("format") == FORMAT else None


def load_checkpoint(path, model, opt, sampler_gen: torch.Generator) -> Progress:
    path = Path(path)
    weights = load_tensors(path / "model.safetensors")
    check_state_dict(weights, model.state_dict(), path / "model.safetensors")
    model.load_state_dict(weights)
    state = load_tensors(path / "state.safetensors")
    _load_optimizer(opt, state)
    torch.set_rng_state(state["rng.torch"])
    sampler_gen.set_state(state["rng.sampler"])
    if "rng.cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng.cuda"])
    with safe_open(str(path / "state.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["progress"])
    return Progress(
        step=meta["step"], elapsed_s=meta["elapsed_s"], best_val_loss=meta["best_val_loss"], loss_sum=meta["loss_sum"]
    )
