"""Send a job's stdout/stderr (prints, tqdm, tracebacks) to its Snakemake log file."""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path


@contextlib.contextmanager
def job_log(path):
    """Redirect output to ``path`` for the duration; a failure's traceback lands there too."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            yield
        except BaseException:
            traceback.print_exc(file=f)
            raise
