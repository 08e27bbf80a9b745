"""The report stage on the tiny DAG: figures, computed verdicts, Snakemake's HTML report in Chromium."""

import os
import shutil
import subprocess

import pytest
from PIL import Image

from conftest import snakemake

pytestmark = pytest.mark.workflow

FIGURES = [
    "training_curves",
    "ppl_vs_k",
    "spectrum",
    "params_vs_k",
    "surgery",
    "surgery_sensitivity",
    "surgery_whole_model",
    "recovery",
    "sketch_error",
    "lowrank",
    "wall_times",
]


@pytest.fixture(scope="module")
def dag(ci_dag):
    results, cfg = ci_dag
    return results.parent, cfg


def colored_pixels(path) -> int:
    """Pixels with clearly unequal RGB channels: plotted data. Text, axes and a blank page are grey."""
    import numpy as np

    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum())


def test_figures_are_real_images(dag, tmp_path):
    from weightpca.report import _not_run

    work, _ = dag
    for name in FIGURES:
        path = work / f"results/report/figures/{name}.png"
        img = Image.open(path).convert("L")
        assert img.size[0] >= 800 and img.size[1] >= 500, name
        lo, hi = img.getextrema()
        assert hi - lo > 100, f"{name} is blank"
        assert colored_pixels(path) > 200, f"{name} plots no data"
    # the check above refuses the placeholder a stage that did not run gets
    _not_run(tmp_path / "placeholder.png", "attention surgery", "surgery.enabled is false")
    assert colored_pixels(tmp_path / "placeholder.png") == 0


def test_summary_answers_every_question(dag):
    import pandas as pd

    work, _ = dag
    summary = pd.read_csv(work / "results/report/summary.csv")
    fact = summary[summary.stage == "factorisation"]
    assert len(fact) == 2 * 4  # A vs C, A vs D, B vs A, B vs D at k = 4 and 16
    assert fact.verdict.str.contains("one seed").all()  # ci.yaml has one seed: no spread claimed
    # the baseline line states the attention-ablation ratio of D's summary and judges it against 1.25
    import json

    from weightpca.report import ATTENTION_USE

    d = json.loads((work / "results/train/D/seed7/summary.json").read_text())
    ratio = d["attention_ablated_val_ppl"] / d["final_val_ppl"]
    (base,) = summary[summary.stage == "baseline"].itertuples()
    assert f"(ratio {ratio:.2f})" in base.numbers
    assert base.verdict.startswith("uses its attention" if ratio >= ATTENTION_USE else "barely uses")
    surgery = summary[summary.stage == "surgery"]
    assert set(surgery.subject) == {"gpt", "smollm2"}
    # per target: the frontier at each tolerance, then equal parameters among working points
    frontier = surgery[surgery.question.str.startswith("q/k/v parameters kept within")]
    assert sorted(frontier.question.str.extract(r"within (\d+)%")[0].astype(int)) == [1, 1, 5, 5, 10, 10]
    assert surgery.question.str.contains("equal q/k/v parameters, working points only").sum() == 2
    for target in ("gpt", "smollm2"):
        table = pd.read_csv(work / f"results/surgery/{target}/frontier.csv")
        # every mode x tolerance (SmolLM2 sweeps its own two modes: targets.smollm2.modes)
        modes = {"gpt": 4, "smollm2": 2}[target]
        assert len(table) == modes * 3 and table["mode"].nunique() == modes
        claimed = table[table.within]
        assert (claimed.ppl_ratio <= 1 + claimed.tolerance).all() and (claimed.params_fraction < 1).all()
        for r in table.itertuples():  # the verdict line quotes each mode's frontier point
            line = frontier[
                (frontier.subject == target) & frontier.question.str.contains(f"within {r.tolerance:.0%}")
            ].numbers.iloc[0]
            assert (f"{r.mode} {r.params_fraction:.1%}" if r.within else f"{r.mode} none") in line
        sens = pd.read_csv(work / f"results/surgery/{target}/sensitivity.csv")
        roles = {"gpt": {"fc", "proj"}, "smollm2": {"gate", "up", "down"}}[target] | {"q", "k", "v", "o"}
        assert set(sens.scope) == {"type", "layer"} and set(sens[sens.scope == "type"].matrices) == roles
    # recovery: one line per recovered point, with the interval over its two seeds
    (rec,) = summary[summary.stage == "recovery"].itertuples()
    assert rec.subject == "gpt whole30" and "the equally fine-tuned dense model, 95 % CI [" in rec.numbers
    assert "(2 seeds, 8 steps)" in rec.numbers
    sketch = summary[summary.stage == "sketch"]
    assert set(sketch.question) == {"seed_srht vs exact PCA", "srht vs exact PCA", "gaussian vs exact PCA"}
    lowrank = summary[summary.stage == "low-rank regulariser"]
    assert list(lowrank.subject) == ["100% of rank", "50% of rank", "25% of rank"]  # λ = 1 vs the control
    assert lowrank.verdict.str.contains("one seed").all()
    stats = pd.read_csv(work / "results/report/lowrank.csv")
    assert set(stats["lambda"]) == {0.0, 1.0} and set(stats.fraction) == {1.0, 0.5, 0.25}
    md = (work / "results/report/summary.md").read_text()
    # every surgery target is named with the perplexity its ratios divide by, and its note
    base = pd.read_csv(work / "results/surgery/smollm2/separate.csv").base_ppl.iloc[0]
    assert f"- **smollm2**: unmodified perplexity {base:.2f}" in md and "dequantised 4-bit" in md
    assert "- **gpt**: unmodified perplexity" in md
    assert "## low-rank regulariser" in md
    assert "## factorisation" in md and "## surgery" in md and "| k=4 |" in md


