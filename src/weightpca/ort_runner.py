"""Run an ONNX export of weightpca (``weightpca.runtime.export_onnx``) with onnxruntime and numpy alone.

    python ort_runner.py model.onnx '{"logits": [[1, 2, 3, 4]], "prefill": [[1, 64]], "decode_batches": [1],
                                      "prompt": 16, "new_tokens": 32, "repeats": 3, "threads": 1}'

Every key of the request is optional. Prints one JSON line:

- ``imported``: whether ``weightpca`` or ``torch`` could be imported here (this file is run where
  neither is on the path: the answer shows it);
- ``logits``: of the token ids given (``[B, T]``, T >= 3): a prefill of the first T - 2 tokens, then
  two single-token steps through the returned key/value cache, concatenated;
- ``prefill``: per (batch, context), tokens / s of one forward pass (median of ``repeats`` after a
  warm-up; ``seconds``: every run);
- ``decode``: per batch, greedy decoding of ``new_tokens`` tokens after a ``prompt``-token prefill
  (untimed: it makes the first token; the ``new_tokens - 1`` steps after it are timed), the cache
  passed from step to step; new tokens / s.

It imports neither weightpca nor torch, so that it shows what a user of the exported file needs.
"""

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def empty_past(meta: dict, batch: int) -> np.ndarray:
    return np.zeros((meta["layers"], batch, meta["kv_heads"], 0, meta["head_dim"]), dtype=np.float32)


def forward(s: ort.InferenceSession, ids: np.ndarray, keys: np.ndarray, values: np.ndarray):
    return s.run(None, {"input_ids": ids.astype(np.int64), "past_keys": keys, "past_values": values})


def prefill(s: ort.InferenceSession, meta: dict, prompt: np.ndarray):
    """The prompt's forward: (the first new token [B, 1], its keys, its values)."""
    keys = values = empty_past(meta, len(prompt))
    logits, keys, values = forward(s, prompt, keys, values)
    return logits[:, -1].argmax(-1)[:, None], keys, values


def decode(s: ort.InferenceSession, first: np.ndarray, keys: np.ndarray, values: np.ndarray, steps: int):
    """``steps`` greedy tokens after ``first``, one call each, the cache passed from call to call."""
    out = [first]
    for _ in range(steps):
        logits, keys, values = forward(s, out[-1], keys, values)
        out.append(logits[:, -1].argmax(-1)[:, None])
    return np.concatenate(out, axis=1)


def greedy(s: ort.InferenceSession, meta: dict, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    """``new_tokens`` greedy tokens after ``prompt [B, T]``."""
    return decode(s, *prefill(s, meta, prompt), new_tokens - 1)


def timed(run, repeats: int, before=None) -> list[float]:
    """Seconds of ``repeats`` calls of ``run(state)`` after a warm-up; ``state = before()``, untimed."""
    times = []
    for i in range(repeats + 1):
        state = before() if before is not None else None
        t0 = time.perf_counter()
        run(state)
        if i:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    path, request = sys.argv[1], json.loads(sys.argv[2])
    meta = json.loads(Path(path).with_suffix(".json").read_text())
    s = session(path, int(request.get("threads", 1)))
    answer = {"imported": {m: importlib.util.find_spec(m) is not None for m in ("weightpca", "torch")}}
    if "logits" in request:
        ids = np.asarray(request["logits"], dtype=np.int64)
        keys = values = empty_past(meta, len(ids))
        parts = []
        for chunk in (ids[:, :-2], ids[:, -2:-1], ids[:, -1:]):
            logits, keys, values = forward(s, chunk, keys, values)
            parts.append(logits)
        answer["logits"] = np.concatenate(parts, axis=1).tolist()
    rng = np.random.default_rng(0)
    repeats = int(request.get("repeats", 3))
    answer["prefill"] = []
    for b, t in dict.fromkeys((int(b), min(int(t), meta["max_len"])) for b, t in request.get("prefill", [])):
        ids = rng.integers(0, meta["vocab_size"], (b, t))
        past = empty_past(meta, b)
        seconds = timed(lambda _: forward(s, ids, past, past), repeats)
        answer["prefill"].append(
            dict(batch=b, context=t, tokens_per_s=b * t / float(np.median(seconds)), repeats=repeats, seconds=seconds)
        )
    answer["decode"] = []
    new_tokens = int(request.get("new_tokens", 32))
    prompt = min(int(request.get("prompt", 16)), meta["max_len"] - new_tokens)
    for b in dict.fromkeys(int(b) for b in request.get("decode_batches", [])):
        ids = rng.integers(0, meta["vocab_size"], (b, prompt))
        seconds = timed(lambda state: decode(s, *state, new_tokens - 1), repeats, lambda: prefill(s, meta, ids))
        answer["decode"].append(
            dict(
                batch=b,
                prompt=prompt,
                new_tokens=new_tokens,
                steps=new_tokens - 1,
                tokens_per_s=b * (new_tokens - 1) / float(np.median(seconds)),
                repeats=repeats,
                seconds=seconds,
            )
        )
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
