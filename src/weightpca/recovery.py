"""Recovery: fine-tune a compressed model back, against the dense original fine-tuned the same way.

A compressed model (an export of ``weightpca.compress``: its factors) is trained on the train split with
the one training loop (``weightpca.train``: checkpoints, resume, seeds, progress, metrics.csv). Its
*control* is the dense original trained with the identical run settings and seed, hence the identical
batches (the batch sampler follows the run's seed alone) and evaluated on the same validation windows:
fine-tuning on the evaluation's domain improves any model, so the recovered model is compared with the
equally fine-tuned dense one, never only with the untouched original.

A recipe (``recovery`` in the config) may add

- ``lora: {r, alpha}``: only LoRA adapters (peft) on the linear modules of the transformer layers are
  trained (the factors' ``basis`` and ``coef`` of a compressed model, the dense matrices of the
  control); merged into them after training, so the export keeps its ranks (Hu et al. 2021);
- ``balance: true``: every factored matrix's rank components rescaled to equal norms in its two
  factors before training (``compress.balance_factors``; the model unchanged, its training not);
- ``distill: {weight, temperature, teacher}``: the loss is ``(1 − w) CE + w T² KL(p_teacher ‖ p_student)``
  at temperature T (Hinton et al. 2015, "Distilling the knowledge in a neural network"). ``teacher:
  original`` (default) distils from the dense original, the control too; ``teacher: control`` from the
  control after its training (the dense model fine-tuned on the same batches, trained then by
  cross-entropy alone): the student learns the domain from the best dense model of the same tokens.

The fraction of the compression gap a recovery closes, in log perplexity,

    closed = (log ppl_before − log ppl_after) / (log ppl_before − log ppl_control_after),

is 1 when the recovered model reaches the equally fine-tuned dense model, 0 when training changed
nothing, negative when it made the model worse.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .model import GPT

RECOVERED = "recovered"  # the subfolder of a recovery run that holds its factored export


class Distilled(nn.Module):
    """A student under the training loop's contract whose loss mixes cross-entropy with the KL divergence
    to a teacher's next-token distribution. The teacher is held outside the module tree: never trained,
    never in the state dict (a checkpoint holds the student alone), left in eval mode."""

    def __init__(self, student: nn.Module, teacher: nn.Module, weight: float, temperature: float = 1.0):
        super().__init__()
        if not 0.0 <= weight <= 1.0 or temperature <= 0:
            raise ValueError(f"distill: weight {weight} must be in [0, 1] and temperature {temperature} > 0")
        self.student = student
        self._teacher = (teacher.eval().requires_grad_(False),)  # a tuple: not registered as a submodule
        self.weight, self.temperature = weight, temperature

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        logits = self.student(x)[0]
        if y is None:
            return logits, None
        flat = logits.float().reshape(-1, logits.size(-1))
        ce = F.cross_entropy(flat, y.reshape(-1))
        with torch.no_grad():
            teacher = self._teacher[0](x)[0].float().reshape(-1, logits.size(-1))
        t = self.temperature
        kl = F.kl_div(
            F.log_softmax(flat / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="batchmean"
        )
        return None, (1 - self.weight) * ce + self.weight * t * t * kl


def control_state(weights, kind: str) -> dict[str, torch.Tensor]:
    """The state dict of a trained control's model.safetensors for its model class: our GPT's as saved, a
    Hugging Face model's without the ``model.`` of the ``adapters.CausalLM`` it trained in."""
    from .io import load_tensors

    state = load_tensors(weights)
    return state if kind == "gpt" else {k.removeprefix("model."): v for k, v in state.items()}


def layer_linears(model: nn.Module, layers_path: str) -> list[str]:
    """Names of every ``nn.Linear`` inside the transformer layers (``layers_path``, an adapter's LAYERS)."""
    return [
        name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith(layers_path + ".")
    ]


