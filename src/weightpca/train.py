"""The one training loop: baseline D, the A/B/C variants and every later stage.

Read top to bottom: build the model (optionally initialised from files),
resume from the last checkpoint if one matches this configuration, then

    for step in steps:   lr schedule -> grad-accumulated forward/backward ->
                         clip -> AdamW step -> (log / eval / snapshot / checkpoint)

(on a GPU the middle three can be one replayed CUDA graph, :class:`GraphedStep`)

and finally evaluate on the validation split and write the artifacts
atomically. :func:`train` is those four parts in order: :func:`setup`,
:func:`resume`, :func:`run_steps`, :func:`finish`. Under ``torchrun``
(``WORLD_SIZE`` > 1) the same loop runs as DistributedDataParallel: every
rank draws the same global batch offsets and trains on its slice, so ``n``
ranks at ``batch_size`` b step like one process at ``n·b``; rank 0 alone
writes files. A run is a dict of plain values (see
``config/config.yaml`` and :mod:`weightpca.runs`):

    run = {"name", "seed", "model": {...GPTConfig}, "train": {...TrainSettings},
           "init": {...}, "freeze": {...}, "wandb": {...}}

The model is our GPT built from ``run['model']`` (:func:`build_model`), or
any ``nn.Module`` handed to :func:`train` that follows the same contract:
``model(x [B, T], y [B, T]) -> (anything, mean loss)`` for training and
``model(x) -> (logits [B, T, V], anything)`` for evaluation (a compressed
Hugging Face model wrapped by ``weightpca.adapters.CausalLM``, for
recovery); ``run['model']['block_size']`` is then the training window.
Inputs and outputs are explicit paths (:class:`TokenFiles`,
:class:`TrainOutputs`), as the workflow's rules declare them. In-progress
state lives in ``work_dir`` (checkpoints, metrics so far) and is removed once
the outputs are in place.
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
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import lowrank
from .checkpoint import Progress, latest_checkpoint, load_checkpoint, save_checkpoint
from .evaluate import evaluate, resolve_device, uniform_attention
from .flat_adamw import FlatAdamW
from .io import atomic_path, check_state_dict, load_tensors, read_json, save_tensors, write_json
from .model import GPT, GPTConfig, padded_vocab
from .tokens import BatchSampler, eval_windows, open_tokens, unigram_perplexity

METRIC_FIELDS = [
    "step",
    "tokens",
    "lr",
    "train_loss",
    "val_loss",
    "val_ppl",
    "cos_target",
    "lowrank_value",
    "elapsed_s",
]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainSettings:
    """One run's training settings: the config's ``train`` block (every key in config/schema.yaml)."""

    max_steps: int
    batch_size: int
    grad_accum: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip: float
    eval_every: int
    eval_windows: int
    eval_tokens: int | None
    checkpoint_every: int
    snapshot_every: int
    compile: bool = False
    compile_mode: str = "default"
    cuda_graph: bool = False
    flat_adamw: bool = False
    dtype: str = "auto"
    lowrank_reg: dict | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSettings":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"train settings: unknown keys {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class TokenFiles:
    """A tokenized corpus: meta.json, train.bin and val.bin (weightpca.tokens)."""

    meta: Path
    train: Path
    val: Path


@dataclass(frozen=True)
class TrainOutputs:
    """Where a finished run's artifacts go; ``snapshots`` is a folder, None for runs without snapshots."""

    model: Path
    config: Path
    metrics: Path
    summary: Path
    snapshots: Path | None = None


def lr_at(step: int, t: TrainSettings) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (t.lr - t.min_lr)


def uses_flat_adamw(t: TrainSettings, device: str, world: int = 1) -> bool:
    """Whether training keeps flat fp32 masters with bf16 weight copies (weightpca.flat_adamw):
    ``t.flat_adamw``, compiled on CUDA in bf16, one process, no low-rank regulariser."""
    return (
        t.flat_adamw
        and t.compile
        and device.startswith("cuda")
        and t.dtype != "float32"
        and world == 1
        and not lowrank.active(t.lowrank_reg)
    )


