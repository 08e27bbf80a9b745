"""The one training loop: baseline D, the A/B/C variants and every later stage.

Read top to bottom: build the model (optionally initialised from files),
resume from the last checkpoint if one matches this configuration, then

    for step in steps:   lr schedule -> grad-accumulated forward/backward ->
                         clip -> AdamW step -> (log / eval / snapshot / checkpoint)

and finally evaluate on the validation split and write the artifacts
atomically. A run is a dict of plain values (see ``config/config.yaml``):

    run = {"name", "seed", "model": {...GPTConfig}, "train": {...}, "init": {...},
           "freeze": {...}, "wandb": {...}}

Outputs in ``out_dir``: ``model.safetensors``, ``config.json``, ``metrics.csv``,
``summary.json`` and, with ``train.snapshot_every > 0``, ``snapshots/``.
In-progress state lives in ``work_dir`` (checkpoints, metrics so far) and is
removed once the outputs are in place.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import Progress, latest_checkpoint, load_checkpoint, save_checkpoint
from .io import atomic_path, check_state_dict, load_tensors, read_json, save_tensors, write_json
from .model import GPT, GPTConfig, padded_vocab
from .tokens import BatchSampler, eval_windows, open_tokens, unigram_perplexity

METRIC_FIELDS = ["step", "tokens", "lr", "train_loss", "val_loss", "val_ppl", "cos_target", "elapsed_s"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{requested}' requested but CUDA is not available; use 'auto' or 'cpu'")
    return requested


def lr_at(step: int, t: dict) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < t["warmup_steps"]:
        return t["lr"] * (step + 1) / t["warmup_steps"]
    progress = (step - t["warmup_steps"]) / max(1, t["max_steps"] - t["warmup_steps"])
    return t["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (t["lr"] - t["min_lr"])


def make_optimizer(model: torch.nn.Module, t: dict, device: str) -> torch.optim.AdamW:
    """AdamW; matrices (dim >= 2) decay, vectors (LayerNorm, biases) do not. Frozen params excluded."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t["weight_decay"]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t["lr"], betas=(t["beta1"], t["beta2"]),
                             fused=device.startswith("cuda"))


def build_model(run: dict, vocab_size: int) -> GPT:
    """Seeded model, initialised from ``run['init']`` files where given, frozen per ``run['freeze']``."""
    torch.manual_seed(run["seed"])
    model_cfg = dict(run["model"])
    # rows past the tokenizer's vocabulary are never targets
    model_cfg["vocab_size"] = padded_vocab(vocab_size, model_cfg.pop("vocab_multiple", 1))
    model = GPT(GPTConfig.from_dict(model_cfg))
    init = run.get("init") or {}
    if init.get("model"):
        # every weight of a trained model except the token embedding path,
        # which the factorisation (init.embedding) or the seed replaces
        src = load_tensors(init["model"])
        own = model.state_dict()
        skip = {"transformer.wte.weight", "scale_up", "scale_down", "embd_bias"}
        wanted = {k: v for k, v in own.items() if k not in skip}
        check_state_dict({k: v for k, v in src.items() if k not in skip}, wanted, init["model"])
        model.load_state_dict({**own, **{k: src[k] for k in wanted}})
    if init.get("embedding"):
        load_embedding(model, init["embedding"])
    freeze = run.get("freeze") or {}
    model.set_frozen(freeze.get("wte", False), freeze.get("scale", False))
    return model


def load_embedding(model: GPT, path) -> None:
    """Set wte (and scale matrices of a factorised model) from a safetensors file."""
    src = load_tensors(path)
    own = model.state_dict()
    names = ["transformer.wte.weight"]
    if model.config.factorized:
        names.append("scale_up")
        if model.scale_down is not None:
            names.append("scale_down")
    if model.config.embd_bias:
        names.append("embd_bias")
    check_state_dict({k: src[k] for k in names if k in src}, {k: own[k] for k in names}, path)
    with torch.no_grad():
        for k in names:
            own[k].copy_(src[k])


@torch.no_grad()
def evaluate(model, windows: np.ndarray, batch_size: int, device: str, autocast) -> tuple[float, float]:
    """(mean next-token cross-entropy, mean cos_target) over fixed [N, T+1] windows.

    cos_target is the seed experiments' ln_f diagnostic: the cosine between
    the final hidden state mapped into token space (``h @ scale_down`` for a
    factorised model, ``h`` otherwise) and the target token's embedding row.
    """
    was_training = model.training
    model.eval()
    total, cos_total, count = 0.0, 0.0, 0
    wte = model.transformer.wte.weight
    for i in range(0, len(windows), batch_size):
        xy = torch.from_numpy(windows[i:i + batch_size]).to(device)
        x, y = xy[:, :-1], xy[:, 1:]
        with autocast():
            z = model.token_space(model.hidden_states(x))
            logits = torch.nn.functional.linear(z, wte)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                                 y.reshape(-1), reduction="sum")
        cos = torch.nn.functional.cosine_similarity(z.float(), wte[y].float(), dim=-1).sum()
        total += loss.item()
        cos_total += cos.item()
        count += y.numel()
    model.train(was_training)
    return total / count, cos_total / count


