"""What a measurement needs from the machine: waiting for the device, and this process's peak memory."""

from __future__ import annotations

import gc
import resource
from pathlib import Path

import torch


def sync(device) -> None:
    """Wait for queued device work, so that wall times measure it (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_rss() -> bool:
    """Start VmHWM afresh at the current resident set (Linux: clear_refs 5), so that what ran before
    (loading a model) is not counted; False where the kernel does not allow it (the peak then includes it)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's peak resident set in MB.

    Linux's VmHWM belongs to the address space, so it starts afresh at exec
    (and at :func:`reset_peak_rss`); ``ru_maxrss`` is carried over from the
    forking parent and would report the parent's peak for a small child.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
