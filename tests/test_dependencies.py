"""The project's dependencies: one lock, true lower bounds, every import declared.

- requirements.lock (written by scripts/lock.sh, installed by scripts/setup.sh) is what
  this environment holds, is current for pyproject.toml, and the rules' conda envs pin
  exactly its versions.
- Every lower bound of pyproject.toml is one that installs together with the others: a
  resolver picking the lowest version of each direct dependency picks that bound.
- Every third-party module the code imports (module level or lazily, `ast`) comes from a
  distribution pyproject.toml declares, not one that merely arrives with another.

The resolver tests ask the registry (PyPI), so they are slow; the rest read files.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from scripts.sync_env_pins import LOCK, LOCKED_ENVS, env_pins, lock_versions, normalise

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
CODE_DIRS = ("wmtp", "workflow_scripts", "scripts", "benchmarks")
UV = [sys.executable, "-m", "uv"]


def requirements(group: str | None = None) -> list[Requirement]:
    """The core dependencies (group None) or one optional group of pyproject.toml."""
    specs = (
        PYPROJECT["dependencies"] if group is None else PYPROJECT["optional-dependencies"][group]
    )
    return [Requirement(spec) for spec in specs]


def declared() -> set[str]:
    """Every distribution pyproject.toml names, core and extras (normalised)."""
    groups = [None, *PYPROJECT["optional-dependencies"]]
    return {normalise(req.name) for group in groups for req in requirements(group)}


# ---- the lock ---------------------------------------------------------------------


def test_env_files_pin_exactly_the_locks_versions():
    locked = lock_versions()
    for name in LOCKED_ENVS:
        env = REPO / "envs" / f"{name}.yaml"
        pins = env_pins(env)
        assert pins, f"{env}: no pins found"
        wrong = {pkg: (pin, locked.get(pkg)) for pkg, pin in pins.items() if locked.get(pkg) != pin}
        assert not wrong, f"{env}: pin != {LOCK.name} (run bash scripts/lock.sh): {wrong}"


def test_lock_satisfies_pyproject_and_pins_one_torch_for_every_build():
    locked = lock_versions()
    for req in [*requirements(), *requirements("dev")]:
        name = normalise(req.name)
        assert name in locked, f"{LOCK.name} lacks {req.name} (run bash scripts/lock.sh)"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"{LOCK.name} pins {req.name}=={locked[name]}, outside pyproject.toml's {req}"
        )
    # no local suffix: `torch==X` is met by the CPU build X+cpu and by PyPI's CUDA build X
    assert Version(locked["torch"]).local is None, locked["torch"]
    assert not any(name.startswith("nvidia-") for name in locked), (
        "lock resolved against CUDA torch"
    )


def test_this_environment_holds_exactly_the_locked_versions():
    """scripts/setup.sh installs from the lock, so a venv it made matches it (CI makes one
    afresh). torch may carry its build's local suffix (2.13.0+cpu)."""
    wrong = {}
    for name, pinned in lock_versions().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed is None or Version(installed).public != Version(pinned).public:
            wrong[name] = (pinned, installed)
    assert not wrong, f"installed != {LOCK.name} (rerun bash scripts/setup.sh): {wrong}"


