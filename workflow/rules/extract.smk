"""Extraction of the matrices later stages analyse, from D's final checkpoint."""


rule extract_baseline:
    input:
        model=baseline_output("model"),
        config=baseline_output("config"),
    output:
        wte=f"{RESULTS}/extract/D/wte.npy",
        attention=f"{RESULTS}/extract/D/attention.safetensors",
        manifest=f"{RESULTS}/extract/D/manifest.json",
    log:
        f"{LOGS}/extract/D.log",
    benchmark:
        f"{BENCH}/extract/D.tsv"
    # short, and A/B wait for it: first in line for a free core, as D is
    priority: 10
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/extract.py"
