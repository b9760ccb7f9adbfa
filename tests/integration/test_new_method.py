"""Adding a weighting method touches four places and nothing else (README: "Add a
weighting method"): one entry in wmtp/config/registry.py, its weight function in
wmtp/core/weights.py, a recipe file and a config that lists it.

The test makes exactly those edits in a copy of the workflow and of the library
(the copy's wmtp first on PYTHONPATH) and checks that Snakemake plans the new
method's trainings and evaluations with the inputs its registry entry names, and
that `algorithm_weights` runs its weight function. A file that would need a fifth
edit (a list of method names, a copy of the results layout, a stale JSON schema)
makes the dry run fail or plan the wrong inputs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.test_workflow import REPO, copy_workflow, planned_inputs, planned_jobs

NAME = "half-mtp"
ENTRY = (
    f'        Method("{NAME}", "half",\n'
    '               inputs=("refce",), knobs=("temperature", "eps", "w_max", "strength",'
    ' "rho1_mode", "rho1_base")),\n'
)
WEIGHT_FUNCTION = '''

def half(mask, settings, *, ce_base=None, ce_ref=None, deltas=None) -> torch.Tensor:
    """Halfway between uniform and Rho-1 weights (mean 1, like both)."""
    rho1 = rho1_weighted(mask, settings, ce_base=ce_base, ce_ref=ce_ref)
    return 0.5 * (uniform(mask, settings) + rho1)
'''
RECIPE = f"algorithm: {NAME}\nweighting:\n  temperature: 1.0\n"
ROWS = ["base", "baseline-mtp", NAME]


def add_method(workdir: Path) -> None:
    """The four edits of the how-to, in a copy of the workflow and of wmtp."""
    shutil.copytree(REPO / "wmtp", workdir / "wmtp", ignore=shutil.ignore_patterns("__pycache__"))
    registry = workdir / "wmtp" / "config" / "registry.py"
    text = registry.read_text()
    anchor = '        Method("ntp",'
    assert anchor in text
    registry.write_text(text.replace(anchor, ENTRY + anchor, 1))
    weights = workdir / "wmtp" / "core" / "weights.py"
    weights.write_text(weights.read_text() + WEIGHT_FUNCTION)
    (workdir / "config" / "recipes" / f"{NAME}.yaml").write_text(RECIPE)
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    config["algorithms"] = ROWS
    config["recipes"] = {
        "baseline-mtp": config["recipes"]["baseline-mtp"],
        NAME: f"config/recipes/{NAME}.yaml",
    }
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def in_copy(workdir: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`python *args` in the copy with the copy's wmtp imported (first on the path)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(workdir), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    workdir = copy_workflow(tmp_path_factory.mktemp("new-method"))
    add_method(workdir)
    return workdir


@pytest.fixture(scope="module")
def plan(workdir) -> str:
    result = in_copy(workdir, "-m", "snakemake", "all", "-n")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_the_copy_imports_its_own_wmtp(workdir):
    result = in_copy(workdir, "-c", "import wmtp; print(wmtp.__file__)")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(workdir)


def test_the_new_method_is_planned_with_the_inputs_its_entry_names(plan, workdir):
    seeds = len(yaml.safe_load((workdir / "config" / "config.yaml").read_text())["seeds"])
    jobs = planned_jobs(plan)
    assert jobs["train"] == 2 * seeds and jobs["eval"] == len(ROWS) * seeds, plan[-3000:]
    assert jobs["refce"] == 1 and "critic" not in jobs  # half-mtp reads refce, nobody a critic
    trainings = planned_inputs(plan, "train")
    for seed in range(seeds):
        output = next(o for o in trainings if f"train/{NAME}/seed{seed}/model" in o)
        inputs = trainings[output]
        assert "results/tiny/models/base" in inputs
        assert "results/tiny/data/tiny-mbpp/train.parquet" in inputs
        assert "results/tiny/refce/tiny-mbpp.parquet" in inputs
        baseline = next(o for o in trainings if f"train/baseline-mtp/seed{seed}/model" in o)
        assert "refce" not in trainings[baseline]
    evals = planned_inputs(plan, "eval")
    for seed in range(seeds):
        output = next(o for o in evals if f"eval/{NAME}/seed{seed}/tiny-mbpp.json" in o)
        model = f"results/tiny/train/{NAME}/seed{seed}/model"
        assert evals[output] == f"{model}, results/tiny/data/tiny-mbpp/test.parquet"
    report = planned_inputs(plan, "report")
    assert len(report) == 1
    assert f"results/tiny/train/{NAME}/seed1/metrics.parquet" in next(iter(report.values()))


def test_the_train_rule_accepts_the_new_name(plan):
    """The train rule's `algo` wildcard is constrained to the registry's trained
    methods, so the new name matches it without an edit of the rules."""
    blocks = re.findall(r"^rule train:\n((?:    .*\n)+)", plan, flags=re.M)
    assert any(f"wildcards: run=tiny, algo={NAME}, seed=0" in block for block in blocks), plan[-3000:]


def test_the_weight_function_runs_through_algorithm_weights(workdir):
    script = f"""
import torch
from wmtp.config.schema import load_recipe
from wmtp.core.weights import algorithm_weights, uniform, rho1_weighted

recipe = load_recipe("config/recipes/{NAME}.yaml")
generator = torch.Generator().manual_seed(0)
mask = torch.rand(2, 12, generator=generator) < 0.8
ce_base = torch.rand(2, 12, generator=generator) * 3
ce_ref = torch.rand(2, 12, generator=generator) * 3
settings = recipe.weighting
weights = algorithm_weights("{NAME}", mask, settings, ce_base=ce_base, ce_ref=ce_ref)
expected = 0.5 * (uniform(mask, settings) + rho1_weighted(mask, settings, ce_base=ce_base, ce_ref=ce_ref))
assert torch.allclose(weights, expected), (weights, expected)
assert abs(weights[mask].mean().item() - 1) < 1e-5
try:
    algorithm_weights("{NAME}", mask, settings)
except ValueError as error:
    assert "needs ce_base" in str(error), error
else:
    raise AssertionError("no ce_base accepted")
print("ok", settings.temperature)
"""
    result = in_copy(workdir, "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "1.0"]
