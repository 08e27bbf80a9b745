"""A stock runtime: ONNX exports run by onnxruntime in a process without weightpca or torch."""

import numpy as np
import pytest
import torch
from test_adapters import factored_llama, small_gpt

from weightpca.adapters import GPTAdapter, LlamaAdapter
from weightpca.runtime import LOGITS_TOLERANCE, RUNNER, check_logits, export_onnx, run_onnx

from test_surgery import tiny_llama


@pytest.mark.parametrize("family", ["gpt", "llama", "factored"])
def test_onnx_logits_and_kv_cache_match_pytorch_without_weightpca(tmp_path, family):
    adapter = {
        "gpt": lambda: GPTAdapter(small_gpt().eval()),
        "llama": lambda: LlamaAdapter(tiny_llama(None)[0].eval()),
        "factored": factored_llama,
    }[family]()
    path = tmp_path / "model.onnx"
    meta = export_onnx(adapter, path)
    assert meta["layers"] == 2 and meta["bytes"] == path.stat().st_size
    ids = np.random.default_rng(1).integers(0, 27, (3, 11))
    # a prefill of 9 tokens, then two steps through the cache the graph returned
    check = check_logits(adapter, path, ids)
    assert check["imported"] == {"weightpca": False, "torch": False}
    assert check["relative_error"] <= LOGITS_TOLERANCE


def test_onnx_greedy_decode_and_timing_follow_the_request(tmp_path):
    adapter = factored_llama()
    path = tmp_path / "model.onnx"
    export_onnx(adapter, path)
    answer = run_onnx(
        path,
        {"prefill": [[1, 20], [2, 100], [1, 20]], "decode_batches": [1, 3], "prompt": 5, "new_tokens": 6, "repeats": 2},
    )
    # (1, 20) once; the context capped at the model's 64 positions
    assert [(r["batch"], r["context"]) for r in answer["prefill"]] == [(1, 20), (2, 64)]
    assert [(r["batch"], r["prompt"], r["new_tokens"]) for r in answer["decode"]] == [(1, 5, 6), (3, 5, 6)]
    assert all(len(r["seconds"]) == 2 and r["tokens_per_s"] > 0 for r in answer["prefill"] + answer["decode"])


def test_the_runner_greedy_tokens_are_pytorchs(tmp_path):
    """The runner's decode loop (prefill, then one token at a time through the cache) continues a prompt
    exactly as PyTorch's full forward does, token for token."""
    import importlib.util
    import json

    adapter = LlamaAdapter(tiny_llama(None)[0].eval())
    path = tmp_path / "model.onnx"
    export_onnx(adapter, path)
    spec = importlib.util.spec_from_file_location("ort_runner", RUNNER)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    meta = json.loads(path.with_suffix(".json").read_text())
    prompt = np.array([[3, 1, 4, 1, 5], [2, 7, 1, 8, 2]], dtype=np.int64)
    got = runner.greedy(runner.session(str(path), 1), meta, prompt, 8)
    ids = torch.from_numpy(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, adapter.logits(ids)[:, -1:].argmax(-1)], dim=1)
    assert got.tolist() == ids[:, 5:].tolist()
