"""profiles/slurm on a real single-node Slurm cluster (tests/slurm/start-cluster.sh).

Every rule of the ci DAG runs as Slurm jobs, in as few jobs as its wildcards allow (ONE_OF_EACH),
with a tiny Llama folder as its pretrained target; the tests of one training job start from the
local run's tokenised corpus.

Runs where slurm-wlm and munge are installed and we are root; .ci/run installs
them and sets WEIGHTPCA_REQUIRE_SLURM=1 so that a missing cluster fails the
suite instead of skipping it. The cluster has no Slurm accounting, so jobs
are followed with squeue (--slurm-status-command squeue --slurm-no-account),
as README "Run on a Slurm cluster" says for such clusters.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from conftest import REPO, write_config
from test_surgery import tiny_llama

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]

SCRIPT = REPO / "tests" / "slurm" / "start-cluster.sh"
LOCAL_RULES = {"all", "fetch_corpus", "fetch_gguf"}
JOBID = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+)")


@pytest.fixture(scope="module")
def slurm_env():
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        why = "needs root and Debian's slurm-wlm and munge (apt-get install slurm-wlm munge)"
        if os.environ.get("WEIGHTPCA_REQUIRE_SLURM"):
            pytest.fail(f"WEIGHTPCA_REQUIRE_SLURM is set but the test cluster {why}")
        pytest.skip(f"the Slurm test cluster {why}")
    done = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    yield dict(os.environ, PYTHONUNBUFFERED="1")
    subprocess.run([str(SCRIPT), "stop"], capture_output=True, text=True, timeout=60)


# every rule of the ci DAG, each run as few times as its wildcards allow (one rank, one mode, one seed
# where the ci config has several): each job of the Slurm run starts its own Snakemake on the
# test node's 2 cores, so the jobs, not the rules, set the test's time
ONE_OF_EACH = {
    "factorize.ranks": [4],
    "surgery.modes": ["separate"],
    "surgery.whole_model.modes": ["activation_aware"],
    "sketch.methods": ["exact", "srht"],
    "recovery.seeds": [1],
    "lowrank.lambdas": [1.0],
}


@pytest.fixture(scope="module")
def slurm_cfg(ci_dag, tmp_path_factory):
    """The ci DAG's config with ONE_OF_EACH: the same rules in fewer jobs, every job's settings those
    of the same job of the local run (ci_dag), so their outputs can be compared. The pretrained
    target is a tiny Llama folder instead of SmolLM2: its rules are the same, and the local run
    has already put SmolLM2 itself through them."""
    _, cfg = ci_dag
    work = tmp_path_factory.mktemp("slurm_cfg")
    model, tok = tiny_llama(work, max_positions=256)  # the ci config's 256-token evaluation window
    model.save_pretrained(work / "llama")
    tok.save_pretrained(work / "llama")
    smollm2 = yaml.safe_load(cfg.read_text())["surgery"]["targets"]["smollm2"]
    llama = {"kind": "hf", "path": str(work / "llama"), "thresholds": smollm2["thresholds"], "whole_model": False}
    points = [
        p | {"target": "llama"} if p["target"] == "smollm2" else p
        for p in yaml.safe_load(cfg.read_text())["compress"]["points"]
        if p["name"] != "aa_tol5"
    ]
    overrides = {"surgery.targets.smollm2": None, "surgery.targets.llama": llama, "compress.points": points}
    return write_config(work / "ci.yaml", base=str(cfg), **ONE_OF_EACH, **overrides)


def with_local_data(workdir, ci_dag) -> None:
    """The local run's tokenised corpus copied into ``workdir`` (modification times kept, so Snakemake
    takes it as up to date): a test of one training job need not tokenise through Slurm first."""
    results, _ = ci_dag
    shutil.copytree(results / "data", workdir / "results" / "data")


def slurm_snakemake(workdir, env, *args, configfile, popen=False, squeue=True):
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--profile",
        str(REPO / "profiles" / "slurm"),
        # a cluster without accounting (the test cluster's case)
        *(["--slurm-status-command", "squeue", "--slurm-no-account"] if squeue else []),
        # poll often: the test's jobs take seconds, not hours
        "--slurm-init-seconds-before-status-checks",
        "2",
        *args,
        "--configfile",
        str(configfile),
    ]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)


def submitted(log: str) -> dict[str, list[str]]:
    """Rule name -> SLURM job ids, from Snakemake's log (each 'rule X:' block precedes its submission)."""
    by_rule, rule_of_job = {}, {}
    for m in re.finditer(r"^(?:localrule|rule) (\w+):\n(?:.*\n)*?\s+jobid: (\d+)", log, re.M):
        rule_of_job[m.group(2)] = m.group(1)
    for job, slurm_id in JOBID.findall(log):
        by_rule.setdefault(rule_of_job[job], []).append(slurm_id)
    return by_rule