def surgery_points(mode, points, base=10.0):
    import pandas as pd

    return pd.DataFrame(
        [
            dict(
                target="m",
                mode=mode,
                threshold=t,
                ppl=base * ratio,
                ppl_ratio=ratio,
                base_ppl=base,
                params_fraction=min(f, 1.0),
                params_factored=f,
                params_dense=1,
            )
            for t, f, ratio in points
        ]
    )


def test_no_verdict_uses_a_broken_point():
    """Points above 2x base enter no verdict: a mode broken everywhere is named as broken, not ranked."""
    import pandas as pd

    from weightpca.report import BROKEN, surgery_verdicts

    working = surgery_points("a", [(1.0, 1.2, 1.0), (0.9, 0.8, 1.05), (0.5, 0.4, 1.5)])
    other = surgery_points("b", [(1.0, 1.2, 1.0), (0.9, 0.7, 1.3), (0.5, 0.3, 1.9)])
    broken = surgery_points("c", [(1.0, 1.2, 1.0), (0.9, 0.6, 2.5), (0.5, 0.2, 40.0)])
    (line,) = surgery_verdicts(pd.concat([working, other, broken]))
    assert "broken (> 2x) at every compressed point: c" in line["numbers"]
    ranked = line["numbers"].split(";")[0]
    assert not ranked.startswith("c ") and ", c " not in ranked and not line["verdict"].startswith("c ")
    # a mode whose working range ends before the budget is not extrapolated into its broken points
    half = surgery_points("b", [(1.0, 1.2, 1.0), (0.9, 0.7, 1.3), (0.5, 0.3, BROKEN + 0.1)])
    (line,) = surgery_verdicts(pd.concat([working, half]))
    assert "0.70 of dense" in line["question"] and "b 13.00" in line["numbers"]
    (line,) = surgery_verdicts(pd.concat([working, broken]))
    assert line["verdict"].startswith("fewer than two modes work")


