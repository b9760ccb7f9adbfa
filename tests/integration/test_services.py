"""Trainings logging to a real MLflow tracking server (`mlflow server` on loopback,
sqlite backend), as the trainings of a cluster run do: several at once, every
metric row of every training must arrive, none twice, all in the study's one
experiment; and the report job's evaluation and report runs with their artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.integration.test_workflow import LAUNCHER_VARIABLES
from tests.services import REPO, build_ci_inputs, ci_config, mlflow_server
from wmtp.config.schema import config_hash, load_config

SEEDS = (0, 1, 2, 3)
ENV = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES} | {"OMP_NUM_THREADS": "1"}
ROUNDS = 5
# Waits for the go signal, then opens an MLflow run in each of ROUNDS new experiments,
# as ROUNDS trainings starting would: every process reaches each creation together.
START_RUNS = f"""
import pathlib, sys
from mlflow import MlflowClient
from wmtp.infra import tracking
uri, go = sys.argv[1], pathlib.Path(sys.argv[2])
MlflowClient(uri).search_experiments()
pathlib.Path(sys.argv[3]).touch()
while not go.exists():
    pass
for i in range({ROUNDS}):
    print(tracking.start_run(uri, f"wmtp/race{{i}}").run_id)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.mark.slow
def test_trainings_starting_at_once_share_one_new_experiment(server, tmp_path):
    """The trainings of a study start together on a cluster: all but one lose the
    race to create their experiment, and must use it rather than fail."""
    from mlflow import MlflowClient

    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in SEEDS]
    procs = [
        subprocess.Popen([sys.executable, "-c", START_RUNS, server, str(go), str(path)], env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for path in ready
    ]
    deadline = time.monotonic() + 300
    while not all(path.exists() for path in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [proc.communicate(timeout=300) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for _, err in results]
    client = MlflowClient(server)
    for i in range(ROUNDS):
        experiment = client.get_experiment_by_name(f"wmtp/race{i}")
        runs = client.search_runs([experiment.experiment_id])
        assert sorted(r.info.run_id for r in runs) == sorted(out.split()[i] for out, _ in results)


@pytest.mark.slow
def test_four_trainings_at_once_log_every_metric_once(server, tmp_path):
    from mlflow import MlflowClient

    from wmtp.stages.train_metrics import mlflow_metrics

    inputs = build_ci_inputs(tmp_path / "inputs")
    config = tmp_path / "ci.yaml"
    settings = ci_config()
    # long enough that all four are still training when the last one starts (the
    # CI cap of 6 steps can end one before another has loaded its model)
    settings["train"] |= {"epochs": 100, "max_steps": 40}
    config.write_text(yaml.safe_dump(settings))
    procs = []
    for seed in SEEDS:
        with open(tmp_path / f"seed{seed}.log", "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "wmtp", "train", "--config", str(config), "--base-dir", str(REPO),
                 "--algorithm", "baseline-mtp", "--seed", str(seed), "--out", str(tmp_path / f"seed{seed}"),
                 "--base-model", str(inputs / "models" / "base"),
                 "--train-data", str(inputs / "data" / "tiny-mbpp" / "train.parquet"),
                 "--tracking-uri", server],
                env=ENV, stdout=subprocess.DEVNULL, stderr=log,
            ))
    for seed, proc in zip(SEEDS, procs, strict=True):
        assert proc.wait(timeout=900) == 0, (tmp_path / f"seed{seed}.log").read_text()[-3000:]
    client = MlflowClient(server)
    runs = []
    for seed in SEEDS:
        out = tmp_path / f"seed{seed}"
        record = json.loads((out / "model" / "tracking.json").read_text())
        assert record["tracking_uri"] == server
        run = client.get_run(record["run_id"])
        assert run.info.status == "FINISHED"
        runs.append(run)
        rows = pd.read_parquet(out / "metrics.parquet").to_dict("records")
        expected = {
            (key, row["step"]): value
            for row in rows for key, value in mlflow_metrics(row).items()
            if not pd.isna(value)
        }
        logged = [
            (key, metric.step, metric.value)
            for key in {key for key, _ in expected}
            for metric in client.get_metric_history(record["run_id"], key)
        ]
        twice = [entry for entry, n in Counter((k, s) for k, s, _ in logged).items() if n > 1]
        assert not twice, f"seed {seed}: logged more than once: {twice}"
        assert {(k, s): pytest.approx(v) for k, s, v in logged} == expected
    # the four ran at the same time: each started before any finished
    assert max(r.info.start_time for r in runs) < min(r.info.end_time for r in runs)
    # in the study's one experiment, each tagged with its row and what made it
    study, recipes = load_config(yaml.safe_load(config.read_text()), base_dir=REPO)
    (experiment,) = {r.info.experiment_id for r in runs}
    assert client.get_experiment(experiment).name == f"wmtp/{study.run}"
    for seed, run in zip(SEEDS, runs, strict=True):
        tags = run.data.tags
        assert (tags["run"], tags["kind"], tags["algorithm"], tags["seed"]) == (
            study.run, "training", "baseline-mtp", str(seed),
        )  # fmt: skip
        assert tags["config_hash"] == config_hash(study, recipes) and tags["git_commit"] != "unknown"


@pytest.mark.slow
def test_report_runs_and_their_artifacts_reach_the_server(server, tmp_path):
    """The report job's entries (wmtp.stages.study_tracking) through the server: the
    base row's evaluation run with its pass@k, the report run with its files."""
    from mlflow import MlflowClient

    from wmtp.stages.study_tracking import log_study

    config, recipes = load_config(ci_config(), base_dir=REPO)
    config = config.model_copy(update={"run": "server-study"})
    summary = tmp_path / "results/eval/base/seed0/tiny-mbpp.json"
    summary.parent.mkdir(parents=True)
    summary.write_text(json.dumps({"pass@1": 0.125, "pass@2": 0.25, "exact_match": 0.0}))
    (tmp_path / "report.md").write_text("| the table |")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "loss_curves.png").write_bytes(b"png")
    files = [tmp_path / "report.md", tmp_path / "figures"]
    evaluation, report = log_study(
        config, recipes, tracking_uri=server, eval_jsons=[summary], report_files=files
    )
    client = MlflowClient(server)
    stored = client.get_run(evaluation.run_id)
    assert stored.data.metrics == {
        "tiny_mbpp_pass_at_1": 0.125, "tiny_mbpp_pass_at_2": 0.25, "tiny_mbpp_exact_match": 0.0,
    }  # fmt: skip
    assert (stored.data.tags["algorithm"], stored.data.tags["kind"]) == ("base", "evaluation")
    back = Path(client.download_artifacts(report.run_id, "report.md", str(tmp_path / "back")))
    assert back.read_text() == "| the table |"
    assert [a.path for a in client.list_artifacts(report.run_id, "figures")] == ["figures/loss_curves.png"]
    experiment = client.get_experiment_by_name("wmtp/server-study").experiment_id
    assert {r.info.run_id for r in client.search_runs([experiment])} == {evaluation.run_id, report.run_id}
