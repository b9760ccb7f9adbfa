"""The study's last MLflow entries, made when its report is built: the evaluation
runs of the rows that have no training run, and a report run.

Trainings log their own runs (`wmtp.stages.train`) and evaluations add their pass@k
to the training run of the model they evaluated (`wmtp.stages.evaluate`). A row
without training (`base`: the downloaded model) has no run to add to, so its
pass@k per benchmark go into an evaluation run per seed, here; the report job is
the one job that has every evaluation of the study as input, so exactly one
process creates these runs (the row's evaluation jobs run at once on a cluster and
would race to create the same run). Then a new report run holds `report.md` and
`figures/`, tagged like every run with the study's `config_hash` and the
`git_commit`: one run per build, so a rebuilt report does not overwrite the one a
colleague looked at. Layout of the experiment: `wmtp.infra.tracking`.
"""

from __future__ import annotations

import json
from pathlib import Path

from wmtp.config.paths import parse_row_file
from wmtp.config.schema import PipelineConfig, Recipe, config_hash
from wmtp.infra import tracking
from wmtp.stages.evaluate import summary_metrics


def untrained_metrics(
    config: PipelineConfig, eval_jsons: list[str | Path]
) -> dict[tuple[str, int], dict[str, float]]:
    """{(row, seed): its MLflow metrics over every benchmark} for the rows that
    are not trained, from their evaluation summaries among `eval_jsons`."""
    untrained = [a for a in config.algorithms if a not in config.trained_algorithms]
    metrics: dict[tuple[str, int], dict[str, float]] = {
        (a, s): {} for a in untrained for s in config.seeds
    }
    for path in eval_jsons:
        algo, seed, benchmark = parse_row_file(path) or (None, None, None)
        if (algo, seed) in metrics:
            summary = json.loads(Path(path).read_text())
            metrics[(algo, seed)] |= summary_metrics(benchmark, summary, config.eval.ks[benchmark])
    return metrics


def log_study(
    config: PipelineConfig,
    recipes: dict[str, Recipe],
    *,
    tracking_uri: str,
    eval_jsons: list[str | Path],
    report_files: list[str | Path],
    repo: str | Path = ".",
) -> list[tracking.Run]:
    """Log the untrained rows' evaluation runs and a report run with `report_files`
    (report.md, figures/) to the study's experiment; nothing with tracking off.
    Returns the runs logged (evaluation runs first)."""
    if not config.tracking.mlflow:
        return []
    study, experiment = config.run, tracking.experiment_name(config.run)
    provenance = tracking.provenance_tags(config_hash(config, recipes), repo)
    runs = [
        tracking.log_evaluation_run(
            tracking_uri,
            experiment,
            tracking.run_name(algo, seed),
            provenance,
            identity=tracking.run_tags(study, "evaluation", algo, seed),
            metrics=metrics,
        )  # fmt: skip
        for (algo, seed), metrics in untrained_metrics(config, eval_jsons).items()
    ]
    tags = {**tracking.run_tags(study, "report"), **provenance}
    runs.append(tracking.log_report_run(tracking_uri, experiment, tags, report_files))
    return runs