def test_disabled_surgery_is_reported_as_not_run(dag, tmp_path):
    from weightpca.report import build_report

    work, _ = dag
    r = work / "results"
    metrics = sorted(r.glob("train/**/metrics.csv"))
    inputs = {
        "runs": r / "train/summary.csv",
        "comparisons": r / "train/comparisons.csv",
        "spectrum": r / "pca/spectrum.json",
        "params": r / "pca/params.csv",
        "metrics": metrics,
        "benchmarks": [],
    }
    outputs = {name: tmp_path / "figures" / f"{name}.png" for name in FIGURES}
    outputs.update(
        summary_csv=tmp_path / "summary.csv", summary_md=tmp_path / "summary.md", lowrank_csv=tmp_path / "lowrank.csv"
    )
    names = [str(p.parent.relative_to(r / "train")) for p in metrics]
    summary = build_report(inputs, outputs, r / "benchmarks", run_names=names)
    line = summary[summary.stage == "surgery"]
    assert list(line.verdict) == ["not run: surgery.enabled is false"]
    assert "Not run: surgery.enabled is false" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "figures/surgery.png").stat().st_size > 0


def chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("WEIGHTPCA_REQUIRE_BROWSER"):
            pytest.fail("chromium is required (WEIGHTPCA_REQUIRE_BROWSER is set) but not installed")
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run does this)")
    return exe


def headless(exe, tmp_path, *args):
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
    ]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)


def test_html_report_renders_in_chromium(dag, tmp_path):
    exe = chromium()
    work, cfg = dag
    html = work / "results/report/report.html"
    snakemake(work, "--report", str(html), configfile=cfg)
    assert html.stat().st_size > 10_000
    dom = headless(exe, tmp_path, "--dump-dom", html.as_uri())
    assert dom.returncode == 0, dom.stderr
    # the rendered page lists the result categories and every figure
    for text in ("Embedding factorisation", "Attention surgery"):
        assert text in dom.stdout, text
    shot = tmp_path / "report.png"
    done = headless(exe, tmp_path, f"--screenshot={shot}", "--window-size=1280,900", html.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr
    img = Image.open(shot).convert("L")
    assert img.size == (1280, 900)
    lo, hi = img.getextrema()
    assert hi - lo > 100, "screenshot of the report is blank"


def test_baseline_verdict_follows_the_ablation_ratio():
    import pandas as pd

    from weightpca.report import baseline_verdicts

    runs = pd.DataFrame(
        [
            dict(variant="D", seed=1, final_val_ppl=100.0, attention_ablated_val_ppl=130.0, unigram_val_ppl=400.0),
            dict(variant="D", seed=2, final_val_ppl=100.0, attention_ablated_val_ppl=110.0, unigram_val_ppl=400.0),
            dict(variant="A", seed=1, final_val_ppl=90.0, attention_ablated_val_ppl=200.0, unigram_val_ppl=400.0),
        ]
    )
    lines = baseline_verdicts(runs)
    assert [line["subject"] for line in lines] == ["D seed 1", "D seed 2"]
    assert lines[0]["verdict"].startswith("uses its attention") and "(ratio 1.30)" in lines[0]["numbers"]
    assert lines[1]["verdict"].startswith("barely uses its attention")
    assert "0.25x unigram" in lines[0]["numbers"]


def test_frontier_verdict_respects_the_bisection_resolution():
    import pandas as pd

    from weightpca.report import frontier_verdicts

    def row(mode, pf, bracket, within=True):
        return dict(
            target="m",
            tolerance=0.05,
            mode=mode,
            within=within,
            params_fraction=pf,
            ppl_ratio=1.04,
            bracket_params_fraction=bracket,
        )

    apart = pd.DataFrame([row("a", 0.20, 0.15), row("b", 0.40, 0.30), row("c", 0.9, 0.5, within=False)])
    (line,) = frontier_verdicts(apart)
    assert line["verdict"].startswith("a keeps the fewest: 20.0%") and "c none" in line["numbers"]
    overlapping = pd.DataFrame([row("a", 0.20, 0.15), row("b", 0.22, 0.10)])  # b may be below 20 %
    (line,) = frontier_verdicts(overlapping)
    assert line["verdict"].startswith("a, b not distinguishable")
    (line,) = frontier_verdicts(pd.DataFrame([row("a", 0.9, 0.5, within=False)]))
    assert line["verdict"] == "no mode compresses q/k/v within 5%"
