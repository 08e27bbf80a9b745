"""Streaming-sketch PCA over whole flattened models.

Setting. n samples (model checkpoints) flattened to ``x_i ∈ R^D`` form the
columns of ``A = [x_1 … x_n]`` (D × n), optionally centred by the mean model.
We want an orthonormal ``W`` (D × k) whose span approximates A's top-k left
singular subspace, and judge it by ``x_rec = W (Wᵀ x)``, per sample
``err_i = ||x_i − W Wᵀ x_i||``; the optimum (Eckart–Young) is exact PCA.

Memory. D may be 1e8 or more, so nothing of size D lives in RAM: the data are
read in coordinate blocks ``A[b0:b1, :]`` (all samples' slice of one block,
n × B floats), every D-sized result (W, the range sketch Y) is a file on disk
written and read by row blocks, and accumulations are matrix products over a
block of all samples. Peak RSS depends on n, B, r and k, not on D; disk use
is D·(r + k)·4 bytes (Y and W, float32). Each method reads the data once to
build its estimate (exact PCA twice) and once more to evaluate the errors.

Device. The block products run in torch on ``device`` (CPU or CUDA): blocks
read from files are moved there, D-sized matrices stay on disk. With
``store="device"`` Y and W are held in device memory instead (D·(r + k)·4
bytes there), for samples that already live on the GPU (``TensorSamples``).
On a CPU with several BLAS threads, set ``OMP_WAIT_POLICY=PASSIVE`` before
torch is imported: otherwise the idle OpenMP threads spin while the main
thread reads the next block, which halved the throughput on 2 cores.

Methods (``fit_*``):

- ``exact``: the n × n Gram ``G = AᵀA`` accumulated blockwise, ``G = Q Λ Qᵀ``,
  ``W = A Q_k Λ_k^{-1/2}`` in a second pass (the optimum).
- ``seed_srht``: the seed design, implemented faithfully: ``R x`` = random
  signs, orthonormal Walsh–Hadamard transform of each power-of-two block,
  then r of the Dpad coordinates sampled without replacement, scaled by
  sqrt(Dpad / r); ``C = Σ (R x_i)(R x_i)ᵀ`` (r × r), ``U_r`` = its top-k
  eigenvectors, ``W = Rᵀ U_r`` with orthonormalised columns. ``Rᵀ U_r`` lies
  in the r-dimensional row space of R whatever the data, so this lift cannot
  recover the data's subspace (the reason a correct method exists).
- ``srht``: a randomized range finder (Halko, Martinsson & Tropp 2011) whose
  subspace comes from the data: range sketch ``Y = A Ω`` with an SRHT test
  matrix Ω (n × r), half of its columns replaced by a pilot's principal
  directions, and exact Rayleigh–Ritz from ``YᵀA`` accumulated in the same
  pass (see ``fit_range``).
- ``gaussian``: the same with a Gaussian test matrix, for comparison.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .io import safetensors_header, write_json
from .resources import peak_rss_mb, sync

METHODS = ("exact", "seed_srht", "srht", "gaussian")


class SketchError(ValueError):
    pass


# ---------------------------------------------------------------- Hadamard


def fwht(a):
    """Orthonormal fast Walsh–Hadamard transform along the last axis (length a power of two).

    Sylvester ordering, equal to ``a @ scipy.linalg.hadamard(n) / sqrt(n)``;
    log2(n) vectorised butterfly stages, no loop over elements. Takes a numpy
    array (computed with numpy) or a torch tensor (computed where it lives,
    e.g. on CUDA); returns a new array of the same kind.
    """
    n = a.shape[-1]
    if n & (n - 1):
        raise ValueError(f"FWHT length {n} is not a power of two")
    lead = a.shape[:-1]
    if isinstance(a, np.ndarray):
        out, copy = np.array(a, dtype=np.result_type(a.dtype, np.float32), copy=True), np.copy
    else:
        out, copy = (a.clone() if a.is_floating_point() else a.float()), torch.clone
    h = 1
    while h < n:
        v = out.reshape(*lead, n // (2 * h), 2, h)
        x, y = copy(v[..., 0, :]), v[..., 1, :]
        v[..., 0, :] += y
        v[..., 1, :] = x - y
        h *= 2
    return out / math.sqrt(n)


def hadamard_rows(rows: np.ndarray, n: int) -> np.ndarray:
    """Rows ``rows`` of the orthonormal Sylvester Hadamard matrix of order n.

    H[i, j] = (-1)^popcount(i & j) / sqrt(n)."""
    j = np.arange(n, dtype=np.int64)
    bits = np.bitwise_and(np.asarray(rows, dtype=np.int64)[:, None], j[None, :])
    parity = np.zeros_like(bits)
    while bits.any():
        parity ^= bits & 1
        bits >>= 1
    return ((1 - 2 * parity) / math.sqrt(n)).astype(np.float32)


# ---------------------------------------------------------------- file access

# Data and D-sized results are read and written with pread/pwrite, not
# memory maps: pages of a mapped file count towards the process's resident
# set, which would then grow with D even though no array of size D is held.


def _pread_into(fd: int, offset: int, dst: np.ndarray) -> None:
    """Fill the contiguous float32 array ``dst`` from the file at ``offset`` (one copy, no temporary)."""
    got = os.preadv(fd, [dst], offset)
    if got != dst.nbytes:
        raise SketchError(f"short read at byte {offset}: the file is truncated")


def _npy_layout(path: Path) -> tuple[int, tuple, np.dtype]:
    """(data offset, shape, dtype) of a .npy file, read from its header; object arrays refused."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
        except ValueError as e:
            raise SketchError(f"{path}: not a .npy file ({e})") from e
        if dtype.hasobject:
            raise SketchError(f"{path}: refused, an object (pickle) array")
        if fortran and len(shape) > 1:
            raise SketchError(f"{path}: Fortran-ordered arrays are not supported")
        return f.tell(), shape, dtype