def with_lora(model: nn.Module, targets: list[str], r: int, alpha: float, seed: int) -> nn.Module:
    """LoRA adapters (peft) on the modules ``targets``; every other parameter frozen. The adapters' random
    initialisation follows ``seed``."""
    from peft import LoraConfig, inject_adapter_in_model

    if not targets:
        raise ValueError("LoRA: the model has no linear modules in its layers to adapt")
    torch.manual_seed(seed)
    model = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=targets), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Each LoRA-wrapped module replaced by its base module with the adapter merged into its weight."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, m in wrapped:
        m.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, m.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def gap_closed(before: float, after: float, control_after: float) -> float:
    """The fraction of the log-perplexity gap to the equally fine-tuned dense model that training closed."""
    gap = math.log(before) - math.log(control_after)
    return (math.log(before) - math.log(after)) / gap if gap != 0 else float("nan")


def recover(
    run: dict,
    data,
    outputs,
    work_dir,
    dense: dict,
    export=None,
    recipe: dict | None = None,
    device: str = "auto",
    threads: int = 1,
    teacher_weights=None,
) -> dict:
    """Fine-tune one model of a recovery: the compressed export in folder ``export``, or (None) the dense
    original itself, the control. ``dense``: the original (and the teacher of a distilling recipe), our
    GPT's ``{"kind": "gpt", "model", "config"}`` files or a Hugging Face ``{"kind": "hf", "folder"}``; a
    Hugging Face model trains through ``adapters.CausalLM`` (the loop's forward contract). ``data``: token
    files of the model's own tokenizer. ``run``: the training loop's run settings (the same for a point
    and its control: same seed, same batches). Trains with ``weightpca.train.train`` to ``outputs``;
    a compressed model is then saved factored to ``<outputs.summary's folder>/recovered`` (its LoRA
    merged), reloaded and evaluated, which must agree with the trained model to a relative 1e-3.
    ``teacher_weights``: the trained control's model.safetensors, the teacher of a ``distill.teacher:
    control`` recipe (of the same seed).
    Returns the record: perplexity before and after on the run's validation windows, and the reload's."""
    from pathlib import Path

    from . import adapters
    from .compress import DTYPES, RELOAD_TOLERANCE, balance_factors, load_compressed, save_compressed
    from .evaluate import evaluate, resolve_device
    from .io import read_json
    from .tokens import eval_windows, open_tokens
    from .train import TrainSettings, setup_precision, train

    recipe = recipe or {}
    device = resolve_device(device)
    t = TrainSettings.from_dict(run["train"])
    torch.set_num_threads(threads)
    kind = dense.get("kind", "gpt")
    if kind not in ("gpt", "hf"):
        raise ValueError(f"recovery: dense kind {kind!r}, expected gpt or hf")

    def original() -> nn.Module:
        if kind == "gpt":
            return adapters.load("gpt", dense["model"], dense["config"], device).model
        return adapters.load("hf", dense["folder"], device=device).model

    # trained in float32 (autocast as the run says), whatever the export is stored in
    model = original() if export is None else load_compressed(export, device, torch.float32)
    model.requires_grad_(True)  # the loaders return inference models; a recovery trains every parameter
    adapter = adapters.adapter_for(model)
    if run["model"]["block_size"] > adapter.max_len:
        raise ValueError(
            f"{run['name']}: windows of {run['model']['block_size']} tokens exceed the model's context of "
            f"{adapter.max_len}; set surgery.window (a Hugging Face target's recovery windows) to at most that"
        )
    layers = adapter.LAYERS

    def trainable(m: nn.Module) -> nn.Module:
        """The training loop's contract: our GPT has it, a Hugging Face model gets it from CausalLM."""
        return m if isinstance(m, GPT) else adapters.CausalLM(adapters.adapter_for(m))

    meta = read_json(data.meta)
    windows = eval_windows(open_tokens(data.val, meta), run["model"]["block_size"], t.eval_tokens)
    autocast = setup_precision(device, t)

    def ppl(m: nn.Module) -> float:
        return math.exp(evaluate(trainable(m), windows, t.batch_size, device, autocast)[0])

    if recipe.get("balance") and export is not None:
        balance_factors(model)
    before = ppl(model)
    if recipe.get("lora"):
        lora = recipe["lora"]
        model = with_lora(model, layer_linears(model, layers), lora["r"], lora["alpha"], run["seed"])
    trained = trainable(model)
    distill = recipe.get("distill")
    if distill and distill.get("teacher", "original") == "control" and export is None:
        distill = None  # the control is the teacher: it trains by cross-entropy
    if distill:
        teacher = original()
        if distill.get("teacher", "original") == "control":
            if teacher_weights is None:
                raise ValueError(
                    f"{run['name']}: distill.teacher is 'control' but no trained control was given "
                    "(teacher_weights: the control's model.safetensors of this seed)"
                )
            teacher.load_state_dict(control_state(teacher_weights, kind))
        trained = Distilled(trained, trainable(teacher), distill["weight"], distill.get("temperature", 1.0))
    summary = train(run, data, outputs, work_dir, device, threads, model=trained)
    if recipe.get("lora"):
        model = merge_lora(model)
    record = dict(
        name=run["name"],
        seed=run["seed"],
        compressed=export is not None,
        ppl_before=before,
        ppl_after=summary["final_val_ppl"],
        params=sum(p.numel() for p in model.parameters()),
        val_tokens=summary["val_tokens_evaluated"],
        steps=summary["steps"],
        tokens_seen=summary["tokens_seen"],
        lora=recipe.get("lora"),
        distill=distill,
        balance=bool(recipe.get("balance")),
    )
    if export is not None:
        info = read_json(Path(export) / "compress.json")
        folder = Path(outputs.summary).parent / RECOVERED
        record["ppl_merged"] = ppl(model.eval())
        stored = DTYPES[info.get("dtype", "float32")]  # saved in the export's dtype, evaluated in float32
        save_compressed(
            model.to(stored),
            info["modules"],
            folder,
            info["kind"],
            read_json(Path(export) / "config.json"),
            {"dtype": info.get("dtype", "float32")},
        )
        record["ppl_loaded"] = ppl(load_compressed(folder, device, torch.float32))
        agreement, tolerance = abs(record["ppl_loaded"] / record["ppl_merged"] - 1), RELOAD_TOLERANCE[stored]
        if agreement > tolerance:
            raise AssertionError(
                f"{folder}: the reloaded recovered model's perplexity {record['ppl_loaded']} differs from the "
                f"trained model's {record['ppl_merged']} by more than {tolerance:g} (relative, {stored})"
            )
    return record


