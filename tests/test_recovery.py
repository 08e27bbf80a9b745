"""Recovery: a compressed model fine-tuned back against the dense original fine-tuned the same way."""

import json
import math

import numpy as np
import pytest
import torch

from weightpca.adapters import GPTAdapter
from weightpca.allocation import trial_ranks
from weightpca.compress import factorize_model, load_compressed, save_compressed
from weightpca.io import load_tensors, read_json
from weightpca.plan import model_plan
from weightpca.recovery import RECOVERED, Distilled, gap_closed, recover

from conftest import kill_training_at, tiny_run, train_files, train_to

RECOVER_IN_SUBPROCESS = """
import json, sys
from weightpca.recovery import recover
from weightpca.train import TokenFiles, TrainOutputs
from pathlib import Path
run, data, out, work, dense, export, recipe = json.loads(sys.argv[1])
data, out = Path(data), Path(out)
recover(run, TokenFiles(data / "meta.json", data / "train.bin", data / "val.bin"),
        TrainOutputs(out / "model.safetensors", out / "config.json", out / "metrics.csv", out / "summary.json"),
        work, dense, export, recipe)
"""


@pytest.fixture(scope="module")
def point(tmp_path_factory, tiny_data):
    """A tiny trained D and its whole-model export at 40 % of every matrix's parameters."""
    root = tmp_path_factory.mktemp("recovery")
    train_to(tiny_run(max_steps=12), tiny_data, root / "d", root / "w")
    dense = {"model": str(root / "d" / "model.safetensors"), "config": str(root / "d" / "config.json")}
    target = GPTAdapter.load(dense["model"], dense["config"])
    calib = np.fromfile(tiny_data / "train.bin", dtype=np.uint16)[:1025].astype(np.int64)
    plan = model_plan(target, "activation_aware", None, calib, 16)
    model, spec = factorize_model(target, plan.factors(trial_ranks(plan, 0.4)))
    save_compressed(model, spec, root / "c", "gpt", read_json(root / "d" / "config.json"))
    return root, dense, str(root / "c")


def run_of(name, seed=1, steps=8):
    return tiny_run(name, seed, max_steps=steps, lr=1e-3, warmup_steps=1, eval_every=4, checkpoint_every=4)


def recovered(point, tiny_data, name, export=True, recipe=None, seed=1, steps=8):
    root, dense, folder = point
    out = root / name
    record = recover(
        run_of(name, seed, steps),
        *train_files(tiny_data, out),
        root / f"{name}_work",
        dense,
        folder if export else None,
        recipe,
    )
    return record, out


def test_recovery_trains_the_factors_and_reloads_them(point, tiny_data):
    record, out = recovered(point, tiny_data, "plain")
    assert record["compressed"] and record["ppl_after"] < record["ppl_before"]
    assert record["ppl_merged"] == pytest.approx(record["ppl_after"], rel=1e-6)
    assert abs(record["ppl_loaded"] / record["ppl_after"] - 1) <= 1e-3
    # the export is factored like the point it recovered: same modules, same parameter count, new values
    exported, start = read_json(out / RECOVERED / "compress.json"), read_json(f"{point[2]}/compress.json")
    assert exported["modules"] == start["modules"]
    reloaded = load_compressed(out / RECOVERED)
    assert sum(p.numel() for p in reloaded.parameters()) == record["params"]
    before = load_tensors(f"{point[2]}/model.safetensors")
    after = load_tensors(out / RECOVERED / "model.safetensors")
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)


def test_the_control_sees_the_same_batches_as_the_compressed_run(point, tiny_data, monkeypatch):
    import weightpca.tokens as tokens

    seen = {}
    original = tokens.BatchSampler.next

    def recording(self):
        x, y = original(self)
        seen.setdefault(current, []).append(x.clone())
        return x, y

    monkeypatch.setattr(tokens.BatchSampler, "next", recording)
    for current, export in (("control", False), ("compressed", True)):
        recovered(point, tiny_data, f"batches_{current}", export=export)
    assert len(seen["control"]) == len(seen["compressed"]) == 8
    assert all(torch.equal(a, b) for a, b in zip(seen["control"], seen["compressed"]))
    # and another seed draws other batches
    current = "seed2"
    recovered(point, tiny_data, "batches_seed2", seed=2)
    assert not torch.equal(seen["seed2"][0], seen["control"][0])


