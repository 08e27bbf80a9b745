"""Figures, computed verdicts and Snakemake's HTML report (snakemake --report)."""


include: "functions/report.smk"


rule report:
    input:
        unpack(report_inputs),
    output:
        summary_csv=f"{RESULTS}/report/summary.csv",
        summary_md=f"{RESULTS}/report/summary.md",
        training_curves=report(
            f"{RESULTS}/report/figures/training_curves.png",
            caption="../report/training_curves.rst",
            category="Embedding factorisation",
        ),
        ppl_vs_k=report(
            f"{RESULTS}/report/figures/ppl_vs_k.png",
            caption="../report/ppl_vs_k.rst",
            category="Embedding factorisation",
        ),
        spectrum=report(
            f"{RESULTS}/report/figures/spectrum.png",
            caption="../report/spectrum.rst",
            category="Embedding factorisation",
        ),
        params_vs_k=report(
            f"{RESULTS}/report/figures/params_vs_k.png",
            caption="../report/params_vs_k.rst",
            category="Embedding factorisation",
        ),
        surgery=report(
            f"{RESULTS}/report/figures/surgery.png",
            caption="../report/surgery.rst",
            category="Attention surgery",
        ),
        surgery_whole_model=report(
            f"{RESULTS}/report/figures/surgery_whole_model.png",
            caption="../report/surgery_whole_model.rst",
            category="Attention surgery",
        ),
        surgery_sensitivity=report(
            f"{RESULTS}/report/figures/surgery_sensitivity.png",
            caption="../report/surgery_sensitivity.rst",
            category="Attention surgery",
        ),
        recovery=report(
            f"{RESULTS}/report/figures/recovery.png",
            caption="../report/recovery.rst",
            category="Recovery",
        ),
        sketch_error=report(
            f"{RESULTS}/report/figures/sketch_error.png",
            caption="../report/sketch_error.rst",
            category="Streaming sketch",
        ),
        lowrank_csv=f"{RESULTS}/report/lowrank.csv",
        lowrank=report(
            f"{RESULTS}/report/figures/lowrank.png",
            caption="../report/lowrank.rst",
            category="Low-rank regulariser",
        ),
        wall_times=report(
            f"{RESULTS}/report/figures/wall_times.png",
            caption="../report/wall_times.rst",
            category="Timing",
        ),
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCH}/report.tsv"
    conda:
        "../../envs/report.yaml"
    params:
        bench_root=BENCH,
        notes={name: t.get("note", "") for name, t in SURGERY["targets"].items()},
        run_names=run_names(),
    script:
        "../scripts/report.py"
