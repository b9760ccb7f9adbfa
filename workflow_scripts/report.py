"""Snakemake adapter of the report rule: the paper table and figures
(wmtp.stages.report.build_report).

input:  evals   = every eval/{algo}/seed{s}/{benchmark}.json of the table,
        samples = every eval/{algo}/seed{s}/{benchmark}.jsonl,
        metrics = every train/{algo}/seed{s}/metrics.parquet,
        critics = every critic/seed{s}/metrics.json (when a row has a critic)
        (algorithm, seed and benchmark are read from each path)
output: report  = results/{run}/report.md, table = results/{run}/table.csv,
        figures = results/{run}/figures (directory)
params: settings = {"report": ReportSettings, "config_hash": str} (a rerun trigger
        only: the full config is re-validated from snakemake.config here)
Then the study's MLflow experiment gets the evaluation runs of its untrained rows and
a report run with the report and figures (wmtp.stages.study_tracking.log_study).
"""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from wmtp.config.schema import load_config  # noqa: E402
from wmtp.infra.tracking import current_git_commit, study_tracking_uri  # noqa: E402
from wmtp.stages.report import build_report  # noqa: E402
from wmtp.stages.study_tracking import log_study  # noqa: E402

sm = snakemake  # noqa: F821
config, recipes = load_config(dict(sm.config), base_dir=".")
build_report(
    eval_jsons=list(sm.input.evals),
    eval_jsonls=list(sm.input.samples),
    metrics_parquets=list(sm.input.metrics),
    config=config,
    recipes=recipes,
    out_md=sm.output.report,
    figures_dir=sm.output.figures,
    git_commit=current_git_commit("."),
    critic_metrics=list(sm.input.get("critics", [])),
    table_csv=sm.output.table,
)
log_study(
    config,
    recipes,
    tracking_uri=study_tracking_uri(config.tracking.tracking_uri, config.run),
    eval_jsons=list(sm.input.evals),
    report_files=[sm.output.report, sm.output.table, sm.output.figures],
)
