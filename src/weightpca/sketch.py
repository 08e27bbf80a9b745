"""Streaming-sketch PCA over whole flattened models.

Setting. n samples (model checkpoints) flattened to ``x_i ∈ R^D`` form the
columns of ``A = [x_1 … x_n]`` (D × n), optionally centred by the mean model.
We want an orthonormal ``W`` (D × k) whose span approximates A's top-k left
singular subspace, and judge it by ``x_rec = W (Wᵀ x)``, per sample
``err_i = ||x_i − W Wᵀ x_i||``; the optimum (Eckart–Young) is exact PCA.

Memory. D may be 1e8 or more, so nothing of size D lives in RAM: the data are
read in coordinate blocks ``A[b0:b1, :]`` (all samples' slice of one block,
n × B floats), every D-sized result (W, the range sketch Y) is a memmap on
disk, and accumulations are matrix products over a block of all samples.
Peak RSS depends on n, B, r and k, not on D; disk use is D·(r + k)·4 bytes
(Y and W, float32). Each method reads the data once to build its estimate
and once more to evaluate the errors.

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
- ``srht``: the one-pass low-rank sketch of Tropp, Yurtsever, Udell & Cevher
  (2017, "Practical sketching algorithms for low-rank matrix approximation",
  SIAM J. Matrix Anal. Appl. 38(4), Alg. 3–4): range sketch ``Y = A Ω``
  (Ω n × r Gaussian), co-range sketch ``Z = Ψ A`` (Ψ s × D, s = 4r + 1;
  see ``CO_RANGE_FACTOR``),
  ``Q = orth(Y)``, ``X = (Ψ Q)⁺ Z`` so that ``A ≈ Q X``, and W = Q U_k from
  the SVD ``X = U Σ Vᵀ``. Ψ is a block subsampled randomized Hadamard
  transform: ``Ψ A = sqrt(B/s) Σ_b S H D_b A_b`` with per-block random signs
  D_b, the orthonormal Hadamard matrix H of the block size and one random
  choice S of s rows (Balabanov, Beaupère & Grigori 2022, "Block subsampled
  randomized Hadamard transform for low-rank approximation on distributed
  architectures"); the s selected Hadamard rows are formed once, so the
  product is a dense matmul per block.
- ``gaussian``: the same with a Gaussian Ψ (entries N(0, 1/s)), generated per
  block from the seed, for comparison.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import write_json

METHODS = ("exact", "seed_srht", "srht", "gaussian")


class SketchError(ValueError):
    pass


# ---------------------------------------------------------------- Hadamard

def fwht(a: np.ndarray) -> np.ndarray:
    """Orthonormal fast Walsh–Hadamard transform along the last axis (length a power of two).

    Sylvester ordering, equal to ``a @ scipy.linalg.hadamard(n) / sqrt(n)``;
    log2(n) vectorised butterfly stages, no loop over elements.
    """
    n = a.shape[-1]
    if n & (n - 1):
        raise ValueError(f"FWHT length {n} is not a power of two")
    lead = a.shape[:-1]
    out = np.array(a, dtype=np.result_type(a.dtype, np.float32), copy=True)
    h = 1
    while h < n:
        v = out.reshape(*lead, n // (2 * h), 2, h)
        x, y = v[..., 0, :].copy(), v[..., 1, :]
        v[..., 0, :] += y
        v[..., 1, :] = x - y
        h *= 2
    return out / math.sqrt(n)


def fwht_torch(a):
    """The same transform in torch (for CUDA tensors)."""
    import torch

    n = a.shape[-1]
    if n & (n - 1):
        raise ValueError(f"FWHT length {n} is not a power of two")
    lead = a.shape[:-1]
    out = a.clone()
    h = 1
    while h < n:
        v = out.reshape(*lead, n // (2 * h), 2, h)
        x, y = v[..., 0, :], v[..., 1, :]
        out = torch.stack((x + y, x - y), dim=-2).reshape(*lead, n)
        h *= 2
    return out / math.sqrt(n)


def hadamard_rows(rows: np.ndarray, n: int) -> np.ndarray:
    """Rows ``rows`` of the orthonormal Sylvester Hadamard matrix of order n: H[i, j] = (-1)^popcount(i & j) / sqrt(n)."""
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
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
        except ValueError as e:
            raise SketchError(f"{path}: not a .npy file ({e})") from e
        if dtype.hasobject:
            raise SketchError(f"{path}: refused, an object (pickle) array")
        if fortran and len(shape) > 1:
            raise SketchError(f"{path}: Fortran-ordered arrays are not supported")
        return f.tell(), shape, dtype


class _RowFile:
    """Row-sliceable view of a D × c float32 .npy file through pread/pwrite."""

    def __init__(self, offset: int, shape: tuple[int, int], fd: int):
        self.offset, self.shape, self.fd = offset, shape, fd

    def _range(self, rows: slice) -> tuple[int, int]:
        b0, b1, _ = rows.indices(self.shape[0])
        return b0, max(b0, b1)

    def __getitem__(self, rows: slice) -> np.ndarray:
        b0, b1 = self._range(rows)
        c = self.shape[1]
        out = np.empty((b1 - b0, c), dtype="<f4")
        _pread_into(self.fd, self.offset + 4 * b0 * c, out)
        return out

    def __setitem__(self, rows: slice, value) -> None:
        b0, b1 = self._range(rows)
        data = np.ascontiguousarray(np.broadcast_to(value, (b1 - b0, self.shape[1])), dtype="<f4")
        os.pwrite(self.fd, data.tobytes(), self.offset + 4 * b0 * self.shape[1])


# ---------------------------------------------------------------- samples

class Samples:
    """n samples of length D read in coordinate blocks: ``block(b0, b1)`` -> [n, b1 - b0] float32."""

    n: int
    D: int
    names: list[str]

    def block(self, b0: int, b1: int) -> np.ndarray:
        raise NotImplementedError

    def blocks(self, block_size: int):
        for b0 in range(0, self.D, block_size):
            b1 = min(self.D, b0 + block_size)
            yield b0, b1, self.block(b0, b1)


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

    def block(self, b0, b1):
        out = np.empty((self.n, b1 - b0), dtype=np.float32)
        for i, (fd, off) in enumerate(zip(self.fds, self.offsets)):
            _pread_into(fd, off + 4 * b0, out[i])
        return _check_finite(out, self.paths, b0, b1)

    def __del__(self):
        for fd in getattr(self, "fds", []):
            os.close(fd)


class SyntheticSamples(Samples):
    """Low-rank plus noise samples generated block by block from a seed (no array of size D exists).

    ``x_i = Σ_j c_ij σ_j u_j + noise · ε_i`` with u_j, ε_i ~ N(0, I/D) and
    c_ij ~ N(0, 1): a rank-``rank`` signal whose block b is regenerated from
    (seed, b) whenever it is read.
    """

    def __init__(self, n: int, D: int, rank: int = 8, noise: float = 0.05, seed: int = 0,
                 decay: float = 0.8, gen_block: int = 1 << 16):
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

    def block(self, b0, b1):
        parts = []
        for g in range(b0 // self.gen_block, (b1 - 1) // self.gen_block + 1):
            g0 = g * self.gen_block
            chunk = self._gen(g)
            parts.append(chunk[:, max(b0, g0) - g0: min(b1, g0 + chunk.shape[1]) - g0])
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
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SketchError(f"{path}: not a safetensors file (too short)")
            hlen = int(np.frombuffer(head, dtype="<u8")[0])
            raw = f.read(hlen)
            size = os.fstat(f.fileno()).st_size
        if len(raw) < hlen:
            raise SketchError(f"{path}: truncated safetensors header")
        try:
            header = json.loads(raw)
        except ValueError as e:
            raise SketchError(f"{path}: unreadable safetensors header ({e})") from e
        header.pop("__metadata__", None)
        segments = []
        for name in sorted(header):
            info = header[name]
            if info["dtype"] != "F32":
                raise SketchError(f"{path}: tensor '{name}' is {info['dtype']}, expected F32")
            b0, b1 = info["data_offsets"]
            if 8 + hlen + b1 > size:
                raise SketchError(f"{path}: truncated (tensor '{name}' runs past the end of the file)")
            segments.append((name, 8 + hlen + b0, (b1 - b0) // 4))
        return segments, os.open(path, os.O_RDONLY)

    def block(self, b0, b1):
        out = np.empty((self.n, b1 - b0), dtype=np.float32)
        first = int(np.searchsorted(self.starts, b0, side="right")) - 1
        for i, (fd, offsets) in enumerate(self.maps):
            pos, seg = b0, first
            while pos < b1:
                start = self.starts[seg]
                take = min(b1, self.starts[seg + 1]) - pos
                _pread_into(fd, offsets[seg] + 4 * (pos - start), out[i, pos - b0: pos - b0 + take])
                pos += take
                seg += 1
        return _check_finite(out, self.paths, b0, b1)


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


# ---------------------------------------------------------------- helpers

class DiskMatrix:
    """A D × c float32 ``.npy`` file written and read in row blocks (W, Y); ``mm[b0:b1]`` slices it."""

    def __init__(self, path, D: int, c: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "wb") as f:
            np.lib.format.write_array_header_2_0(f, {"descr": "<f4", "fortran_order": False, "shape": (D, c)})
            offset = f.tell()
            f.truncate(offset + 4 * D * c)
        self.fd = os.open(self.path, os.O_RDWR)
        self.mm = _RowFile(offset, (D, c), self.fd)

    def flush(self):
        os.fsync(self.fd)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.close()


def orthonormalise(mat: DiskMatrix, block: int) -> None:
    """Cholesky-QR of a D × c disk matrix in place: Q = M L⁻ᵀ with MᵀM = L Lᵀ."""
    D, c = mat.mm.shape
    gram = np.zeros((c, c))
    for b0 in range(0, D, block):
        mb = mat.mm[b0:b0 + block].astype(np.float64)
        gram += mb.T @ mb
    # a tiny ridge keeps rank-deficient sketches factorable
    chol = np.linalg.cholesky(gram + 1e-12 * np.trace(gram) * np.eye(c) / c)
    inv_t = np.linalg.inv(chol).T
    for b0 in range(0, D, block):
        mat.mm[b0:b0 + block] = (mat.mm[b0:b0 + block].astype(np.float64) @ inv_t).astype(np.float32)


@dataclass
class Fit:
    method: str
    W: DiskMatrix
    seconds: float
    bytes_streamed: int


# ---------------------------------------------------------------- methods

def centering_matrix(n: int, centered: bool) -> np.ndarray:
    """P = I − 11ᵀ/n (or I): the centred data are A P, so (AP)ᵀ(AP) = P G P and AP M = A (P M)."""
    return np.eye(n) - np.full((n, n), 1.0 / n) if centered else np.eye(n)


def fit_exact(src: Samples, k: int, out_path, centered: bool, block: int) -> Fit:
    t0, nbytes = time.perf_counter(), 0
    gram = np.zeros((src.n, src.n))
    for _, _, xb in src.blocks(block):
        gram += xb @ xb.T  # one BLAS product per block; centring is applied to G afterwards
        nbytes += xb.nbytes
    p = centering_matrix(src.n, centered)
    evals, evecs = np.linalg.eigh(p @ gram @ p)
    order = np.argsort(evals)[::-1][:k]
    if evals[order[-1]] <= 1e-12 * max(evals.max(), 1e-300):
        raise SketchError(f"the samples span fewer than k={k} dimensions")
    proj = (p @ evecs[:, order] / np.sqrt(evals[order])).astype(np.float32)  # [n, k]
    W = DiskMatrix(out_path, src.D, k)
    for b0, b1, xb in src.blocks(block):
        W.mm[b0:b1] = xb.T @ proj
        nbytes += xb.nbytes
    W.flush()
    return Fit("exact", W, time.perf_counter() - t0, nbytes)


def _padded_blocks(D: int, block: int) -> tuple[int, int]:
    bsize = 1 << max(0, (block - 1).bit_length())  # power of two >= block
    n_blocks = -(-D // bsize)
    return bsize, n_blocks


def fit_seed_srht(src: Samples, k: int, r: int, out_path, centered: bool, block: int, seed: int) -> Fit:
    t0, nbytes = time.perf_counter(), 0
    bsize, n_blocks = _padded_blocks(src.D, block)
    dpad = bsize * n_blocks
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(dpad, size=r, replace=False))
    scale = math.sqrt(dpad / r)
    rx = np.zeros((src.n, r), dtype=np.float64)
    for bi in range(n_blocks):
        b0, b1 = bi * bsize, min(src.D, (bi + 1) * bsize)
        xb = np.zeros((src.n, bsize), dtype=np.float32)
        xb[:, : b1 - b0] = src.block(b0, b1)
        nbytes += src.n * (b1 - b0) * 4
        signs = np.random.default_rng([seed, bi]).choice(np.float32([-1, 1]), size=bsize)
        sel = (idx >= b0) & (idx < b0 + bsize)
        if sel.any():
            rx[:, sel] += scale * fwht(xb * signs)[:, idx[sel] - b0]
    rx = centering_matrix(src.n, centered) @ rx  # R is linear: centre the sketches
    sketch_c = rx.T @ rx
    evals, evecs = np.linalg.eigh(sketch_c)
    u_r = evecs[:, np.argsort(evals)[::-1][:k]].astype(np.float32)  # [r, k]
    W = DiskMatrix(out_path, src.D, k)
    for bi in range(n_blocks):
        b0, b1 = bi * bsize, min(src.D, (bi + 1) * bsize)
        sel = (idx >= b0) & (idx < b0 + bsize)
        placed = np.zeros((k, bsize), dtype=np.float32)  # Pᵀ U_r restricted to this block
        placed[:, idx[sel] - b0] = scale * u_r[sel].T
        signs = np.random.default_rng([seed, bi]).choice(np.float32([-1, 1]), size=bsize)
        W.mm[b0:b1] = (fwht(placed) * signs)[:, : b1 - b0].T  # Rᵀ = D_b Hᵀ Pᵀ, H symmetric
    orthonormalise(W, block)
    W.flush()
    return Fit("seed_srht", W, time.perf_counter() - t0, nbytes)


class _CoRange:
    """Ψ applied blockwise: block SRHT (``srht``) or Gaussian (``gaussian``), s rows."""

    def __init__(self, kind: str, s: int, D: int, block: int, seed: int):
        self.kind, self.s, self.seed = kind, s, seed
        self.bsize, _ = _padded_blocks(D, block)
        if kind == "srht":
            if s > self.bsize:
                raise SketchError(f"co-range size s={s} exceeds the Hadamard block {self.bsize}; raise sketch.block")
            rows = np.sort(np.random.default_rng([seed, 1]).choice(self.bsize, size=s, replace=False))
            # sqrt(B/s) S H: with H orthonormal, E[ΨᵀΨ] = I
            self.h_sel = hadamard_rows(rows, self.bsize) * np.float32(math.sqrt(self.bsize / s))

    def apply(self, xb_t: np.ndarray, b0: int) -> np.ndarray:
        """Ψ_b applied to the rows of ``xb_t`` [c, b1-b0] (samples or basis columns) -> [c, s]."""
        width = xb_t.shape[1]
        bi = b0 // self.bsize
        if self.kind == "srht":
            signs = np.random.default_rng([self.seed, 2, bi]).choice(np.float32([-1, 1]), size=width)
            return (xb_t * signs) @ self.h_sel[:, :width].T
        psi = np.random.default_rng([self.seed, 3, bi]).standard_normal((self.s, width), dtype=np.float32)
        return xb_t @ psi.T / np.float32(math.sqrt(self.s))


# Co-range size s = CO_RANGE_FACTOR · r + 1. Tropp et al. (2017) need s >= 2r + 1;
# a larger s solves X = (ΨQ)⁺ Z more accurately at the cost of an s-row product
# per block. On D's 30 default snapshots (centred, r = 4k) the mean error ratio
# to exact PCA was 1.062 / 1.058 / 1.010 at k = 2 / 4 / 6 with s = 2r + 1,
# 1.036 / 1.036 / 1.007 with s = 4r + 1 and 1.039 / 1.025 / 1.006 with
# s = 8r + 1, against 1.033 / 1.026 / 1.006 for the two-pass optimum within the
# same range sketch (X = QᵀA exactly): 4r + 1 is the smallest near that floor.
CO_RANGE_FACTOR = 4


def fit_tropp(src: Samples, k: int, r: int, out_path, centered: bool, block: int, seed: int,
              kind: str) -> Fit:
    """One-pass range/co-range sketch (Tropp et al. 2017) with an SRHT or Gaussian co-range map."""
    t0, nbytes = time.perf_counter(), 0
    s = CO_RANGE_FACTOR * r + 1
    co = _CoRange(kind, s, src.D, block, seed)
    step = co.bsize  # blocks aligned with the Hadamard blocks
    p = centering_matrix(src.n, centered)
    omega = np.random.default_rng([seed, 0]).standard_normal((src.n, r))
    omega_c = (p @ omega).astype(np.float32)  # (A P) Ω = A (P Ω): centring folded into Ω
    Y = DiskMatrix(Path(out_path).with_suffix(".range.npy"), src.D, r)
    z = np.zeros((src.n, s))
    for b0, b1, xb in src.blocks(step):  # the one pass over the data
        Y.mm[b0:b1] = xb.T @ omega_c
        z += co.apply(xb, b0)
        nbytes += xb.nbytes
    z = p @ z  # Ψ (A P) = (Ψ A) P
    orthonormalise(Y, step)  # Y -> Q
    psi_q = np.zeros((r, s))
    for b0 in range(0, src.D, step):
        psi_q += co.apply(np.ascontiguousarray(Y.mm[b0:b0 + step].T), b0)
    # Z = Ψ A ≈ Ψ Q X  ->  X = (Ψ Q)⁺ Z, least squares in the s-dimensional sketch space
    x_small, *_ = np.linalg.lstsq(psi_q.T, z.T, rcond=None)  # [r, n]
    u, _, _ = np.linalg.svd(x_small, full_matrices=False)
    u_k = u[:, :k].astype(np.float32)
    W = DiskMatrix(out_path, src.D, k)
    for b0 in range(0, src.D, step):
        W.mm[b0:b0 + step] = Y.mm[b0:b0 + step] @ u_k
    W.flush()
    del Y
    os.unlink(Path(out_path).with_suffix(".range.npy"))
    return Fit(kind, W, time.perf_counter() - t0, nbytes)


def fit(method: str, src: Samples, k: int, r: int, out_path, centered: bool = True,
        block: int = 1 << 16, seed: int = 0) -> Fit:
    if method not in METHODS:
        raise SketchError(f"unknown sketch method '{method}'; choose from {', '.join(METHODS)}")
    if r < k:
        raise SketchError(f"sketch size r={r} must be at least k={k}")
    if k >= src.n:
        raise SketchError(f"k={k} must be smaller than the number of samples ({src.n})")
    if method == "exact":
        return fit_exact(src, k, out_path, centered, block)
    if method == "seed_srht":
        return fit_seed_srht(src, k, r, out_path, centered, block, seed)
    return fit_tropp(src, k, r, out_path, centered, block, seed, method)


# ---------------------------------------------------------------- errors

def reconstruction_errors(src: Samples, W: np.ndarray, centered: bool, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(L2 error, norm) per sample of x_rec = W (Wᵀ x), x centred if asked; W has orthonormal columns.

    One pass accumulates the Gram G = AᵀA and AᵀW; centring enters as P
    (see ``centering_matrix``): ||x_i||² = (P G P)_ii, Wᵀx_i = (P AᵀW)_i.
    """
    gram = np.zeros((src.n, src.n))
    proj = np.zeros((src.n, W.shape[1]))
    for b0, b1, xb in src.blocks(block):
        gram += xb @ xb.T
        proj += xb @ W[b0:b1]
    p = centering_matrix(src.n, centered)
    norms2 = np.clip(np.diag(p @ gram @ p), 0.0, None)
    proj = p @ proj
    err2 = np.clip(norms2 - np.einsum("ij,ij->i", proj, proj), 0.0, None)
    return np.sqrt(err2), np.sqrt(norms2)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_method(method: str, src: Samples, k: int, r: int, out_dir, centered: bool, block: int,
               seed: int, optimum: dict | None = None) -> dict:
    """Fit one method, evaluate per-sample errors, write W.npy and errors.json atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_w = out_dir / ".W.partial.npy"
    try:
        result = fit(method, src, k, r, tmp_w, centered, block, seed)
        err, norm = reconstruction_errors(src, result.W.mm, centered, block)
    except BaseException:
        for leftover in (tmp_w, tmp_w.with_suffix(".range.npy")):
            leftover.unlink(missing_ok=True)
        raise
    rel = err / np.where(norm > 0, norm, 1.0)
    report = {
        "method": method, "k": k, "r": r, "centered": centered, "n_samples": src.n, "D": src.D,
        "samples": src.names, "l2_error": err.tolist(), "relative_error": rel.tolist(),
        "mean_relative_error": float(rel.mean()), "median_relative_error": float(np.median(rel)),
        "mean_l2_error": float(err.mean()), "wall_s": result.seconds,
        "bytes_streamed": result.bytes_streamed,
        "throughput_bytes_per_s": result.bytes_streamed / result.seconds,
        "peak_rss_mb": peak_rss_mb(), "disk_bytes_W": src.D * k * 4,
    }
    if optimum is not None:
        opt = np.asarray(optimum["l2_error"])
        report["ratio_to_optimum"] = (err / np.where(opt > 0, opt, 1.0)).tolist()
        report["mean_error_ratio_to_optimum"] = float(err.mean() / opt.mean())
    del result
    os.replace(tmp_w, out_dir / "W.npy")
    write_json(out_dir / "errors.json", report)
    return report