def config_hash(run: dict) -> str:
    """Identity of a run's mathematics: settings plus the content of its init files."""
    h = hashlib.sha256(json.dumps(
        {k: run.get(k) for k in ("seed", "model", "train", "init", "freeze")}, sort_keys=True
    ).encode())
    for path in sorted(v for v in (run.get("init") or {}).values() if v):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


class MetricsLog:
    """metrics.csv in the work folder; rows past a resumed step are dropped (they will be redone)."""

    def __init__(self, path, resume_step: int):
        self.path = Path(path)
        rows = []
        if resume_step > 0 and self.path.is_file():
            with open(self.path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
                w.writeheader()
                w.writerows(rows)

    def append(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_FIELDS).writerow(row)
            f.flush()
            os.fsync(f.fileno())


def start_wandb(run: dict, chash: str):
    """W&B run named after variant, rank and seed; offline runs land in ``wandb.dir`` for `wandb sync`."""
    cfg = run.get("wandb") or {"mode": "disabled"}
    if cfg["mode"] == "disabled":
        return None
    import wandb

    m = run["model"]
    k = m.get("n_embd_wte")
    tags = [f"seed={run['seed']}", f"k={k if k else 'full'}", f"L{m['n_layer']}-d{m['n_embd']}"]
    Path(cfg["dir"]).mkdir(parents=True, exist_ok=True)
    return wandb.init(
        mode=cfg["mode"], project=cfg["project"], entity=cfg.get("entity"),
        group=run.get("group"), name=run["name"], tags=tags, dir=cfg["dir"],
        id=f"{run['name'].replace('/', '-')}-{chash}", resume="allow", config=run,
    )


def train(run: dict, data_dir, out_dir, work_dir, device: str = "auto", threads: int = 1) -> dict:
    data_dir, out_dir, work_dir = Path(data_dir), Path(out_dir), Path(work_dir)
    t = run["train"]
    device = resolve_device(device)
    torch.set_num_threads(threads)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_bf16 = device == "cuda" and t.get("dtype", "auto") in ("auto", "bfloat16")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    meta = read_json(data_dir / "meta.json")
    train_tokens = open_tokens(data_dir / "train.bin", meta)
    val_tokens = open_tokens(data_dir / "val.bin", meta)
    block = run["model"]["block_size"]
    val_windows = eval_windows(val_tokens, block, t["eval_tokens"])

    model = build_model(run, meta["vocab_size"]).to(device)
    opt = make_optimizer(model, t, device)
    sampler = BatchSampler(train_tokens, t["batch_size"], block, run["seed"], device)
    chash = config_hash(run)

    ckpt_root = work_dir / "ckpt"
    progress = Progress()
    resume = latest_checkpoint(ckpt_root, chash)
    if resume is None:
        shutil.rmtree(work_dir, ignore_errors=True)  # stale state of other settings
        work_dir.mkdir(parents=True)
    else:
        progress = load_checkpoint(resume, model, opt, sampler.generator)
        print(f"resuming {run['name']} from {resume} (step {progress.step})", flush=True)
    metrics = MetricsLog(work_dir / "metrics.csv", progress.step)
    step_fn = torch.compile(model) if (t.get("compile") and device == "cuda") else model
    wb = start_wandb(run, chash)

    tokens_per_step = t["batch_size"] * block * t["grad_accum"]
    # running train-loss sum since the last eval; part of the checkpoint so a
    # resumed run logs the same averages as an uninterrupted one
    loss_sum = torch.tensor(progress.extra.get("loss_sum", 0.0), dtype=torch.float64, device=device)
    loss_steps = progress.extra.get("loss_steps", 0)
    started = time.perf_counter() - progress.elapsed_s
    bar = tqdm(total=t["max_steps"], initial=progress.step, desc=run["name"], unit="step",
               mininterval=5.0, dynamic_ncols=True)
    model.train()
    while progress.step < t["max_steps"]:
        lr = lr_at(progress.step, t)
        for group in opt.param_groups:
            group["lr"] = lr
        for _ in range(t["grad_accum"]):
            x, y = sampler.next()
            with autocast():
                _, loss = step_fn(x, y)
            (loss / t["grad_accum"]).backward()
            loss_sum += loss.detach() / t["grad_accum"]  # stays on device: no host sync
        if t["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        progress.step += 1
        progress.tokens += tokens_per_step
        loss_steps += 1
        bar.update(1)

        last = progress.step == t["max_steps"]
        if progress.step % t["eval_every"] == 0 or last:
            train_loss = loss_sum.item() / loss_steps  # the one host sync per interval
            if not math.isfinite(train_loss):
                raise TrainingDiverged(
                    f"{run['name']}: training loss is {train_loss} at step {progress.step} "
                    f"(lr {lr:.3g}); the last good checkpoint is kept in {ckpt_root}"
                )
            loss_sum.zero_()
            loss_steps = 0
            val_loss, cos = evaluate(model, val_windows[: t["eval_windows"]], t["batch_size"], device, autocast)
            progress.best_val_loss = min(progress.best_val_loss, val_loss)
            progress.elapsed_s = time.perf_counter() - started
            row = dict(step=progress.step, tokens=progress.tokens, lr=lr, train_loss=train_loss,
                       val_loss=val_loss, val_ppl=math.exp(val_loss), cos_target=cos,
                       elapsed_s=progress.elapsed_s)
            metrics.append(row)
            bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
            if wb is not None:
                wb.log(row, step=progress.step)
        if t["snapshot_every"] and progress.step % t["snapshot_every"] == 0:
            save_tensors(work_dir / "snapshots" / f"step_{progress.step:08d}.safetensors",
                         model.state_dict())
        if t["checkpoint_every"] and progress.step % t["checkpoint_every"] == 0 and not last:
            progress.elapsed_s = time.perf_counter() - started
            progress.extra = {"loss_sum": loss_sum.item(), "loss_steps": loss_steps}
            weights_finite = torch.stack([p.isfinite().all() for p in model.parameters()]).all().item()
            if not (weights_finite and math.isfinite(progress.extra["loss_sum"])):
                # never checkpoint diverged weights: the previous checkpoint stays the latest
                raise TrainingDiverged(
                    f"{run['name']}: weights or training loss not finite at step {progress.step} "
                    f"(lr {lr:.3g}); the last good checkpoint is kept in {ckpt_root}"
                )
            save_checkpoint(ckpt_root, model, opt, sampler.generator, progress, chash)
    bar.close()

    # final evaluation on the whole (or eval_tokens-capped) validation split
    final_val, final_cos = evaluate(model, val_windows, t["batch_size"], device, autocast)
    if not math.isfinite(final_val):
        raise TrainingDiverged(f"{run['name']}: final validation loss is {final_val}; no outputs written")
    targets = val_windows[:, 1:]
    summary = dict(
        name=run["name"], seed=run["seed"], steps=progress.step, tokens_seen=progress.tokens,
        final_val_loss=final_val, final_val_ppl=math.exp(final_val),
        best_val_ppl=math.exp(min(progress.best_val_loss, final_val)), final_cos_target=final_cos,
        unigram_val_ppl=unigram_perplexity(train_tokens, targets, meta["vocab_size"]),
        val_tokens_evaluated=int(targets.size), wall_s=time.perf_counter() - started,
        params=model.num_params(), embedding_params=model.embedding_params(),
        device=device, threads=threads, config_hash=chash,
    )
    if wb is not None:
        wb.summary.update(summary)
        wb.finish()

    out_dir.mkdir(parents=True, exist_ok=True)
    if (work_dir / "snapshots").is_dir():
        shutil.rmtree(out_dir / "snapshots", ignore_errors=True)
        shutil.copytree(work_dir / "snapshots", out_dir / "snapshots")
    with atomic_path(out_dir / "metrics.csv") as tmp:
        shutil.copyfile(work_dir / "metrics.csv", tmp)
    write_json(out_dir / "config.json", dict(run, model=model.config.to_dict()))
    write_json(out_dir / "summary.json", summary)
    save_tensors(out_dir / "model.safetensors", model.state_dict())
    shutil.rmtree(work_dir, ignore_errors=True)
    return summary


def load_model(model_path, config_path, device: str = "cpu") -> GPT:
    """A trained model from its safetensors weights and config.json; refuses mismatched tensors."""
    cfg = read_json(config_path)
    model = GPT(GPTConfig.from_dict(cfg["model"]))
    weights = load_tensors(model_path)
    check_state_dict(weights, model.state_dict(), model_path)
    model.load_state_dict(weights)
    return model.to(device)
