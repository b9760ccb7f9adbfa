"""The study's MLflow entries made with the report: an evaluation run per seed of each
untrained row, and a report run with the report's files (real sqlite store)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from wmtp.config.paths import Layout
from wmtp.config.schema import config_hash, load_config
from wmtp.infra import tracking
from wmtp.stages.study_tracking import log_study

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def study(tmp_path):
    """The tiny default with two seeds and an evaluation summary for every row, each
    row's pass@k distinct, and the report's files."""
    settings = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config, recipes = load_config(settings, base_dir=REPO)
    layout = Layout.of_run(config.run, tmp_path / "results")
    evals = []
    for i, algo in enumerate(config.algorithms):
        for seed in config.seeds:
            summary = {f"pass@{k}": (i + seed + k) / 100 for k in config.eval.ks["tiny-mbpp"]}
            path = Path(layout.eval_file(algo, seed, "tiny-mbpp", "json"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**summary, "exact_match": seed / 10}))
            evals.append(path)
    (tmp_path / "report.md").write_text("| table |")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "pass_at_k.png").write_bytes(b"png")
    return config, recipes, evals, [tmp_path / "report.md", tmp_path / "figures"]


def test_untrained_rows_get_evaluation_runs_and_the_report_a_run(study, tmp_path):
    config, recipes, evals, files = study
    uri = tracking.default_tracking_uri(tmp_path / "store")
    runs = log_study(config, recipes, tracking_uri=uri, eval_jsons=evals, report_files=files, repo=REPO)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(f"wmtp/{config.run}")
    stored = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(stored) == sorted(r.run_id for r in runs)
    untrained = [a for a in config.algorithms if a not in config.trained_algorithms]
    assert untrained == ["base"]
    evaluations = [r for r in stored.values() if r.data.tags["kind"] == "evaluation"]
    assert sorted((r.data.tags["algorithm"], r.data.tags["seed"]) for r in evaluations) == [
        ("base", str(s)) for s in config.seeds
    ]
    row = config.algorithms.index("base")
    for run in evaluations:
        seed = int(run.data.tags["seed"])
        assert run.info.run_name == f"base-seed{seed}"
        assert run.data.metrics == {
            **{f"tiny_mbpp_pass_at_{k}": (row + seed + k) / 100 for k in config.eval.ks["tiny-mbpp"]},
            "tiny_mbpp_exact_match": seed / 10,
        }
    (report,) = [r for r in stored.values() if r.data.tags["kind"] == "report"]
    assert sorted(a.path for a in client.list_artifacts(report.info.run_id)) == ["figures", "report.md"]
    for run in stored.values():
        assert run.data.tags["run"] == config.run
        assert run.data.tags["config_hash"] == config_hash(config, recipes)
        assert run.data.tags["git_commit"] == tracking.current_git_commit(REPO)


def test_a_rebuilt_report_reuses_the_evaluation_runs(study, tmp_path):
    config, recipes, evals, files = study
    uri = tracking.default_tracking_uri(tmp_path / "store")
    first = log_study(config, recipes, tracking_uri=uri, eval_jsons=evals, report_files=files)
    second = log_study(config, recipes, tracking_uri=uri, eval_jsons=evals, report_files=files)
    assert [r.run_id for r in first[:-1]] == [r.run_id for r in second[:-1]]
    assert first[-1].run_id != second[-1].run_id  # one report run per build


def test_nothing_is_logged_with_tracking_off(study, tmp_path):
    config, recipes, evals, files = study
    off = config.model_copy(update={"tracking": config.tracking.model_copy(update={"mlflow": False})})
    uri = tracking.default_tracking_uri(tmp_path / "store")
    assert log_study(off, recipes, tracking_uri=uri, eval_jsons=evals, report_files=files) == []
    assert not (tmp_path / "store").exists()