def squeue_ids(env) -> set[str]:
    out = subprocess.run(
        ["squeue", "--states=all", "-h", "-o", "%i"], capture_output=True, text=True, env=env, check=True
    ).stdout
    return set(out.split())


def scontrol_job(job_id: str, env) -> str:
    """The TRES a finished job was given, as scontrol reports it (gres/gpu=1 for a GPU job)."""
    out = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env, check=True
    ).stdout
    return " ".join(re.findall(r"(?:AllocTRES|TresPerJob|TresPerNode)=(\S*)", out))


def test_every_rule_runs_as_slurm_jobs_and_matches_a_local_run(slurm_env, ci_dag, slurm_cfg, tmp_path):
    local_results, _ = ci_dag
    cfg = slurm_cfg
    started = time.perf_counter()
    done = slurm_snakemake(tmp_path, slurm_env, "all", configfile=cfg)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    print(f"ci DAG on the Slurm test cluster: {time.perf_counter() - started:.0f} s")

    jobs = submitted(log)
    planned = set(re.findall(r"^rule (\w+):", log, re.M))
    assert planned and planned.isdisjoint(LOCAL_RULES)
    # every rule of the local run's DAG but the local ones ran here. The fixture's run wrote the
    # oldest log (names are timestamps); other tests' dry runs and --report add logs of their own.
    local_log = min((local_results.parent / ".snakemake" / "log").glob("*.snakemake.log")).read_text()
    assert planned == set(re.findall(r"^(?:local)?rule (\w+):", local_log, re.M)) - LOCAL_RULES
    assert set(jobs) == planned  # every non-local rule's jobs went through sbatch
    ids = {i for v in jobs.values() for i in v}
    assert len(ids) == log.count("has been submitted with SLURM jobid")
    assert ids <= squeue_ids(slurm_env)  # and Slurm knows them (MinJobAge keeps finished jobs)
    assert re.search(r"^localrule all:", log, re.M)
    # the profile's GPU rules asked Slurm for a GPU (the test node's GPUs are file-backed fakes)
    assert "gpu" in scontrol_job(jobs["train_baseline"][0], slurm_env)
    assert "gpu" not in scontrol_job(jobs["sketch"][0], slurm_env)
    # Slurm's logs of successful jobs are kept where the README says
    assert list((tmp_path / ".snakemake" / "slurm_logs" / "rule_train_baseline").glob("**/*.log"))
    # the same numbers as the local run: CPU training is bitwise repeatable
    slurm_results = tmp_path / "results"
    models = sorted(p.relative_to(slurm_results) for p in slurm_results.glob("**/model.safetensors"))
    assert any(rel.parts[:2] == ("compress", "llama") for rel in models)  # the Llama's exported point
    models = [rel for rel in models if "llama" not in rel.parts]
    assert len(models) >= 8
    for rel in models:
        a, b = load_file(str(local_results / rel)), load_file(str(slurm_results / rel))
        assert all((a[k] == b[k]).all() for k in a), rel
    for rel in ["lowrank/lambda1.0/seed7/sweep.csv", "surgery/gpt/separate.csv"]:
        assert (local_results / rel).read_text() == (slurm_results / rel).read_text(), rel
    # the spectrum's per-rank entries follow the config's ranks (here one of the local run's two)
    local, slurm = (json.loads((r / "pca" / "spectrum.json").read_text()) for r in (local_results, slurm_results))
    assert slurm["singular_values"] == local["singular_values"] and set(slurm["energy_kept"]) == {"4"}
    assert slurm["energy_kept"]["4"] == local["energy_kept"]["4"]


