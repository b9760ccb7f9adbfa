"""MLflow helpers against a throwaway sqlite store (no server, no DeepSpeed)."""

from __future__ import annotations

import json
import math
import multiprocessing

import pytest
from mlflow import MlflowClient

from wmtp.infra import tracking


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One store for the module: creating an MLflow sqlite schema takes seconds."""
    return tracking.default_tracking_uri(tmp_path_factory.mktemp("mlflow"))


def test_default_uri_is_absolute_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        tracking.default_tracking_uri("results/tiny")
        == f"sqlite:///{tmp_path}/results/tiny/mlflow.db"
    )


def test_flatten_and_metric_key():
    flat = tracking.flatten(
        {"recipe": {"train": {"lr": 0.001, "zero": 0}, "ks": [1, 10]}, "seed": 3}
    )
    assert flat == {
        "recipe.train.lr": "0.001",
        "recipe.train.zero": "0",
        "recipe.ks": "[1, 10]",
        "seed": "3",
    }
    assert tracking.metric_key("eval/mbpp/pass@10") == "eval/mbpp/pass_at_10"
    assert tracking.metric_key("a b:c-d.e/f_g") == "a b:c-d.e/f_g"
    assert tracking.metric_key("x(y)") == "x_y_"


def test_run_logs_params_metrics_and_resumes(uri, tmp_path):
    run = tracking.start_run(
        uri,
        "mtp/baseline-mtp/tiny-mbpp",
        run_name="r",
        tags={"run": "tiny"},
        params={"recipe": {"train": {"lr": 0.1}}, "seed": 0},
    )
    run.log_metrics({"train/loss": 2.0, "val/loss": math.nan}, step=1)
    again = tracking.start_run(uri, "mtp/baseline-mtp/tiny-mbpp", run_id=run.run_id)
    again.log_metrics({"train/loss": 1.5}, step=2)
    again.finish()
    client = MlflowClient(uri)
    stored = client.get_run(run.run_id)
    assert stored.data.params == {"recipe.train.lr": "0.1", "seed": "0"}
    assert stored.data.tags["run"] == "tiny" and stored.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "train/loss")] == [
        (1, 2.0),
        (2, 1.5),
    ]
    assert "val/loss" not in stored.data.metrics  # NaN = not computed at that step
    experiment = client.get_experiment_by_name("mtp/baseline-mtp/tiny-mbpp")
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_tracking_file_and_log_to_model_run(uri, tmp_path):
    run = tracking.start_run(uri, "mtp/rho1-weighted/tiny-mbpp")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tracking.write_tracking_file(model_dir, uri, run.run_id, run.experiment)
    assert json.loads((model_dir / "tracking.json").read_text())["run_id"] == run.run_id
    assert tracking.log_to_model_run(
        model_dir, {"eval/tiny-mbpp/pass@1": 0.5, "eval/tiny-mbpp/pass@10": 0.75}
    )
    metrics = MlflowClient(uri).get_run(run.run_id).data.metrics
    assert metrics == {"eval/tiny-mbpp/pass_at_1": 0.5, "eval/tiny-mbpp/pass_at_10": 0.75}


def test_untracked_model_and_disabled_run_are_no_ops(tmp_path):
    untracked = tmp_path / "untracked"
    untracked.mkdir()
    tracking.write_tracking_file(untracked, None, None, None)
    assert tracking.log_to_model_run(untracked, {"x": 1.0}) is False
    assert tracking.log_to_model_run(tmp_path, {"x": 1.0}) is False  # no tracking.json at all
    run = tracking.Run()
    run.log_metrics({"x": 1.0}, step=1)
    run.finish()
    assert not run.enabled and not list(tmp_path.glob("*.db"))


def _start(uri: str, name: str) -> None:
    run = tracking.start_run(uri, "mtp/baseline-mtp/shared", run_name=name, params={"p": 1})
    for step in range(3):
        run.log_metrics({"train/loss": float(step)}, step=step)


@pytest.mark.slow
def test_concurrent_jobs_share_one_sqlite_store(tmp_path):
    """Parallel Snakemake jobs create the store and their runs at the same time."""
    uri = tracking.default_tracking_uri(tmp_path)
    context = multiprocessing.get_context("spawn")
    jobs = [context.Process(target=_start, args=(uri, f"job{i}")) for i in range(3)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
    assert [job.exitcode for job in jobs] == [0, 0, 0]
    client = MlflowClient(uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("mtp/baseline-mtp/shared").experiment_id]
    )
    assert sorted(r.info.run_name for r in runs) == ["job0", "job1", "job2"]