# ---------------------------------------------------------------- samples


class Samples:
    """n samples of length D read in coordinate blocks: ``block(b0, b1)`` -> [n, b1 - b0] float32.

    File-backed sources fill ``out`` when given one; ``blocks`` reuses one
    buffer for the whole pass, because a fresh multi-megabyte array per block
    is fresh pages from the kernel each time (page faults cost more than the
    read itself). File-backed sources hold open descriptors: use them as
    context managers (``with NpySamples(paths) as src: ...``) or ``close()`` them.
    """

    n: int
    D: int
    names: list[str]

    def close(self) -> None:
        """Release open files (nothing to release for in-memory sources)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def block(self, b0: int, b1: int, out: np.ndarray | None = None):
        raise NotImplementedError

    def blocks(self, block_size: int, skip=()):
        """(b0, b1, block) over [0, D); each block is overwritten by the next one."""
        buf = None
        for b0 in range(0, self.D, block_size):
            if b0 in skip:
                continue
            b1 = min(self.D, b0 + block_size)
            if buf is None or buf.shape[1] != b1 - b0:
                buf = np.empty((self.n, b1 - b0), dtype=np.float32)
            yield b0, b1, self.block(b0, b1, out=buf)


def _check_finite(block: np.ndarray, paths, b0: int, b1: int) -> np.ndarray:
    """Refuse NaN/inf. A row sum is one pass without a temporary; it also flags sums overflowing float32."""
    bad = ~np.isfinite(block.sum(axis=1))
    if bad.any():
        raise SketchError(f"{paths[int(np.argmax(bad))]}: non-finite values in coordinates {b0}..{b1}")
    return block


class NpySamples(Samples):
    """Flattened samples stored one per ``.npy`` file (1-D float32), read block by block."""

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise SketchError("no sample files given")
        layouts = []
        for p in self.paths:
            if not p.is_file():
                raise SketchError(f"{p}: sample file not found")
            layouts.append(_npy_layout(p))
        _, shape0, dtype0 = layouts[0]
        for p, (_, shape, dtype) in zip(self.paths, layouts):
            if len(shape) != 1:
                raise SketchError(f"{p}: a flattened sample must be 1-D, got shape {shape}")
            if shape != shape0 or dtype != dtype0:
                raise SketchError(
                    f"{p}: shape {shape} dtype {dtype} differs from {self.paths[0]}: "
                    f"shape {shape0} dtype {dtype0}; every sample must match"
                )
        if dtype0 != np.dtype("<f4"):
            raise SketchError(f"{self.paths[0]}: samples must be float32, got {dtype0}")
        self.offsets = [off for off, _, _ in layouts]
        self.fds = [os.open(p, os.O_RDONLY) for p in self.paths]
        self.n, self.D = len(self.paths), int(shape0[0])
        self.names = [p.stem for p in self.paths]

    def block(self, b0, b1, out=None):
        out = np.empty((self.n, b1 - b0), dtype=np.float32) if out is None else out
        for i, (fd, off) in enumerate(zip(self.fds, self.offsets)):
            _pread_into(fd, off + 4 * b0, out[i])
        return _check_finite(out, self.paths, b0, b1)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class SyntheticSamples(Samples):
    """Low-rank plus noise samples generated block by block from a seed (no array of size D exists).

    ``x_i = Σ_j c_ij σ_j u_j + noise · ε_i`` with u_j, ε_i ~ N(0, I/D) and
    c_ij ~ N(0, 1): a rank-``rank`` signal whose block b is regenerated from
    (seed, b) whenever it is read.
    """

    def __init__(
        self,
        n: int,
        D: int,
        rank: int = 8,
        noise: float = 0.05,
        seed: int = 0,
        decay: float = 0.8,
        gen_block: int = 1 << 16,
    ):
        self.n, self.D, self.rank, self.noise, self.seed = n, D, rank, noise, seed
        self.gen_block = gen_block
        rng = np.random.default_rng(seed)
        self.coef = (rng.standard_normal((n, rank)) * decay ** np.arange(rank)).astype(np.float32)
        self.names = [f"synthetic_{i:03d}" for i in range(n)]

    def _gen(self, g: int) -> np.ndarray:
        g0, g1 = g * self.gen_block, min(self.D, (g + 1) * self.gen_block)
        rng = np.random.default_rng([self.seed, g])
        scale = 1.0 / math.sqrt(self.D)
        u = rng.standard_normal((self.rank, g1 - g0), dtype=np.float32) * scale
        eps = rng.standard_normal((self.n, g1 - g0), dtype=np.float32) * scale
        return self.coef @ u + self.noise * eps

    def block(self, b0, b1, out=None):  # generated, so a new array each time
        parts = []
        for g in range(b0 // self.gen_block, (b1 - 1) // self.gen_block + 1):
            g0 = g * self.gen_block
            chunk = self._gen(g)
            parts.append(chunk[:, max(b0, g0) - g0 : min(b1, g0 + chunk.shape[1]) - g0])
        return np.concatenate(parts, axis=1)


class SafetensorsSamples(Samples):
    """Model snapshots (safetensors files) read in place as flat float32 vectors.

    Flattening order, fixed and documented: tensors sorted by name, each
    flattened row-major, concatenated (``flat_layout`` gives the offsets).
    Blocks are read with pread; nothing is loaded whole.
    """

    def __init__(self, paths):
        self.paths = [Path(p) for p in sorted(paths)]
        if not self.paths:
            raise SketchError("no snapshot files given")
        self.maps, self.segments = [], None
        for p in self.paths:
            segments, mm = self._open(p)
            if self.segments is None:
                self.segments, first = segments, p
            elif [(n, sz) for n, _, sz in segments] != [(n, sz) for n, _, sz in self.segments]:
                raise SketchError(f"{p}: tensors or sizes differ from {first}; every snapshot must match")
            self.maps.append((mm, [off for _, off, _ in segments]))
        self.n = len(self.paths)
        self.D = sum(sz for _, _, sz in self.segments)
        self.names = [p.stem for p in self.paths]
        self.starts = np.cumsum([0] + [sz for _, _, sz in self.segments])

    @staticmethod
    def _open(path):
        try:
            header, data_start, _ = safetensors_header(path)
        except (ValueError, KeyError) as e:
            raise SketchError(f"{path}: {e}") from e
        segments = []
        for name in sorted(header):
            info = header[name]
            if info["dtype"] != "F32":
                raise SketchError(f"{path}: tensor '{name}' is {info['dtype']}, expected F32")
            b0, b1 = info["data_offsets"]
            segments.append((name, data_start + b0, (b1 - b0) // 4))
        return segments, os.open(path, os.O_RDONLY)

    def block(self, b0, b1, out=None):
        out = np.empty((self.n, b1 - b0), dtype=np.float32) if out is None else out
        first = int(np.searchsorted(self.starts, b0, side="right")) - 1
        for i, (fd, offsets) in enumerate(self.maps):
            pos, seg = b0, first
            while pos < b1:
                start = self.starts[seg]
                take = min(b1, self.starts[seg + 1]) - pos
                _pread_into(fd, offsets[seg] + 4 * (pos - start), out[i, pos - b0 : pos - b0 + take])
                pos += take
                seg += 1
        return _check_finite(out, self.paths, b0, b1)

    def close(self) -> None:
        for fd, _ in self.maps:
            os.close(fd)
        self.maps = []


class TensorSamples(Samples):
    """Samples already in memory as one [n, D] float32 tensor (on a GPU, say); blocks are views."""

    def __init__(self, data: torch.Tensor, names=None):
        if data.ndim != 2 or data.dtype != torch.float32:
            raise SketchError(f"samples must be an [n, D] float32 tensor, got {tuple(data.shape)} {data.dtype}")
        self.data, (self.n, self.D) = data, data.shape
        self.names = list(names) if names is not None else [f"sample_{i:03d}" for i in range(self.n)]

    def block(self, b0, b1, out=None):  # a view, nothing to fill
        out = self.data[:, b0:b1]
        bad = ~torch.isfinite(out.sum(dim=1))
        if bad.any():
            raise SketchError(f"{self.names[int(bad.int().argmax())]}: non-finite values in coordinates {b0}..{b1}")
        return out


def flatten_state(tensors: dict) -> np.ndarray:
    """One model's parameters as a float32 vector: names sorted, each tensor flattened row-major."""
    return np.concatenate([tensors[k].reshape(-1).float().numpy() for k in sorted(tensors)])


