"""The report stage: every result table as figures, and verdicts computed from the numbers.

Each research question becomes one line of ``summary.csv`` / ``summary.md``
with the compared numbers, their spread and a verdict derived from them by
the rules below, never typed by hand:

- training variants (A/B/C/D per k): mean and 95 % t-interval of the
  per-seed perplexity differences (``weightpca.tables.compare_variants``);
  "X better/worse than Y" when the interval excludes 0, "not
  distinguishable" when it contains 0, "no interval" with one seed;
- baselines: perplexity with every head attending uniformly over perplexity
  as trained; below ``ATTENTION_USE`` the model barely uses its attention and
  surgery results on it are flagged as uninformative;
- compressed models: bytes (in the export's dtype), parameters and peak
  memory of the factored model over the dense original's; per speed regime
  (prefill batch x context, decode batch) "faster" or "slower" only when
  every timed repeat of one beats every repeat of the other, each figure
  next to its bandwidth bound;
- sketch methods: ratio of mean reconstruction error to exact PCA's at the
  same k; "near optimal" within ``SKETCH_TOLERANCE``;
- low-rank regulariser: per λ > 0 and fraction of rank kept, the per-seed
  perplexity differences to the λ = 0 control (same init and batches), judged
  by the training rule above;
- surgery modes per target: the frontier (fewest q/k/v parameters within each
  tolerance of the base perplexity, ``frontier.csv``), then perplexity at
  equal fraction of parameters kept, interpolated on log(perplexity) over
  working points only (a point above ``BROKEN`` x base enters no verdict);
  modes within ``SURGERY_TIE`` (relative) of the best are tied. The sweeps are
  deterministic (no seeds), so their spread is reported as 0.

A stage whose tables are absent is reported as "not run".
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .io import atomic_path, write_csv, write_text  # noqa: E402
from .tables import difference_verdict  # noqa: E402

SURGERY_TIE = 0.01  # perplexities within 1 % of the best count as tied
BROKEN = 2.0  # a surgery point above this many times the base perplexity is broken: it enters no verdict
# a baseline "uses its attention" when uniform attention raises its perplexity
# by at least this factor; below, surgery of its q/k/v has little to remove
ATTENTION_USE = 1.25
VARIANT_COLORS = {"A": "tab:blue", "B": "tab:green", "C": "tab:red", "D": "black"}
DPI = 100
FIGSIZE = (8, 5)


def _save(fig, path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)


def _not_run(path, title: str, why: str) -> None:
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.axis("off")
    ax.text(0.5, 0.5, f"{title}\n\nnot run: {why}", ha="center", va="center", fontsize=14)
    _save(fig, path)


# ---------------------------------------------------------------- training


def plot_training_curves(metrics: dict[str, pd.DataFrame], ranks, path) -> None:
    """Validation perplexity vs tokens seen: one panel per k with A/B/C (every seed) and D."""
    fig, axes = plt.subplots(1, max(1, len(ranks)), figsize=(6 * max(1, len(ranks)), 5), squeeze=False)
    for ax, k in zip(axes[0], ranks or [None]):
        for name, df in metrics.items():
            parts = name.split("/")
            if parts[0] == "D":
                label, color, style = f"D {parts[1]}", "black", "--"
            elif parts[0] == f"k{k}":
                label, color, style = f"{parts[1]} {parts[2]}", VARIANT_COLORS[parts[1]], "-"
            else:
                continue
            ax.plot(df.tokens / 1e3, df.val_ppl, style, color=color, alpha=0.8, label=label)
        ax.set_title(f"k = {k}" if k else "baseline D")
        ax.set_xlabel("tokens seen (thousands)")
        ax.set_ylabel("validation perplexity")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    _save(fig, path)


def plot_ppl_vs_k(runs: pd.DataFrame, path) -> None:
    """Final validation perplexity vs k for A, B, C (mean, error bars: std over seeds), D as a line."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for variant in ("A", "B", "C"):
        v = runs[runs.variant == variant]
        if v.empty:
            continue
        g = v.groupby("k").final_val_ppl
        mean, std = g.mean(), g.std(ddof=1).fillna(0.0)
        ax.errorbar(
            mean.index.astype(int),
            mean.values,
            yerr=std.values,
            marker="o",
            capsize=4,
            color=VARIANT_COLORS[variant],
            label=f"{variant} (mean ± std over seeds)",
        )
    d = runs[runs.variant == "D"].final_val_ppl
    if not d.empty:
        ax.axhline(d.mean(), color="black", ls="--", label=f"D (full rank), {d.mean():.1f}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding rank k")
    ax.set_ylabel("final validation perplexity")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_spectrum(spectrum: dict, path) -> None:
    s = np.asarray(spectrum["singular_values"])
    energy = np.asarray(spectrum["cumulative_energy"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 5))
    a1.semilogy(np.arange(1, len(s) + 1), s, color="tab:blue")
    a1.set_xlabel("index i")
    a1.set_ylabel("singular value σ_i")
    a2.plot(np.arange(1, len(s) + 1), energy, color="tab:blue")
    a2.set_xlabel("rank k")
    a2.set_ylabel("cumulative energy Σσ²_{≤k} / Σσ²")
    for k, err in spectrum["relative_error"].items():
        for ax in (a1, a2):
            ax.axvline(int(k), color="tab:red", ls=":", alpha=0.8)
        a2.annotate(
            f"k={k}\nrel. err {err:.3f}",
            (int(k), energy[int(k) - 1]),
            fontsize=8,
            xytext=(5, -30),
            textcoords="offset points",
        )
    centred = "centred PCA" if spectrum["centered"] else "SVD"
    a1.set_title(f"D's token embedding {spectrum['shape']} ({centred})")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    _save(fig, path)