def test_failing_job_is_reported_with_its_slurm_log_retried_and_leaves_no_output(slurm_env, ci_dag, tmp_path):
    _, cfg = ci_dag
    with_local_data(tmp_path, ci_dag)
    data = tmp_path / "results" / "data" / "shakespeare"
    # a torn tokenised corpus: every attempt of the training job fails on the cluster
    with open(data / "train.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 3)
    target = tmp_path / "results" / "train" / "D" / "seed7" / "summary.json"
    done = slurm_snakemake(tmp_path, slurm_env, str(target.relative_to(tmp_path)), configfile=cfg)
    log = done.stdout + done.stderr
    assert done.returncode != 0
    assert "rule tokenize:" not in log  # the copied corpus was taken as it is
    attempts = submitted(log)["train_baseline"]
    assert len(attempts) == 3  # the first try and the profile's 2 retries
    slurm_logs = re.findall(r"(\S+/\.snakemake/slurm_logs/rule_train_baseline/\S+?\.log)", log)
    assert slurm_logs, log[-3000:]
    assert "train.bin" in open(slurm_logs[0]).read()  # the job's own error, in the log Snakemake names
    assert not any((tmp_path / "results" / "train" / "D" / "seed7").glob("*.safetensors"))
    assert not target.exists()


def test_cancelled_job_is_resubmitted_and_completes(slurm_env, ci_dag, tmp_path):
    _, base = ci_dag
    # 950 steps (~20 s) left to train after the first checkpoint: the cancel lands while it runs
    cfg = write_config(tmp_path / "ci.yaml", base=str(base), **{"train.max_steps": 1000, "train.checkpoint_every": 50})
    with_local_data(tmp_path, ci_dag)
    target = tmp_path / "results" / "train" / "D" / "seed7" / "summary.json"
    proc = slurm_snakemake(tmp_path, slurm_env, str(target.relative_to(tmp_path)), configfile=cfg, popen=True)
    try:
        deadline = time.time() + 600
        ckpt = tmp_path / "results" / "train" / "D" / "seed7" / "_work" / "ckpt" / "LATEST"
        while not ckpt.exists():  # the training job is running on the cluster
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.5)
        running = subprocess.run(
            ["squeue", "-h", "-t", "RUNNING", "-o", "%i %k"], capture_output=True, text=True, env=slurm_env, check=True
        ).stdout.splitlines()
        victim = next(line.split()[0] for line in running if "train_baseline" in line)
        subprocess.run(["scancel", victim], env=slurm_env, check=True)
        log, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    assert proc.returncode == 0, log[-3000:]
    attempts = submitted(log)["train_baseline"]
    assert attempts[0] == victim and len(attempts) == 2
    assert re.search(rf"SLURM-job '{victim}' failed, SLURM status is: 'CANCELLED", log), log[-3000:]
    assert target.exists()
    # the resubmitted job went on from the cancelled one's last checkpoint
    assert "resuming D/seed7 from" in (tmp_path / "results" / "logs" / "train" / "D" / "seed7.log").read_text()


def test_without_accounting_the_run_stops_before_submitting(slurm_env, ci_dag, tmp_path):
    """The profile's sacct status on a cluster without accounting: a message naming the fix, no job."""
    _, cfg = ci_dag
    started = time.perf_counter()
    done = slurm_snakemake(tmp_path, slurm_env, "results/data/shakespeare/split.json", configfile=cfg, squeue=False)
    log = done.stdout + done.stderr
    assert done.returncode != 0
    assert "sacct cannot answer" in log and "--slurm-status-command squeue --slurm-no-account" in log
    assert "has been submitted" not in log and not (tmp_path / "results" / "data").exists()
    assert time.perf_counter() - started < 60


def test_start_after_stop_lists_no_earlier_jobs(slurm_env):
    job = subprocess.run(
        ["sbatch", "--parsable", "--wrap", "true"], capture_output=True, text=True, env=slurm_env, check=True
    ).stdout.strip()
    assert job in squeue_ids(slurm_env)
    for step in ("stop", "start"):
        done = subprocess.run([str(SCRIPT), step], capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
    assert squeue_ids(slurm_env) == set()