def make_optimizer(model: torch.nn.Module, t: TrainSettings, world: int = 1) -> torch.optim.Optimizer:
    """AdamW on the trainable parameters; matrices (dim >= 2) decay, vectors (LayerNorm, biases) do not.

    :class:`FlatAdamW` where :func:`uses_flat_adamw` (it clips the gradients itself), else torch's
    fused AdamW (one kernel per group of tensors, on CPU too)."""
    device = next(model.parameters()).device.type
    if uses_flat_adamw(t, device, world):
        return FlatAdamW(model, t.lr, (t.beta1, t.beta2), t.weight_decay, t.grad_clip, t.grad_accum)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=True)


def clip_and_step(opt: torch.optim.Optimizer, max_norm: float) -> None:
    """AdamW step on the gradients clipped to total 2-norm ``max_norm`` (0: no clipping).

    :class:`FlatAdamW` clips with its own ``max_norm`` (``t.grad_clip``, as made by :func:`make_optimizer`).

    The rule is ``clip_grad_norm_``'s, g <- g · min(1, max_norm / (‖g‖ + 1e-6)),
    but the factor reaches the fused kernel as its ``grad_scale`` (the
    attribute GradScaler sets; the kernel divides every gradient by it), so
    the gradients are not rewritten in a pass of their own before the update.
    """
    if max_norm > 0 and not isinstance(opt, FlatAdamW):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        opt.grad_scale = torch.clamp_min((norm + 1e-6) / max_norm, 1.0)
    opt.step()


def optimizer_step(forward, model, opt, sampler, t: TrainSettings, autocast, no_sync=None) -> torch.Tensor:
    """One AdamW step over ``t.grad_accum`` micro-batches; returns the mean loss on the device.

    ``forward(x, y) -> (logits, loss)`` is the (possibly compiled, possibly
    DDP-wrapped) model; ``sampler.next()`` gives a micro-batch ``(x, y)``;
    ``no_sync`` is DDP's context manager that skips the gradient all-reduce
    on all but the last micro-batch. A low-rank regulariser
    (``t.lowrank_reg``, see weightpca.lowrank) depends on the weights alone,
    so its gradient is added once per step, before the micro-batches (under
    DDP every rank adds the same, which averaging keeps). Nothing here reads
    a value back to the host, so the GPU never waits for Python.
    """
    if lowrank.active(t.lowrank_reg):
        lowrank.penalty(model, t.lowrank_reg).backward()
    mean_loss = torch.zeros((), device=next(model.parameters()).device)
    for micro in range(t.grad_accum):
        x, y = sampler.next()
        last_micro = micro == t.grad_accum - 1
        with contextlib.nullcontext() if (last_micro or no_sync is None) else no_sync():
            with autocast():
                _, loss = forward(x, y)
            (loss / t.grad_accum).backward()
        mean_loss += loss.detach() / t.grad_accum
    clip_and_step(opt, t.grad_clip)
    opt.zero_grad(set_to_none=True)
    return mean_loss


class _StaticBatches:
    """The sampler's micro-batches copied into fixed device buffers [grad_accum, B, T], as a graph needs."""

    def __init__(self, sampler: BatchSampler, grad_accum: int):
        self.sampler = sampler
        shape = (grad_accum, sampler.batch_size, sampler.block_size)
        self.x = torch.zeros(shape, dtype=torch.long, device=sampler.device)
        self.y = torch.zeros_like(self.x)
        self.micro = 0

    def refill(self) -> None:
        for m in range(len(self.x)):
            x, y = self.sampler.next()
            self.x[m].copy_(x, non_blocking=True)
            self.y[m].copy_(y, non_blocking=True)
        self.micro = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        m, self.micro = self.micro, self.micro + 1
        return self.x[m], self.y[m]