def recovery_table(points, controls, compress_records):
    """recovery.csv of one target: one row per recovered point and seed, with the dense control of that
    seed (``points``, ``controls``: recovery.json files; ``compress_records``: each point's compress.json,
    for the whole-model fraction it keeps)."""
    from pathlib import Path

    import pandas as pd

    from .io import read_json

    control = {r["seed"]: r for r in map(read_json, controls)}
    kept = {Path(p).parent.name: read_json(p) for p in compress_records}
    rows = []
    for r in map(read_json, points):
        c, k = control[r["seed"]], kept[r["point"]]
        rows.append(
            dict(
                target=r["target"],
                point=r["point"],
                seed=r["seed"],
                removed=k.get("removed"),
                allocation=k.get("allocation"),
                refit=bool(k.get("refit")),
                fraction_kept=k["params_factored"] / k["params_dense"],
                ppl_before=r["ppl_before"],
                ppl_after=r["ppl_after"],
                ppl_loaded=r["ppl_loaded"],
                control_before=c["ppl_before"],
                control_after=c["ppl_after"],
                ratio_before=r["ppl_before"] / c["ppl_before"],
                ratio_to_control=r["ppl_after"] / c["ppl_after"],
                gap_closed=gap_closed(r["ppl_before"], r["ppl_after"], c["ppl_after"]),
                steps=r["steps"],
                tokens_seen=r["tokens_seen"],
                val_tokens=r["val_tokens"],
                lora=r["lora"] is not None,
                distill=r["distill"] is not None,
                balance=r.get("balance", False),
            )
        )
    return pd.DataFrame(rows)
