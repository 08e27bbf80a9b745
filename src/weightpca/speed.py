"""What a compressed model buys: parameters, bytes, peak memory, and speed in the regimes models are run in.

Each model is measured in a fresh Python process holding only that model
(``python -m weightpca.speed``), in one dtype (on CUDA the export's own, e.g.
bfloat16; on the CPU float32, which every CPU runs fast), so that peak
memory is the model's own: on CUDA the peak of
``torch.cuda.max_memory_allocated`` during prefill, on the CPU the process's
peak resident set during prefill (VmHWM, reset after loading; it includes
the Python and torch runtime, the same for both models of a comparison).

Both regimes run the model's cached forward (``ModelAdapter.cached_logits``)
as inference engines run a model: a layer's matrices of one input fused into
one stacked GEMM (``fuse``, ``weightpca.compress.fuse_shared_inputs``: dense
q/k/v and gate/up one GEMM each, factored ones their bases stacked) and, on
CUDA, each forward captured as a CUDA graph and replayed (``graph``), the decode
step compiled by ``torch.compile`` first with ``compile`` (the prefill is not:
at its sizes it is bound by its GEMMs, and compiling each of its shapes costs a
minute). Regimes (``compress.speed``):

- prefill: one forward pass of ``batch × context`` tokens for each pair of
  ``prefill`` (the context capped at the model's) into an empty static cache,
  the output layer on the last position only (what a prompt needs), tokens / s;
- decode: greedy decoding of ``new_tokens`` tokens at each batch size of
  ``decode_batches`` after a ``prompt``-token prefill (untimed: it makes the
  first new token; the ``new_tokens - 1`` steps after it are timed), through the model's
  explicit key/value cache (``ModelAdapter.cached_logits``) preallocated for
  the whole sequence (a static cache: every step has one shape). On CUDA one
  decode step (forward, argmax, cache write, position) is the captured graph,
  replayed once per token, so no Python runs between tokens; on the CPU the
  same step runs eagerly. New tokens / s over the batch.

On CUDA a decode record also says what one step launches (``step_kernels``:
the kernels and their summed device time, from the profiler over one step run
outside its graph): far fewer seconds of kernels than of step means launch gaps;
nearly as many, that the step costs the kernels themselves.

Every figure is the median of ``repeats`` timed runs after an untimed warm-up
(graph capture included), with every run recorded, and its *bound*: what the
device's measured copy bandwidth allows if each forward only had to read its
bytes from memory once, the weights (prefill) plus the keys and values a
decode step attends to. A figure near its bound is bandwidth-bound; far below
it, compute or overhead dominates.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

from . import adapters
from .adapters import KVCache
from .compress import DTYPES
from .resources import peak_rss_mb, reset_peak_rss, sync


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def copy_bandwidth(device: str, mib: int | None = None, repeats: int = 5) -> float:
    """Bytes / s a device copy moves (read + write, median of ``repeats``): the memory bandwidth a forward
    that only streams its weights could use. 1 GiB on CUDA (beyond any cache), 256 MiB on the CPU."""
    n = (mib or (1024 if device.startswith("cuda") else 256)) * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / float(np.median(times))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers a forward reads (a tensor shared by several modules once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def timed(run, device: str, repeats: int, before=None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``run`` after an untimed warm-up; ``before`` runs untimed
    ahead of every call (a decode's prefill)."""
    times = []
    for i in range(repeats + 1):  # the first: warm-up (allocations, kernel choice, compilation, capture)
        if before is not None:
            before()
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return times


class Captured:
    """``fn()`` (no arguments; it reads and writes fixed tensors) compiled by ``torch.compile`` when
    ``compile``, and with ``graph`` on CUDA captured as a CUDA graph at its first call (after three
    warm-up calls on a side stream, compilation included) and replayed by every call after it. The
    warm-up calls run ``fn`` for real: a caller whose ``fn`` moves state on resets it after the first call."""

    def __init__(self, fn, device: torch.device, graph: bool, compile: bool = False):
        self.fn = torch.compile(fn, dynamic=False) if compile else fn
        self.use_graph = graph and device.type == "cuda"
        self.graph = None

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if not self.use_graph:
            self.fn()
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (and compilation) off the capture
            for _ in range(3):
                self.fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.fn()


class Prefill:
    """One forward of a prompt ``tokens [B, T]`` into an empty static cache of ``T`` positions, the
    output layer on the last position only; ``Captured`` (a CUDA graph on CUDA)."""

    def __init__(self, adapter, tokens: torch.Tensor, dtype, graph: bool):
        self.adapter, self.tokens = adapter, tokens
        batch, length = tokens.shape
        self.cache = KVCache.empty(adapter.kv_shape(), batch, dtype, tokens.device, capacity=length)
        self.run = Captured(self._forward, tokens.device, graph)

    def _forward(self) -> None:
        self.cache.position.zero_()
        self.logits = self.adapter.cached_logits(self.tokens, self.cache, last=True)


