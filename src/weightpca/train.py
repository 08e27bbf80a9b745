"""The one training loop: baseline D, the A/B/C variants and every later stage.

Read top to bottom: build the model (optionally initialised from files),
resume from the last checkpoint if one matches this configuration, then

    for step in steps:   lr schedule -> grad-accumulated forward/backward ->
                         clip -> AdamW step -> (log / eval / snapshot / checkpoint)

and finally evaluate on the validation split and write the artifacts
atomically. Under ``torchrun`` (``WORLD_SIZE`` > 1) the same loop runs as
DistributedDataParallel: every rank draws the same global batch offsets and
trains on its slice, so ``n`` ranks at ``batch_size`` b step like one process
at ``n·b``; rank 0 alone writes files. A run is a dict of plain values (see
``config/config.yaml``):

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import lowrank
from .checkpoint import Progress, latest_checkpoint, load_checkpoint, save_checkpoint
from .io import atomic_path, check_state_dict, load_tensors, read_json, save_tensors, write_json
from .model import GPT, GPTConfig, padded_vocab
from .tokens import BatchSampler, eval_windows, open_tokens, unigram_perplexity

METRIC_FIELDS = ["step", "tokens", "lr", "train_loss", "val_loss", "val_ppl", "cos_target", "lowrank_value",
                 "elapsed_s"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def resolve_device(requested: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; an explicit CUDA request without one is an error."""
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


def optimizer_step(forward, model, opt, sampler, t: dict, autocast, no_sync=None) -> torch.Tensor:
    """One AdamW step over ``t['grad_accum']`` micro-batches; returns the mean loss on the device.

    ``forward(x, y) -> (logits, loss)`` is the (possibly compiled, possibly
    DDP-wrapped) model; ``no_sync`` is DDP's context manager that skips the
    gradient all-reduce on all but the last micro-batch. A low-rank
    regulariser (``t['lowrank_reg']``, see weightpca.lowrank) depends on the
    weights alone, so its gradient is added once per step, before the
    micro-batches (under DDP every rank adds the same, which averaging keeps).
    Nothing here reads a value back to the host, so the GPU never waits for Python.
    """
    if lowrank.active(t.get("lowrank_reg")):
        lowrank.penalty(model, t["lowrank_reg"]).backward()
    mean_loss = torch.zeros((), device=next(model.parameters()).device)
    for micro in range(t["grad_accum"]):
        x, y = sampler.next()
        last_micro = micro == t["grad_accum"] - 1
        with contextlib.nullcontext() if (last_micro or no_sync is None) else no_sync():
            with autocast():
                _, loss = forward(x, y)
            (loss / t["grad_accum"]).backward()
        mean_loss += loss.detach() / t["grad_accum"]
    if t["grad_clip"] > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    return mean_loss


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) for a plain process."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def setup_precision(device: str, t: dict):
    """TF32 matmuls on CUDA; returns the autocast context factory (bf16 on CUDA unless dtype float32)."""
    if not device.startswith("cuda"):
        return contextlib.nullcontext
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if t.get("dtype", "auto") == "float32":
        return contextlib.nullcontext
    return lambda: torch.autocast("cuda", dtype=torch.bfloat16)


def training_forward(model: GPT, t: dict, device: str, world: int = 1, local_rank: int = 0):
    """(forward, no_sync) for :func:`optimizer_step`: the model, DDP-wrapped across ranks and
    compiled on CUDA when ``t['compile']`` (CPU runs stay eager: compiling costs more than it saves
    at laptop scale). ``no_sync`` is None without DDP."""
    forward, no_sync = model, None
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.startswith("cuda") else None)
        forward, no_sync = ddp, ddp.no_sync
    if t.get("compile") and device.startswith("cuda"):
        from torch._inductor import config as inductor_config

        # tune the generated kernels' launch parameters at compile time (+1.3 % for GPT-2 small, H100)
        inductor_config.coordinate_descent_tuning = True
        forward = torch.compile(forward, mode=t.get("compile_mode", "default"))
    return forward, no_sync


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