def test_lora_trains_only_its_adapters_and_changes_the_result(point, tiny_data):
    plain, _ = recovered(point, tiny_data, "cmp_plain")
    lora, out = recovered(point, tiny_data, "cmp_lora", recipe={"lora": {"r": 2, "alpha": 4}})
    assert lora["ppl_after"] != pytest.approx(plain["ppl_after"], rel=1e-6)
    assert lora["ppl_after"] < lora["ppl_before"] and lora["params"] == plain["params"]
    before = load_tensors(f"{point[2]}/model.safetensors")
    after = load_tensors(out / RECOVERED / "model.safetensors")
    # outside the layers (embeddings, norms of the head) nothing trains; inside, the merged adapters moved the factors
    outside = [k for k in before if not k.startswith("transformer.h.")]
    assert outside and all(torch.equal(before[k], after[k]) for k in outside)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("coef.weight"))


def test_distillation_changes_the_result_and_is_the_kl_to_the_teacher(point, tiny_data):
    plain, _ = recovered(point, tiny_data, "d_plain")
    distilled, _ = recovered(point, tiny_data, "d_kl", recipe={"distill": {"weight": 0.9, "temperature": 2.0}})
    assert distilled["ppl_after"] != pytest.approx(plain["ppl_after"], rel=1e-6)
    # the loss itself: cross-entropy alone at weight 0, zero against an identical teacher at weight 1
    _, dense, folder = point
    student = load_compressed(folder)
    x = torch.randint(0, 300, (2, 16))
    y = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(student(x)[0].reshape(-1, student(x)[0].size(-1)), y.reshape(-1))
        assert Distilled(student, load_compressed(folder), 0.0)(x, y)[1] == pytest.approx(ce.item(), rel=1e-5)
        assert Distilled(student, load_compressed(folder), 1.0, 2.0)(x, y)[1].item() == pytest.approx(0.0, abs=1e-6)
        teacher = GPTAdapter.load(dense["model"], dense["config"]).model
        assert Distilled(student, teacher, 1.0)(x, y)[1].item() > 1e-4
    assert "student.transformer.wte.weight" in Distilled(student, teacher, 0.5).state_dict()
    assert not any(k.startswith("_teacher") for k in Distilled(student, teacher, 0.5).state_dict())


def test_distilling_from_the_trained_control_uses_its_weights(point, tiny_data):
    """teacher: control: the control trains by cross-entropy alone (the plain control), and the point
    distils from its trained weights: a result of its own, refused without them."""
    recipe = {"distill": {"weight": 0.9, "temperature": 2.0, "teacher": "control"}}
    plain_control, _ = recovered(point, tiny_data, "t_plain", export=False)
    control, control_out = recovered(point, tiny_data, "t_control", export=False, recipe=recipe)
    assert control["ppl_after"] == plain_control["ppl_after"] and control["distill"] is None
    root, dense, folder = point
    with pytest.raises(ValueError, match="teacher_weights"):
        recovered(point, tiny_data, "t_missing", recipe=recipe)
    from_original, _ = recovered(
        point, tiny_data, "t_original", recipe={"distill": dict(recipe["distill"], teacher="original")}
    )
    out = root / "t_student"
    student = recover(
        run_of("t_student"),
        *train_files(tiny_data, out),
        root / "t_student_work",
        dense,
        folder,
        recipe,
        teacher_weights=control_out / "model.safetensors",
    )
    assert student["distill"]["teacher"] == "control"
    assert student["ppl_after"] != pytest.approx(from_original["ppl_after"], rel=1e-6)


def test_balanced_factors_start_from_the_same_model_and_train_differently(point, tiny_data):
    plain, _ = recovered(point, tiny_data, "b_plain")
    balanced, out = recovered(point, tiny_data, "b_balanced", recipe={"balance": True})
    assert balanced["balance"] and not plain["balance"]
    assert balanced["ppl_before"] == pytest.approx(plain["ppl_before"], rel=1e-5)
    assert balanced["ppl_after"] != pytest.approx(plain["ppl_after"], rel=1e-6)
    assert balanced["ppl_after"] < balanced["ppl_before"]
    # the control has no factors: the same run with or without it
    control = recovered(point, tiny_data, "b_control", export=False, recipe={"balance": True})[0]
    assert control["ppl_after"] == recovered(point, tiny_data, "b_control_plain", export=False)[0]["ppl_after"]


