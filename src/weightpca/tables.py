"""Tables of the embedding-factorisation experiment: parameter counts and results.

Parameter counts come from instantiated models (on the ``meta`` device, so
GPT-2 small costs no memory), never from formulas typed by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from .model import GPT, GPTConfig, padded_vocab

GPT2_SMALL = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True)
GPT2_SMALL_RANKS = (64, 128, 256, 384)


def count_params(cfg: dict) -> tuple[int, int]:
    """(embedding params, total params) of the GPT described by ``cfg``."""
    with torch.device("meta"):
        model = GPT(GPTConfig.from_dict(cfg))
    return model.embedding_params(), model.num_params()


def param_rows(label: str, base: dict, ranks, tie_scale: bool = False, embd_bias: bool = False) -> list[dict]:
    full_emb, full_total = count_params(base)
    rows = [
        dict(
            model=label,
            k="full",
            vocab_size=base["vocab_size"],
            n_embd=base["n_embd"],
            embedding_params=full_emb,
            total_params=full_total,
            embedding_compression=1.0,
            total_compression=1.0,
        )
    ]
    for k in ranks:
        emb, total = count_params(dict(base, n_embd_wte=k, tie_scale=tie_scale, embd_bias=embd_bias))
        rows.append(
            dict(
                model=label,
                k=k,
                vocab_size=base["vocab_size"],
                n_embd=base["n_embd"],
                embedding_params=emb,
                total_params=total,
                embedding_compression=full_emb / emb,
                total_compression=full_total / total,
            )
        )
    return rows


def param_table(model_cfg: dict, vocab_size: int, ranks, tie_scale=False, embd_bias=False) -> pd.DataFrame:
    """This configuration's counts at every rank, and GPT-2 small's at k = 64, 128, 256, 384."""
    base = {k: v for k, v in model_cfg.items() if k not in ("vocab_multiple", "n_embd_wte", "tie_scale")}
    base["vocab_size"] = padded_vocab(vocab_size, model_cfg.get("vocab_multiple", 1))
    rows = param_rows("this config", base, ranks, tie_scale, embd_bias)
    rows += param_rows("gpt2-small", GPT2_SMALL, GPT2_SMALL_RANKS)
    return pd.DataFrame(rows)


def run_table(summary_paths) -> pd.DataFrame:
    """One row per training run (D and every variant/k/seed) from their summary.json files."""
    rows = []
    for path in summary_paths:
        s = json.loads(Path(path).read_text())
        parts = s["name"].split("/")  # "D/seed1" or "k16/A/seed1"
        variant, k = ("D", None) if parts[0] == "D" else (parts[1], int(parts[0][1:]))
        rows.append(
            dict(
                variant=variant,
                k=k,
                seed=s["seed"],
                final_val_loss=s["final_val_loss"],
                final_val_ppl=s["final_val_ppl"],
                best_val_ppl=s["best_val_ppl"],
                attention_ablated_val_ppl=s.get("attention_ablated_val_ppl"),
                unigram_val_ppl=s.get("unigram_val_ppl"),
                final_cos_target=s.get("final_cos_target"),
                tokens_seen=s["tokens_seen"],
                steps=s["steps"],
                params=s["params"],
                embedding_params=s["embedding_params"],
                wall_s=s["wall_s"],
            )
        )
    df = pd.DataFrame(rows)
    df["k"] = df["k"].astype("Int64")
    return df.sort_values(["variant", "k", "seed"], na_position="first").reset_index(drop=True)


COMPARISONS = [
    ("A", "C", "PCA init vs random low-rank init"),
    ("A", "D", "cost of rank k (A starts from D's PCA'd embedding, same budget)"),
    ("B", "A", "fine-tuning from D vs training from scratch"),
    ("B", "D", "does compression plus fine-tuning recover the baseline"),
]


CONFIDENCE = 0.95


def mean_interval(diffs: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): the t-interval of the mean of n paired differences,

        mean ± t_{(1 + confidence)/2, n−1} · s / √n,    s the sample standard deviation,

    (Student 1908); NaN bounds with one difference, where no interval exists.
    """
    diffs = np.asarray(diffs, dtype=float)
    mean = float(np.mean(diffs))
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf((1 + confidence) / 2, len(diffs) - 1) * np.std(diffs, ddof=1) / math.sqrt(len(diffs)))
    return mean, mean - half, mean + half


def difference_verdict(diffs: np.ndarray, first: str, second: str) -> tuple[float, float, float, str]:
    """(mean, low, high, verdict) of perplexity differences first − second over seeds (lower is better).

    "not distinguishable" when the 95 % interval contains 0.
    """
    mean, low, high = mean_interval(diffs)
    if math.isnan(low):
        verdict = "one seed: no interval"
    elif low <= 0 <= high:
        verdict = "not distinguishable"
    else:
        verdict = f"{first} {'better' if mean < 0 else 'worse'} than {second}"
    return mean, low, high, verdict


def compare_variants(runs: pd.DataFrame) -> pd.DataFrame:
    """Final val perplexity differences (first − second) per k: mean and 95 % t-interval over seeds.

    Variants with the same seed share data order and (A/C) non-embedding
    init, so A−C and B−A are paired by seed; comparisons with D subtract D's
    mean over its seeds (``d_seeds`` says how many: with one, D's own seed
    variation is not in the interval). With one seed no interval exists.
    """
    rows = []
    d_ppl = runs.loc[runs.variant == "D", "final_val_ppl"]
    for k in sorted(runs.k.dropna().unique()):
        at_k = runs[runs.k == k].set_index(["variant", "seed"])["final_val_ppl"]
        for first, second, question in COMPARISONS:
            if first not in at_k.index.get_level_values(0):
                continue
            a = at_k.loc[first]
            if second == "D":
                if d_ppl.empty:
                    continue
                diffs = (a - d_ppl.mean()).to_numpy()
            else:
                if second not in at_k.index.get_level_values(0):
                    continue
                b = at_k.loc[second]
                seeds = a.index.intersection(b.index)
                diffs = (a.loc[seeds] - b.loc[seeds]).to_numpy()
            mean, low, high, verdict = difference_verdict(diffs, first, second)
            rows.append(
                dict(
                    k=int(k),
                    comparison=f"{first} vs {second}",
                    question=question,
                    ppl_first=float(a.mean()),
                    ppl_second=float(d_ppl.mean() if second == "D" else at_k.loc[second].mean()),
                    diff_mean=mean,
                    ci95_low=low,
                    ci95_high=high,
                    n_seeds=len(diffs),
                    d_seeds=len(d_ppl) if second == "D" else None,
                    verdict=verdict,
                )
            )
    return pd.DataFrame(rows)
