"""The per-rule conda envs (envs/*.yaml, used with `snakemake --sdm conda`).

Conda itself cannot be installed on our machines, so what is checked is what pip can
check: each env's pinned pip set resolves to one co-installable set for this Python
(`pip install --dry-run --ignore-installed`, the resolver conda's pip step runs), and
that set provides every third-party package the code of the rules naming the env
imports (`imported_modules`).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
from wmtp.core.vllm_engine import WORKER, WORKER_ENV_FILE  # noqa: E402

# envs of a process a rule starts, not of a rule: env name -> the script run in it
WORKER_ENVS = {WORKER_ENV_FILE.stem: WORKER}
ENVS = sorted(p.stem for p in (REPO / "envs").glob("*.yaml") if p.stem not in WORKER_ENVS)


def rule_envs() -> dict[str, list[Path]]:
    """env name -> the scripts of the rules that use it (rules/*.smk)."""
    uses: dict[str, list[Path]] = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        for body in re.split(r"^rule \w+:\n", smk.read_text(), flags=re.M)[1:]:
            env = re.search(r'^    conda:\n        "\.\./envs/([\w-]+)\.yaml"', body, re.M)
            script = re.search(r'^    script:\n        "\.\./(workflow_scripts/[\w.]+)"', body, re.M)
            if env:
                uses.setdefault(env.group(1), [])
                if script:
                    uses[env.group(1)].append(REPO / script.group(1))
    return uses


def pins(env: str) -> list[str]:
    spec = yaml.safe_load((REPO / "envs" / f"{env}.yaml").read_text())
    return [pin for dep in spec["dependencies"] if isinstance(dep, dict) for pin in dep["pip"]]


def module_level(tree: ast.Module) -> list[ast.stmt]:
    """Statements run when the module is imported (not inside functions or classes),
    `if`/`try` blocks included, `if TYPE_CHECKING:` blocks not."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue  # never run: imports for type hints only
        found.append(node)
        if isinstance(node, ast.If | ast.Try | ast.With):
            todo += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", [])]
    return found


def imports(nodes) -> list[tuple[str, list[str]]]:
    """(module, imported names) of the absolute import statements among `nodes`."""
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def imported_modules(scripts: list[Path]) -> set[str]:
    """Top-level modules the rules' code imports: the scripts' imports; every import
    of the wmtp modules a script imports (its entry points, used whole: the lazy
    ones too, e.g. sentencepiece for Meta's tokenizer in wmtp.stages.download); and the
    module-level imports of the wmtp modules reached from there (their lazy imports
    serve other rules or optional paths)."""
    found: set[str] = set()
    loaded: set[Path] = set()
    todo: list[tuple[str, list[str], bool]] = []
    for script in scripts:
        todo += [(module, names, True) for module, names in imports(ast.walk(ast.parse(script.read_text())))]
    while todo:
        module, names, whole = todo.pop()
        found.add(module.split(".")[0])
        if module.split(".")[0] != "wmtp":
            continue
        for name in [module, *(f"{module}.{name}" for name in names)]:
            path = REPO.joinpath(*name.split(".")).with_suffix(".py")
            if path.exists() and (path, whole) not in loaded:
                loaded.add((path, whole))
                tree = ast.parse(path.read_text())
                todo += [(m, n, False) for m, n in imports(ast.walk(tree) if whole else module_level(tree))]
    return found - set(sys.stdlib_module_names) - {"wmtp", "__future__"}


def test_worker_envs_hold_all_their_script_imports():
    """The vLLM worker runs in an env with nothing of wmtp: it imports only the
    standard library and the env's pinned packages (anywhere in the file)."""
    for env, script in WORKER_ENVS.items():
        modules = {m.split(".")[0] for m, _ in imports(ast.walk(ast.parse(script.read_text())))}
        third_party = modules - set(sys.stdlib_module_names) - {"__future__"}
        assert third_party == {pin.split("==")[0] for pin in pins(env)} - {"torch"}, third_party


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_rule_env_exists_with_its_post_deploy_script():
    uses = rule_envs()
    assert set(uses) == set(ENVS), "an env no rule uses, or a rule naming a missing env"
    for env in ENVS:
        assert (REPO / "envs" / f"{env}.post-deploy.sh").exists()
        assert all(re.fullmatch(r"[\w.-]+==[\w.+]+", pin) for pin in pins(env)), pins(env)


@pytest.mark.slow
@pytest.mark.parametrize("env", ENVS)
def test_env_pins_are_co_installable_and_cover_the_rules_imports(env, tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--disable-pip-version-check", "--report", str(report), *pins(env)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, f"envs/{env}.yaml pins do not resolve:\n{result.stderr[-3000:]}"
    resolved = {normalise(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"]}
    assert {normalise(pin.split("==")[0]) for pin in pins(env)} <= resolved
    providers = packages_distributions()
    missing = {
        module: providers.get(module, ["?"])
        for module in imported_modules(rule_envs()[env])
        if not {normalise(d) for d in providers.get(module, [])} & resolved
    }
    assert not missing, f"envs/{env}.yaml lacks what its rules import: {missing}"
