"""Truly factored models: the surgery's low-rank matrices stored as factors, saved, reloaded and timed.

A weight ``W [n, m]`` (``nn.Linear``: y = x Wᵀ + b) compressed at rank r is
stored as ``coef [n, r]``, ``basis [r, m]`` and, for weight-only PCA, the
mean row ``μ [m]`` (``weightpca.surgery``):

    W ≈ coef @ basis + 1 μᵀ,   so   y = (x basisᵀ) coefᵀ + (x · μ) 1 + b.

The mean is a rank-one term, not a bias: every output gets ``x · μ``. For
``activation_aware`` ``coef = (W L)_r``'s ``U S`` and ``basis = Vt_r L⁻¹``
(no mean). ``shared_kv`` and ``cross_layer`` give K and V (of a layer, or of
every layer) one ``basis`` and ``μ``: one ``nn.Parameter`` referenced by
several modules, saved once. A matrix group whose factors are not smaller
than its dense matrices is stored dense, as its reconstruction, so the model
equals the surgery's at that point and never grows.

Output folder: ``model.safetensors`` (factors and every other weight; a
tensor shared by several modules is saved once and listed under
``aliases``), ``config.json`` (the model's own config) and ``compress.json``
(``modules``: every replaced module's shapes and the names of its shared
factors, plus the measurements). ``load_compressed`` rebuilds the model from
these with the native model class; nothing is unpickled and no remote code
runs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .io import WeightFileError, check_state_dict, load_tensors, read_json, save_tensors, write_json
from .surgery import PCABasis, SweepPlan, WhitenedBasis, input_cholesky, rank_for_threshold

FORMAT = "weightpca-compressed-1"
MATRIX_GROUPS = ("qkv", "o", "mlp")


class CompressedModelError(ValueError):
    """A compressed model folder that cannot be loaded."""


class LowRankLinear(nn.Module):
    """``y = (x basisᵀ) coefᵀ + (x · μ) 1 + b``: an ``nn.Linear`` of weight ``coef @ basis + 1 μᵀ``.

    ``basis [r, m]`` and ``row_mean [m]`` may be parameters shared with other
    modules (a shared K/V basis); ``coef [n, r]`` and ``bias [n]`` are its own.
    """

    def __init__(self, coef: nn.Parameter, basis: nn.Parameter, row_mean: nn.Parameter | None = None,
                 bias: nn.Parameter | None = None):
        super().__init__()
        self.coef, self.basis, self.row_mean, self.bias = coef, basis, row_mean, bias
        self.in_features, self.out_features, self.rank = basis.shape[1], coef.shape[0], basis.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(F.linear(x, self.basis), self.coef, self.bias)
        if self.row_mean is not None:
            y = y + (x @ self.row_mean).unsqueeze(-1)
        return y

    def dense_weight(self) -> torch.Tensor:
        w = self.coef @ self.basis
        return w + self.row_mean if self.row_mean is not None else w


class ConcatLinear(nn.Module):
    """Several linear maps of one input, outputs concatenated: our GPT's fused q/k/v projection, factored."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


@dataclass
class Factor:
    """One matrix's factors; matrices with the same ``key`` share ``basis`` and ``mean``."""

    key: str
    coef: np.ndarray  # [n, r]
    basis: np.ndarray  # [r, m]
    mean: np.ndarray | None  # [m]

    def dense(self) -> np.ndarray:
        w = self.coef @ self.basis
        return w + self.mean if self.mean is not None else w


# ------------------------------------------------------------- where the matrices are

def _is_gpt(target) -> bool:
    return type(target).__name__ == "GPTTarget"


