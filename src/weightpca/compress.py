"""Truly factored models: the surgery's low-rank matrices stored as factors, saved, reloaded and timed.

A weight ``W [n, m]`` (``nn.Linear``: y = x Wᵀ + b) compressed at rank r is
stored as ``coef [n, r]``, ``basis [r, m]`` and, for weight-only PCA, the
mean row ``μ [m]`` (the factors of a ``weightpca.plan.Plan``):

    W ≈ coef @ basis + 1 μᵀ,   so   y = (x basisᵀ) coefᵀ + (x · μ) 1 + b.

A factored matrix is a :class:`LowRankLinear`: two ``nn.Linear`` (``basis``
[r, m] without bias, then ``coef`` [n, r] with the original bias) plus the
mean term, so tools that look for ``nn.Linear`` (peft, torch.compile, ONNX
export, quantisers) see both factors. The mean is a rank-one term, not a
bias: every output gets ``x · μ``. For ``activation_aware``
``coef = (W L)_r``'s ``U S`` and ``basis = Vt_r L⁻¹``
(no mean). ``shared_kv`` and ``cross_layer`` give K and V (of a layer, or of
every layer) one ``basis`` and ``μ``: one module and parameter referenced
by several modules, saved once. A matrix group whose factors are not smaller
than its dense matrices is stored dense, as its reconstruction, so the model
equals the surgery's at that point and never grows.

Exports are stored in one dtype (``compress.dtype``; ``auto``: the model's own, e.g. SmolLM2's
bfloat16, our GPT's float32), and their bytes are compared with the dense model's in that dtype.
Reloaded for the perplexity check, an export is evaluated in its own dtype on CUDA and upcast to
float32 on the CPU (which has no fast bfloat16 matmul everywhere); it must agree with the float32
reconstruction within ``RELOAD_TOLERANCE`` of its dtype.

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
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .adapters import ADAPTERS, adapter_for
from .adapters.base import add_linear, add_product
from .allocation import parse_ranks
from .io import WeightFileError, check_state_dict, load_tensors, read_json, save_tensors, write_json
from .partial_products import partial_products, plan_tiles
from .plan import Factor, model_plan
from .refit import refit_plan

# 2: factors are nn.Linear weights ("<path>.basis.weight", "<path>.coef.weight"/".bias"); 1 had bare tensors
FORMAT = "weightpca-compressed-2"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# relative perplexity agreement of a reloaded export with its float32 reconstruction, per storage dtype:
# float32 only reorders sums; a 16-bit dtype rounds every weight (bfloat16 to 8 significant bits)
RELOAD_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def storage_dtype(setting: str, model_config: dict, own: str | None = None) -> torch.dtype:
    """The dtype exports are stored in: ``setting`` (compress.dtype) by name, or ``auto``: the model's
    own, which a target states (``own``: a dequantised GGUF's files do not say it) or its config.json
    (``dtype``, older transformers ``torch_dtype``); float32 when neither does (our GPT)."""
    name = setting if setting != "auto" else own or model_config.get("dtype") or model_config.get("torch_dtype")
    name = name or "float32"
    if name not in DTYPES:
        raise ValueError(f"export dtype {name!r}: choose from {sorted(DTYPES)} (or auto, the model's own)")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compute_dtype(stored: torch.dtype, device: str) -> torch.dtype:
    """What an export stored in ``stored`` runs in on ``device``: its own dtype on CUDA, float32 on a CPU."""
    return stored if str(device).startswith("cuda") else torch.float32


class CompressedModelError(ValueError):
    """A compressed model folder that cannot be loaded."""


class LowRankLinear(nn.Module):
    """``y = coef(basis(x)) + (x · μ) 1``: an ``nn.Linear`` of weight ``coef.weight @ basis.weight + 1 μᵀ``.

    ``basis`` (``nn.Linear`` m -> r, no bias) and ``row_mean [m]`` may be shared
    with other modules (a shared K/V basis); ``coef`` (``nn.Linear`` r -> n,
    with the original bias) is its own.
    """

    def __init__(self, basis: nn.Linear, coef: nn.Linear, row_mean: nn.Parameter | None = None):
        super().__init__()
        self.basis, self.coef, self.row_mean = basis, coef, row_mean
        self.in_features, self.out_features, self.rank = basis.in_features, coef.out_features, basis.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.coef(self.basis(x))
        if self.row_mean is not None:
            y = y + (x @ self.row_mean).unsqueeze(-1)
        return y

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)``, the coefficient GEMM adding the residual (``addmm``: one kernel fewer)."""
        if self.coef.bias is not None or self.row_mean is not None:
            return residual + self(x)
        return add_product(residual, self.basis(x), self.coef.weight)

    def dense_weight(self) -> torch.Tensor:
        w = self.coef.weight @ self.basis.weight
        return w + self.row_mean if self.row_mean is not None else w


def basis_users(model: nn.Module) -> dict[int, list[LowRankLinear]]:
    """id of each basis module -> every ``LowRankLinear`` reading it (several for a shared basis)."""
    users: dict[int, list[LowRankLinear]] = {}
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            users.setdefault(id(m.basis), []).append(m)
    return users


@torch.no_grad()
def balance_factors(model: nn.Module) -> int:
    """Rescale every factored matrix's rank components to equal norms in its two factors; returns how many
    bases were balanced. The product, hence the model, is unchanged.

    ``W = C B`` (``C = coef [n, r]``, ``B = basis [r, m]``) equals ``(C D⁻¹)(D B)`` for any positive
    diagonal ``D``, but gradient training of the factors does not: a component whose basis row is large
    and whose coefficient column is small moves W little per step along one factor and much along the
    other. ``activation_aware`` factors are far from balanced: ``C = U S`` carries the singular values of
    ``W L`` (the inputs' scale), ``B = Vt L⁻¹`` its inverse. With

        d_i = sqrt(‖C[:, i]‖ / ‖B[i, :]‖),   C ← C D⁻¹,   B ← D B,

    both norms become ``sqrt(‖C[:, i]‖ ‖B[i, :]‖)``: the balanced split ``U √S``, ``√S Vt`` of a plain SVD
    (and the state gradient flow conserves, Du, Hu & Lee 2018, "Algorithmic regularization in learning
    deep homogeneous models: layers are automatically balanced"). A basis shared by several modules
    (``shared_kv``, ``cross_layer``) is balanced against all of their coefficient columns together.
    A PCA mean row is a separate rank-one term and is left as it is.
    """
    sharing = basis_users(model)
    for members in sharing.values():
        basis = members[0].basis.weight
        coef_norm = torch.sqrt(sum(m.coef.weight.float().square().sum(0) for m in members))
        basis_norm = basis.float().norm(dim=1)
        d = torch.where((coef_norm > 0) & (basis_norm > 0), torch.sqrt(coef_norm / basis_norm.clamp_min(1e-30)), 1.0)
        basis.mul_(d.unsqueeze(1).to(basis.dtype))
        for m in members:
            m.coef.weight.div_(d.unsqueeze(0).to(m.coef.weight.dtype))
    return len(sharing)


class ConcatLinear(nn.Module):
    """Several linear maps of one input, outputs concatenated: a fused projection (our GPT's q/k/v), factored."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


# decode batches up to this many rows go through partial_products when a FusedProjection's few_rows is set
PARTIAL_PRODUCT_ROWS = 64

_SIDE_STREAMS: dict[torch.device, list] = {}  # CUDA streams concurrent_linears forks onto, per device


def _linear_into(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``y = x Wᵀ + b`` written into ``y``, over the flattened leading dims (a column slice stays a view)."""
    x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
    if bias is None:
        torch.mm(x2, weight.t(), out=y2)
    else:
        torch.addmm(bias, x2, weight.t(), out=y2)


def _linear_outputs(xs: list[torch.Tensor], weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Uninitialised ``[.., n]`` outputs of the linear maps ``weights [n, m]`` on ``xs [.., m]``."""
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for x, w in zip(xs, weights, strict=True)]


@torch.library.custom_op("weightpca::concurrent_linears", mutates_args=())
def concurrent_linears(
    xs: list[torch.Tensor], weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    """``[x Wᵀ + b]`` of independent linear maps; on CUDA each on its own stream, so that they run at once.

    At decode sizes a GEMM is a few microseconds of latency on a few SMs, not of bandwidth: the
    coefficient GEMMs of a layer's factored q/k/v, run one after the other, cost three times one of
    them; forked onto streams (and captured so in a CUDA graph, whose branches then run concurrently)
    less (H200, in a CUDA graph, SmolLM2's three at batch 1: 7.5 against 5.3 us; a 1.7B shape's 10.3
    against 7.1; benchmarks/decode_ops_bench.py, docs/speed.md). The outputs are
    allocated on the calling stream, which waits for every fork before it goes on. A custom op, so that
    ``torch.compile`` calls it as it is rather than tracing through its stream switches."""
    outs = _linear_outputs(xs, weights)
    work = list(zip(outs, xs, weights, biases, strict=True))
    if xs[0].device.type != "cuda":
        for args in work:
            _linear_into(*args)
        return outs
    main = torch.cuda.current_stream(xs[0].device)
    side = _SIDE_STREAMS.setdefault(xs[0].device, [])
    side += [torch.cuda.Stream(xs[0].device) for _ in range(len(work) - 1 - len(side))]
    for stream in side[: len(work) - 1]:
        stream.wait_stream(main)
    _linear_into(*work[0])
    for stream, args in zip(side, work[1:]):
        with torch.cuda.stream(stream):
            _linear_into(*args)
    for stream in side[: len(work) - 1]:
        main.wait_stream(stream)
    return outs


@concurrent_linears.register_fake
def _(xs, weights, biases):
    return _linear_outputs(xs, weights)


class FusedProjection(nn.Module):
    """The linear maps of one input (a layer's q/k/v, gate/up) as one stacked GEMM, then each factored
    member's coefficient GEMM on its slice: what inference engines do with dense q/k/v and gate/up.

    With input ``x [.., m]`` the stack ``S [N, m]`` holds, in member order, each dense member's weight
    ``W [n, m]`` and each factored member's basis ``B [r, m]`` (a basis shared by several members once)
    and mean row ``μ [m]``, so ``z = x Sᵀ`` is computed once and

        dense:     y = z[W's rows] (+ its bias, stacked too),
        factored:  y = coef(z[B's rows]) + z[μ's row] 1.

    q/k/v factored thus take 1 + 3 GEMMs instead of 6 (dense: 1 instead of 3), and on CUDA the 3 run
    concurrently (:func:`concurrent_linears`). Built after the model has
    its final dtype and device: every member's stacked parameter becomes a view of the stack, so the
    weights are held once. For inference only (a view's gradient would not reach the stack).
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        blocks, biases, rows = [], [], {}

        def place(key: torch.Tensor, block: torch.Tensor, bias: torch.Tensor | None) -> slice:
            if id(key) not in rows:
                start = sum(b.shape[0] for b in blocks)
                blocks.append(block.detach())
                biases.append(bias)
                rows[id(key)] = (key, slice(start, start + block.shape[0]))
            return rows[id(key)][1]

        self.reads = []  # per member: (its rows of z, coef module or None (dense), mean row or None)
        for m in members:
            if isinstance(m, LowRankLinear):
                mean = None if m.row_mean is None else place(m.row_mean, m.row_mean.unsqueeze(0), None).start
                self.reads.append((place(m.basis.weight, m.basis.weight, None), m.coef, mean))
            else:
                self.reads.append((place(m.weight, m.weight, m.bias), None, None))
        stack = torch.cat(blocks)
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat(
                [b.detach() if b is not None else stack.new_zeros(k.shape[0]) for b, k in zip(biases, blocks)]
            )
        self.register_buffer("weight", stack)
        self.register_buffer("bias", bias)
        for key, where in rows.values():  # the members' tensors become views of the stack
            key.data = stack[where.start] if key.dim() == 1 else stack[where]
        for m, (where, coef, _) in zip(members, self.reads):
            if coef is None and m.bias is not None:
                m.bias.data = bias[where]
        self.members, self.few_rows = members, False
        self._plan_partial_products()

    def _plan_partial_products(self) -> None:
        """The tile table of :func:`~weightpca.partial_products.partial_products` over the members; the
        factored members' coefficients become views of one flat buffer. None where a member has a PCA
        mean row (a rank-one term the kernel does not add)."""
        self.register_buffer("tiles", None)
        if any(mean is not None for _, _, mean in self.reads):
            return
        maps, coefs, biases = [], [], []
        for where, coef, _ in self.reads:
            if coef is None:
                n = where.stop - where.start
                maps.append((n, where.start, 0, 0, True))
                biases.append(None if self.bias is None else self.bias[where])
            else:
                n, rank = coef.weight.shape
                maps.append((n, where.start, rank, sum(c.numel() for c in coefs), False))
                coefs.append(coef.weight.detach().reshape(-1))
                biases.append(coef.bias)
        flat = torch.cat(coefs) if coefs else self.weight.new_empty(0)
        for (n, _, rank, offset, dense), (_, coef, _) in zip(maps, self.reads):
            if not dense:
                coef.weight.data = flat[offset : offset + n * rank].view(n, rank)
        tiles, self.block_k, self.slices, self.max_rank = plan_tiles(maps, self.weight.shape[1])
        self.tiles = tiles.to(self.weight.device)
        self.register_buffer("coefs", flat)
        self.n_outputs = [n for n, *_ in maps]
        self.out_bias = None
        if any(b is not None for b in biases):
            self.out_bias = torch.cat(
                [b.detach() if b is not None else flat.new_zeros(n) for b, n in zip(biases, self.n_outputs)]
            )

    def _partial_sum(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every member's output side by side, ``[.., N]``, from :func:`partial_products` when it applies:
        ``few_rows`` set, compiling for CUDA (inductor fuses the sum over the slices into the op that
        reads it; run eagerly the sum would be a kernel of its own), at most ``PARTIAL_PRODUCT_ROWS`` rows
        of a 16-bit dtype. None otherwise."""
        rows = x.numel() // x.shape[-1]
        if not (
            self.few_rows
            and self.tiles is not None
            and x.is_cuda
            and torch.compiler.is_compiling()
            and rows <= PARTIAL_PRODUCT_ROWS
            and x.dtype in (torch.bfloat16, torch.float16)
        ):
            return None
        x2 = x.reshape(rows, x.shape[-1])
        p = partial_products(
            x2, self.weight, self.coefs, self.tiles, sum(self.n_outputs), self.block_k, self.slices, self.max_rank
        )
        y = p.sum(0) if self.out_bias is None else p.sum(0) + self.out_bias
        return y.to(x.dtype).view(*x.shape[:-1], -1)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + member(x)`` of a group of one (a layer's o or down matrix)."""
        y = self._partial_sum(x)
        return add_linear(residual, self.members[0], x) if y is None else residual + y

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self._partial_sum(x)
        if y is not None:
            return tuple(y.split(self.n_outputs, dim=-1))
        z = nn.functional.linear(x, self.weight, self.bias)
        factored = [(z[..., where], coef) for where, coef, _ in self.reads if coef is not None]
        if x.is_cuda and len(factored) > 1:  # on CUDA the coefficient GEMMs run at once
            slices, coefs = zip(*factored)
            ys = iter(concurrent_linears(list(slices), [c.weight for c in coefs], [c.bias for c in coefs]))
        else:
            ys = (coef(part) for part, coef in factored)
        out = []
        for where, coef, mean in self.reads:
            y = z[..., where] if coef is None else next(ys)
            out.append(y if mean is None else y + z[..., mean].unsqueeze(-1))
        return tuple(out)


def _fusable(adapter, layer: dict, roles: tuple[str, ...], users: dict[int, list]) -> list[nn.Module] | None:
    """The modules of ``roles`` if they can be one :class:`FusedProjection`: several ``nn.Linear`` /
    ``LowRankLinear`` (or one fused module's factored parts); None if they already are one GEMM, one of
    them is something else (a LoRA wrapper), or a basis is shared beyond the group (``cross_layer``:
    stacking it here would copy it)."""
    modules = list({id(mod): mod for mod in (adapter.module(layer[r]) for r in roles)}.values())
    if len(modules) == 1 and len(roles) > 1:
        only = modules[0]
        modules = list(only.parts) if isinstance(only, ConcatLinear) and len(only.parts) == len(roles) else []
    if len(modules) != len(roles) or not all(type(m) in (nn.Linear, LowRankLinear) for m in modules):
        return None
    bases = [id(m.basis) for m in modules if isinstance(m, LowRankLinear)]
    if any(bases.count(b) != len(users[b]) for b in bases):
        return None
    return modules


@torch.no_grad()
def fuse_shared_inputs(adapter, few_rows: bool = False) -> int:
    """Fuse every layer's ``SHARED_INPUT`` groups, and each ``RESIDUAL_INPUT`` matrix as a group of one,
    into :class:`FusedProjection` modules, used by the adapter's ``project`` and ``add_project`` (hence
    its cached forward, which speed measurements run); returns how many. ``few_rows``: a compiled CUDA
    forward of at most ``PARTIAL_PRODUCT_ROWS`` rows runs each of them as one
    :func:`~weightpca.partial_products.partial_products` kernel. Call it on a model in its final dtype
    and device, for inference: its weights become views."""
    adapter.fused, users = {}, basis_users(adapter.model)
    groups = adapter.SHARED_INPUT + tuple((role,) for role in adapter.RESIDUAL_INPUT)
    for i in range(adapter.n_layers):
        layer = adapter.layer_matrices(i)
        for roles in groups:
            members = _fusable(adapter, layer, roles, users)
            if members is not None:
                adapter.fused[(i, roles)] = fused = FusedProjection(members)
                fused.few_rows = few_rows
    return len(adapter.fused)


def _linear(n_in: int, n_out: int, bias: bool, like: torch.Tensor, weight=None, bias_value=None) -> nn.Linear:
    """An ``nn.Linear`` on ``like``'s device and dtype, its weight (and bias) set when given, else zero.

    Built without random initialisation (``skip_init``): the values are set right away, and the global
    random stream stays where it was."""
    module = torch.nn.utils.skip_init(nn.Linear, n_in, n_out, bias=bias, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        if weight is None:
            module.weight.zero_()
        else:
            module.weight.copy_(torch.as_tensor(np.ascontiguousarray(weight)))
        if bias and bias_value is None:
            module.bias.zero_()
        elif bias:
            module.bias.copy_(bias_value)
    return module


def _saves(members: list[Factor]) -> bool:
    """Whether a group sharing one basis is smaller factored than dense."""
    first = members[0]
    factored = sum(f.coef.size for f in members) + first.basis.size + (first.mean.size if first.mean is not None else 0)
    return factored < sum(f.coef.shape[0] * f.basis.shape[1] for f in members)


# ------------------------------------------------------------- building the factored model


def factorize_model(target, factors: dict[str, Factor], trainable: bool = False) -> tuple[nn.Module, list[dict]]:
    """A copy of ``target.model`` with every matrix of ``factors`` factored (or dense-reconstructed).

    Returns (model, modules spec). The spec names, per replaced module path,
    its parts' shapes and the basis key each shares, which ``load_compressed``
    rebuilds the skeleton from. ``trainable``: the new modules' parameters
    require gradients (recovery fine-tuning); otherwise they are frozen.
    """
    model = copy.deepcopy(target.model)
    groups: dict[str, list[Factor]] = {}
    for f in factors.values():
        groups.setdefault(f.key, []).append(f)
    factored_keys = {k for k, members in groups.items() if _saves(members)}
    shared: dict[str, tuple] = {}
    paths: dict[str, list[tuple]] = {}
    for name, f in factors.items():
        m = target.matrix(name)
        paths.setdefault(m.path, []).append((m, f))
    spec = []
    for path, parts in paths.items():
        dense = model.get_submodule(path)
        like = dense.weight
        parts.sort(key=lambda part: part[0].rows.start if part[0].rows is not None else 0)
        built, part_specs = [], []
        for m, f in parts:
            n, n_in = f.coef.shape[0], f.basis.shape[1]
            has_bias = dense.bias is not None
            bias = (dense.bias if m.rows is None else dense.bias[m.rows]).detach() if has_bias else None
            if f.key in factored_keys:
                if f.key not in shared:
                    mean = (
                        nn.Parameter(torch.as_tensor(np.ascontiguousarray(f.mean)).to(like.device, like.dtype))
                        if f.mean is not None
                        else None
                    )
                    shared[f.key] = (_linear(n_in, f.basis.shape[0], False, like, f.basis), mean)
                basis, mean = shared[f.key]
                module = LowRankLinear(basis, _linear(f.basis.shape[0], n, has_bias, like, f.coef, bias), mean)
                part_specs.append(
                    dict(
                        kind="lowrank", out=n, rank=f.basis.shape[0], key=f.key, mean=f.mean is not None, bias=has_bias
                    )
                )
            else:
                module = _linear(n_in, n, has_bias, like, f.dense(), bias)
                part_specs.append(dict(kind="dense", out=n, bias=has_bias))
            built.append(module.requires_grad_(trainable))
        replacement = built[0] if len(built) == 1 else ConcatLinear(built)
        _set_submodule(model, path, replacement)
        spec.append(dict(path=path, in_features=like.shape[1], parts=part_specs))
    return model, spec


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def build_skeleton(model: nn.Module, spec: list[dict]) -> nn.Module:
    """Replace ``spec``'s modules of a freshly built model by factored modules of the recorded shapes (zeros)."""
    shared: dict[str, tuple] = {}
    for entry in spec:
        m, built = entry["in_features"], []
        like = model.get_submodule(entry["path"]).weight
        for part in entry["parts"]:
            if part["kind"] == "dense":
                built.append(_linear(m, part["out"], part["bias"], like))
                continue
            if part["key"] not in shared:
                mean = nn.Parameter(torch.zeros(m, dtype=like.dtype)) if part["mean"] else None
                shared[part["key"]] = (_linear(m, part["rank"], False, like), mean)
            basis, mean = shared[part["key"]]
            built.append(LowRankLinear(basis, _linear(part["rank"], part["out"], part["bias"], like), mean))
        _set_submodule(model, entry["path"], built[0] if len(built) == 1 else ConcatLinear(built))
    return model.requires_grad_(False)


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


def save_compressed(
    model: nn.Module, spec: list[dict], folder, kind: str, model_config: dict, record: dict | None = None
) -> dict:
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


def load_compressed(folder, device: str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a saved compressed model: native model class, factored modules substituted, weights loaded,
    in ``dtype`` (None: the dtype it was stored in).

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
        raise CompressedModelError(
            f"{folder / 'compress.json'}: format {info.get('format')!r}, expected {FORMAT!r}; "
            f"export the model again with this weightpca (rerun its compress job)"
        )
    if info["kind"] not in ADAPTERS:
        raise CompressedModelError(
            f"{folder / 'compress.json'}: kind {info['kind']!r}, expected one of {sorted(ADAPTERS)}"
        )
    model = ADAPTERS[info["kind"]].empty_model(folder)
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
    stored = {t.dtype for t in tensors.values() if t.is_floating_point()}
    model = model.to(dtype or (stored.pop() if len(stored) == 1 else torch.float32))
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


def whole_model_ranks(
    whole_csv, mode: str, allocation: str, refit: bool = False, removed=None, tolerance=None
) -> dict[str, int]:
    """The rank map of a whole-model sweep's point (whole/<mode>.csv): its grid point at ``removed``, or
    the largest measured removal within ``(1 + tolerance)`` × base perplexity; refused if it has none."""
    import pandas as pd

    if (removed is None) == (tolerance is None):
        raise ValueError("a whole-model point takes exactly one of removed and tolerance")
    table = pd.read_csv(whole_csv)
    rows = table[(table["mode"] == mode) & (table.allocation == allocation) & (table.refit.astype(bool) == refit)]
    what = f"{allocation}{' refit' if refit else ''} point of {mode}"
    if tolerance is not None:
        inside = rows[rows.reachable.astype(bool) & (rows.ppl_ratio <= 1 + tolerance)]
        if inside.empty:
            raise ValueError(
                f"{whole_csv}: no {what} within {tolerance:.0%} of the base perplexity (the smallest ratio "
                f"measured is {rows.ppl_ratio.min():.3f}); give this compress point a larger tolerance"
            )
        return parse_ranks(inside.loc[inside.removed.idxmax()].ranks)
    row = rows[np.isclose(rows.removed, removed) & (rows.source == "grid")]
    if row.empty:
        raise ValueError(
            f"{whole_csv}: no {what} at removed {removed}; give this compress "
            f"point one of surgery.whole_model.removed ({sorted(set(table.removed))})"
            + (" and an allocation listed in surgery.whole_model.refit" if refit else "")
        )
    row = row.iloc[0]
    if not bool(row.reachable):
        raise ValueError(
            f"{whole_csv}: removing {removed:.0%} of the model is out of reach of its factored "
            f"matrices (rank 1 everywhere keeps more); give this compress point a smaller removed"
        )
    return parse_ranks(row.ranks)


def dense_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of ``model``'s weights as one safetensors file in ``dtype`` (None: their own), written the way
    compressed models are."""
    import tempfile

    tensors, _ = unique_tensors(model)
    if dtype is not None:
        tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    with tempfile.TemporaryDirectory() as tmp:
        save_tensors(Path(tmp) / "dense.safetensors", tensors)
        return (Path(tmp) / "dense.safetensors").stat().st_size


def export_point(
    target,
    mode: str,
    allocation: float | dict[str, int],
    groups,
    val,
    calib,
    window: int,
    folder,
    model_config: dict,
    prompt: str,
    refit_ridge: float | None = None,
    progress=print,
    plan=None,
    dtype: torch.dtype = torch.float32,
    rank_multiple: int = 1,
) -> dict:
    """Factor ``target`` at one operating point, save it, reload it and check it against the dense path.

    ``groups``: the matrix groups to factor (any of ``qkv``, ``o``, ``mlp``), every one of them by
    ``mode`` (``weightpca.plan.mode_groups``) under ``allocation``: one threshold for every matrix, or
    a rank per group key (a whole-model sweep's point). ``refit_ridge`` (a rank map only): the factors
    are refit to the inputs the compressed model feeds them (``weightpca.refit``) on ``calib``, with this
    ridge. ``plan``: the decomposed plan of ``mode`` over ``groups`` (calibrated on ``calib``) when the
    caller exports several points of one sweep; None decomposes here. ``dtype``: the storage dtype
    (``storage_dtype``). ``rank_multiple``: every rank rounded to a multiple of it first
    (``Plan.rounded_ranks``), the point then being those ranks (reconstruction, refit, parameters).
    Returns the record: perplexity of the unmodified model, of the dense reconstruction (the surgery's
    measurement) and of the reloaded factored model (in ``compute_dtype``), which must agree with the
    reconstruction within ``RELOAD_TOLERANCE`` of the dtype; parameters and bytes of both in that
    dtype; ranks; a greedy continuation of ``prompt`` by the reloaded model.
    """
    from .targets import perplexity

    base_ppl = perplexity(target, val, window)
    if plan is None:
        plan = model_plan(target, mode, target.roles(groups), calib, window)
    threshold = None if isinstance(allocation, dict) else allocation
    if rank_multiple > 1:
        allocation = plan.rounded_ranks(allocation, rank_multiple)
    if refit_ridge is not None:
        if not isinstance(allocation, dict):
            raise ValueError("refit applies to a whole-model point (a rank map), not a threshold")
        plan = refit_plan(target, plan, plan.ranks(allocation), calib, window, refit_ridge, progress)
    with target.patched(plan.weights(allocation, np.float32)):
        ppl_reconstructed = perplexity(target, val, window)
    model, spec = factorize_model(target, plan.factors(allocation))
    save_compressed(model.to(dtype), spec, folder, target.family, model_config, {"dtype": dtype_name(dtype)})
    del model
    evaluated = compute_dtype(dtype, str(target.device))
    loaded = adapter_for(load_compressed(folder, str(target.device), evaluated), target.tokenizer)
    ppl_loaded = perplexity(loaded, val, window)
    agreement, tolerance = abs(ppl_loaded / ppl_reconstructed - 1), RELOAD_TOLERANCE[dtype]
    at = f"t={allocation:.6g}" if not isinstance(allocation, dict) else f"{len(allocation)} allocated ranks"
    progress(
        f"{mode} {at}: ppl base {base_ppl:.4f}, reconstructed {ppl_reconstructed:.4f}, reloaded factored "
        f"({dtype_name(dtype)}, evaluated in {dtype_name(evaluated)}) {ppl_loaded:.4f} (|ratio - 1| = {agreement:.2e})"
    )
    if agreement > tolerance:
        raise AssertionError(
            f"{folder}: the reloaded factored model's perplexity {ppl_loaded} differs from the "
            f"dense reconstruction's {ppl_reconstructed} by more than {tolerance:g} (relative, {dtype})"
        )
    prompt_ids = target.encode(prompt) or [0]
    factored_parts = [p for e in spec for p in e["parts"] if p["kind"] == "lowrank"]
    return dict(
        mode=mode,
        threshold=threshold,
        rank_multiple=rank_multiple,
        refit=refit_ridge is not None,
        matrices=list(groups),
        base_ppl=base_ppl,
        ppl_reconstructed=ppl_reconstructed,
        ppl_loaded=ppl_loaded,
        ppl_ratio=ppl_loaded / base_ppl,
        loaded_vs_reconstructed=agreement,
        reload_tolerance=tolerance,
        dtype=dtype_name(dtype),
        eval_dtype=dtype_name(evaluated),
        params_dense=count_parameters(target.model),
        params_factored=count_parameters(loaded.model),
        bytes_dense=dense_bytes(target.model, dtype),
        bytes_factored=(Path(folder) / "model.safetensors").stat().st_size,
        matrices_factored=len(factored_parts),
        matrices_dense_kept=sum(len(e["parts"]) for e in spec) - len(factored_parts),
        mean_rank=float(np.mean([p["rank"] for p in factored_parts])) if factored_parts else float("nan"),
        continuation=loaded.decode(loaded.greedy(prompt_ids, 12)),
    )
