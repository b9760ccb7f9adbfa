"""The critic rule of the reduced tiny DAG on its own (slow): Snakemake builds the
downloads it needs and runs the Monte-Carlo critic with CI's recipe, value head
included; the gate record and lambda are in the table's metadata, as in metrics.json.

The whole reduced DAG (critic included, then training and the report on its
table) is tests/integration/test_workflow.py::test_end_to_end_rerun_regenerate_and_recipe_change."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.integration.test_workflow import CI, copy_workflow, planned_jobs, snakemake
from wmtp.config.schema import load_config, load_config_files
from wmtp.stages.value_table_meta import read_gate


@pytest.mark.slow
def test_the_critic_rule_alone_on_the_reduced_tiny_dag(tmp_path):
    workdir = copy_workflow(tmp_path)
    target = "results/ci/critic/seed0/values.parquet"
    plan = snakemake(workdir, target, "-n", *CI)
    assert planned_jobs(plan.stdout)["critic"] == 1, plan.stdout[-3000:]
    result = snakemake(workdir, target, "--cores", "2", *CI, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((workdir / "results/ci/critic/seed0/metrics.json").read_text())
    record, strength = read_gate(workdir / target)
    assert record == {"monte_carlo": metrics["gate"], "head": metrics["gate_head"]}
    assert strength == metrics["auto_strength"] and 0.0 <= strength <= 1.0
    critic = load_config(load_config_files([workdir / CI[1]], base=workdir / "config/config.yaml"), workdir)[1][
        "critic-wmtp"
    ].critic
    assert metrics["n_valued"] == critic.max_problems and metrics["seed"] == 0
    assert metrics["n_head"] == metrics["n_examples"] - critic.max_problems  # ci fits a value head
    table = pd.read_parquet(workdir / target)
    assert table["sample_id"].nunique() == metrics["n_examples"]
    assert table.loc[table["delta"].notna(), "delta"].abs().sum() > 0
    assert "sandbox" in (workdir / "logs/ci/critic/seed0.log").read_text()  # the progress bars
