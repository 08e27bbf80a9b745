"""Whole-model compression of a Hugging Face model at the GPU preset's sizes, per mode and allocation rule.

    python benchmarks/whole_model_bench.py MODEL --val-text val.txt --train-text train.txt \\
        [--modes activation_aware] [--removed 0.05 0.1 0.2 0.3] [--eval-tokens 32768] \\
        [--calib-tokens 65536] [--sensitivity-tokens 4096] [--window 1024] [--trial-keep 0.5] \\
        [--refit calibrated] [--refit-ridge 0.01] [--device auto] --json out.json [--markdown out.md]

MODEL is a save_pretrained folder or a GGUF file (converted once into the
folder ``hf`` beside it, as the workflow's prepare_hf_target does). The same library call
as the workflow's surgery_whole_model rule (``weightpca.surgery
.run_budget_sweep``): every linear matrix factored by each mode, ranks
allocated by threshold, uniform and calibrated under each removed fraction
of the whole model, then per tolerance (1, 5, 10 %) three bisection steps
on the removed fraction; each rule of ``--refit`` again at every removed
fraction with its factors refit (``weightpca.refit``). The JSON holds every
row with the command and the device; ``--markdown`` writes the table
docs/whole_model.md quotes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from weightpca.evaluate import resolve_device  # noqa: E402
from weightpca.surgery import budget_frontier, run_budget_sweep  # noqa: E402
from weightpca.targets import load_target, prepared_folder  # noqa: E402

RULES = ("threshold", "uniform", "calibrated")
TOLERANCES = (0.01, 0.05, 0.10)


def markdown(result: dict) -> str:
    """Perplexity ratio per removed fraction and rule (grid points), and each rule's frontier."""
    lines = [
        f"Measured with `{result['command']}` on {result['device']} (torch {result['torch']}), "
        f"{result['eval_tokens']} validation tokens in windows of {result['window']}, "
        f"{result['calib_tokens']} calibration tokens, sensitivity on {result['sensitivity_tokens']}; "
        f"unmodified perplexity {result['base_ppl']:.2f}, {result['params_total']:,} parameters.",
        "",
    ]
    for mode, rows in result["rows"].items():
        grid = [r for r in rows if r["source"] == "grid"]
        fractions = sorted({r["removed"] for r in grid})
        columns = [(rule, False) for rule in RULES] + [
            (rule, True) for rule in RULES if any(r["refit"] and r["allocation"] == rule for r in grid)
        ]
        names = [f"{rule}{' + refit' if refit else ''}" for rule, refit in columns]
        lines += [f"**{mode}**: perplexity / unmodified at each fraction of the whole model removed", ""]
        lines += ["| removed | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for f in fractions:
            cells = []
            for rule, refit in columns:
                r = next(x for x in grid if (x["allocation"], x["refit"], x["removed"]) == (rule, refit, f))
                cells.append(f"{r['ppl_ratio']:.3f}x" if r["reachable"] else "out of reach")
            lines.append(f"| {f:.0%} | " + " | ".join(cells) + " |")
        lines += ["", "Largest removal within each tolerance (bisection; the bracket is where it fails):", ""]
        lines += ["| tolerance | " + " | ".join(RULES) + " |", "|---" * (len(RULES) + 1) + "|"]
        for tol in TOLERANCES:
            front = {f["allocation"]: f for f in budget_frontier(rows, tol) if not f["refit"]}
            cells = [
                f"{front[rule]['removed']:.1%} (fails at {front[rule]['bracket_removed']:.1%})"
                if front[rule]["within"]
                else "none"
                for rule in RULES
            ]
            lines.append(f"| {tol:.0%} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--val-text", type=Path, required=True)
    ap.add_argument("--train-text", type=Path, required=True)
    ap.add_argument("--modes", nargs="+", default=["activation_aware"])
    ap.add_argument("--removed", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.3])
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--calib-tokens", type=int, default=65536)
    ap.add_argument("--sensitivity-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--trial-keep", type=float, default=0.5)
    ap.add_argument("--refit", nargs="*", default=[], choices=RULES)
    ap.add_argument("--refit-ridge", type=float, default=0.01)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args()
    started = time.perf_counter()
    folder = prepared_folder(args.model)
    device = resolve_device(args.device)
    paths = {"model_config": folder / "config.json", "val_text": args.val_text, "train_text": args.train_text}
    target, val, calib, window = load_target("hf", paths, args.eval_tokens, args.calib_tokens, args.window, device)
    result = dict(
        command=" ".join(["python", "benchmarks/whole_model_bench.py", *sys.argv[1:]]),
        device=torch.cuda.get_device_name() if device.startswith("cuda") else device,
        torch=torch.__version__,
        eval_tokens=int(len(val) - 1),
        calib_tokens=int(len(calib) - 1),
        sensitivity_tokens=args.sensitivity_tokens,
        refit_ridge=args.refit_ridge,
        window=window,
        rows={},
        info={},
    )
    for mode in args.modes:
        rows, info = run_budget_sweep(
            target,
            mode,
            None,
            list(RULES),
            args.removed,
            val,
            window,
            calib_tokens=calib,
            sensitivity_tokens=calib[: args.sensitivity_tokens + 1],
            trial_keep=args.trial_keep,
            tolerances=TOLERANCES,
            refine=3,
            refit=args.refit,
            refit_ridge=args.refit_ridge,
        )
        result["rows"][mode], result["info"][mode] = rows, info
        result.update(base_ppl=info["base_ppl"], params_total=info["params_total"])
    result["wall_s"] = time.perf_counter() - started
    args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