class Decoder:
    """Greedy decoding of ``batch`` sequences through a static KV cache of ``prompt + new_tokens`` positions
    (rounded up to a multiple of 16: attention kernels pad a mask whose rows are not 16-aligned, in every layer).

    ``prefill()`` runs the prompt (the cache rewound to position 0), which gives the first new token;
    ``decode()`` the ``new_tokens - 1`` steps after it, one ``Captured`` step each (on CUDA a graph
    captured at the first ``decode``; with ``compile`` compiled first: the elementwise operations of
    norms, rotary embedding and cache writes fused into few kernels).
    """

    def __init__(self, adapter, prompt: torch.Tensor, new_tokens: int, dtype, graph: bool, compile: bool = False):
        self.adapter, self.prompt, self.new_tokens = adapter, prompt, new_tokens
        batch, length = prompt.shape
        capacity = -(-(length + new_tokens) // 16) * 16
        self.cache = KVCache.empty(adapter.kv_shape(), batch, dtype, prompt.device, capacity=capacity)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=prompt.device)  # the last token of each
        self.steps = torch.zeros((), dtype=torch.long, device=prompt.device)  # decode steps since the prefill
        self.step = Captured(self._step, prompt.device, graph, compile)

    @property
    def graph(self):
        return self.step.graph

    def _step(self) -> None:
        logits = self.adapter.cached_logits(self.ids, self.cache)
        self.ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.steps.add_(1)

    @torch.no_grad()
    def prefill(self) -> None:
        self.cache.position.zero_()
        self.steps.zero_()
        logits = self.adapter.cached_logits(self.prompt, self.cache, last=True)
        self.ids.copy_(logits[:, -1].argmax(-1, keepdim=True))

    @torch.no_grad()
    def decode(self) -> None:
        steps = self.new_tokens - 1  # the prefill gave the first new token
        if steps and self.graph is None and self.step.use_graph:
            self.step()  # warm-up and capture (the captured step does not run)
            self.prefill()  # the warm-up steps moved the cache on
        for _ in range(steps):
            self.step()

    def run(self) -> None:
        """A whole greedy continuation: prefill, then decode."""
        self.prefill()
        self.decode()

    @torch.no_grad()
    def step_kernels(self, top: int = 8) -> dict | None:
        """CUDA: what one decode step launches, from the profiler over one step run outside its graph
        after a prefill (compiled with ``compile``; the graph replays the same kernels): their number,
        summed device seconds, and the ``top`` kernels by time as ``[name, calls, seconds]``. None on the CPU."""
        if self.prompt.device.type != "cuda":
            return None
        from torch.profiler import ProfilerActivity, profile

        self.prefill()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            self.step.fn()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        by_name: dict[str, list] = {}
        for e in kernels:
            row = by_name.setdefault(e.name, [e.name, 0, 0.0])
            row[1] += 1
            row[2] += e.time_range.elapsed_us() / 1e6
        return dict(
            kernels=len(kernels),
            kernel_seconds=sum(row[2] for row in by_name.values()),
            top=sorted(by_name.values(), key=lambda row: -row[2])[:top],
        )


