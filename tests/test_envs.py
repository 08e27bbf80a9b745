"""envs/*.yaml (conda, for --software-deployment-method conda) agree with pyproject.toml.

Conda channels are unreachable here, so the environments are not built; this
checks that every package they list is a dependency of the project with the
same version bound, and that every dependency is in some environment.
"""

import ast
import re
import sys
import tomllib
from pathlib import Path

import yaml

from conftest import REPO

CONDA_TO_PIP = {"pytorch": "torch"}
NOT_IN_PYPROJECT = {"python", "pip"}
ONLY_FOR_THE_DRIVER = {"snakemake", "snakemake-executor-plugin-slurm"}  # run the DAG; jobs do not import them


def split_req(req: str) -> tuple[str, str]:
    m = re.match(r"^([A-Za-z0-9_.-]+)\s*(.*)$", req.strip())
    return m.group(1).lower(), m.group(2).replace(" ", "")


def test_env_packages_match_pyproject():
    deps = dict(split_req(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
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


# import name -> conda package name, where they differ
IMPORT_TO_CONDA = {"torch": "pytorch", "yaml": "pyyaml", "sklearn": "scikit-learn"}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(third-party modules, weightpca modules) a Python file imports at module level.

    Imports inside functions are left out on purpose: they are the library's
    optional features (datasets for a hub corpus, wandb when enabled,
    transformers for a hub tokenizer), needed only by the jobs that use them.
    """
    third, own = set(), set()
    package = REPO / "src" / "weightpca"
    depth = len(path.relative_to(package).parts) - 1 if path.is_relative_to(package) else 0
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level and node.level <= depth:  # within a subpackage, whose files are all read
                continue
            if node.level:  # from . import x / from .x import y, inside the package
                base = node.module.split(".")[0] if node.module else None
                own.update([base] if base else [a.name for a in node.names])
                continue
            names = [node.module]
            if node.module == "weightpca":
                own.update(a.name for a in node.names)
                continue
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top == "weightpca":
                own.add(name.split(".")[1])
            elif top not in sys.stdlib_module_names and top != "__future__":
                third.add(top)
    return third, own


def modules_needed(script: Path) -> set[str]:
    """Third-party modules a job script needs: its own imports and, transitively, the library's it uses."""
    needed, todo = _imports(script)
    seen = set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        module = REPO / "src" / "weightpca" / f"{mod}.py"
        files = [module] if module.is_file() else sorted((module.parent / mod).glob("*.py"))
        assert files, f"weightpca.{mod}: no such module"
        for file in files:
            third, own = _imports(file)
            needed |= third
            todo |= own - seen
    return needed


def rule_envs_and_scripts():
    """(rule name, env file, script file) of every rule that runs a script."""
    out = []
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for rule in re.split(r"\nrule ", smk.read_text())[1:]:
            script = re.search(r'script:\n\s+"../(scripts/[\w.-]+)"', rule)
            env = re.search(r'conda:\n\s+"../../(envs/[\w.-]+)"', rule)
            if script:
                out.append((rule.split(":")[0], REPO / env.group(1), REPO / "workflow" / script.group(1)))
    return out


def test_every_env_has_what_its_rules_import():
    rules = rule_envs_and_scripts()
    assert len(rules) >= 15
    missing = []
    for name, env, script in rules:
        listed = {
            split_req(d.replace("=", "==", 1) if re.match(r"^[\w.-]+=[^=]", d) else d)[0]
            for d in yaml.safe_load(env.read_text())["dependencies"]
            if isinstance(d, str)
        }
        for module in sorted(modules_needed(script)):
            if IMPORT_TO_CONDA.get(module, module) not in listed:
                missing.append(f"rule {name}: {script.name} needs {module}, which {env.name} lacks")
    assert not missing, "\n".join(missing)


def test_import_walk_sees_the_library(tmp_path):
    """The walk above follows the library: a script importing only weightpca.report needs torch (via io)."""
    script = tmp_path / "s.py"
    script.write_text("from weightpca.report import build_report\n")
    needed = modules_needed(script)
    assert {"matplotlib", "pandas", "numpy"} <= needed
    assert "torch" in needed


def library_import_graph() -> dict[str, set[str]]:
    """weightpca module -> the weightpca modules it imports anywhere in its text (function-level included)."""
    graph = {}
    for path in (REPO / "src" / "weightpca").glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("weightpca"):
                deps.update([node.module.split(".")[1]] if "." in node.module else [a.name for a in node.names])
        graph[path.stem] = deps - {path.stem}
    return graph


def test_library_has_no_import_cycle():
    graph = library_import_graph()
    assert {"train", "evaluate", "lowrank", "targets"} <= set(graph)
    state = {}

    def visit(mod, stack):
        state[mod] = "open"
        for dep in graph.get(mod, ()):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(stack + [mod, dep])}"
            if dep not in state:
                visit(dep, stack + [mod])
        state[mod] = "done"

    for mod in graph:
        if mod not in state:
            visit(mod, [])
    # scoring lives in evaluate: no library module needs the training loop but the recovery stage, which drives it
    assert [m for m, deps in graph.items() if "train" in deps] == ["recovery"]