def linear_paths(target, i: int, groups) -> dict[str, str]:
    """Module paths of layer i's linear maps in ``groups`` other than q/k/v (those are ``get_qkv``'s)."""
    if _is_gpt(target):
        names = {"o": ["attn.c_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"]}
        prefix = f"transformer.h.{i}."
    else:
        names = {"o": ["self_attn.o_proj"], "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}
        prefix = f"model.layers.{i}."
    return {f"{i}.{n}": prefix + n for g in groups if g != "qkv" for n in names[g]}


def qkv_paths(target, i: int) -> dict[str, str]:
    """Module paths of layer i's q, k, v (our GPT: three row blocks of one fused ``c_attn``)."""
    if _is_gpt(target):
        return {n: f"transformer.h.{i}.attn.c_attn" for n in "qkv"}
    return {n: f"model.layers.{i}.self_attn.{n}_proj" for n in "qkv"}


def factor_path(target, name: str) -> str:
    """Module path of the matrix a factor name ("<layer>.<matrix>") belongs to."""
    i, matrix = name.split(".", 1)
    if matrix in ("q", "k", "v"):
        return qkv_paths(target, int(i))[matrix]
    return linear_paths(target, int(i), MATRIX_GROUPS)[name]


def plan_factors(target, mode: str, threshold: float, groups, calib_tokens, window: int,
                 dtype=np.float32) -> dict[str, Factor]:
    """Factors of every matrix in ``groups`` at one threshold, keyed "<layer>.<name>".

    q/k/v follow the surgery's mode exactly (``SweepPlan``). The attention
    output and MLP matrices get their own decomposition per matrix:
    activation-weighted in ``activation_aware``, weight-only PCA otherwise
    (K/V sharing has no analogue there).
    """
    from .targets import input_moments

    unknown = set(groups) - set(MATRIX_GROUPS)
    if unknown or "qkv" not in groups:
        raise ValueError(f"matrices {list(groups)}: choose [qkv] plus any of o, mlp")
    aware = mode == "activation_aware"
    moments = input_moments(target, calib_tokens, window) if aware else None
    plan = SweepPlan(mode, [target.get_qkv(i) for i in range(target.n_layers)], moments, dtype)
    factors = {}
    for i, layer in enumerate(plan.factors_at(threshold)):
        for name, (key, coef, basis, mean) in layer.items():
            factors[f"{i}.{name}"] = Factor(key, coef, basis, mean)
    others = {k: path for i in range(target.n_layers) for k, path in linear_paths(target, i, groups).items()}
    modules = [target.model.get_submodule(p) for p in others.values()]
    extra = input_moments(target, calib_tokens, window, modules) if aware and modules else [None] * len(modules)
    for (key, _), module, c in zip(others.items(), modules, extra):
        w = module.weight.detach().double().cpu().numpy()
        if aware:
            chol = input_cholesky(c)
            b = WhitenedBasis.fit(w, chol, np.linalg.inv(chol))
            r = rank_for_threshold(b.s, threshold)
            factors[key] = Factor(key, b.u_s[:, :r], b.vt_linv[:r], None)
        else:
            b = PCABasis.fit(w, dtype)
            r = rank_for_threshold(b.s, threshold)
            factors[key] = Factor(key, b.scores[:, :r], b.vt[:r], b.mean)
    return factors


def _saves(members: list[Factor]) -> bool:
    """Whether a group sharing one basis is smaller factored than dense."""
    first = members[0]
    factored = sum(f.coef.size for f in members) + first.basis.size + (first.mean.size if first.mean is not None else 0)
    return factored < sum(f.coef.shape[0] * f.basis.shape[1] for f in members)


# ------------------------------------------------------------- building the factored model

def _param(a, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.as_tensor(np.ascontiguousarray(a)).to(like.device, like.dtype), requires_grad=False)


def factorize_model(target, factors: dict[str, Factor]) -> tuple[nn.Module, list[dict]]:
    """A copy of ``target.model`` with every matrix of ``factors`` factored (or dense-reconstructed).

    Returns (model, modules spec). The spec names, per replaced module path,
    its parts' shapes and the basis key each shares, which ``load_compressed``
    rebuilds the skeleton from.
    """
    model = copy.deepcopy(target.model)
    groups: dict[str, list[Factor]] = {}
    for f in factors.values():
        groups.setdefault(f.key, []).append(f)
    factored_keys = {k for k, members in groups.items() if _saves(members)}
    shared: dict[str, tuple] = {}
    paths: dict[str, list[Factor]] = {}
    for name, f in factors.items():
        paths.setdefault(factor_path(target, name), []).append(f)
    spec = []
    for path, parts in paths.items():
        dense = model.get_submodule(path)
        built, part_specs = [], []
        row = 0
        for f in parts:
            n = f.coef.shape[0]
            bias = dense.bias[row:row + n] if dense.bias is not None else None
            row += n
            like = dense.weight
            if f.key in factored_keys:
                if f.key not in shared:
                    shared[f.key] = (_param(f.basis, like), _param(f.mean, like) if f.mean is not None else None)
                basis, mean = shared[f.key]
                module = LowRankLinear(_param(f.coef, like), basis, mean,
                                       nn.Parameter(bias.detach().clone(), requires_grad=False)
                                       if bias is not None else None)
                part_specs.append(dict(kind="lowrank", out=n, rank=f.basis.shape[0], key=f.key,
                                       mean=f.mean is not None, bias=bias is not None))
            else:
                module = nn.Linear(f.basis.shape[1], n, bias=bias is not None, device=like.device, dtype=like.dtype)
                with torch.no_grad():
                    module.weight.copy_(torch.as_tensor(f.dense()))
                    if bias is not None:
                        module.bias.copy_(bias)
                part_specs.append(dict(kind="dense", out=n, bias=bias is not None))
            built.append(module.requires_grad_(False))
        replacement = built[0] if len(built) == 1 else ConcatLinear(built)
        _set_submodule(model, path, replacement)
        spec.append(dict(path=path, in_features=dense.weight.shape[1], parts=part_specs))
    return model, spec


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def build_skeleton(model: nn.Module, spec: list[dict]) -> nn.Module:
    """Replace ``spec``'s modules of a freshly built model by factored modules of the recorded shapes."""
    shared: dict[str, tuple] = {}
    for entry in spec:
        m, built = entry["in_features"], []
        like = model.get_submodule(entry["path"]).weight
        for part in entry["parts"]:
            bias = nn.Parameter(torch.zeros(part["out"], dtype=like.dtype), requires_grad=False) if part["bias"] else None
            if part["kind"] == "dense":
                built.append(nn.Linear(m, part["out"], bias=part["bias"], dtype=like.dtype).requires_grad_(False))
                continue
            if part["key"] not in shared:
                shared[part["key"]] = (
                    nn.Parameter(torch.zeros(part["rank"], m, dtype=like.dtype), requires_grad=False),
                    nn.Parameter(torch.zeros(m, dtype=like.dtype), requires_grad=False) if part["mean"] else None,
                )
            basis, mean = shared[part["key"]]
            coef = nn.Parameter(torch.zeros(part["out"], part["rank"], dtype=like.dtype), requires_grad=False)
            built.append(LowRankLinear(coef, basis, mean, bias))
        _set_submodule(model, entry["path"], built[0] if len(built) == 1 else ConcatLinear(built))
    return model


# ------------------------------------------------------------- saving and loading

def unique_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, aliases): every state-dict tensor once; a name sharing another's storage is an alias."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), t.stride())
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = t
    return tensors, aliases