class GraphedStep:
    """:func:`optimizer_step` recorded once as a CUDA graph and replayed for every later step.

    Even compiled, a GPT-2 small step is ~540 kernels launched one by one
    from Python; a replay launches the recorded sequence at once and the
    GPU stops waiting between them (H100, B 12, T 1024: see docs/gpu.md).
    What a graph reads must live at fixed addresses: each step's
    micro-batches are copied into static buffers, the learning rate is one
    device tensor shared by every parameter group (filled before each
    replay) and the optimizer is ``capturable``. The first ``warmup`` calls
    run uncaptured on a side stream: they compile the model, create the
    optimizer state and settle the allocator, as capture requires. Every
    call, warm-up or replay, is one real optimizer step.

    Call ``step(lr)``; it returns the step's mean loss on the device, valid
    until the next call.
    """

    def __init__(self, forward, model, opt, sampler: BatchSampler, t: TrainSettings, autocast, warmup: int = 3):
        self.model, self.opt, self.t, self.autocast = model, opt, t, autocast
        self.forward, self.warmup, self.calls = forward, warmup, 0
        self.batches = _StaticBatches(sampler, t.grad_accum)
        self.lr = torch.zeros((), device=sampler.device)
        for group in opt.param_groups:
            group["lr"], group["capturable"] = self.lr, True
        self.graph, self.loss = None, None

    def _step(self) -> torch.Tensor:
        return optimizer_step(self.forward, self.model, self.opt, self.batches, self.t, self.autocast)

    def __call__(self, lr: float) -> torch.Tensor:
        self.batches.refill()
        self.lr.fill_(lr)
        self.calls += 1
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self._step()
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records without running
                self.loss = self._step()
        self.graph.replay()
        return self.loss


def training_step(forward, model, opt, sampler, t: TrainSettings, autocast, device: str, no_sync=None):
    """The callable the loop runs once per optimizer step: ``step(lr) -> mean loss`` (on the device).

    A :class:`GraphedStep` when ``t.cuda_graph`` and it can be captured (one
    CUDA process, no low-rank regulariser: DDP's all-reduce and the
    regulariser's SVD are not captured), else :func:`optimizer_step` with
    the learning rate set in every parameter group.
    """
    if t.cuda_graph and device.startswith("cuda"):
        if no_sync is None and not lowrank.active(t.lowrank_reg):
            return GraphedStep(forward, model, opt, sampler, t, autocast)
        print(
            "train.cuda_graph: not captured (data-parallel or low-rank regulariser); steps run uncaptured", flush=True
        )

    def step(lr: float) -> torch.Tensor:
        for group in opt.param_groups:
            group["lr"] = lr
        return optimizer_step(forward, model, opt, sampler, t, autocast, no_sync)

    return step


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) for a plain process."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def setup_precision(device: str, t: TrainSettings):
    """TF32 matmuls on CUDA; returns the autocast context factory (bf16 on CUDA unless dtype float32)."""
    if not device.startswith("cuda"):
        return contextlib.nullcontext
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if t.dtype == "float32":
        return contextlib.nullcontext
    return lambda: torch.autocast("cuda", dtype=torch.bfloat16)


def training_forward(model: torch.nn.Module, opt, t: TrainSettings, device: str, world: int = 1, local_rank: int = 0):
    """(forward, no_sync) for :func:`optimizer_step`: the model, DDP-wrapped across ranks and
    compiled on CUDA when ``t.compile`` (CPU runs stay eager: compiling costs more than it saves
    at laptop scale); with a :class:`FlatAdamW` ``opt``, the model run on its flat weights and bf16
    copies. ``no_sync`` is None without DDP."""
    forward, no_sync = model, None
    if isinstance(opt, FlatAdamW):
        opt.refresh_copies()  # the weights may have been loaded since the optimizer was made
        forward = opt.forward_fn(model)
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.startswith("cuda") else None
        )
        forward, no_sync = ddp, ddp.no_sync
    if t.compile and device.startswith("cuda"):
        from torch._inductor import config as inductor_config

        # tune the generated kernels' launch parameters at compile time (+1.3 % for GPT-2 small, H100)
        inductor_config.coordinate_descent_tuning = True
        forward = torch.compile(forward, mode=t.compile_mode)
    if isinstance(opt, FlatAdamW):
        flat_forward = forward
        forward = lambda x, y: flat_forward(opt.leaves(), x, y)  # noqa: E731
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
def lowrank_value(model: GPT, t: TrainSettings):
    """The regulariser's statistic (mean over its matrices, before λ) for metrics.csv; '' without one."""
    reg = t.lowrank_reg
    return float(lowrank.mean_statistic(model, reg["kind"], reg["targets"])) if reg else ""


