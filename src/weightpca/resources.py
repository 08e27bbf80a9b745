"""What a job needs from the machine: its thread count, waiting for the device, and this process's peak memory."""

from __future__ import annotations

import gc
import resource
from pathlib import Path

import torch


def use_threads(n: int) -> None:
    """Compute with ``n`` threads: torch's intra-op pool and the BLAS under numpy and scipy (OpenBLAS
    otherwise starts one thread per CPU, so that two one-thread jobs on a 2-core machine each ran two
    threads; measured on one SVD loop: 1.7x the CPU time for 0.86x the wall time)."""
    import os

    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(limits=n, user_api="blas")  # the BLAS libraries loaded so far (numpy's)
    for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # those loaded later read it (scipy's)
        os.environ[name] = str(n)


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
