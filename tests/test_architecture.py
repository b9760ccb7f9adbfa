"""The import rules of the package: which part may import which (docs/design.md,
"Import rules").

The rules are read from the source (every import statement, module level and
inside functions, found by `ast`) or checked in a fresh interpreter, so an import
that breaks one fails here naming the file and line. Each rule's checker is also
run on a made-up violation, so a checker that sees nothing cannot pass unnoticed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "wmtp"


@dataclass(frozen=True)
class Import:
    """One imported module of one import statement."""

    module: str  # the importing module, e.g. "wmtp.stages.evaluate"
    target: str  # the imported module, absolute, e.g. "wmtp.core.checkpoints"
    where: str  # "wmtp/stages/evaluate.py:167"
    in_function: bool  # the statement sits inside a function body


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    """Whether `name` is a module or package of this repository's wmtp."""
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Absolute names of the modules a statement imports: `from wmtp.stages import
    evaluate` imports wmtp.stages.evaluate, `from wmtp.core.model import MTPModel`
    imports wmtp.core.model."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join([*anchor, *([base] if base else [])])
    names = [f"{base}.{alias.name}" for alias in node.names]
    submodules = [name for name in names if name.startswith("wmtp") and _is_module(name)]
    return submodules or [base]


def imports_of_source(source: str, module: str, filename: str, is_package: bool = False) -> list[Import]:
    """Every import of a module's source, with whether it is inside a function."""
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                where = f"{filename}:{child.lineno}"
                for target in _targets(child, module, is_package):
                    found.append(Import(module, target, where, in_function))
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, inner)

    visit(ast.parse(source, filename), False)
    return found


def imports_of(path: Path) -> list[Import]:
    return imports_of_source(
        path.read_text(), module_name(path), path.relative_to(REPO).as_posix(), path.name == "__init__.py"
    )


def package_imports() -> list[Import]:
    return [found for path in sorted(PACKAGE.rglob("*.py")) for found in imports_of(path)]


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


# ---- (a) the sandbox's inside half: standard library only ------------------------------


def non_stdlib(imports: list[Import]) -> list[str]:
    return [
        f"{found.where}: {found.target}"
        for found in imports
        if found.target.split(".")[0] not in sys.stdlib_module_names
    ]


def test_sandbox_inside_imports_only_the_standard_library():
    """wmtp/sandbox/inside.py runs inside the sandbox from its source text, under
    whatever interpreter the sandbox has (often the system python3): nothing of
    the project's environment, wmtp included, is importable there."""
    assert non_stdlib(imports_of(PACKAGE / "sandbox" / "inside.py")) == []


def test_the_stdlib_check_sees_a_foreign_import():
    found = imports_of_source("import os\ndef f():\n    import numpy\n", "wmtp.sandbox.inside", "x.py")
    assert non_stdlib(found) == ["x.py:3: numpy"]


# ---- (b) what loads without torch ------------------------------------------------------

_PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
    if "torch" in sys.modules:
        print(name)
        break
"""


def torch_free_modules() -> list[str]:
    """The config (loaded by the Snakefile), the report stage (its rule's conda env
    has no torch) and the infrastructure every rule's adapter uses."""
    config = sorted(module_name(p) for p in (PACKAGE / "config").glob("*.py") if p.stem != "__init__")
    infra = sorted(module_name(p) for p in (PACKAGE / "infra").glob("*.py") if p.stem != "__init__")
    return [*config, "wmtp.stages.report", *infra]