def config_hash(run: dict) -> str:
    """Identity of a run's mathematics: settings plus the content of its init files."""
    h = hashlib.sha256(
        json.dumps({k: run.get(k) for k in ("seed", "model", "train", "init", "freeze")}, sort_keys=True).encode()
    )
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
        mode=cfg["mode"],
        project=cfg["project"],
        entity=cfg.get("entity"),
        group=run.get("group"),
        name=run["name"],
        tags=tags,
        dir=cfg["dir"],
        id=f"{run['name'].replace('/', '-')}-{chash}",
        resume="allow",
        config=run,
    )


@dataclass
class Session:
    """What :func:`setup` builds for one run; the other parts read it."""

    run: dict
    t: TrainSettings
    device: str
    threads: int
    rank: int
    world: int
    local_rank: int
    autocast: object
    meta: dict
    train_tokens: np.ndarray
    val_windows: np.ndarray
    model: torch.nn.Module  # our GPT, or any model with its forward contract (module docstring)
    opt: torch.optim.Optimizer  # torch's AdamW or FlatAdamW (make_optimizer)
    sampler: BatchSampler
    chash: str
    work_dir: Path

    @property
    def is_main(self) -> bool:
        """The one process that writes files."""
        return self.rank == 0

    @property
    def tokens_per_step(self) -> int:
        return self.t.batch_size * self.run["model"]["block_size"] * self.t.grad_accum * self.world

    @property
    def ckpt_root(self) -> Path:
        return self.work_dir / "ckpt"


def setup(
    run: dict, data: TokenFiles, work_dir, device: str = "auto", threads: int = 1, model: torch.nn.Module | None = None
) -> Session:
    """Device, process group, data, seeded model (``model``, else :func:`build_model`), optimizer and
    batch sampler of one run."""
    t = TrainSettings.from_dict(run["train"])
    device = resolve_device(device)
    rank, world, local_rank = distributed_env()
    if world > 1:
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    torch.set_num_threads(threads)
    autocast = setup_precision(device, t)

    meta = read_json(data.meta)
    train_tokens = open_tokens(data.train, meta)
    block = run["model"]["block_size"]
    val_windows = eval_windows(open_tokens(data.val, meta), block, t.eval_tokens)
    torch.manual_seed(run["seed"])
    model = (build_model(run, meta["vocab_size"]) if model is None else model).to(device)
    opt = make_optimizer(model, t, world)
    sampler = BatchSampler(train_tokens, t.batch_size, block, run["seed"], device, rank, world)
    return Session(
        run,
        t,
        device,
        threads,
        rank,
        world,
        local_rank,
        autocast,
        meta,
        train_tokens,
        val_windows,
        model,
        opt,
        sampler,
        config_hash(run),
        Path(work_dir),
    )


def resume(s: Session) -> Progress:
    """Progress of the last checkpoint written under these settings, or a fresh start in an empty work_dir."""
    ckpt = latest_checkpoint(s.ckpt_root, s.chash)
    progress = Progress()
    if ckpt is None and s.is_main:
        shutil.rmtree(s.work_dir, ignore_errors=True)  # stale state of other settings
        s.work_dir.mkdir(parents=True)
    if ckpt is not None:
        progress = load_checkpoint(ckpt, s.model, s.opt, s.sampler.generator)
        print(f"resuming {s.run['name']} from {ckpt} (step {progress.step})", flush=True)
    if s.world > 1:
        torch.distributed.barrier()  # work_dir exists before any rank goes on
    return progress