@torch.no_grad()
def lowrank_value(model: GPT, t: dict):
    """The regulariser's statistic (mean over its matrices, before λ) for metrics.csv; '' without one."""
    reg = t.get("lowrank_reg")
    return float(lowrank.mean_statistic(model, reg["kind"], reg["targets"])) if reg else ""


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
    rank, world, local_rank = distributed_env()
    if world > 1:
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    is_main = rank == 0  # the one process that writes files
    torch.set_num_threads(threads)
    autocast = setup_precision(device, t)

    meta = read_json(data_dir / "meta.json")
    train_tokens = open_tokens(data_dir / "train.bin", meta)
    val_tokens = open_tokens(data_dir / "val.bin", meta)
    block = run["model"]["block_size"]
    val_windows = eval_windows(val_tokens, block, t["eval_tokens"])

    model = build_model(run, meta["vocab_size"]).to(device)
    opt = make_optimizer(model, t, device)
    sampler = BatchSampler(train_tokens, t["batch_size"], block, run["seed"], device, rank, world)
    chash = config_hash(run)

    ckpt_root = work_dir / "ckpt"
    progress = Progress()
    resume = latest_checkpoint(ckpt_root, chash)
    if resume is None and is_main:
        shutil.rmtree(work_dir, ignore_errors=True)  # stale state of other settings
        work_dir.mkdir(parents=True)
    if resume is not None:
        progress = load_checkpoint(resume, model, opt, sampler.generator)
        print(f"resuming {run['name']} from {resume} (step {progress.step})", flush=True)
    if world > 1:
        torch.distributed.barrier()  # work_dir exists before any rank goes on
    metrics = MetricsLog(work_dir / "metrics.csv", progress.step) if is_main else None
    forward, no_sync = training_forward(model, t, device, world, local_rank)
    wb = start_wandb(run, chash) if is_main else None

    tokens_per_step = t["batch_size"] * block * t["grad_accum"] * world
    # running train-loss sum since the last eval; part of the checkpoint so a
    # resumed run logs the same averages as an uninterrupted one
    loss_sum = torch.tensor(progress.extra.get("loss_sum", 0.0), dtype=torch.float64, device=device)
    loss_steps = progress.extra.get("loss_steps", 0)
    started = time.perf_counter() - progress.elapsed_s
    bar = tqdm(total=t["max_steps"], initial=progress.step, desc=run["name"], unit="step",
               mininterval=5.0, dynamic_ncols=True, disable=not is_main)
    model.train()
    while progress.step < t["max_steps"]:
        lr = lr_at(progress.step, t)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum += optimizer_step(forward, model, opt, sampler, t, autocast, no_sync)
        progress.step += 1
        progress.tokens += tokens_per_step
        loss_steps += 1
        bar.update(1)

        last = progress.step == t["max_steps"]
        if progress.step % t["eval_every"] == 0 or last:
            if world > 1:
                torch.distributed.all_reduce(loss_sum)
                loss_sum /= world
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
                       lowrank_value=lowrank_value(model, t), elapsed_s=progress.elapsed_s)
            if is_main:
                metrics.append(row)
            bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
            if wb is not None:
                wb.log(row, step=progress.step)
        if is_main and t["snapshot_every"] and progress.step % t["snapshot_every"] == 0:
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
            if is_main:
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
        final_lowrank_value=lowrank_value(model, t),
        unigram_val_ppl=unigram_perplexity(train_tokens, targets, meta["vocab_size"]),
        val_tokens_evaluated=int(targets.size), wall_s=time.perf_counter() - started,
        params=model.num_params(), embedding_params=model.embedding_params(),
        device=device, threads=threads, world_size=world, config_hash=chash,
    )
    if wb is not None:
        wb.summary.update(summary)
        wb.finish()
    if world > 1:
        torch.distributed.barrier()  # every rank is done with work_dir before rank 0 removes it
        torch.distributed.destroy_process_group()
    if not is_main:
        return summary

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


def _file_or_none(stream):
    """``stream`` if a child process can write to it (a real file, e.g. the job's log), else None."""
    try:
        stream.fileno()
        return stream
    except (AttributeError, OSError, ValueError):
        return None


def train_distributed(run: dict, data_dir, out_dir, work_dir, nproc: int, device: str = "auto",
                      threads: int = 1) -> dict:
    """:func:`train` as ``nproc`` DDP processes under torchrun (one per GPU; gloo on CPU).

    The run dict travels as a JSON file next to ``out_dir``; torchrun's
    ``--standalone`` picks a free rendezvous port, so several such jobs can
    share a node. Returns rank 0's summary.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=out_dir.parent, delete=False) as f:
        json.dump(run, f)
    try:
        subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
             "-m", "weightpca.train", f.name, str(data_dir), str(out_dir), str(work_dir),
             f"--device={device}", f"--threads={threads}"],
            check=True, stdout=_file_or_none(sys.stdout), stderr=_file_or_none(sys.stderr),
        )
    finally:
        os.unlink(f.name)
    return read_json(out_dir / "summary.json")


def main(argv=None) -> None:
    """``python -m weightpca.train RUN_JSON DATA_DIR OUT_DIR WORK_DIR``: the entry point torchrun launches."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("run_json", help="the run dict (as the workflow's train rule builds it) as JSON")
    parser.add_argument("data_dir")
    parser.add_argument("out_dir")
    parser.add_argument("work_dir")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    train(read_json(args.run_json), args.data_dir, args.out_dir, args.work_dir, args.device, args.threads)


def load_model(model_path, config_path, device: str = "cpu") -> GPT:
    """A trained model from its safetensors weights and config.json; refuses mismatched tensors."""
    cfg = read_json(config_path)
    model = GPT(GPTConfig.from_dict(cfg["model"]))
    weights = load_tensors(model_path)
    check_state_dict(weights, model.state_dict(), model_path)
    model.load_state_dict(weights)
    return model.to(device)


if __name__ == "__main__":
    main()