def first_importing_torch(modules: list[str]) -> str:
    """The first of `modules` whose import (after the ones before it) loads torch,
    in a fresh interpreter; "" if none does."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_config_report_and_infra_import_without_torch():
    modules = torch_free_modules()
    assert {"wmtp.config.schema", "wmtp.config.registry", "wmtp.config.paths"} <= set(modules)
    assert first_importing_torch(modules) == "", "imports torch (directly or through a wmtp module)"


def test_the_torch_probe_sees_torch():
    assert first_importing_torch(["wmtp.config.paths", "wmtp.core.model"]) == "wmtp.core.model"


# ---- (c) the layers: core below stages; config and infra below everything ---------------

LAYERS: dict[tuple[str, ...], tuple[str, ...]] = {
    # importer packages -> packages they must not import
    ("wmtp.core",): ("wmtp.stages", "wmtp.tiny", "wmtp.cli"),
    ("wmtp.config", "wmtp.infra"): (
        "wmtp.core", "wmtp.stages", "wmtp.tiny", "wmtp.data", "wmtp.sandbox", "wmtp.cli",
    ),
}


def layer_violations(imports: list[Import]) -> list[str]:
    return [
        f"{found.where}: {found.module} imports {found.target}"
        for importers, forbidden in LAYERS.items()
        for found in imports
        if _under(found.module, importers) and _under(found.target, forbidden)
    ]


def test_layers_import_only_downwards():
    """core is the maths and the model, usable without the pipeline; config and
    infra are read by everything, so they read nothing of the rest (no cycles,
    and the Snakefile loads the config without the library's heavy parts)."""
    assert layer_violations(package_imports()) == []


def test_the_layer_check_sees_an_upward_import():
    found = imports_of_source("def f():\n    from wmtp.stages import train\n", "wmtp.core.loss", "x.py")
    found += imports_of_source("from wmtp.data.prompts import STOP\n", "wmtp.config.schema", "y.py")
    assert layer_violations(found) == [
        "x.py:2: wmtp.core.loss imports wmtp.stages.train",
        "y.py:1: wmtp.config.schema imports wmtp.data.prompts",
    ]


# ---- (d) the library never imports the workflow engine -----------------------------------


def snakemake_imports(imports: list[Import]) -> list[str]:
    return [f"{found.where}: {found.target}" for found in imports if _under(found.target, ("snakemake",))]


def test_the_library_never_imports_snakemake():
    """Snakemake reaches wmtp only through workflow_scripts/ (which turn the
    `snakemake` object into arguments), so every stage runs as a plain call."""
    assert snakemake_imports(package_imports()) == []


def test_the_snakemake_check_sees_one():
    found = imports_of_source("def f():\n    from snakemake.io import Namedlist\n", "wmtp.cli", "x.py")
    assert snakemake_imports(found) == ["x.py:2: snakemake.io"]


# ---- (e) wmtp imports wmtp at module level, except where a reason says otherwise ----------

_TORCH = "keeps torch out of a module that must load without it (rule b)"
_STAGE_ON_DEMAND = "the command line imports a stage when its subcommand runs: `validate`, `schema` and --help load without torch"

FUNCTION_LEVEL_ALLOWED: dict[tuple[str, str], str] = {
    ("wmtp.stages.evaluate", "wmtp.core.checkpoints"): f"report reads pass@k from evaluate: {_TORCH}",
    ("wmtp.stages.eval_sampling", "wmtp.core.sample"): f"report reads pass@k from evaluate: {_TORCH}",
    ("wmtp.stages.eval_sampling", "wmtp.core.vllm_engine"): f"report reads pass@k from evaluate: {_TORCH}",
    ("wmtp.stages.eval_sampling", "wmtp.stages.export"): f"report reads pass@k from evaluate: {_TORCH}",
    ("wmtp.stages.diagnostics", "wmtp.data.training"): f"report reads the token classes: {_TORCH}",
    ("wmtp.cli", "wmtp.stages.train"): _STAGE_ON_DEMAND,
    ("wmtp.cli", "wmtp.stages.evaluate"): _STAGE_ON_DEMAND,
    ("wmtp.cli", "wmtp.stages.export"): _STAGE_ON_DEMAND,
    ("wmtp.cli", "wmtp.stages.report"): _STAGE_ON_DEMAND,
}


def function_level_wmtp_imports(imports: list[Import]) -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = {}
    for item in imports:
        if item.in_function and _under(item.target, ("wmtp",)):
            found.setdefault((item.module, item.target), []).append(item.where)
    return found


def test_wmtp_modules_import_each_other_at_module_level():
    """An import hidden in a function hides a dependency from the reader and from
    these rules; each exception names its reason in FUNCTION_LEVEL_ALLOWED."""
    found = function_level_wmtp_imports(package_imports())
    unexplained = {pair: where for pair, where in found.items() if pair not in FUNCTION_LEVEL_ALLOWED}
    assert unexplained == {}, "move these imports to the module's top, or add a reason"
    stale = sorted(set(FUNCTION_LEVEL_ALLOWED) - set(found))
    assert stale == [], "allowed but no longer imported in a function: remove the entries"


def test_the_function_level_check_sees_one():
    source = "from wmtp.core import model\nclass A:\n    def f(self):\n        import wmtp.stages.train\n"
    found = imports_of_source(source, "wmtp.stages.export", "x.py")
    assert function_level_wmtp_imports(found) == {("wmtp.stages.export", "wmtp.stages.train"): ["x.py:4"]}


@pytest.mark.parametrize(
    ("source", "module", "expected"),
    [
        ("from wmtp.stages import diagnostics, evaluate\n", "wmtp.stages.report",
         ["wmtp.stages.diagnostics", "wmtp.stages.evaluate"]),
        ("from wmtp.core.model import MTPModel\n", "wmtp.core.loss", ["wmtp.core.model"]),
        ("from . import cgroups\n", "wmtp.sandbox.runner", ["wmtp.sandbox.cgroups"]),
        ("from .model import MTPModel\n", "wmtp.core.loss", ["wmtp.core.model"]),
        ("import os.path\n", "wmtp.cli", ["os.path"]),
    ],
)
def test_import_targets_are_resolved_to_modules(source, module, expected):
    assert [found.target for found in imports_of_source(source, module, "x.py")] == expected