def test_recovery_resumes_bitwise_after_a_kill(point, tiny_data):
    root, dense, folder = point
    args = lambda name: json.dumps(  # noqa: E731
        [run_of("killed", steps=12), str(tiny_data), str(root / name), str(root / f"{name}_work"), dense, folder, None]
    )
    kill_training_at(args("killed"), "step", 6, body=RECOVER_IN_SUBPROCESS)
    assert not (root / "killed" / "summary.json").exists()
    recover(run_of("killed", steps=12), *train_files(tiny_data, root / "killed"), root / "killed_work", dense, folder)
    recover(run_of("killed", steps=12), *train_files(tiny_data, root / "whole"), root / "whole_work", dense, folder)
    a, b = (load_tensors(root / n / RECOVERED / "model.safetensors") for n in ("killed", "whole"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_gap_closed():
    assert gap_closed(20.0, 10.0, 10.0) == pytest.approx(1.0)
    assert gap_closed(20.0, 20.0, 10.0) == pytest.approx(0.0)
    assert gap_closed(20.0, math.sqrt(200.0), 10.0) == pytest.approx(0.5)
    assert gap_closed(20.0, 30.0, 10.0) < 0


@pytest.fixture(scope="module")
def llama_point(tmp_path_factory):
    """A tiny Llama folder, its token files of a text through its own tokenizer, and its whole-model export
    at 40 % of every matrix's parameters."""
    from weightpca.adapters import LlamaAdapter
    from weightpca.targets import write_target_tokens

    from test_surgery import tiny_llama

    root = tmp_path_factory.mktemp("llama_recovery")
    model, tok = tiny_llama(None)
    model.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    text = "".join(chr(97 + (i * 7 + i // 13) % 26) + (" " if i % 5 == 4 else "") for i in range(8000))
    (root / "train.txt").write_text(text)
    (root / "val.txt").write_text(text[::-1])
    target = LlamaAdapter.load(str(root / "hf"))
    meta = write_target_tokens(target, root / "train.txt", root / "val.txt", root / "tokens")
    calib = np.fromfile(root / "tokens" / "train.bin", dtype=np.uint16)[:513].astype(np.int64)
    plan = model_plan(target, "activation_aware", None, calib, 32)
    model, spec = factorize_model(target, plan.factors(trial_ranks(plan, 0.4)))
    save_compressed(model, spec, root / "c", target.family, json.loads((root / "hf" / "config.json").read_text()))
    return root, target, meta


def llama_run(name, seed=1):
    run = run_of(name, seed, steps=6)
    run["model"] = {"block_size": 32}
    run["train"]["eval_tokens"] = 256
    return run


def test_a_hugging_face_target_recovers_on_its_own_tokens(llama_point):
    from weightpca.targets import text_tokens

    root, target, meta = llama_point
    # the token files are the text through the target's tokenizer: the first val tokens are the surgery's
    val = np.fromfile(root / "tokens" / "val.bin", dtype=np.dtype(meta["dtype"]))
    assert meta["vocab_size"] == 64 and meta["val_tokens"] == len(val)
    np.testing.assert_array_equal(val[:257], text_tokens(target, root / "val.txt", 256))
    dense = {"kind": "hf", "folder": str(root / "hf")}
    records = {}
    for name, export in (("point", str(root / "c")), ("control", None)):
        records[name] = recover(
            llama_run(name), *train_files(root / "tokens", root / name), root / f"{name}_w", dense, export
        )
    point, control = records["point"], records["control"]
    assert point["ppl_after"] < point["ppl_before"] and control["ppl_after"] < control["ppl_before"]
    # the control starts from the original, which the 40 % export is worse than
    assert control["ppl_before"] < point["ppl_before"]
    assert point["val_tokens"] == control["val_tokens"] == 256
    assert abs(point["ppl_loaded"] / point["ppl_after"] - 1) <= 1e-3
    reloaded = load_compressed(root / "point" / RECOVERED)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in reloaded.parameters()) == point["params"] < control["params"]