def run_steps(s: Session, progress: Progress, wb=None) -> None:
    """Train from ``progress.step`` to ``max_steps``: log and evaluate every ``eval_every`` steps,
    snapshot every ``snapshot_every``, checkpoint every ``checkpoint_every``."""
    t, name = s.t, s.run["name"]
    metrics = MetricsLog(s.work_dir / "metrics.csv", progress.step) if s.is_main else None
    forward, no_sync = training_forward(s.model, s.opt, t, s.device, s.world, s.local_rank)
    step = training_step(forward, s.model, s.opt, s.sampler, t, s.autocast, s.device, no_sync)
    # running train-loss sum since the last eval; checkpointed so that a
    # resumed run logs the same averages as an uninterrupted one
    loss_sum = torch.tensor(progress.loss_sum, dtype=torch.float64, device=s.device)
    started = time.perf_counter() - progress.elapsed_s
    bar = tqdm(
        total=t.max_steps,
        initial=progress.step,
        desc=name,
        unit="step",
        mininterval=5.0,
        dynamic_ncols=True,
        disable=not s.is_main,
    )
    s.model.train()
    while progress.step < t.max_steps:
        lr = lr_at(progress.step, t)
        loss_sum += step(lr)
        progress.step += 1
        bar.update(1)

        last = progress.step == t.max_steps
        if progress.step % t.eval_every == 0 or last:
            if s.world > 1:
                torch.distributed.all_reduce(loss_sum)
                loss_sum /= s.world
            steps_since_eval = progress.step - (progress.step - 1) // t.eval_every * t.eval_every
            train_loss = loss_sum.item() / steps_since_eval  # the one host sync per interval
            if not math.isfinite(train_loss):
                raise TrainingDiverged(
                    f"{name}: training loss is {train_loss} at step {progress.step} "
                    f"(lr {lr:.3g}); the last good checkpoint is kept in {s.ckpt_root}"
                )
            loss_sum.zero_()
            val_loss, cos = evaluate(s.model, s.val_windows[: t.eval_windows], t.batch_size, s.device, s.autocast)
            progress.best_val_loss = min(progress.best_val_loss, val_loss)
            progress.elapsed_s = time.perf_counter() - started
            row = dict(
                step=progress.step,
                tokens=progress.step * s.tokens_per_step,
                lr=lr,
                train_loss=train_loss,
                val_loss=val_loss,
                val_ppl=math.exp(val_loss),
                cos_target=cos,
                lowrank_value=lowrank_value(s.model, t),
                elapsed_s=progress.elapsed_s,
            )
            if s.is_main:
                metrics.append(row)
            bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
            if wb is not None:
                wb.log(row, step=progress.step)
        if s.is_main and t.snapshot_every and progress.step % t.snapshot_every == 0:
            save_tensors(s.work_dir / "snapshots" / f"step_{progress.step:08d}.safetensors", s.model.state_dict())
        if t.checkpoint_every and progress.step % t.checkpoint_every == 0 and not last:
            progress.elapsed_s = time.perf_counter() - started
            progress.loss_sum = loss_sum.item()
            weights_finite = torch.stack([p.isfinite().all() for p in s.model.parameters()]).all().item()
            if not (weights_finite and math.isfinite(progress.loss_sum)):
                # never checkpoint diverged weights: the previous checkpoint stays the latest
                raise TrainingDiverged(
                    f"{name}: weights or training loss not finite at step {progress.step} "
                    f"(lr {lr:.3g}); the last good checkpoint is kept in {s.ckpt_root}"
                )
            if s.is_main:
                save_checkpoint(s.ckpt_root, s.model, s.opt, s.sampler.generator, progress, s.chash)
    bar.close()
    progress.elapsed_s = time.perf_counter() - started