def flat_layout(tensors: dict) -> list[dict]:
    out, offset = [], 0
    for k in sorted(tensors):
        n = tensors[k].numel()
        out.append({"name": k, "shape": list(tensors[k].shape), "offset": offset, "size": n})
        offset += n
    return out


# ---------------------------------------------------------------- D-sized matrices


def _on(block, device) -> torch.Tensor:
    """A block (numpy or torch) as a float32 tensor on ``device``; numpy blocks are wrapped without a copy."""
    return torch.as_tensor(block).to(device, non_blocking=True)


class DiskMatrix:
    """A D × c float32 ``.npy`` file written and read in row blocks (W, Y); RSS does not grow with D.

    Holds the file open until ``close()``; a context manager closes it on exit.
    """

    def __init__(self, path, D: int, c: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "wb") as f:
            np.lib.format.write_array_header_2_0(f, {"descr": "<f4", "fortran_order": False, "shape": (D, c)})
            offset = f.tell()
            f.truncate(offset + 4 * D * c)
        self.shape, self.offset, self._buf = (D, c), offset, None
        self.fd = os.open(self.path, os.O_RDWR)

    def rows(self, b0: int, b1: int) -> torch.Tensor:
        """Rows b0..b1 in a buffer that the next call overwrites (reused: see ``Samples``)."""
        b1 = min(b1, self.shape[0])
        if self._buf is None or self._buf.shape[0] != b1 - b0:
            self._buf = np.empty((b1 - b0, self.shape[1]), dtype="<f4")
        _pread_into(self.fd, self.offset + 4 * b0 * self.shape[1], self._buf)
        return torch.from_numpy(self._buf)

    def write(self, b0: int, value: torch.Tensor) -> None:
        data = np.ascontiguousarray(value.detach().cpu().numpy(), dtype="<f4")
        os.pwrite(self.fd, data, self.offset + 4 * b0 * self.shape[1])

    def finish(self) -> None:
        """Make the file durable (W is a result)."""
        os.fsync(self.fd)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DeviceMatrix:
    """A D × c float32 matrix held in device memory (``store="device"``): D·c·4 bytes there.

    For data already on a GPU, where a round trip through host files would
    cost more than the sketch; ``finish`` writes the matrix to its ``.npy`` path.
    """

    def __init__(self, path, D: int, c: int, device):
        self.path, self.shape = Path(path), (D, c)
        self.t = torch.empty((D, c), dtype=torch.float32, device=device)

    def rows(self, b0: int, b1: int) -> torch.Tensor:
        return self.t[b0:b1]

    def write(self, b0: int, value: torch.Tensor) -> None:
        self.t[b0 : b0 + value.shape[0]] = value

    def finish(self, block: int = 1 << 20) -> None:
        with DiskMatrix(self.path, *self.shape) as disk:
            for b0 in range(0, self.shape[0], block):
                disk.write(b0, self.t[b0 : b0 + block])
            disk.finish()

    def close(self):
        pass


