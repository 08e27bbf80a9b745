"""Recovery of a Hugging Face model's whole-model compression points, against the dense model fine-tuned
the same way, with a preset's recipe (the GPU preset's: config/gpu-smoke.yaml).

    python benchmarks/recovery_bench.py MODEL --val-text val.txt --train-text train.txt --work DIR \\
        [--config config/config.yaml config/gpu-smoke.yaml] [--target smollm2] \\
        [--removed 0.1 0.2 0.3] [--allocation calibrated [uniform ...]] [--no-refit] [--balance] \\
        [--distill WEIGHT [--teacher control]] [--seeds 1 2] [--device auto] --json out.json [--markdown out.md]

MODEL is a save_pretrained folder or a GGUF file (converted once into the folder ``hf`` beside it, as
the workflow's prepare_hf_target does). The library calls of the workflow's stages, with the sizes and
the recipe of the merged ``--config`` files (surgery's eval/calibration tokens and window, the
whole-model sensitivity tokens and refit ridge, ``recovery.train`` with the target's
``recovery.target_train``, ``recovery.seeds`` unless ``--seeds``, ``recovery.balance`` or
``--balance``): the target's token files (``weightpca.targets.write_target_tokens``); one whole-model
sweep of each ``--allocation`` at every ``--removed`` fraction for its ranks
(``weightpca.surgery.run_budget_sweep``); each point exported factored, its factors refit unless
``--no-refit`` (``weightpca.compress.export_point``); per seed, the dense control and every point
fine-tuned (``weightpca.recovery.recover``); the table (``weightpca.recovery.recovery_table``).

Everything lands in ``--work`` and is reused when there: a run killed at any moment (a command time
limit) continues where it stopped when started again, a training run from its last checkpoint. Calls
with other allocations, refit or balance in the same ``--work`` reuse its tokens, sweeps, exports and
dense controls; the table holds the points of the call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from weightpca import runs  # noqa: E402
from weightpca.allocation import parse_ranks  # noqa: E402
from weightpca.compress import export_point  # noqa: E402
from weightpca.config import merged_config  # noqa: E402
from weightpca.evaluate import resolve_device  # noqa: E402
from weightpca.io import read_json, write_json  # noqa: E402
from weightpca.plan import model_plan  # noqa: E402
from weightpca.recovery import recover, recovery_table  # noqa: E402
from weightpca.surgery import run_budget_sweep  # noqa: E402
from weightpca.targets import load_target, prepared_folder, write_target_tokens  # noqa: E402
from weightpca.train import TokenFiles, TrainOutputs  # noqa: E402

MODE = "activation_aware"


def point_name(allocation: str, removed: float, refit: bool) -> str:
    return f"{allocation}{round(removed * 100):d}" + ("_refit" if refit else "")


def markdown(result: dict, table) -> str:
    """Per point: perplexity before and after recovery (mean over seeds), the control's, the ratio."""
    recipe = result["recipe"]
    lines = [
        f"Measured with `{result['command']}` on {result['device']} (torch {result['torch']}): "
        f"{result['eval_tokens']} validation tokens in windows of {result['window']}, seeds "
        f"{result['seeds']}; recipe {recipe['max_steps']} steps x {recipe['batch_size']} x {result['window']} "
        f"tokens ({result['tokens_per_run']:,} per run), lr {recipe['lr']:g} to {recipe['min_lr']:g} "
        f"(cosine, {recipe['warmup_steps']} warm-up steps), every parameter trained"
        + (", LoRA" if result["lora"] else "")
        + (
            f", distilled (weight {result['distill']['weight']:g}, from the "
            f"{result['distill'].get('teacher', 'original')})"
            if result["distill"]
            else ""
        )
        + (", factors balanced" if result["balance"] else "")
        + f". Dense control: {table.control_before.mean():.2f} -> {table.control_after.mean():.2f}.",
        "",
        "| allocation | refit | removed | kept | before recovery | after recovery | x dense+FT (per seed) "
        "| gap closed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (allocation, refit, removed), rows in table.groupby(["allocation", "refit", "removed"]):
        lines.append(
            f"| {allocation} | {'yes' if refit else 'no'} | {removed:.0%} | {rows.fraction_kept.mean():.3f} | "
            f"{rows.ppl_before.mean():.2f} | "
            f"{rows.ppl_after.mean():.2f} | {rows.ratio_to_control.mean():.3f}x "
            f"({', '.join(f'{x:.3f}' for x in rows.ratio_to_control)}) | {rows.gap_closed.mean():.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--val-text", type=Path, required=True)
    ap.add_argument("--train-text", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument(
        "--config", nargs="+", type=Path, default=[Path("config/config.yaml"), Path("config/gpu-smoke.yaml")]
    )
    ap.add_argument("--target", default="smollm2", help="the config's surgery target whose recipe applies")
    ap.add_argument("--removed", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    ap.add_argument("--allocation", nargs="+", default=["calibrated"], choices=["threshold", "uniform", "calibrated"])
    ap.add_argument("--no-refit", action="store_true")
    ap.add_argument("--balance", action="store_true", help="the recipe's balance: true (default: the config's)")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the config's recovery.seeds")
    ap.add_argument(
        "--distill",
        type=float,
        default=None,
        metavar="WEIGHT",
        help="the recipe's distill weight (default: the config's)",
    )
    ap.add_argument("--teacher", choices=["original", "control"], default="original", help="with --distill")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args()
    started = time.perf_counter()
    config = merged_config(*args.config)
    surgery, whole, rec = config["surgery"], config["surgery"]["whole_model"], config["recovery"]
    rec["balance"] = rec["balance"] or args.balance
    if args.distill is not None:
        rec["distill"] = {"weight": args.distill, "temperature": 1.0, "teacher": args.teacher}
    rec["seeds"] = args.seeds or rec["seeds"]
    folder = prepared_folder(args.model)
    device = resolve_device(args.device)
    work = args.work
    paths = {"model_config": folder / "config.json", "val_text": args.val_text, "train_text": args.train_text}
    target, val, calib, window = load_target(
        "hf", paths, surgery["eval_tokens"], surgery["calib_tokens"], surgery["window"], device
    )
    tokens = work / "tokens"
    if not (tokens / "meta.json").is_file():
        write_target_tokens(target, args.train_text, args.val_text, tokens)
    data = TokenFiles(tokens / "meta.json", tokens / "train.bin", tokens / "val.bin")

    # the ranks of every point: one sweep per allocation (no refit rows: the export refits each point)
    sweep, points = [], {}
    for allocation in args.allocation:
        # one sweep per allocation and list of fractions (the calibrated one measures sensitivities first)
        sweep_json = work / f"sweep_{allocation}_{'-'.join(str(round(f * 100)) for f in args.removed)}.json"
        if not sweep_json.is_file():
            rows, info = run_budget_sweep(
                target,
                MODE,
                None,
                [allocation],
                args.removed,
                val,
                window,
                calib_tokens=calib,
                sensitivity_tokens=calib[: whole["sensitivity_tokens"] + 1],
                trial_keep=whole["trial_keep"],
            )
            write_json(sweep_json, {"rows": rows, "info": info})
        rows = read_json(sweep_json)["rows"]
        sweep += rows
        for f in args.removed:
            row = next(r for r in rows if r["removed"] == f and r["source"] == "grid")
            points[point_name(allocation, f, not args.no_refit)] = dict(row, allocation=allocation)
    plan = None
    refit_ridge = None if args.no_refit else whole["refit_ridge"]
    for name, row in points.items():
        record_path = work / "compress" / name / "compress.json"  # save_compressed's, the record merged in
        if record_path.is_file() and "params_factored" in read_json(record_path):
            continue
        if plan is None:
            plan = model_plan(target, MODE, None, calib, window)
        record = export_point(
            target,
            MODE,
            parse_ranks(row["ranks"]),
            whole["matrices"],
            val,
            calib,
            window,
            record_path.parent,
            read_json(folder / "config.json"),
            surgery["prompt"],
            refit_ridge=refit_ridge,
            plan=plan,
        )
        write_json(
            record_path, dict(read_json(record_path), **record, removed=row["removed"], allocation=row["allocation"])
        )
    del plan, target  # the training runs load their own copies
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    # per seed, the control and every point: the same recipe, seed and batches
    config["recovery"]["points"] = [{"target": args.target, "point": name} for name in points]
    dense = {"kind": "hf", "folder": str(folder)}
    records = {"points": [], "controls": []}
    for seed in rec["seeds"]:
        for name in ["dense", *points]:
            trained = name
            if name != "dense":  # a recipe's controls are the same when it only changes the points
                trained += "_balanced" if rec["balance"] else ""
                trained += "_from_control" if (rec["distill"] or {}).get("teacher") == "control" else ""
            out = work / "recovery" / trained / f"seed{seed}"
            record_path = out / "recovery.json"
            if not record_path.is_file():
                run = runs.recovery_run(config, args.target, name, seed)
                record = recover(
                    run,
                    data,
                    TrainOutputs(
                        out / "model.safetensors", out / "config.json", out / "metrics.csv", out / "summary.json", None
                    ),
                    out / "_work",
                    dense,
                    None if name == "dense" else work / "compress" / name,
                    run["recipe"],
                    device,
                    teacher_weights=work / "recovery" / "dense" / f"seed{seed}" / "model.safetensors",
                )
                write_json(record_path, dict(record, target=args.target, point=name))
                print(record, flush=True)
            records["controls" if name == "dense" else "points"].append(record_path)
    table = recovery_table(
        records["points"], records["controls"], [work / "compress" / n / "compress.json" for n in points]
    )
    run = runs.recovery_run(config, args.target, "dense", rec["seeds"][0])
    result = dict(
        command=" ".join(["python", "benchmarks/recovery_bench.py", *sys.argv[1:]]),
        device=torch.cuda.get_device_name() if device.startswith("cuda") else device,
        torch=torch.__version__,
        eval_tokens=int(len(val) - 1),
        window=window,
        seeds=rec["seeds"],
        recipe=run["train"],
        tokens_per_run=run["train"]["max_steps"] * run["train"]["batch_size"] * run["train"]["grad_accum"] * window,
        lora=rec["lora"],
        distill=rec["distill"],
        balance=rec["balance"],
        sweep=sweep,
        rows=table.replace({np.nan: None}).to_dict("records"),
        wall_s=time.perf_counter() - started,
    )
    args.json.write_text(json.dumps(result, indent=1))
    text = markdown(result, table)
    if args.markdown:
        args.markdown.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