def plot_params(params: pd.DataFrame, path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, (label, df) in zip(axes, params.groupby("model", sort=False)):
        ranked = df[df.k != "full"]
        full = df[df.k == "full"].iloc[0]
        ks = ranked.k.astype(int)
        ax.plot(ks, ranked.total_params / 1e6, "o-", label="total (factorised)")
        ax.plot(ks, ranked.embedding_params / 1e6, "s-", label="embedding path (wte + scale)")
        ax.axhline(full.total_params / 1e6, color="black", ls="--", label="total, full embedding")
        ax.axhline(full.embedding_params / 1e6, color="gray", ls=":", label="embedding, full")
        ax.set_title(f"{label}: V={full.vocab_size}, d={full.n_embd}")
        ax.set_xlabel("embedding rank k")
        ax.set_ylabel("parameters (millions)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    _save(fig, path)


# ---------------------------------------------------------------- surgery


def plot_surgery(surgery: pd.DataFrame, frontier: pd.DataFrame, notes: dict[str, str], path) -> None:
    """Per target: perplexity ratio against q/k/v parameters (tolerance lines, frontier marked) and threshold."""
    targets = list(dict.fromkeys(surgery.target))
    fig, axes = plt.subplots(len(targets), 2, figsize=(12, 4.5 * len(targets)), squeeze=False)
    for row, target in zip(axes, targets):
        t = surgery[surgery.target == target]
        colors = {}
        for mode, m in t.groupby("mode", sort=False):
            by_params = m.assign(x=m.params_factored / m.params_dense).sort_values("x")
            (line,) = row[0].plot(by_params.x, by_params.ppl_ratio, "o-", ms=4, label=mode)
            colors[mode] = line.get_color()
            m = m.sort_values("threshold")
            row[1].plot(1 - m.threshold.clip(upper=1 - 1e-6), m.ppl_ratio, "o-", ms=4, label=mode)
        f = frontier[(frontier.target == target) & frontier.within]
        for r in f.itertuples():
            row[0].plot(
                r.params_fraction,
                r.ppl_ratio,
                "*",
                ms=14,
                color=colors.get(r.mode, "black"),
                markeredgecolor="black",
                zorder=5,
            )
        title = f"{target}: unmodified perplexity {t.base_ppl.iloc[0]:.2f}" + (
            "\n" + textwrap.fill(notes[target], 70) if notes.get(target) else ""
        )
        for ax in row:
            for tol in sorted(set(frontier.tolerance)):
                ax.axhline(1 + tol, color="grey", ls=":", lw=1)
            ax.axhline(BROKEN, color="red", ls="--", lw=1, label=f"broken (> {BROKEN:g}x)")
            ax.set_yscale("log")
            ax.set_ylabel("perplexity / unmodified")
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
        row[0].axvline(1.0, color="black", lw=1)
        row[0].set_xlabel(
            "q/k/v parameters of the factored form / dense (> 1: no saving);\n"
            "stars: frontier per tolerance (dotted lines)"
        )
        row[1].set_xscale("log")
        row[1].set_xlabel("1 - threshold (fraction of variance dropped; 1.0 shown at 1e-6)")
        row[0].legend(fontsize=8)
    _save(fig, path)


def plot_sensitivity(sensitivity: pd.DataFrame, path) -> None:
    """Per target: perplexity ratio with one matrix type compressed (left), then one layer of the worst (right)."""
    targets = list(dict.fromkeys(sensitivity.target))
    fig, axes = plt.subplots(len(targets), 2, figsize=(12, 4 * len(targets)), squeeze=False)
    for row, target in zip(axes, targets):
        t = sensitivity[sensitivity.target == target]
        types = t[t.scope == "type"]
        for name, m in types.groupby("matrices", sort=False):
            m = m.sort_values("threshold")
            row[0].plot(1 - m.threshold, m.ppl_ratio, "o-", label=f"{name} only, every layer")
        row[0].set_xscale("log")
        row[0].set_xlabel("1 - threshold (fraction of variance dropped)")
        layers = t[t.scope == "layer"]
        row[1].bar(layers.layer.astype(int), layers.ppl_ratio - 1, bottom=1, color="tab:red")
        if len(layers):
            row[1].set_title(
                f"{target}: {layers.matrices.iloc[0]} of one layer at threshold "
                f"{layers.threshold.iloc[0]:g} ({layers.eval_tokens.iloc[0]} tokens)",
                fontsize=9,
            )
        row[1].set_xlabel("layer")
        row[0].set_title(f"{target}: separate PCA of one matrix type at a time", fontsize=9)
        for ax in row:
            ax.set_yscale("log")
            ax.set_ylabel("perplexity / unmodified")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    _save(fig, path)


def with_refit_label(table: pd.DataFrame) -> pd.DataFrame:
    """A whole-model table (or its frontier) with refit rows named as allocations of their own
    ("calibrated + refit"), so that every figure and verdict compares them with the rest."""
    table = table.copy()
    table["allocation"] = [f"{a} + refit" if r else a for a, r in zip(table.allocation, table.refit.astype(bool))]
    return table


def plot_whole_model(whole: pd.DataFrame, path) -> None:
    """Per target: perplexity ratio against the fraction of the whole model kept, per mode and allocation."""
    targets = list(dict.fromkeys(whole.target))
    fig, axes = plt.subplots(1, len(targets), figsize=(max(FIGSIZE[0] + 2, 7 * len(targets)), 5.5), squeeze=False)
    for ax, target in zip(axes[0], targets):
        t = whole[(whole.target == target) & whole.reachable.astype(bool)]
        for (mode, rule), m in t.groupby(["mode", "allocation"], sort=False):
            m = m.sort_values("fraction_kept")
            ax.plot(m.fraction_kept, m.ppl_ratio, "o-", ms=4, label=f"{mode}, {rule}")
        ax.axhline(BROKEN, color="red", ls="--", lw=1, label=f"broken (> {BROKEN:g}x)")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("fraction of the whole model's parameters kept (embeddings included)")
        ax.set_ylabel("perplexity / unmodified")
        base = whole[whole.target == target].base_ppl.iloc[0]
        ax.set_title(f"{target}: every selected matrix factored (unmodified perplexity {base:.2f})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def whole_model_verdicts(whole: pd.DataFrame, frontier: pd.DataFrame) -> list[dict]:
    """Per target: which allocation has the lowest perplexity at each removed fraction (a difference under
    ``SURGERY_TIE`` is a tie; where every rule is above ``BROKEN``, none is compared), and which removes the
    most within each tolerance (one rule removes more than another only when its point lies beyond the
    other's bracket, where that one left the tolerance)."""
    lines = []
    grid = whole[(whole.source == "grid") & whole.reachable.astype(bool)]
    for (target, mode, removed), g in grid.groupby(["target", "mode", "removed"], sort=False):
        g = g.sort_values("ppl_ratio")
        best = g.iloc[0]
        numbers = "; ".join(f"{r.allocation} {r.ppl_ratio:.3f}x" for r in g.itertuples())
        tied = [r.allocation for r in g.itertuples() if r.ppl_ratio <= best.ppl_ratio * (1 + SURGERY_TIE)]
        if best.ppl_ratio > BROKEN:  # broken models enter no comparison
            verdict = f"every allocation is broken here (> {BROKEN:g}x): not compared"
        elif len(tied) > 1:
            verdict = f"{', '.join(tied)} tied (within {SURGERY_TIE:.0%})"
        else:
            verdict = (
                f"{best.allocation} lowest ({best.ppl_ratio:.3f}x; next {g.iloc[1].allocation} "
                f"{g.iloc[1].ppl_ratio:.3f}x)"
                if len(g) > 1
                else f"{best.allocation} only"
            )
        lines.append(
            dict(
                stage="whole-model",
                subject=f"{target} {mode}",
                question=f"perplexity with {removed:.0%} of the whole model removed",
                numbers=numbers,
                spread=f"ties within {SURGERY_TIE:.0%}",
                verdict=verdict,
            )
        )
    for (target, mode, tol), f in frontier.groupby(["target", "mode", "tolerance"], sort=False):
        f = f.sort_values("removed", ascending=False)
        numbers = "; ".join(
            f"{r.allocation} {r.removed:.1%}"
            + (f" (fails at {r.bracket_removed:.1%})" if math.isfinite(r.bracket_removed) else "")
            for r in f.itertuples()
        )
        best = f.iloc[0]
        if not best.within:
            verdict = f"no allocation stays within {tol:.0%} at any measured removal"
        else:
            others = f.iloc[1:]
            beaten = others.bracket_removed.fillna(np.inf) < best.removed
            if len(others) and beaten.all():
                verdict = f"{best.allocation} removes the most: {best.removed:.1%} of the model"
            else:
                tied = [best.allocation] + list(others[~beaten].allocation)
                verdict = (
                    f"{', '.join(tied)} not distinguishable at the bisection's resolution "
                    f"(best point {best.allocation} {best.removed:.1%})"
                )
        lines.append(
            dict(
                stage="whole-model",
                subject=f"{target} {mode}",
                question=f"whole model removed within {tol:.0%} of base perplexity",
                numbers=numbers,
                spread="frontier between point and bracket (bisection resolution)",
                verdict=verdict,
            )
        )
    return lines


def frontier_verdicts(frontier: pd.DataFrame) -> list[dict]:
    """Per target and tolerance: which mode keeps the fewest q/k/v parameters within tolerance.

    Bisection locates each mode's frontier between its bracket (outside the
    tolerance) and its point (inside): a mode keeps fewer parameters than
    another only when its point lies below the other's bracket; otherwise the
    two are not distinguishable at the measured resolution.
    """
    lines = []
    for (target, tol), f in frontier.groupby(["target", "tolerance"], sort=False):
        within = f[f.within].sort_values("params_fraction")
        outside = f[~f.within]
        numbers = [
            f"{r.mode} {r.params_fraction:.1%} ({r.ppl_ratio:.3f}x"
            + (
                f"; frontier above {r.bracket_params_fraction:.1%})"
                if math.isfinite(r.bracket_params_fraction)
                else ")"
            )
            for r in within.itertuples()
        ]
        numbers += [
            f"{r.mode} none"
            + (
                f" (best compressed point {r.ppl_ratio:.3g}x at {r.params_fraction:.1%})"
                if math.isfinite(r.params_fraction)
                else ""
            )
            for r in outside.itertuples()
        ]
        question = f"q/k/v parameters kept within {tol:.0%} of base perplexity"
        if within.empty:
            verdict = f"no mode compresses q/k/v within {tol:.0%}"
        else:
            best = within.iloc[0]
            # the others' lower bounds: their brackets (a mode without one may go lower still)
            lower = within.iloc[1:].bracket_params_fraction.fillna(0.0)
            tied = [best["mode"]] + list(within.iloc[1:][~(best.params_fraction < lower)]["mode"])
            if len(tied) == 1:
                verdict = f"{best['mode']} keeps the fewest: {best.params_fraction:.1%} of q/k/v parameters"
                if len(within) > 1:
                    verdict += f" (next: {within.iloc[1]['mode']} {within.iloc[1].params_fraction:.1%})"
            else:
                verdict = (
                    f"{', '.join(tied)} not distinguishable at the bisection's resolution "
                    f"(best point {best['mode']} {best.params_fraction:.1%})"
                )
        lines.append(
            dict(
                stage="surgery",
                subject=target,
                question=question,
                numbers="; ".join(numbers),
                spread="frontier between bracket and point (bisection resolution)",
                verdict=verdict,
            )
        )
    return lines


def _interp_log_ppl(m: pd.DataFrame, fraction: float) -> float:
    m = m.sort_values("params_fraction")
    x, y = m.params_fraction.to_numpy(), np.log(m.ppl.to_numpy())
    if not x[0] <= fraction <= x[-1]:
        return float("nan")
    return float(np.exp(np.interp(fraction, x, y)))


def _common_budget(compressed: dict[str, pd.DataFrame]) -> tuple[float, list[str]]:
    """The parameter fraction inside the most modes' sweeps (ties: the largest), and those modes."""
    best = (0, 0.0, [])
    for f in sorted({float(x) for c in compressed.values() for x in c.params_fraction}):
        inside = [m for m, c in compressed.items() if c.params_fraction.min() <= f <= c.params_fraction.max()]
        if (len(inside), f) > (best[0], best[1]):
            best = (len(inside), f, inside)
    return best[1], best[2]


def surgery_verdicts(surgery: pd.DataFrame) -> list[dict]:
    """Per target: which mode keeps perplexity lowest at equal q/k/v parameters, among working models.

    Only compressed points (factored form smaller than dense) within
    ``BROKEN`` x the base perplexity enter: a broken model's perplexity says
    nothing about a mode a user would deploy. Each mode's working points are
    interpolated (log perplexity) at the parameter fraction that the most
    modes' working ranges cover.
    """
    lines = []
    for target, t in surgery.groupby("target", sort=False):
        modes = list(dict.fromkeys(t["mode"]))
        working = {m: t[(t["mode"] == m) & (t.params_fraction < 1.0) & (t.ppl_ratio <= BROKEN)] for m in modes}
        working = {m: w for m, w in working.items() if len(w)}
        broken = [m for m in modes if m not in working]
        question = "modes at equal q/k/v parameters, working points only"
        note = f"; broken (> {BROKEN:g}x) at every compressed point: {', '.join(broken)}" if broken else ""
        fraction, inside = _common_budget(working)
        if len(inside) >= 2:
            values = {m: _interp_log_ppl(working[m], fraction) for m in inside}
            line = _rank_line("surgery", target, f"{question} ({fraction:.2f} of dense)", values, "ppl (interpolated)")
            outside = [m for m in working if m not in inside]
            if outside:
                line["numbers"] += f"; outside this budget: {', '.join(outside)}"
            line["numbers"] += note
            lines.append(line)
        else:
            lines.append(
                dict(
                    stage="surgery",
                    subject=target,
                    question=question,
                    numbers=(f"working: {', '.join(working) or 'none'}" + note).lstrip("; "),
                    spread="",
                    verdict="fewer than two modes work at a common parameter budget: no comparison",
                )
            )
    return lines


def _rank_line(stage: str, subject: str, question: str, values: dict, unit: str) -> dict:
    finite = {k: v for k, v in values.items() if math.isfinite(v)}
    best = min(finite, key=finite.get)
    tied = [k for k, v in finite.items() if v <= finite[best] * (1 + SURGERY_TIE)]
    numbers = ", ".join(f"{k} {v:.2f}" for k, v in sorted(finite.items(), key=lambda kv: kv[1]))
    if len(tied) == len(finite):
        verdict = f"all compared modes within {SURGERY_TIE:.0%}: not distinguishable"
    elif len(tied) > 1:
        verdict = f"{' = '.join(tied)} best (within {SURGERY_TIE:.0%})"
    else:
        runner = sorted(finite.values())[1]
        verdict = f"{best} best, {runner / finite[best]:.2f}x lower {unit} than the next"
    return dict(
        stage=stage, subject=subject, question=question, numbers=numbers, spread="0 (deterministic)", verdict=verdict
    )


# ---------------------------------------------------------------- compress


def plot_recovery(recovery: pd.DataFrame, path) -> None:
    """Per target: perplexity against the whole-model fraction kept, before and after recovery (each seed
    and their mean), with the dense control before and after fine-tuning (mean over seeds) as lines."""
    targets = list(dict.fromkeys(recovery.target))
    fig, axes = plt.subplots(1, len(targets), figsize=(max(FIGSIZE[0], 6 * len(targets)), 5.5), squeeze=False)
    for ax, target in zip(axes[0], targets):
        t = recovery[recovery.target == target]
        for column, label, marker in (("ppl_before", "compressed", "o"), ("ppl_after", "compressed + recovery", "s")):
            ax.scatter(t.fraction_kept, t[column], marker=marker, alpha=0.5, label=f"{label} (each seed)")
        ax.axhline(t.control_before.mean(), color="gray", ls=":", label="dense original")
        ax.axhline(t.control_after.mean(), color="black", ls="--", label="dense, fine-tuned the same way")
        ax.set_xlabel("fraction of the whole model's parameters kept")
        ax.set_ylabel("validation perplexity")
        ax.set_title(f"{target}: recovery against the equally fine-tuned dense model", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def recovery_verdicts(recovery: pd.DataFrame) -> list[dict]:
    """Per recovered point: its perplexity after recovery over the dense model fine-tuned the same way, and
    the fraction of the gap to it closed, each a mean with a 95 % t-interval over seeds."""
    from .tables import mean_interval

    span = lambda low, high: f"[{low:.3f}, {high:.3f}]" if math.isfinite(low) else "n/a (one seed)"  # noqa: E731
    lines = []
    for (target, point), g in recovery.groupby(["target", "point"], sort=False):
        ratio, r_low, r_high = mean_interval(g.ratio_to_control.to_numpy())
        closed, c_low, c_high = mean_interval(g.gap_closed.to_numpy())
        at = (
            f"{g.removed.iloc[0]:.0%} removed" if pd.notna(g.removed.iloc[0]) else f"{g.fraction_kept.iloc[0]:.1%} kept"
        )
        if len(g) < 2:
            verdict = "one seed: no interval"
        elif c_low > 0:
            verdict = f"recovery closes {closed:.0%} of the gap (interval above 0)"
        elif c_high < 0:
            verdict = "recovery widens the gap (interval below 0)"
        else:
            verdict = "the gap closed is not distinguishable from 0"
        lines.append(
            dict(
                stage="recovery",
                subject=f"{target} {point}",
                question=f"{at} and recovered, against the dense model fine-tuned the same way",
                numbers=(
                    f"{ratio:.3f}x the equally fine-tuned dense model, 95 % CI {span(r_low, r_high)}; "
                    f"before recovery {g.ratio_before.mean():.3f}x the dense original; gap closed {closed:.2f}, "
                    f"95 % CI {span(c_low, c_high)} ({len(g)} seeds, {int(g.steps.iloc[0])} steps)"
                ),
                spread="95 % t-interval over seeds",
                verdict=verdict,
            )
        )
    return lines


def compress_verdicts(paths) -> list[dict]:
    """Per exported point: bytes, parameters, peak memory, and every speed regime against the dense original."""
    from .speed import compare

    lines = []
    for p in paths:
        c = json.loads(Path(p).read_text())
        dense, fact = c["speed"]["dense"], c["speed"]["factored"]
        if c.get("whole_model") or c.get("removed"):
            refit = " + refit" if c.get("refit") else ""
            at = (
                f"{c['removed']:.0%} of the whole model removed"
                if c.get("removed")
                else f"the whole model's {c['tolerance']:.0%} frontier"
            ) + f" ({c['allocation']}{refit} allocation)"
        elif c.get("tolerance"):
            at = f"the {c['tolerance']:.0%} frontier (threshold {c['threshold']:.5g})"
        else:
            at = f"threshold {c['threshold']:g}"
        bytes_ratio = c["bytes_factored"] / c["bytes_dense"]
        regimes = compare(dense, fact)
        speeds = "; ".join(
            f"{r['regime']} {r['speedup']:.2f}x ({r['factored_tokens_per_s']:.4g} vs {r['dense_tokens_per_s']:.4g} "
            f"tokens/s, bounds {r['factored_bound']:.4g} / {r['dense_bound']:.4g})"
            for r in regimes
        )
        numbers = (
            f"{bytes_ratio:.3f}x the bytes in {c['dtype']} ({c['bytes_factored'] / 2**20:.1f} vs "
            f"{c['bytes_dense'] / 2**20:.1f} MiB), {c['params_factored'] / c['params_dense']:.3f}x the parameters, "
            f"peak memory {fact['peak_memory_mb'] / dense['peak_memory_mb']:.3f}x; timed in {dense['dtype']} on "
            f"{c['device']}: {speeds}; perplexity {c['ppl_ratio']:.3f}x base (reloaded factored model, evaluated "
            f"in {c['eval_dtype']}, = dense reconstruction within {c['loaded_vs_reconstructed']:.1e}, "
            f"tolerance {c['reload_tolerance']:g})"
        )
        size = "smaller" if bytes_ratio < 1 else "not smaller"
        verdict = f"{size}; " + ", ".join(f"{r['regime']} {r['verdict']}" for r in regimes)
        lines.append(
            dict(
                stage="compress",
                subject=f"{c['target']} {c['name']}",
                question=f"what {c['mode']} at {at} buys, {'+'.join(c['matrices'])} factored",
                numbers=numbers,
                spread=f"{min(r['repeats'] for r in regimes)} timed repeats per regime (speed: every "
                "repeat of one beats every repeat of the other, or not distinguishable)",
                verdict=verdict,
            )
        )
    return lines


def onnx_verdicts(paths) -> list[dict]:
    """Per ONNX export: whether onnxruntime, in a process without weightpca, gives PyTorch's logits, and its
    prefill and KV-cache decode speed factored against dense."""
    lines = []
    for p in paths:
        o = json.loads(Path(p).read_text())
        dense, fact = o["dense"], o["factored"]
        clean = not any(fact["imported"].values()) and not any(dense["imported"].values())
        matches = max(fact["relative_error"], dense["relative_error"]) <= o["logits_tolerance"]
        lines.append(
            dict(
                stage="onnx",
                subject=f"{o['target']} {o['point']}",
                question="does a stock runtime (onnxruntime, without weightpca or torch) run the factored model",
                numbers=(
                    f"ONNX {fact['bytes'] / 2**20:.1f} vs {dense['bytes'] / 2**20:.1f} MiB (float32); logits vs "
                    f"PyTorch: {fact['relative_error']:.1e} (dense {dense['relative_error']:.1e}) of the largest; "
                    + "; ".join(
                        f"{r['regime']} {r['speedup']:.2f}x ({r['factored_tokens_per_s']:.4g} vs "
                        f"{r['dense_tokens_per_s']:.4g} tokens/s)"
                        for r in o["regimes"]
                    )
                    + f" on {o['threads']} CPU thread(s)"
                ),
                spread=f"{min(r['repeats'] for r in o['regimes'])} timed repeats per regime",
                verdict=(
                    ("runs, logits match" if matches else "runs, logits do not match")
                    + ("" if clean else " (but its process could import weightpca or torch)")
                    + "; "
                    + ", ".join(f"{r['regime']} {r['verdict']}" for r in o["regimes"])
                ),
            )
        )
    return lines


# ---------------------------------------------------------------- sketch

SKETCH_TOLERANCE = 1.05  # "near optimal": mean error within 5 % of exact PCA's


def sketch_table(paths) -> pd.DataFrame:
    rows = []
    for p in paths:
        e = json.loads(Path(p).read_text())
        ratios = np.asarray(e.get("ratio_to_optimum", [1.0] * len(e["l2_error"])))
        # r: the sketch size used (fit_range may drop dependent test columns); exact PCA has none
        r = "none" if e["r"] is None else f"{e['r']} of {e['r_requested']}" if e["r"] != e["r_requested"] else e["r"]
        rows.append(
            dict(
                method=e["method"],
                k=e["k"],
                r=r,
                centered=e["centered"],
                mean_relative_error=e["mean_relative_error"],
                median_relative_error=e["median_relative_error"],
                mean_error_ratio=e.get("mean_error_ratio_to_optimum", 1.0),
                ratio_std=float(np.std(ratios, ddof=1)) if len(ratios) > 1 else 0.0,
                wall_s=e["wall_s"],
                throughput_mb_s=e["throughput_bytes_per_s"] / 1e6,
            )
        )
    return pd.DataFrame(rows)


def plot_sketch(table: pd.DataFrame, path) -> None:
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for (method, centered), m in table.groupby(["method", "centered"], sort=False):
        m = m.sort_values("k")
        style = "k--" if method == "exact" else "o-"
        label = f"{method} ({'centred' if centered else 'uncentred'})"
        ax.plot(m.k, m.mean_relative_error, style, marker="o", label=label)
    ax.set_xlabel("number of components k (sketch size r = r_factor · k)")
    ax.set_ylabel("mean relative reconstruction error ||x − W Wᵀx|| / ||x||")
    ax.set_yscale("log")
    ax.set_title("streaming-sketch PCA of D's weight snapshots")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def sketch_verdicts(table: pd.DataFrame) -> list[dict]:
    lines = []
    for r in table[table.method != "exact"].sort_values(["method", "k"]).itertuples():
        opt = table[(table.method == "exact") & (table.k == r.k) & (table.centered == r.centered)]
        opt_err = float(opt.mean_relative_error.iloc[0]) if len(opt) else float("nan")
        if r.mean_error_ratio <= SKETCH_TOLERANCE:
            verdict = f"near optimal (mean error within {SKETCH_TOLERANCE - 1:.0%} of exact PCA)"
        else:
            verdict = f"{r.mean_error_ratio:.2f}x the optimum's mean error"
        lines.append(
            dict(
                stage="sketch",
                subject=f"k={r.k}, r={r.r}",
                question=f"{r.method} vs exact PCA",
                numbers=f"mean rel. error {r.mean_relative_error:.4f} vs optimum {opt_err:.4f} "
                f"(ratio {r.mean_error_ratio:.3f}); {r.throughput_mb_s:.0f} MB/s",
                spread=f"per-sample ratio std {r.ratio_std:.3f}",
                verdict=verdict,
            )
        )
    return lines


# ---------------------------------------------------------------- low-rank regulariser

LOWRANK_VERDICT_FRACTIONS = (1.0, 0.5, 0.25)  # full rank, and the two truncations the summary judges


def lowrank_table(paths) -> pd.DataFrame:
    """Every sweep.csv (λ, seed, fraction, val_ppl, parameters ...) in one table."""
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)


def lowrank_stats(table: pd.DataFrame) -> pd.DataFrame:
    """Per λ and fraction: mean, sample std, min and max of val_ppl over seeds, and parameters kept."""
    g = table.groupby(["lambda", "fraction"])
    stats = g.val_ppl.agg(["mean", "std", "min", "max", "count"]).rename(columns=lambda c: f"ppl_{c}")
    stats["params_kept"] = g.params_kept.first()
    return stats.reset_index().sort_values(["lambda", "fraction"], ascending=[True, False])


def plot_lowrank(table: pd.DataFrame, path) -> None:
    stats = lowrank_stats(table)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for lam, m in stats.groupby("lambda"):
        (line,) = left.plot(m.fraction, m.ppl_mean, "o-", label=f"λ = {lam:g}" + (" (control)" if lam == 0 else ""))
        left.fill_between(m.fraction, m.ppl_min, m.ppl_max, color=line.get_color(), alpha=0.2)
    left.set_xscale("log", base=2)
    left.invert_xaxis()
    left.set_yscale("log")
    left.set_xlabel("fraction of each targeted matrix's rank kept (SVD truncation)")
    left.set_ylabel("validation perplexity")
    left.set_title("perplexity after truncation (band: min–max over seeds)")
    left.legend()
    left.grid(alpha=0.3)
    full = stats[stats.fraction == stats.fraction.max()]
    err = full.ppl_std.fillna(0.0)
    right.bar([f"{x:g}" for x in full["lambda"]], full.ppl_mean, yerr=err, capsize=4, color="tab:gray")
    right.set_xlabel("λ")
    right.set_ylabel("validation perplexity, untruncated")
    right.set_title("cost of the penalty at full rank (bars: std over seeds)")
    right.grid(alpha=0.3, axis="y")
    _save(fig, path)


def lowrank_verdicts(table: pd.DataFrame) -> list[dict]:
    """Each λ > 0 against the λ = 0 control at full rank, 50 % and 25 % rank, paired by seed."""
    lines = []
    control = table[table["lambda"] == 0].set_index(["fraction", "seed"]).val_ppl
    if control.empty:
        return [
            dict(
                stage="low-rank regulariser",
                subject="",
                question="",
                numbers="",
                spread="",
                verdict="no λ = 0 control in lowrank.lambdas: nothing to compare against",
            )
        ]
    for lam in sorted(x for x in table["lambda"].unique() if x != 0):
        runs = table[table["lambda"] == lam].set_index(["fraction", "seed"]).val_ppl
        for f in LOWRANK_VERDICT_FRACTIONS:
            if f not in runs.index.get_level_values(0) or f not in control.index.get_level_values(0):
                continue
            a, b = runs.loc[f], control.loc[f]
            seeds = a.index.intersection(b.index)
            mean, low, high, verdict = difference_verdict((a.loc[seeds] - b.loc[seeds]).to_numpy(), f"λ={lam:g}", "λ=0")
            shown = interval_text(low, high)
            lines.append(
                dict(
                    stage="low-rank regulariser",
                    subject=f"{f:.0%} of rank",
                    question=f"λ={lam:g} vs λ=0 (same init per seed): perplexity after truncation",
                    numbers=f"{a.mean():.2f} vs {b.mean():.2f} ppl; difference {mean:+.2f}, {shown}, "
                    f"over {len(seeds)} seed(s)",
                    spread=shown,
                    verdict=verdict,
                )
            )
    return lines


# ---------------------------------------------------------------- timing


def plot_wall_times(bench: pd.DataFrame, path) -> None:
    """Wall time per rule (summed over that rule's jobs) from Snakemake's benchmark files."""
    per_rule = bench.groupby("rule").s.agg(["sum", "count"]).sort_values("sum")
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.barh([f"{r} ({int(c)} jobs)" for r, c in zip(per_rule.index, per_rule["count"])], per_rule["sum"])
    ax.set_xlabel("wall time, summed over jobs (s)")
    ax.set_title("per-rule wall time (results/benchmarks)")
    ax.grid(alpha=0.3, axis="x")
    _save(fig, path)


def read_benchmarks(paths, root) -> pd.DataFrame:
    """One row per benchmark file: rule (first folder under ``root``), job, seconds, peak RSS."""
    rows = []
    for f in map(Path, paths):
        df = pd.read_csv(f, sep="\t")
        rel = f.relative_to(root)
        rows.append(
            dict(
                rule=rel.parts[0].removesuffix(".tsv"),
                job=str(rel.with_suffix("")),
                s=float(df.s.iloc[-1]),
                max_rss_mb=float(df.max_rss.iloc[-1]),
            )
        )
    return pd.DataFrame(rows, columns=["rule", "job", "s", "max_rss_mb"])


# ---------------------------------------------------------------- summary


def baseline_verdicts(runs: pd.DataFrame) -> list[dict]:
    """Per baseline D: does it use its attention (the ablation ratio) and how far below unigram is it?"""
    lines = []
    for r in runs[runs.variant == "D"].itertuples():
        if not (isinstance(r.attention_ablated_val_ppl, float) and math.isfinite(r.attention_ablated_val_ppl)):
            continue
        ratio = r.attention_ablated_val_ppl / r.final_val_ppl
        uses = ratio >= ATTENTION_USE
        verdict = (
            f"uses its attention (≥ {ATTENTION_USE}x): surgery results on this model are informative"
            if uses
            else f"barely uses its attention (< {ATTENTION_USE}x): surgery results on this "
            f"model say little about attention"
        )
        lines.append(
            dict(
                stage="baseline",
                subject=f"D seed {r.seed}",
                question="does D use its attention?",
                numbers=f"ppl {r.final_val_ppl:.2f}; every head uniform over its prefix "
                f"{r.attention_ablated_val_ppl:.2f} (ratio {ratio:.2f}); unigram {r.unigram_val_ppl:.1f} "
                f"(D at {r.final_val_ppl / r.unigram_val_ppl:.2f}x unigram)",
                spread="",
                verdict=verdict,
            )
        )
    return lines


def interval_text(low: float, high: float) -> str:
    """The 95 % interval as the summary states it; 'n/a (one seed)' where none exists."""
    return "95% CI n/a (one seed)" if not math.isfinite(low) else f"95% CI [{low:+.2f}, {high:+.2f}]"


def training_verdicts(comparisons: pd.DataFrame) -> list[dict]:
    lines = []
    for r in comparisons.itertuples():
        shown = interval_text(r.ci95_low, r.ci95_high)
        d_note = " (D on one seed: its seed variation is not in the interval)" if r.d_seeds == 1 else ""
        lines.append(
            dict(
                stage="factorisation",
                subject=f"k={r.k}",
                question=f"{r.comparison}: {r.question}",
                numbers=f"{r.comparison.split()[0]} {r.ppl_first:.2f} vs "
                f"{r.comparison.split()[-1]} {r.ppl_second:.2f} ppl; "
                f"difference {r.diff_mean:+.2f}, {shown}, over {r.n_seeds} seed(s){d_note}",
                spread=shown,
                verdict=r.verdict,
            )
        )
    return lines


def surgery_targets_measured(surgery: pd.DataFrame, notes: dict[str, str]) -> list[str]:
    """One markdown line per surgery target: the unmodified perplexity every ratio divides by, and its note."""
    out = []
    for target, t in surgery.groupby("target", sort=False):
        note = notes.get(target, "")
        out.append(
            f"- **{target}**: unmodified perplexity {t.base_ppl.iloc[0]:.2f} on its validation tokens"
            + (f"; {note}" if note else "")
        )
    return out


def write_summary(
    lines: list[dict], not_run: dict[str, str], csv_path, md_path, preambles: dict[str, list[str]] | None = None
) -> None:
    """summary.csv and summary.md; ``preambles`` are markdown lines printed under a stage's heading."""
    table = pd.DataFrame(lines, columns=["stage", "subject", "question", "numbers", "spread", "verdict"])
    for stage, why in not_run.items():
        table.loc[len(table)] = dict(
            stage=stage, subject="", question="", numbers="", spread="", verdict=f"not run: {why}"
        )
    write_csv(csv_path, table)
    md = [
        "# weightpca summary",
        "",
        "Every verdict below is computed from the numbers beside it (src/weightpca/report.py).",
        "",
    ]
    for stage, group in table.groupby("stage", sort=False):
        md += [f"## {stage}", ""]
        if (preambles or {}).get(stage):
            md += [*preambles[stage], ""]
        if group.verdict.str.startswith("not run").all():
            md += [f"Not run: {not_run[stage]}.", ""]
            continue
        md += ["| subject | question | numbers | verdict |", "|---|---|---|---|"]
        md += [f"| {r.subject} | {r.question} | {r.numbers} | **{r.verdict}** |" for r in group.itertuples()]
        md.append("")
    write_text(md_path, "\n".join(md))


def build_report(
    inputs: dict,
    outputs: dict,
    bench_root,
    surgery_notes: dict[str, str] | None = None,
    run_names: list[str] | None = None,
) -> pd.DataFrame:
    """Write every figure plus the summary tables to ``outputs``; returns the summary table.

    ``inputs`` maps: runs (train/summary.csv), comparisons, spectrum, params,
    metrics (list of metrics.csv, named by ``run_names`` in the same order),
    surgery (list of csv), frontier (list of frontier.csv), sensitivity (list
    of sensitivity.csv), compress (list of compress.json), sketch (list of errors.json), lowrank (list of
    sweep.csv), benchmarks (list of Snakemake benchmark files under
    ``bench_root``); absent keys mean the stage was not run. ``outputs`` maps
    each figure's name (as the report rule names its outputs, the one list of
    them) to its .png path, and summary_csv, summary_md and lowrank_csv to
    theirs.
    """
    fig = outputs
    lines, not_run, preambles = [], {}, {}

    if inputs.get("runs"):
        runs = pd.read_csv(inputs["runs"])
        ranks = sorted(int(k) for k in runs.k.dropna().unique())
        metrics = {name: pd.read_csv(p) for name, p in zip(run_names, inputs.get("metrics", []), strict=True)}
        plot_training_curves(metrics, ranks, fig["training_curves"])
        plot_ppl_vs_k(runs, fig["ppl_vs_k"])
        plot_spectrum(json.loads(Path(inputs["spectrum"]).read_text()), fig["spectrum"])
        plot_params(pd.read_csv(inputs["params"]), fig["params_vs_k"])
        lines += baseline_verdicts(runs)
        lines += training_verdicts(pd.read_csv(inputs["comparisons"]))
    else:
        not_run["factorisation"] = "no training results"
        for name in ("training_curves", "ppl_vs_k", "spectrum", "params_vs_k"):
            _not_run(fig[name], name, "no training results")

    if inputs.get("surgery"):
        surgery = pd.concat([pd.read_csv(p) for p in inputs["surgery"]], ignore_index=True)
        frontier = pd.concat([pd.read_csv(p) for p in inputs["frontier"]], ignore_index=True)
        plot_surgery(surgery, frontier, surgery_notes or {}, fig["surgery"])
        lines += frontier_verdicts(frontier)
        lines += surgery_verdicts(surgery)
        preambles["surgery"] = surgery_targets_measured(surgery, surgery_notes or {})
    else:
        not_run["surgery"] = "surgery.enabled is false"
        _not_run(fig["surgery"], "attention surgery", "surgery.enabled is false")
    if inputs.get("whole_model"):
        whole = with_refit_label(pd.concat([pd.read_csv(p) for p in inputs["whole_model"]], ignore_index=True))
        whole_frontier = with_refit_label(
            pd.concat([pd.read_csv(p) for p in inputs["whole_model_frontier"]], ignore_index=True)
        )
        plot_whole_model(whole, fig["surgery_whole_model"])
        lines += whole_model_verdicts(whole, whole_frontier)
    else:
        not_run["whole-model"] = "surgery.whole_model.enabled is false"
        _not_run(fig["surgery_whole_model"], "whole-model compression", not_run["whole-model"])
    if inputs.get("sensitivity"):
        plot_sensitivity(
            pd.concat([pd.read_csv(p) for p in inputs["sensitivity"]], ignore_index=True), fig["surgery_sensitivity"]
        )
    else:
        _not_run(fig["surgery_sensitivity"], "surgery sensitivity", "surgery.sensitivity is false")

    if inputs.get("compress"):
        lines += compress_verdicts(inputs["compress"])
        lines += onnx_verdicts(inputs.get("onnx") or [])
    else:
        not_run["compress"] = "compress.enabled is false or no points"
    if inputs.get("recovery"):
        recovery = pd.concat([pd.read_csv(p) for p in inputs["recovery"]], ignore_index=True)
        plot_recovery(recovery, fig["recovery"])
        lines += recovery_verdicts(recovery)
    else:
        not_run["recovery"] = "recovery.enabled is false or no points"
        _not_run(fig["recovery"], "recovery", not_run["recovery"])

    if inputs.get("sketch"):
        table = sketch_table(inputs["sketch"])
        plot_sketch(table, fig["sketch_error"])
        lines += sketch_verdicts(table)
    else:
        not_run["sketch"] = "sketch.enabled is false"
        _not_run(fig["sketch_error"], "streaming-sketch PCA", not_run["sketch"])

    if inputs.get("lowrank"):
        table = lowrank_table(inputs["lowrank"])
        write_csv(outputs["lowrank_csv"], lowrank_stats(table))
        plot_lowrank(table, fig["lowrank"])
        lines += lowrank_verdicts(table)
    else:
        not_run["low-rank regulariser"] = "lowrank.enabled is false"
        write_csv(outputs["lowrank_csv"], pd.DataFrame())
        _not_run(fig["lowrank"], "low-rank regulariser", not_run["low-rank regulariser"])

    bench = read_benchmarks(inputs.get("benchmarks", []), bench_root)
    if bench.empty:
        _not_run(fig["wall_times"], "wall times", "no benchmark files")
    else:
        plot_wall_times(bench, fig["wall_times"])
    write_summary(lines, not_run, outputs["summary_csv"], outputs["summary_md"], preambles)
    return pd.read_csv(outputs["summary_csv"])