STORES = ("disk", "device")


def new_matrix(path, D: int, c: int, device, store: str):
    if store == "disk":
        return DiskMatrix(path, D, c)
    if store == "device":
        return DeviceMatrix(path, D, c, device)
    raise SketchError(f"unknown store '{store}'; choose from {', '.join(STORES)}")


def orthonormalise(mat, block: int, device) -> None:
    """Cholesky-QR of a D × c matrix in place: Q = M L⁻ᵀ with MᵀM = L Lᵀ."""
    D, c = mat.shape
    gram = torch.zeros((c, c), dtype=torch.float64, device=device)
    for b0 in range(0, D, block):
        mb = _on(mat.rows(b0, b0 + block), device).double()
        gram += mb.T @ mb
    # a tiny ridge keeps rank-deficient matrices factorable
    chol = torch.linalg.cholesky(gram + 1e-12 * torch.trace(gram) * torch.eye(c, dtype=gram.dtype, device=device) / c)
    inv_t = torch.linalg.inv(chol).T
    for b0 in range(0, D, block):
        mat.write(b0, (_on(mat.rows(b0, b0 + block), device).double() @ inv_t).float())


@dataclass
class Fit:
    method: str
    W: DiskMatrix | DeviceMatrix
    seconds: float
    bytes_streamed: int
    r: int | None  # sketch size used: fit_range drops test-matrix columns that add nothing; None for exact