@pytest.mark.slow
def test_lock_is_what_its_script_writes():
    """Regenerating (versions kept) changes nothing: the lock was not edited by hand and
    covers pyproject.toml as it stands."""
    result = subprocess.run(["bash", "scripts/lock.sh", "--check"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


# ---- lower bounds -----------------------------------------------------------------


def lowest_resolution(*extra_args: str) -> dict[str, str]:
    """package -> version uv picks when each direct dependency is taken at its lowest."""
    result = subprocess.run(
        [*UV, "pip", "compile", "pyproject.toml", "--resolution", "lowest-direct",
         "--python-version", PYPROJECT["requires-python"].removeprefix(">="),
         "--python-platform", "x86_64-manylinux_2_28", "--no-header", "--no-annotate",
         "--quiet", *extra_args],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, (
        f"the lower bounds do not resolve together:\n{result.stderr[-3000:]}"
    )
    lines = (line.split("==") for line in result.stdout.splitlines() if "==" in line)
    return {normalise(name): pinned.split(";")[0].strip() for name, pinned in lines}


def lower_bound(req: Requirement) -> Version:
    bounds = [Version(spec.version) for spec in req.specifier if spec.operator in (">=", "==")]
    assert bounds, f"pyproject.toml: {req} has no lower bound (>= or ==)"
    return max(bounds)


def assert_at_lower_bounds(reqs: list[Requirement], resolved: dict[str, str]) -> None:
    off = {
        str(req): resolved.get(normalise(req.name))
        for req in reqs
        if Version(resolved.get(normalise(req.name), "0")) != lower_bound(req)
    }
    assert not off, (
        f"lower bounds that cannot be installed with the others (bound: resolved): {off}"
    )


@pytest.mark.slow
def test_core_lower_bounds_install_together():
    assert_at_lower_bounds(requirements(), lowest_resolution())


@pytest.mark.slow
def test_extras_lower_bounds_install_together():
    extras = [req for group in PYPROJECT["optional-dependencies"] for req in requirements(group)]
    assert_at_lower_bounds(extras, lowest_resolution("--all-extras"))


def test_lower_bound_checker_sees_a_bound_that_cannot_be_met():
    with pytest.raises(AssertionError, match="transformers>=5.4"):
        assert_at_lower_bounds([Requirement("transformers>=5.4")], {"transformers": "5.5.0"})


# ---- declared imports -------------------------------------------------------------


def local_modules(path: Path) -> set[str]:
    """Top-level names a file in the repository imports from the repository itself: the
    repository root's and the file's own folder's modules, and those of tests/ and its
    folders (benchmarks put them on sys.path, e.g. tests/smollm2.py)."""
    folders = {REPO, path.parent, REPO / "tests"}
    if (REPO / "tests").is_dir():
        folders |= {p for p in (REPO / "tests").rglob("*") if p.is_dir()}
    names = set()
    for folder in folders:
        names |= {p.stem for p in folder.glob("*.py")}
        names |= {p.name for p in folder.iterdir() if p.is_dir()}
    return names


def third_party_imports(path: Path) -> list[tuple[str, int]]:
    """(top-level module, line) of every absolute import in `path` that is neither the
    standard library nor the repository's own code."""
    skip = set(sys.stdlib_module_names) | {"__future__"} | local_modules(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        found += [(m.split(".")[0], node.lineno) for m in modules if m.split(".")[0] not in skip]
    return found


def undeclared_imports(paths: list[Path], declared: set[str]) -> list[str]:
    """'file:line: module (from distribution)' of each import no declared distribution
    provides. A module no installed distribution provides is taken as its own
    distribution's name (e.g. `datasets` of the hub extra, not installed by setup.sh)."""
    providers = packages_distributions()
    problems = []
    for path in paths:
        for module, line in third_party_imports(path):
            dists = {normalise(d) for d in providers.get(module, [module])}
            if not dists & declared:
                where = f"{path.relative_to(REPO)}:{line}"
                problems.append(f"{where}: {module} (from {', '.join(sorted(dists))})")
    return problems


def code_files() -> list[Path]:
    """Every code file of the project's environment; the vLLM worker runs in an
    environment of its own, whose pins cover its imports (tests/integration/test_envs.py)."""
    from wmtp.core.vllm_engine import WORKER

    return sorted(
        p for folder in CODE_DIRS for p in (REPO / folder).rglob("*.py") if p.resolve() != WORKER.resolve()
    )


def test_every_third_party_import_is_declared():
    files = code_files()
    assert len(files) > 50, "the walk found too few files"
    problems = undeclared_imports(files, declared())
    assert not problems, "imported but not declared in pyproject.toml:\n" + "\n".join(problems)


def test_import_checker_names_an_undeclared_transitive_dependency(tmp_path, monkeypatch):
    """requests arrives with mlflow but is not declared: the checker must name it."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    script = tmp_path / "scripts" / "fetch.py"
    script.parent.mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "scripts" / "helper.py").write_text("")
    script.write_text(
        "import json\nimport helper\nimport numpy\n\ndef f():\n    import requests.adapters\n"
    )
    assert undeclared_imports([script], declared()) == [
        "scripts/fetch.py:6: requests (from requests)"
    ]
