"""A job's thread count holds for torch and for every BLAS it loads, also one loaded after the call."""

import json
import subprocess
import sys

from conftest import REPO

LATER_SCIPY = """
import json
from weightpca.resources import use_threads
use_threads(1)
from scipy.linalg import lapack  # scipy's own OpenBLAS, loaded after the call
import torch
from threadpoolctl import threadpool_info
blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
print(json.dumps({"blas": blas, "files": [i["filepath"] for i in threadpool_info()], "torch": torch.get_num_threads()}))
"""


def test_use_threads_limits_torch_and_every_blas_library():
    done = subprocess.run(
        [sys.executable, "-c", LATER_SCIPY], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["torch"] == 1
    assert len(seen["blas"]) >= 2, seen["files"]  # numpy's and scipy's
    assert set(seen["blas"]) == {1}