# ---------------------------------------------------------------- methods


def centering_matrix(n: int, centered: bool) -> np.ndarray:
    """P = I − 11ᵀ/n (or I): the centred data are A P, so (AP)ᵀ(AP) = P G P and AP M = A (P M)."""
    return np.eye(n) - np.full((n, n), 1.0 / n) if centered else np.eye(n)


def _f32(a: np.ndarray, device) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32), device=device)


def fit_exact(src: Samples, k: int, out_path, centered: bool, block: int, device, store) -> Fit:
    t0, nbytes = time.perf_counter(), 0

    def shifted(xb):
        """Centred, the samples minus the first one: P (A − x_1 1ᵀ)ᵀ(A − x_1 1ᵀ) P = P G P exactly, and
        float32 products of the differences do not lose the small deviations from a large mean model."""
        xb = _on(xb, device)
        return xb - xb[:1] if centered else xb

    gram = torch.zeros((src.n, src.n), dtype=torch.float64, device=device)
    for _, _, xb in src.blocks(block):
        xb = shifted(xb)
        gram += (xb @ xb.T).double()  # one product per block; centring is applied to G afterwards
        nbytes += xb.numel() * 4
    p = centering_matrix(src.n, centered)
    evals, evecs = np.linalg.eigh(p @ gram.cpu().numpy() @ p)
    order = np.argsort(evals)[::-1][:k]
    if evals[order[-1]] <= 1e-12 * max(evals.max(), 1e-300):
        raise SketchError(f"the samples span fewer than k={k} dimensions")
    proj = _f32(p @ evecs[:, order] / np.sqrt(evals[order]), device)  # [n, k]
    W = new_matrix(out_path, src.D, k, device, store)
    for b0, _, xb in src.blocks(block):
        xb = shifted(xb)  # (A − x_1 1ᵀ) P = A P
        W.write(b0, xb.T @ proj)
        nbytes += xb.numel() * 4
    sync(device)
    return Fit("exact", W, time.perf_counter() - t0, nbytes, None)


def _padded_blocks(D: int, block: int) -> tuple[int, int]:
    bsize = 1 << max(0, (block - 1).bit_length())  # power of two >= block
    n_blocks = -(-D // bsize)
    return bsize, n_blocks


def fit_seed_srht(src: Samples, k: int, r: int, out_path, centered: bool, block: int, seed: int, device, store) -> Fit:
    t0, nbytes = time.perf_counter(), 0
    bsize, n_blocks = _padded_blocks(src.D, block)
    dpad = bsize * n_blocks
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(dpad, size=r, replace=False))
    scale = math.sqrt(dpad / r)

    def signs(bi):
        return _f32(np.random.default_rng([seed, bi]).choice(np.float32([-1, 1]), size=bsize), device)

    rx = torch.zeros((src.n, r), dtype=torch.float64, device=device)
    for bi in range(n_blocks):
        b0, b1 = bi * bsize, min(src.D, (bi + 1) * bsize)
        sel = np.flatnonzero((idx >= b0) & (idx < b0 + bsize))
        xb = torch.zeros((src.n, bsize), dtype=torch.float32, device=device)
        xb[:, : b1 - b0] = _on(src.block(b0, b1), device)
        nbytes += src.n * (b1 - b0) * 4
        rx[:, sel] += scale * fwht(xb * signs(bi))[:, idx[sel] - b0].double()
    rx = torch.as_tensor(centering_matrix(src.n, centered), device=device) @ rx  # R is linear: centre the sketches
    evals, evecs = torch.linalg.eigh(rx.T @ rx)  # C = Σ (R x_i)(R x_i)ᵀ
    u_r = evecs[:, torch.argsort(evals, descending=True)[:k]].float()  # [r, k]
    W = new_matrix(out_path, src.D, k, device, store)
    for bi in range(n_blocks):
        b0, b1 = bi * bsize, min(src.D, (bi + 1) * bsize)
        sel = np.flatnonzero((idx >= b0) & (idx < b0 + bsize))
        placed = torch.zeros((k, bsize), dtype=torch.float32, device=device)  # Pᵀ U_r restricted to this block
        placed[:, idx[sel] - b0] = scale * u_r[sel].T
        W.write(b0, (fwht(placed) * signs(bi))[:, : b1 - b0].T)  # Rᵀ = D_b Hᵀ Pᵀ, H symmetric
    orthonormalise(W, block, device)
    sync(device)
    return Fit("seed_srht", W, time.perf_counter() - t0, nbytes, r)


