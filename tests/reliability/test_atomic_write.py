"""A writer killed mid-write leaves the old file or the new one, never a torn one."""

import json
import signal
import subprocess
import sys
import time

WRITER = """
import sys
from weightpca.io import write_json
path = sys.argv[1]
i = 0
while True:
    i += 1
    write_json(path, {"i": i, "payload": "x" * 2_000_000})
"""


def test_killed_writer_never_tears_the_file(tmp_path):
    path = tmp_path / "artifact.json"
    for attempt in range(10):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
        deadline = time.monotonic() + 600  # catches a hang only
        while not path.exists():  # the event: the writer's first complete file
            assert proc.poll() is None and time.monotonic() < deadline, "the writer never wrote"
            time.sleep(0.01)
        # then a kill at a spread of moments into the rewrites: any moment is a valid test point,
        # so the machine's load changes which write is cut, never whether the assertion holds
        time.sleep(0.05 + 0.037 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = json.loads(path.read_text())  # parses: complete, old or new
        assert data["i"] >= 1 and len(data["payload"]) == 2_000_000
    leftovers = [p for p in tmp_path.iterdir() if p.name != "artifact.json"]
    assert all(p.name.startswith(".artifact.json.") for p in leftovers)  # only temporary names


def test_atomic_write_leaves_the_mode_a_plain_write_would(tmp_path):
    """mkstemp creates 0600 files; results must be readable by collaborators (umask respected)."""
    import os
    import stat

    import torch

    from weightpca.io import save_npy, save_tensors, write_json

    for mask in (0o022, 0o077, 0o002):
        old = os.umask(mask)
        try:
            plain = tmp_path / f"plain{mask:o}"
            plain.write_text("x")
            written = [tmp_path / f"a{mask:o}.json", tmp_path / f"a{mask:o}.safetensors", tmp_path / f"a{mask:o}.npy"]
            write_json(written[0], {"a": 1})
            save_tensors(written[1], {"w": torch.zeros(2)})
            save_npy(written[2], torch.zeros(2).numpy())
        finally:
            os.umask(old)
        assert stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~mask
        for path in written:
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path.name