def finish(s: Session, progress: Progress, outputs: TrainOutputs, wb=None) -> dict:
    """Final evaluation on the (eval_tokens-capped) validation split; rank 0 writes ``outputs`` atomically."""
    t, started = s.t, time.perf_counter() - progress.elapsed_s
    final_val, final_cos = evaluate(s.model, s.val_windows, t.batch_size, s.device, s.autocast)
    if not math.isfinite(final_val):
        raise TrainingDiverged(f"{s.run['name']}: final validation loss is {final_val}; no outputs written")
    ablated_val = float("nan")
    if isinstance(s.model, GPT):
        with uniform_attention(s.model):  # the same evaluation with attention ablated: does the model use it?
            ablated_val, _ = evaluate(s.model, s.val_windows, t.batch_size, s.device, s.autocast)
    targets = s.val_windows[:, 1:]
    summary = dict(
        name=s.run["name"],
        seed=s.run["seed"],
        steps=progress.step,
        tokens_seen=progress.step * s.tokens_per_step,
        final_val_loss=final_val,
        final_val_ppl=math.exp(final_val),
        best_val_ppl=math.exp(min(progress.best_val_loss, final_val)),
        final_cos_target=final_cos,
        attention_ablated_val_ppl=math.exp(ablated_val),
        final_lowrank_value=lowrank_value(s.model, t),
        unigram_val_ppl=unigram_perplexity(s.train_tokens, targets, s.meta["vocab_size"]),
        val_tokens_evaluated=int(targets.size),
        wall_s=time.perf_counter() - started,
        params=sum(p.numel() for p in s.model.parameters()),
        embedding_params=s.model.embedding_params() if isinstance(s.model, GPT) else None,
        device=s.device,
        threads=s.threads,
        world_size=s.world,
        config_hash=s.chash,
    )
    if wb is not None:
        wb.summary.update(summary)
        wb.finish()
    if s.world > 1:
        torch.distributed.barrier()  # every rank is done with work_dir before rank 0 removes it
        torch.distributed.destroy_process_group()
    if not s.is_main:
        return summary

    snapshots = s.work_dir / "snapshots"
    if outputs.snapshots is not None and snapshots.is_dir():
        shutil.rmtree(outputs.snapshots, ignore_errors=True)
        shutil.copytree(snapshots, outputs.snapshots)
    with atomic_path(outputs.metrics) as tmp:
        shutil.copyfile(s.work_dir / "metrics.csv", tmp)
    model_config = s.model.config.to_dict() if isinstance(s.model, GPT) else s.run["model"]
    write_json(outputs.config, dict(s.run, model=model_config))
    write_json(outputs.summary, summary)
    save_tensors(outputs.model, s.model.state_dict())
    shutil.rmtree(s.work_dir, ignore_errors=True)
    return summary


def train(
    run: dict,
    data: TokenFiles,
    outputs: TrainOutputs,
    work_dir,
    device: str = "auto",
    threads: int = 1,
    model: torch.nn.Module | None = None,
) -> dict:
    """Train one run from its last checkpoint (or from scratch) to ``outputs``; returns its summary.

    ``model``: train this module instead of the GPT ``run['model']`` describes (module docstring)."""
    s = setup(run, data, work_dir, device, threads, model)
    progress = resume(s)
    wb = start_wandb(run, s.chash) if s.is_main else None
    run_steps(s, progress, wb)
    return finish(s, progress, outputs, wb)


def _file_or_none(stream):
    """``stream`` if a child process can write to it (a real file, e.g. the job's log), else None."""
    try:
        stream.fileno()
        return stream
    except (AttributeError, OSError, ValueError):
        return None


def _paths(obj) -> dict:
    return {k: None if v is None else str(v) for k, v in asdict(obj).items()}


def train_distributed(
    run: dict, data: TokenFiles, outputs: TrainOutputs, work_dir, nproc: int, device: str = "auto", threads: int = 1
) -> dict:
    """:func:`train` as ``nproc`` DDP processes under torchrun (one per GPU; gloo on CPU).

    The job (run dict and paths) travels as a JSON file next to the work
    folder; torchrun's ``--standalone`` picks a free rendezvous port, so
    several such jobs can share a node. Returns rank 0's summary.
    """
    parent = Path(work_dir).parent
    parent.mkdir(parents=True, exist_ok=True)
    job = {"run": run, "data": _paths(data), "outputs": _paths(outputs), "work_dir": str(work_dir)}
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=parent, delete=False) as f:
        json.dump(job, f)
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={nproc}",
                "-m",
                "weightpca.train",
                f.name,
                f"--device={device}",
                f"--threads={threads}",
            ],
            check=True,
            stdout=_file_or_none(sys.stdout),
            stderr=_file_or_none(sys.stderr),
        )
    finally:
        os.unlink(f.name)
    return read_json(outputs.summary)


def main(argv=None) -> None:
    """``python -m weightpca.train JOB_JSON``: the entry point torchrun launches."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("job_json", help="{run, data, outputs, work_dir} as train_distributed writes it")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    job = read_json(args.job_json)
    outputs = {k: None if v is None else Path(v) for k, v in job["outputs"].items()}
    train(
        job["run"],
        TokenFiles(**{k: Path(v) for k, v in job["data"].items()}),
        TrainOutputs(**outputs),
        job["work_dir"],
        args.device,
        args.threads,
    )


if __name__ == "__main__":
    main()