def range_test_matrix(kind: str, n: int, cols: int, seed: int) -> np.ndarray:
    """Random test matrix Ω (n × cols) of the range sketch.

    ``srht``: Ω = sqrt(N/cols) · D H S, the subsampled randomized Hadamard
    transform of Halko, Martinsson & Tropp (2011, SIAM Review 53(2), §4.6)
    with Walsh–Hadamard in place of Fourier: D random signs, H the
    orthonormal Hadamard matrix of order N (the power of two ≥ max(n, cols)),
    S a choice of ``cols`` of its columns, first n rows kept.
    ``gaussian``: i.i.d. N(0, 1) entries.
    """
    if kind == "srht":
        order = 1 << max(0, (max(n, cols) - 1).bit_length())
        chosen = np.sort(np.random.default_rng([seed, 1]).choice(order, size=cols, replace=False))
        signs = np.random.default_rng([seed, 2]).choice([-1.0, 1.0], size=n)
        return signs[:, None] * hadamard_rows(chosen, order).T[:n].astype(np.float64) * math.sqrt(order / cols)
    if kind == "gaussian":
        return np.random.default_rng([seed, 0]).standard_normal((n, cols))
    raise SketchError(f"unknown test matrix '{kind}'")


def pilot_starts(D: int, block: int, count: int, seed: int) -> list[int]:
    """First coordinates of ``count`` blocks spread evenly over [0, D) (random phase), the pilot."""
    n_blocks = -(-D // block)
    count = min(count, n_blocks)
    phase = np.random.default_rng([seed, 4]).random()
    return sorted({int((i + phase) * n_blocks / count) * block for i in range(count)})


def fit_range(
    src: Samples,
    k: int,
    r: int,
    out_path,
    centered: bool,
    block: int,
    seed: int,
    kind: str,
    pilot_blocks: int,
    device,
    store,
) -> Fit:
    """Pilot-informed randomized range finder with exact Rayleigh–Ritz, in one pass over the data.

    Range finder (Halko, Martinsson & Tropp 2011, Alg. 4.1 and §5.1): with a
    test matrix Ω (n × r) the range sketch ``Y = A_c Ω`` (D × r) spans
    approximately A_c's top singular subspace; the best rank-k approximation
    of A_c inside span(Y) is W = Q U_k with Q = orth(Y) and ``QᵀA_c = U Σ Vᵀ``.

    One pass. The data are read in coordinate blocks holding every sample, so
    both products are formed block by block as the data go by:
    ``Y_b = A_b Ω_c`` (written to disk) and ``T = Σ_b Y_bᵀ A_b = YᵀA``
    (r × n, in RAM). Then ``YᵀY = T Ω_c`` and, with ``YᵀY = V Λ Vᵀ``,
    ``Q = Y V Λ^{-1/2}``, ``QᵀA_c = Λ^{-1/2} Vᵀ T P``: Rayleigh–Ritz is exact
    and costs nothing D-sized. W = Y C with C = V Λ^{-1/2} U_k (r × k) is a
    pass over Y, not over the data. Cost per data element: 4r flops.

    Pilot. A data-oblivious Ω leaves an error above the optimum that only
    power iterations (more passes) remove; measured on 64 synthetic samples at
    r = 4k it was 1.09× exact PCA. Instead the first ``pilot_blocks`` blocks
    read (spread evenly over D) give a Gram estimate ``G_p = Σ A_bᵀ A_b``,
    and ⌈r/2⌉ columns of Ω are the top eigenvectors of ``P G_p P``, the
    sample-space directions the data vary along; the other ⌊r/2⌋ stay random
    (``range_test_matrix``) so that directions the pilot missed are still sampled.
    The pilot blocks are kept in RAM (pilot_blocks · n · block floats) and
    then absorbed like any other block, so every coordinate is read once.
    ``pilot_blocks=0`` is the plain range finder.
    """
    t0 = time.perf_counter()
    n, D = src.n, src.D
    p = centering_matrix(n, centered)
    starts = pilot_starts(D, block, pilot_blocks, seed) if pilot_blocks else []
    pilot = {b0: _on(src.block(b0, min(D, b0 + block)), device) for b0 in starts}
    r_pilot = (r + 1) // 2 if pilot else 0
    columns = [range_test_matrix(kind, n, r - r_pilot, seed)] if r > r_pilot else []
    if pilot:
        g_p = sum((xb @ xb.T).double() for xb in pilot.values()).cpu().numpy()
        evals, evecs = np.linalg.eigh(p @ g_p @ p)
        columns.insert(0, evecs[:, np.argsort(evals)[::-1][:r_pilot]])
    # (A P) Ω = A (P Ω): centring folded into Ω. Only span(Ω) matters, so it is
    # replaced by an orthonormal basis of its span: with r >= rank (few samples,
    # or P removing the mean) dependent columns are dropped rather than stored.
    u_om, s_om, _ = np.linalg.svd(p @ np.hstack(columns), full_matrices=False)
    omega_c = u_om[:, s_om > 1e-8 * s_om.max()]
    r = omega_c.shape[1]
    omega = _f32(omega_c, device)  # [n, r]

    Y = new_matrix(Path(out_path).with_suffix(".range.npy"), D, r, device, store)
    t = torch.zeros((r, n), dtype=torch.float64, device=device)
    try:
        y_buf = torch.empty((block, r), dtype=torch.float32, device=device)  # reused, see ``Samples``

        def absorb(b0, xb):
            # Y_b [b, r], row-major as stored (a transposed copy would cost more than the product)
            y = torch.mm(xb.T, omega, out=y_buf[: xb.shape[1]])
            t.add_((xb @ y).T.double())  # T += Y_bᵀ A_b
            Y.write(b0, y)

        for b0 in starts:
            absorb(b0, pilot.pop(b0))
        for b0, _, xb in src.blocks(block, skip=starts):  # the one pass over the rest of the data
            absorb(b0, _on(xb, device))

        t = t.cpu().numpy()
        yty = t @ omega_c
        lam, v = np.linalg.eigh((yty + yty.T) / 2)
        # YᵀY comes from float32 products, good to about 1e-7 of its largest
        # eigenvalue: directions below 1e-6 are rounding, dropped, not amplified
        keep = lam > 1e-6 * lam.max()
        v_scaled = v[:, keep] / np.sqrt(lam[keep])  # Q = Y V Λ^{-1/2}
        u, _, _ = np.linalg.svd(v_scaled.T @ t @ p, full_matrices=False)  # QᵀA_c = U Σ Vᵀ
        if u.shape[1] < k:
            raise SketchError(f"the range sketch spans {u.shape[1]} < k={k} dimensions")
        c = _f32(v_scaled @ u[:, :k], device)  # W = Y C
        W = new_matrix(out_path, D, k, device, store)
        for b0 in range(0, D, block):
            W.write(b0, _on(Y.rows(b0, b0 + block), device) @ c)
        sync(device)
    finally:
        Y.close()
        Path(out_path).with_suffix(".range.npy").unlink(missing_ok=True)
    return Fit(kind, W, time.perf_counter() - t0, n * D * 4, r)


def fit(
    method: str,
    src: Samples,
    k: int,
    r: int,
    out_path,
    centered: bool = True,
    block: int = 1 << 16,
    seed: int = 0,
    pilot_blocks: int = 4,
    device="cpu",
    store: str = "disk",
) -> Fit:
    if method not in METHODS:
        raise SketchError(f"unknown sketch method '{method}'; choose from {', '.join(METHODS)}")
    if r < k:
        raise SketchError(f"sketch size r={r} must be at least k={k}")
    if k >= src.n:
        raise SketchError(f"k={k} must be smaller than the number of samples ({src.n})")
    if pilot_blocks < 0:
        raise SketchError(f"pilot_blocks={pilot_blocks} must be 0 (no pilot) or more")
    if method == "exact":
        return fit_exact(src, k, out_path, centered, block, device, store)
    if method == "seed_srht":
        return fit_seed_srht(src, k, r, out_path, centered, block, seed, device, store)
    return fit_range(src, k, r, out_path, centered, block, seed, method, pilot_blocks, device, store)


# ---------------------------------------------------------------- errors


def reconstruction_errors(src: Samples, W, centered: bool, block: int, device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """(L2 error, norm) per sample of x_rec = W (Wᵀ x), x centred if asked.

    One pass accumulates the Gram G = AᵀA, AᵀW and WᵀW; centring enters as P
    (see ``centering_matrix``): with c_i = Wᵀx_i = (P AᵀW)_i,
    ``err_i² = ||x_i||² − 2 c_iᵀc_i + c_iᵀ (WᵀW) c_i`` and ||x_i||² = (P G P)_ii.
    WᵀW is kept rather than assumed to be I, and the products are float64:
    err² is a difference of nearly equal numbers when the error is small, and
    centring subtracts again when the samples differ little from their mean
    (early snapshots do), so float32 sums and a float32 W's departure from
    orthonormality (~1e-6) had reported some errors 30 % low.
    """
    gram = torch.zeros((src.n, src.n), dtype=torch.float64, device=device)
    proj = torch.zeros((src.n, W.shape[1]), dtype=torch.float64, device=device)
    wtw = torch.zeros((W.shape[1], W.shape[1]), dtype=torch.float64, device=device)
    for b0, b1, xb in src.blocks(block):
        xb, wb = _on(xb, device).double(), _on(W.rows(b0, b1), device).double()
        gram += xb @ xb.T
        proj += xb @ wb
        wtw += wb.T @ wb
    p = centering_matrix(src.n, centered)
    gram, proj, wtw = gram.cpu().numpy(), p @ proj.cpu().numpy(), wtw.cpu().numpy()
    norms2 = np.clip(np.diag(p @ gram @ p), 0.0, None)
    err2 = norms2 - 2 * np.einsum("ij,ij->i", proj, proj) + np.einsum("ij,jk,ik->i", proj, wtw, proj)
    return np.sqrt(np.clip(err2, 0.0, None)), np.sqrt(norms2)


def run_method(
    method: str,
    src: Samples,
    k: int,
    r: int,
    W_path,
    errors_path,
    centered: bool,
    block: int,
    seed: int,
    optimum: dict | None = None,
    pilot_blocks: int = 4,
    device="cpu",
    store: str = "disk",
) -> dict:
    """Fit one method, evaluate per-sample errors, write W (``W_path``, .npy) and ``errors_path`` atomically.

    ``errors.json`` states the sketch size requested (``r_requested``) and the
    one used (``r``, smaller when the test matrix had dependent columns; null
    for exact PCA, which sketches nothing).
    """
    W_path = Path(W_path)
    W_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_w = W_path.parent / f".{W_path.stem}.partial.npy"
    try:
        result = fit(method, src, k, r, tmp_w, centered, block, seed, pilot_blocks, device, store)
        err, norm = reconstruction_errors(src, result.W, centered, block, device)
        result.W.finish()
        result.W.close()
    except BaseException:
        for leftover in (tmp_w, tmp_w.with_suffix(".range.npy")):
            leftover.unlink(missing_ok=True)
        raise
    rel = err / np.where(norm > 0, norm, 1.0)
    report = {
        "method": method,
        "k": k,
        "r": result.r,
        "r_requested": r,
        "centered": centered,
        "n_samples": src.n,
        "D": src.D,
        "pilot_blocks": pilot_blocks if method in ("srht", "gaussian") else None,
        "device": str(device),
        "store": store,
        "samples": src.names,
        "l2_error": err.tolist(),
        "relative_error": rel.tolist(),
        "mean_relative_error": float(rel.mean()),
        "median_relative_error": float(np.median(rel)),
        "mean_l2_error": float(err.mean()),
        "wall_s": result.seconds,
        "bytes_streamed": result.bytes_streamed,
        "throughput_bytes_per_s": result.bytes_streamed / result.seconds,
        "peak_rss_mb": peak_rss_mb(),
        "disk_bytes_W": src.D * k * 4,
    }
    if optimum is not None:
        opt = np.asarray(optimum["l2_error"])
        report["ratio_to_optimum"] = (err / np.where(opt > 0, opt, 1.0)).tolist()
        report["mean_error_ratio_to_optimum"] = float(err.mean() / opt.mean())
    del result
    os.replace(tmp_w, W_path)
    write_json(errors_path, report)
    return report