def count_parameters(model: nn.Module) -> int:
    """Parameters stored once each (``parameters()`` already skips shared ones)."""
    return sum(p.numel() for p in model.parameters())


def save_compressed(model: nn.Module, spec: list[dict], folder, kind: str, model_config: dict,
                    record: dict | None = None) -> dict:
    """Write ``model.safetensors``, ``config.json`` and ``compress.json``; returns compress.json's content."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, aliases = unique_tensors(model)
    save_tensors(folder / "model.safetensors", tensors, metadata={"format": FORMAT})
    write_json(folder / "config.json", model_config)
    content = dict(format=FORMAT, kind=kind, modules=spec, aliases=aliases, **(record or {}))
    write_json(folder / "compress.json", content)
    return content


PICKLED = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def load_compressed(folder, device: str = "cpu") -> nn.Module:
    """Rebuild a saved compressed model: native model class, factored modules substituted, weights loaded.

    Refused with a message naming the file: a pickled weight file in the
    folder (never unpickled), a missing or extra tensor, a shape that does
    not match ``compress.json``'s modules.
    """
    folder = Path(folder)
    for p in sorted(folder.iterdir()):
        if p.suffix in PICKLED:
            raise CompressedModelError(f"{p}: pickled weight files are refused (weightpca loads safetensors only)")
    info = read_json(folder / "compress.json")
    if info.get("format") != FORMAT:
        raise CompressedModelError(f"{folder / 'compress.json'}: format {info.get('format')!r}, expected {FORMAT!r}")
    if info["kind"] == "gpt":
        from .model import GPT, GPTConfig

        model = GPT(GPTConfig.from_dict(read_json(folder / "config.json")["model"]))
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    model = build_skeleton(model, info["modules"])
    weights = folder / "model.safetensors"
    try:
        tensors = load_tensors(weights)
    except Exception as e:
        raise CompressedModelError(str(e)) from e
    for alias, source in info["aliases"].items():
        if source not in tensors:
            raise CompressedModelError(f"{weights}: tensor '{source}' (shared as '{alias}') is missing")
        tensors[alias] = tensors[source]
    try:  # the skeleton's shapes are compress.json's modules
        check_state_dict(tensors, model.state_dict(), weights)
    except WeightFileError as e:
        raise CompressedModelError(str(e)) from e
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval()


# ------------------------------------------------------------- one operating point, end to end

def frontier_threshold(frontier_csv, mode: str, tolerance: float) -> float:
    """The threshold of ``mode``'s frontier point at ``tolerance`` (frontier.csv), refused if it has none."""
    import pandas as pd

    table = pd.read_csv(frontier_csv)
    row = table[(table["mode"] == mode) & np.isclose(table.tolerance, tolerance)]
    if row.empty:
        raise ValueError(f"{frontier_csv}: no row for mode {mode} at tolerance {tolerance}")
    row = row.iloc[0]
    if not row.within:
        raise ValueError(
            f"{frontier_csv}: {mode} has no compressed point within {tolerance:.0%} of the base perplexity "
            f"(its best is {row.ppl_ratio:.3g}x at {row.params_fraction:.1%} of q/k/v parameters); "
            f"give this compress point a larger tolerance, another mode or a threshold"
        )
    return float(row.threshold)


