"""envs/*.yaml (conda, for --software-deployment-method conda) agree with pyproject.toml.

Conda channels are unreachable here, so the environments are not built; this
checks that every package they list is a dependency of the project with the
same version bound, and that every dependency is in some environment.
"""

import re
import tomllib

import yaml

from conftest import REPO

CONDA_TO_PIP = {"pytorch": "torch"}
NOT_IN_PYPROJECT = {"python", "pip"}
ONLY_FOR_THE_DRIVER = {"snakemake", "snakemake-executor-plugin-slurm"}  # run the DAG; jobs do not import them


def split_req(req: str) -> tuple[str, str]:
    m = re.match(r"^([A-Za-z0-9_.-]+)\s*(.*)$", req.strip())
    return m.group(1).lower(), m.group(2).replace(" ", "")


def test_env_packages_match_pyproject():
    deps = dict(split_req(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())
                ["project"]["dependencies"])
    seen = set()
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert envs
    for env in envs:
        for dep in yaml.safe_load(env.read_text())["dependencies"]:
            if not isinstance(dep, str):
                continue
            name, bound = split_req(dep.replace("=", "==", 1) if re.match(r"^[\w.-]+=[^=]", dep) else dep)
            name = CONDA_TO_PIP.get(name, name)
            if name in NOT_IN_PYPROJECT:
                continue
            assert name in deps, f"{env.name}: {name} is not a dependency in pyproject.toml"
            assert bound == deps[name], f"{env.name}: {name}{bound} but pyproject.toml has {deps[name]}"
            seen.add(name)
    assert set(deps) - seen - ONLY_FOR_THE_DRIVER == set()


def test_every_job_rule_names_an_env():
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        for rule in re.split(r"\nrule ", smk.read_text())[1:]:
            name = rule.split(":")[0]
            if "script:" in rule or "shell:" in rule:
                assert "conda:" in rule, f"{smk.name}: rule {name} has no conda env"
                env = re.search(r'conda:\n\s+"../../(envs/[\w.-]+)"', rule).group(1)
                assert (REPO / env).is_file()
