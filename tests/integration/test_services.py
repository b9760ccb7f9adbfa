"""Trainings logging to a real MLflow tracking server (`mlflow server` on loopback,
sqlite backend), as the trainings of a cluster run do: several at once, every
metric row of every training must arrive, none twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter

import pandas as pd
import pytest
import yaml

from tests.integration.test_workflow import LAUNCHER_VARIABLES
from tests.services import REPO, build_ci_inputs, ci_config, mlflow_server

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
    print(tracking.start_run(uri, f"mtp/race{{i}}/tiny-mbpp").run_id)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.mark.slow
def test_trainings_starting_at_once_share_one_new_experiment(server, tmp_path):
    """The seeds of one algorithm start together on a cluster: all but one lose the
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
        experiment = client.get_experiment_by_name(f"mtp/race{i}/tiny-mbpp")
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
