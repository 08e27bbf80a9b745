"""Extraction of the matrices later stages analyse, from D's final checkpoint."""


rule extract_baseline:
    input:
        model=f"{RESULTS}/train/D/seed{baseline_seed()}/model.safetensors",
        config=f"{RESULTS}/train/D/seed{baseline_seed()}/config.json",
    output:
        wte=f"{RESULTS}/extract/D/wte.npy",
        attention=f"{RESULTS}/extract/D/attention.safetensors",
        manifest=f"{RESULTS}/extract/D/manifest.json",
    log:
        f"{LOGS}/extract/D.log",
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/extract.py"
