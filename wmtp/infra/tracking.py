"""MLflow tracking: one experiment per study, one run per training, metrics logged in batches.

A study is one config's `run` (`tiny`, `paper`, ...): its experiment `wmtp/{run}`
(`experiment_name`) holds every run of it, so methods and seeds compare side by side
in one table of the MLflow UI:

- a training run per (algorithm, seed), with the fully resolved config as
  (flattened) params, its metric rows, `metrics.parquet` as an artifact, and the
  pass@k of its model's evaluations (`log_to_model_run`);
- an evaluation run per (row, seed) of a row without training (`base`), holding its
  pass@k (`log_evaluation_run`);
- a report run per build of the report, with `report.md` and `figures/` as
  artifacts (`log_report_run`).

Every run is tagged (`run_tags`) with `run` (the study), `kind` (training,
evaluation, report), `algorithm` and `seed` where they apply, and the provenance of
what made it (`provenance_tags`): `config_hash` (`wmtp.config.schema.config_hash` of
the study's setting, the hash the report quotes) and `git_commit`
(`current_git_commit`), both as they were when the run was made.

The default store is a local sqlite file, `sqlite:///<abs results/{run}>/mlflow.db`
(browse with `mlflow ui --backend-store-uri <uri>`), its artifacts beside it in
`mlartifacts/`; a tracking server works the same way. On a shared server give each
study its own `run:` name.

Why `MlflowClient` and `log_batch` instead of the fluent `mlflow.log_metric`:
no global "active run" state (a resumed training re-attaches to its run by id),
and one sqlite transaction per metric row instead of one per value, so logging
stays a small fraction of a tiny CPU step.

Several training jobs may share one sqlite file, and sqlite (plus MLflow's
schema migration on first use) does not like concurrent writers: every call on
a sqlite store holds an exclusive `fcntl` lock on `<db>.lock`.

The model directory of a training gets a `tracking.json` (uri, run id,
experiment) so evaluation can add its pass@k to the same run
(`log_to_model_run`). With `TrackingSettings.mlflow = False` a `Run` is a no-op.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from wmtp.config.paths import Layout, mlflow_uri
from wmtp.infra.atomic import write_json_atomic

TRACKING_FILE = "tracking.json"


def default_tracking_uri(run_dir: str | Path) -> str:
    """`sqlite:///<absolute run_dir>/mlflow.db` (four slashes: an absolute path)."""
    return f"sqlite:///{(Path(run_dir).resolve() / 'mlflow.db')}"


def study_tracking_uri(tracking_uri: str | None, study: str) -> str:
    """The study's store: `tracking.tracking_uri`, else its sqlite file
    `results/{study}/mlflow.db` (the workflow's default)."""
    return tracking_uri or mlflow_uri(Layout.of_run(study).mlflow_db())


def experiment_name(study: str) -> str:
    """The MLflow experiment of one study (a config's `run`): all its runs."""
    return f"wmtp/{study}"


def run_name(algorithm: str, seed: int | str) -> str:
    """The default MLflow run name of one training (a row's seed)."""
    return f"{algorithm}-seed{seed}"


def run_tags(
    study: str, kind: str, algorithm: str | None = None, seed: int | str | None = None
) -> dict[str, str]:
    """The tags that say which study and row a run belongs to: `run`, `kind`
    ("training", "evaluation" or "report") and, for a row, `algorithm` and `seed`."""
    tags = {"run": study, "kind": kind}
    if algorithm is not None:
        tags["algorithm"] = algorithm
    if seed is not None:
        tags["seed"] = str(seed)
    return tags


def current_git_commit(repo: str | Path = ".") -> str | None:
    """HEAD of the repository at `repo` (with `-dirty` if it has local changes),
    or None outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def provenance_tags(config_hash: str, repo: str | Path = ".") -> dict[str, str]:
    """`config_hash` (of the study's setting, as the report quotes it) and
    `git_commit` (of the code in `repo`, "unknown" outside a checkout)."""
    return {"config_hash": config_hash, "git_commit": current_git_commit(repo) or "unknown"}


def metric_key(name: str) -> str:
    """A name MLflow accepts: `@` becomes `_at_` (pass@k -> pass_at_k), any other
    character outside alphanumerics and `_ - . : / space` becomes `_`."""
    return re.sub(r"[^A-Za-z0-9_\-.:/ ]", "_", name.replace("@", "_at_"))


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b.c": "value"}: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Exclusive lock for sqlite stores (concurrent jobs, schema migration)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


class Run:
    """Handle on one MLflow run (or nothing, when `run_id` is None)."""

    def __init__(
        self, uri: str | None = None, run_id: str | None = None, experiment: str | None = None
    ):
        self.uri, self.run_id, self.experiment = uri, run_id, experiment

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log one row of metrics at `step` in a single batch; NaN values (e.g. a
        val/loss not computed at this step) are skipped, names pass `metric_key`."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key=metric_key(k), value=float(v), timestamp=now, step=step)
            for k, v in metrics.items()
            if v is not None and not math.isnan(float(v))
        ]
        with _store_lock(self.uri):
            _client(self.uri).log_batch(self.run_id, metrics=batch, synchronous=True)

    def last_step(self, key: str) -> int:
        """The highest step logged for metric `key` (0 when none, or no run)."""
        if not self.enabled:
            return 0
        with _store_lock(self.uri):
            history = _client(self.uri).get_metric_history(self.run_id, metric_key(key))
        return max((m.step for m in history), default=0)

    def log_artifacts(self, paths: list[str | Path]) -> None:
        """Copy files (kept by name) and directories (their files under the
        directory's name) into the run's artifacts."""
        if not self.enabled:
            return
        with _store_lock(self.uri):
            client = _client(self.uri)
            for path in map(Path, paths):
                if path.is_dir():
                    client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
                else:
                    client.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        with _store_lock(self.uri):
            _client(self.uri).set_terminated(self.run_id, status=status)


def start_run(
    uri: str,
    experiment: str,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> Run:
    """Create a run in `experiment` (created if missing) with `params` (flattened),
    or, given `run_id` (a resumed training), re-open that run."""
    from mlflow.entities import Param, RunTag

    with _store_lock(uri):
        client = _client(uri)
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            return Run(uri, run_id, experiment)
        run = client.create_run(_experiment_id(client, experiment), run_name=run_name)
        flat = flatten(params or {})
        client.log_batch(
            run.info.run_id,
            params=[Param(k, v[:6000]) for k, v in flat.items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
            synchronous=True,
        )
    return Run(uri, run.info.run_id, experiment)


def _artifact_location(uri: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its artifacts: `mlartifacts/`
    beside the database (MLflow's default, `./mlruns`, depends on the working
    directory). None elsewhere: a tracking server has its own artifact root."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()


def _experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created if missing. Trainings starting at once
    against a tracking server (the trainings of a study on a cluster) race to
    create it, and all but one get RESOURCE_ALREADY_EXISTS: they take the winner's."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=_artifact_location(client.tracking_uri)
        )
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def write_tracking_file(
    model_dir: str | Path, uri: str | None, run_id: str | None, experiment: str | None
) -> Path:
    """Record where the model's training run lives (atomically), for evaluation."""
    path = Path(model_dir) / TRACKING_FILE
    payload = {"tracking_uri": uri, "run_id": run_id, "experiment": experiment}
    return write_json_atomic(path, payload, sort_keys=False)


def read_tracking_file(model_dir: str | Path) -> dict[str, str | None]:
    path = Path(model_dir) / TRACKING_FILE
    if not path.exists():
        return {"tracking_uri": None, "run_id": None, "experiment": None}
    return json.loads(path.read_text())


def log_to_model_run(model_dir: str | Path, metrics: Mapping[str, float], step: int = 0) -> bool:
    """Log `metrics` (e.g. {"eval/mbpp/pass@1": 0.31}) to the run that trained the
    model in `model_dir`. Returns False (and logs nothing) when that training was
    not tracked."""
    record = read_tracking_file(model_dir)
    if not record.get("run_id") or not record.get("tracking_uri"):
        return False
    Run(record["tracking_uri"], record["run_id"], record.get("experiment")).log_metrics(
        metrics, step
    )
    return True


def log_model_artifacts(model_dir: str | Path, paths: list[str | Path]) -> bool:
    """Attach `paths` (e.g. the training's metrics.parquet) to the run that trained
    the model in `model_dir`. False (nothing logged) when it was not tracked."""
    record = read_tracking_file(model_dir)
    if not record.get("run_id") or not record.get("tracking_uri"):
        return False
    Run(record["tracking_uri"], record["run_id"], record.get("experiment")).log_artifacts(paths)
    return True


def _tag_filter(tags: Mapping[str, str]) -> str:
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in sorted(tags.items()))


def log_evaluation_run(
    uri: str,
    experiment: str,
    run_name: str,
    tags: Mapping[str, str],
    identity: Mapping[str, str],
    metrics: Mapping[str, float],
) -> Run:
    """Log `metrics` to the evaluation run of a row that has no training run (the
    `base` row): the newest run of `experiment` whose tags include `identity`
    (e.g. run, kind, algorithm, seed) when the report was built before, else a new
    one with `tags` (identity included). Its tags are brought up to date either way.
    Called by one job (the report's), so two never create the same run."""
    from mlflow.entities import RunTag

    tags = {**tags, **identity}
    with _store_lock(uri):
        client = _client(uri)
        experiment_id = _experiment_id(client, experiment)
        found = client.search_runs(
            [experiment_id],
            filter_string=_tag_filter(identity),
            order_by=["attributes.start_time DESC"],
        )
        if found:
            run_id = found[0].info.run_id
        else:
            run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
        client.log_batch(
            run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True
        )
    run = Run(uri, run_id, experiment)
    run.log_metrics(metrics, step=0)
    run.finish()
    return run


def log_report_run(
    uri: str, experiment: str, tags: Mapping[str, str], files: list[str | Path]
) -> Run:
    """A new run named `report` in `experiment` with `tags` and `files` (report.md,
    figures/) as artifacts: one per build of the report, so earlier builds stay
    comparable by their `config_hash`."""
    run = start_run(uri, experiment, run_name="report", tags=tags)
    run.log_artifacts(files)
    run.finish()
    return run
