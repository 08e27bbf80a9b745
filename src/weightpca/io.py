"""File helpers: atomic writes and safe tensor loading.

Every artifact is written to a temporary name in its destination folder and
renamed into place, so a reader (or a resumed run) sees the old file or the
new one, never a torn one. Nothing here unpickles: tensors travel as
safetensors, arrays as ``.npy`` loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class WeightFileError(ValueError):
    """A weight file is missing, truncated or does not match the model."""


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask must set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The file gets the mode a plain ``open(path, "w")`` would give (0666 less
    the umask), not mkstemp's private 0600, so collaborators on a shared file
    system can read results.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # after the writer is done: some writers (safetensors) replace the file they are given
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def apply_umask(folder) -> None:
    """Give every file in ``folder`` the mode a plain write would (0666 less the umask).

    For files other libraries write (save_pretrained's safetensors come out 0600).
    """
    mode = 0o666 & ~_umask()
    for p in Path(folder).iterdir():
        if p.is_file():
            os.chmod(p, mode)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(path, table) -> None:
    """A pandas DataFrame as CSV without its index, written atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    return json.loads(path.read_text())


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_tensors(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: weight file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightFileError(f"{path}: not a readable safetensors file ({e})") from e


def safetensors_header(path) -> tuple[dict, int, int]:
    """(tensor entries, offset of the data, file size) of a safetensors file, reading its header alone.

    The header is an 8-byte little-endian length and that much JSON; refused
    (ValueError) when short, unreadable, or when a tensor's bytes run past the
    end of the file (truncated). ``__metadata__`` is left out of the entries.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("not a safetensors file (too short)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"truncated safetensors header (length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"unreadable safetensors header ({e})") from e
    header.pop("__metadata__", None)
    for name, info in header.items():
        if 8 + n + info["data_offsets"][1] > size:
            raise ValueError(f"truncated (tensor '{name}' runs past the end of the file, {size} bytes)")
    return header, 8 + n, size


def check_state_dict(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source) -> None:
    """Refuse ``loaded`` unless it has exactly ``expected``'s names and shapes."""
    missing = sorted(set(expected) - set(loaded))
    extra = sorted(set(loaded) - set(expected))
    if missing or extra:
        raise WeightFileError(f"{source}: missing tensors {missing}, unexpected tensors {extra}")
    for name, ref in expected.items():
        if tuple(loaded[name].shape) != tuple(ref.shape):
            raise WeightFileError(
                f"{source}: tensor '{name}' has shape {tuple(loaded[name].shape)}, the model expects {tuple(ref.shape)}"
            )


def save_npy(path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def load_npy(path, mmap: bool = False) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as e:
        raise WeightFileError(f"{path}: refused, not a plain numeric .npy ({e})") from e
