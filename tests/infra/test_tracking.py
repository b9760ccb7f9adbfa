"""MLflow helpers against a throwaway sqlite store (no server, no DeepSpeed)."""

from __future__ import annotations

import json
import math
import multiprocessing
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from wmtp.infra import tracking

REPO = Path(__file__).resolve().parents[2]


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


def test_one_experiment_per_study_and_its_default_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.experiment_name("paper") == "wmtp/paper"
    assert tracking.study_tracking_uri(None, "paper") == f"sqlite:///{tmp_path}/results/paper/mlflow.db"
    assert tracking.study_tracking_uri("http://mlflow:5000", "paper") == "http://mlflow:5000"


def test_run_tags_and_provenance(tmp_path):
    assert tracking.run_tags("tiny", "training", "ntp", 1) == {
        "run": "tiny", "kind": "training", "algorithm": "ntp", "seed": "1",
    }  # fmt: skip
    assert tracking.run_tags("tiny", "report") == {"run": "tiny", "kind": "report"}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    commit = tracking.provenance_tags("abc", REPO)["git_commit"]
    assert commit.removesuffix("-dirty") == head.stdout.strip()
    assert tracking.provenance_tags("abc", tmp_path) == {"config_hash": "abc", "git_commit": "unknown"}


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
        "wmtp/tiny",
        run_name="r",
        tags={"run": "tiny"},
        params={"recipe": {"train": {"lr": 0.1}}, "seed": 0},
    )
    run.log_metrics({"train/loss": 2.0, "val/loss": math.nan}, step=1)
    again = tracking.start_run(uri, "wmtp/tiny", run_id=run.run_id)
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
    experiment = client.get_experiment_by_name("wmtp/tiny")
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_tracking_file_and_log_to_model_run(uri, tmp_path):
    run = tracking.start_run(uri, "wmtp/tiny-2")
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


def test_artifacts_of_a_sqlite_store_lie_beside_it(tmp_path, monkeypatch):
    """Files and directories logged to a run; a new experiment of a sqlite store
    keeps them in `mlartifacts/` next to the database, whatever the working directory."""
    uri = tracking.default_tracking_uri(tmp_path / "store")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(b"png")
    (tmp_path / "report.md").write_text("# table")
    run = tracking.start_run(uri, "wmtp/artifacts")
    run.log_artifacts([tmp_path / "report.md", tmp_path / "figures"])
    client = MlflowClient(uri)
    assert sorted(a.path for a in client.list_artifacts(run.run_id)) == ["figures", "report.md"]
    assert [a.path for a in client.list_artifacts(run.run_id, "figures")] == ["figures/a.png"]
    stored = client.download_artifacts(run.run_id, "report.md", str(tmp_path / "back"))
    assert Path(stored).read_text() == "# table"
    assert (tmp_path / "store" / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()


def test_model_artifacts_go_to_the_training_run(uri, tmp_path):
    run = tracking.start_run(uri, "wmtp/models")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (tmp_path / "metrics.parquet").write_bytes(b"rows")
    assert not tracking.log_model_artifacts(model_dir, [tmp_path / "metrics.parquet"])  # untracked
    tracking.write_tracking_file(model_dir, uri, run.run_id, run.experiment)
    assert tracking.log_model_artifacts(model_dir, [tmp_path / "metrics.parquet"])
    assert [a.path for a in MlflowClient(uri).list_artifacts(run.run_id)] == ["metrics.parquet"]


def test_evaluation_run_of_an_untrained_row_is_reused_when_the_report_is_rebuilt(uri):
    identity = tracking.run_tags("rebuilt", "evaluation", "base", 0)
    first = tracking.log_evaluation_run(
        uri, "wmtp/rebuilt", "base-seed0", {"config_hash": "h1"}, identity, {"mbpp_pass@1": 0.25}
    )
    other = tracking.log_evaluation_run(
        uri, "wmtp/rebuilt", "base-seed1", {"config_hash": "h1"},
        tracking.run_tags("rebuilt", "evaluation", "base", 1), {"mbpp_pass@1": 0.5},
    )  # fmt: skip
    again = tracking.log_evaluation_run(
        uri, "wmtp/rebuilt", "base-seed0", {"config_hash": "h2"}, identity, {"mbpp_pass@1": 0.375}
    )
    assert again.run_id == first.run_id != other.run_id
    client = MlflowClient(uri)
    stored = client.get_run(first.run_id)
    assert stored.info.run_name == "base-seed0" and stored.info.status == "FINISHED"
    assert stored.data.tags["config_hash"] == "h2"  # the latest build's
    assert {k: stored.data.tags[k] for k in identity} == identity
    assert stored.data.metrics == {"mbpp_pass_at_1": 0.375}
    experiment = client.get_experiment_by_name("wmtp/rebuilt").experiment_id
    assert len(client.search_runs([experiment])) == 2


def test_each_report_build_is_a_new_report_run(uri, tmp_path):
    (tmp_path / "report.md").write_text("v1")
    tags = {**tracking.run_tags("reports", "report"), "config_hash": "h"}
    first = tracking.log_report_run(uri, "wmtp/reports", tags, [tmp_path / "report.md"])
    second = tracking.log_report_run(uri, "wmtp/reports", tags, [tmp_path / "report.md"])
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("wmtp/reports").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted([first.run_id, second.run_id])
    assert all(r.info.run_name == "report" and r.data.tags["kind"] == "report" for r in runs)
    assert [a.path for a in client.list_artifacts(second.run_id)] == ["report.md"]


def _start(uri: str, name: str) -> None:
    run = tracking.start_run(uri, "wmtp/shared", run_name=name, params={"p": 1})
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
        [client.get_experiment_by_name("wmtp/shared").experiment_id]
    )
    assert sorted(r.info.run_name for r in runs) == ["job0", "job1", "job2"]