def _with_weights(target, factors: dict[str, Factor], fn):
    """``fn()`` with every factored matrix of ``target.model`` replaced by its dense reconstruction."""
    originals = {}
    with torch.no_grad():
        for i in range(target.n_layers):
            originals[("qkv", i)] = target.get_qkv(i)
            target.set_qkv(i, {n: factors[f"{i}.{n}"].dense() for n in "qkv"})
        for name, f in factors.items():
            if name.split(".", 1)[1] not in ("q", "k", "v"):
                w = target.model.get_submodule(factor_path(target, name)).weight
                originals[name] = w.detach().clone()
                w.copy_(torch.as_tensor(f.dense()).to(w.device, w.dtype))
    try:
        return fn()
    finally:
        with torch.no_grad():
            for key, w in originals.items():
                if isinstance(key, tuple):
                    target.set_qkv(key[1], w)
                else:
                    target.model.get_submodule(factor_path(target, key)).weight.copy_(w)


def dense_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s weights as one safetensors file, written the way compressed models are."""
    import tempfile

    tensors, _ = unique_tensors(model)
    with tempfile.TemporaryDirectory() as tmp:
        save_tensors(Path(tmp) / "dense.safetensors", tensors)
        return (Path(tmp) / "dense.safetensors").stat().st_size


def export_point(target, kind: str, mode: str, threshold: float, groups, val, calib, window: int, folder,
                 model_config: dict, progress=print) -> dict:
    """Factor ``target`` at one operating point, save it, reload it and check it against the dense path.

    Returns the record: perplexity of the unmodified model, of the dense
    reconstruction (the surgery's measurement) and of the reloaded factored
    model, which must agree with the reconstruction to a relative 1e-3;
    parameters and bytes of both; ranks; a greedy continuation of the
    reloaded model.
    """
    from .targets import GPTTarget, HFTarget, perplexity

    base_ppl = perplexity(target, val, window)
    factors = plan_factors(target, mode, threshold, groups, calib, window)
    ppl_reconstructed = _with_weights(target, factors, lambda: perplexity(target, val, window))
    model, spec = factorize_model(target, factors)
    save_compressed(model, spec, folder, kind, model_config)
    del model
    reloaded = load_compressed(folder, str(target.device))
    wrap = GPTTarget if kind == "gpt" else HFTarget
    loaded = wrap(reloaded, target.tokenizer)
    ppl_loaded = perplexity(loaded, val, window)
    agreement = abs(ppl_loaded / ppl_reconstructed - 1)
    progress(f"{mode} t={threshold:.6g}: ppl base {base_ppl:.4f}, reconstructed {ppl_reconstructed:.4f}, "
             f"reloaded factored {ppl_loaded:.4f} (|ratio - 1| = {agreement:.2e})")
    if agreement > 1e-3:
        raise AssertionError(f"{folder}: the reloaded factored model's perplexity {ppl_loaded} differs from the "
                             f"dense reconstruction's {ppl_reconstructed} by more than 1e-3 (relative)")
    prompt = target.encode("ROMEO.\n") or [0]
    factored_parts = [p for e in spec for p in e["parts"] if p["kind"] == "lowrank"]
    return dict(
        mode=mode, threshold=threshold, matrices=list(groups),
        base_ppl=base_ppl, ppl_reconstructed=ppl_reconstructed, ppl_loaded=ppl_loaded,
        ppl_ratio=ppl_loaded / base_ppl, loaded_vs_reconstructed=agreement,
        params_dense=count_parameters(target.model), params_factored=count_parameters(reloaded),
        bytes_dense=dense_bytes(target.model), bytes_factored=(Path(folder) / "model.safetensors").stat().st_size,
        matrices_factored=len(factored_parts), matrices_dense_kept=sum(len(e["parts"]) for e in spec)
        - len(factored_parts), mean_rank=float(np.mean([p["rank"] for p in factored_parts])) if factored_parts
        else float("nan"),
        continuation=loaded.decode(loaded.greedy(prompt, 12)),
    )