@torch.no_grad()
def measure(
    kind: str,
    path: str,
    config: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    prefill=((1, 512),),
    decode_batches=(1,),
    prompt: int = 16,
    new_tokens: int = 32,
    repeats: int = 3,
    graph: bool = True,
    compile: bool = False,
    fuse: bool = True,
    partial_products: bool = False,
) -> dict:
    """Parameters, weight bytes, peak memory, and every prefill and decode regime of one model (run in its
    own process), each with its bandwidth bound. ``partial_products`` (with ``fuse`` and ``compile``, on
    CUDA): every fused projection of a decode step as one split kernel
    (``weightpca.partial_products``) instead of its GEMMs."""
    from .compress import fuse_shared_inputs

    loaded = adapters.load(kind, path, config, device)
    model = loaded.model.to(DTYPES[dtype])
    fused = fuse_shared_inputs(loaded, few_rows=partial_products) if fuse else 0
    params = sum(p.numel() for p in model.parameters())
    weights = weight_bytes(model)
    bandwidth = copy_bandwidth(device)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size

    def tokens(batch: int, length: int) -> torch.Tensor:
        return torch.from_numpy(rng.integers(0, vocab, (batch, length))).to(device)

    regimes = list(dict.fromkeys((int(b), min(int(t), loaded.max_len)) for b, t in prefill))
    Prefill(loaded, tokens(*regimes[0]), DTYPES[dtype], graph=False).run()  # warm-up before the peak is reset
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        peak_includes_loading = False
    else:
        peak_includes_loading = not reset_peak_rss()
    prefills = []
    for b, t in regimes:
        times = timed(Prefill(loaded, tokens(b, t), DTYPES[dtype], graph).run, device, repeats)
        prefills.append(
            dict(
                batch=b,
                context=t,
                tokens_per_s=b * t / float(np.median(times)),
                bound_tokens_per_s=b * t * bandwidth / weights,
                cuda_graph=graph and device.startswith("cuda"),
                repeats=repeats,
                seconds=times,
            )
        )
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else peak_rss_mb()

    decodes = []
    n_layers, kv_heads, head_dim = loaded.kv_shape()
    prompt = min(prompt, loaded.max_len - new_tokens)
    if prompt < 1:
        raise ValueError(f"decode: {new_tokens} new tokens leave no prompt in the model's {loaded.max_len} positions")
    for b in dict.fromkeys(int(b) for b in decode_batches):
        decoder = Decoder(loaded, tokens(b, prompt), new_tokens, DTYPES[dtype], graph, compile)
        times = timed(decoder.decode, device, repeats, before=decoder.prefill)
        assert int(decoder.steps) == new_tokens - 1
        kernels = decoder.step_kernels()  # after the timing: a compiled step is compiled by then
        # a step attends to prompt + new_tokens / 2 positions on average
        kv = 2 * n_layers * b * kv_heads * (prompt + new_tokens / 2) * head_dim * torch.finfo(DTYPES[dtype]).bits // 8
        decodes.append(
            dict(
                batch=b,
                prompt=prompt,
                new_tokens=new_tokens,
                steps=new_tokens - 1,
                tokens_per_s=b * (new_tokens - 1) / float(np.median(times)),
                bound_tokens_per_s=b * bandwidth / (weights + kv),
                cuda_graph=decoder.graph is not None,
                compiled=compile,
                step_kernels=kernels,
                repeats=repeats,
                seconds=times,
            )
        )
    return dict(
        params=params,
        weight_bytes=weights,
        dtype=dtype,
        fused_groups=fused,
        partial_products=partial_products and fuse,
        bandwidth_bytes_per_s=bandwidth,
        peak_memory_mb=peak,
        peak_includes_loading=peak_includes_loading,
        prefill=prefills,
        decode=decodes,
        device=device_name(device),
        threads=torch.get_num_threads(),
    )


def speed_verdict(dense_s: list[float], factored_s: list[float]) -> str:
    """ "faster" / "slower" only when every repeat of one beats every repeat of the other."""
    if max(factored_s) < min(dense_s):
        return "faster"
    if min(factored_s) > max(dense_s):
        return "slower"
    return "not distinguishable"


def regime_label(kind: str, row: dict) -> str:
    return f"prefill {row['batch']}x{row['context']}" if kind == "prefill" else f"decode batch {row['batch']}"


def compare(dense: dict, factored: dict) -> list[dict]:
    """Per regime of two measurements: factored / dense tokens per second, both figures with their bounds
    (NaN where a measurement has none), and the verdict (``speed_verdict`` of their timed repeats)."""
    rows = []
    for kind in ("prefill", "decode"):
        for d, f in zip(dense[kind], factored[kind], strict=True):
            rows.append(
                dict(
                    regime=regime_label(kind, d),
                    speedup=f["tokens_per_s"] / d["tokens_per_s"],
                    dense_tokens_per_s=d["tokens_per_s"],
                    factored_tokens_per_s=f["tokens_per_s"],
                    dense_bound=d.get("bound_tokens_per_s", float("nan")),
                    factored_bound=f.get("bound_tokens_per_s", float("nan")),
                    repeats=min(d["repeats"], f["repeats"]),
                    verdict=speed_verdict(d["seconds"], f["seconds"]),
                )
            )
    return rows


def measure_in_subprocess(
    kind: str, path, config=None, device: str = "cpu", threads: int | None = None, **kwargs
) -> dict:
    """``measure`` in a fresh interpreter (its peak memory is this model's alone)."""
    args = dict(kind=kind, path=str(path), config=str(config) if config else None, device=device, **kwargs)
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), WEIGHTPCA_THREADS=str(threads))
    done = subprocess.run(
        [sys.executable, "-m", "weightpca.speed", json.dumps(args)], capture_output=True, text=True, env=env
    )
    if done.returncode:
        raise RuntimeError(f"measuring {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if os.environ.get("WEIGHTPCA_THREADS"):
        torch.set_num_threads(int(os.environ["WEIGHTPCA_THREADS"]))
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
