"""The results layout: where every stage's files live under a run's directory.

The workflow's rules (through rules/common.smk), the command line, the trainer's
own command line and the report all build their paths here, so the layout is
written once. Arguments may be values or Snakemake wildcards: `Layout("results/{run}")
.trained_model("{algo}", "{seed}")` is the train rule's output pattern.

    models/{role}                          download: base, ref, reward
    data/{dataset}/{split}.parquet         download: train, validation and test splits
    reference/model                        finetune_reference: the fine-tuned Rho-1 reference
    refce/{dataset}.parquet                refce: per-token reference CE
    critic/seed{s}/values.parquet          critic: value table (+ metrics.json)
    train/{algo}/seed{s}/model             train: fine-tuned model (+ metrics.parquet)
    eval/{algo}/seed{s}/{benchmark}.json   eval: pass@k summary (+ .jsonl of samples)
    report.md, table.csv, figures/         report (table.csv: the table as data)
    upload.json                            upload: the manifest sent last
    mlflow.db                              tracking (default sqlite store)
    cli/{name}/                            `python -m wmtp train` by hand

Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for the hint: this module stays standard library only
    from wmtp.config.schema import PipelineConfig

RESULTS = "results"
DEFAULT_CONFIG = "config/config.yaml"  # the Snakefile's configfile: the tiny default
REPORT_COPY = f"{RESULTS}/report.md"  # the latest run's report, where users look first
TRAIN_SPLIT = "train"
TEST_SPLIT = "test"
VALIDATION_SPLIT = "validation"  # for tuning: never the test split (MBPP's own name)
PROMPT_SPLIT = "prompt"  # MBPP's 10 few-shot problems (task ids 1-10), in no other split
CRITIC_TABLE = "values.parquet"
CRITIC_METRICS = "metrics.json"
TRAIN_METRICS = "metrics.parquet"
TABLE_CSV = "table.csv"  # the report's table as data, beside report.md
TRAINED_MODEL = "model"  # the train stage's model directory, beside TRAIN_METRICS
TRAIN_CHECKPOINTS = "checkpoints"  # the train stage's resumable state, beside TRAIN_METRICS

# .../{algo}/seed{s}/{name}.json|.jsonl|.parquet: a per-row file of the eval and train stages
_ROW_FILE = re.compile(
    r"(?P<algo>[^/]+)/seed(?P<seed>\d+)/(?P<name>[^/]+?)(?:\.json|\.jsonl|\.parquet)$"
)


@dataclass(frozen=True)
class Layout:
    """The paths of one run, under `root` (`results/{run}`)."""

    root: str

    @classmethod
    def of_run(cls, run: str, results: str | Path = RESULTS) -> Layout:
        return cls(f"{Path(results).as_posix()}/{run}")

    def model(self, role: str) -> str:
        return f"{self.root}/models/{role}"

    def data(self, dataset: str, split: str) -> str:
        return f"{self.root}/data/{dataset}/{split}.parquet"

    def finetuned_ref(self) -> str:
        """The reference model fine-tuned on `reference_finetune.splits`, which the
        refce stage scores with instead of `model("ref")` when that section is enabled."""
        return f"{self.root}/reference/model"

    def refce(self, dataset: str) -> str:
        return f"{self.root}/refce/{dataset}.parquet"

    def critic_dir(self, seed: int | str) -> str:
        return f"{self.root}/critic/seed{seed}"

    def critic_table(self, seed: int | str) -> str:
        return f"{self.critic_dir(seed)}/{CRITIC_TABLE}"

    def critic_metrics(self, seed: int | str) -> str:
        return f"{self.critic_dir(seed)}/{CRITIC_METRICS}"

    def train_dir(self, algo: str, seed: int | str) -> str:
        return f"{self.root}/train/{algo}/seed{seed}"

    def trained_model(self, algo: str, seed: int | str) -> str:
        return f"{self.train_dir(algo, seed)}/{TRAINED_MODEL}"

    def train_metrics(self, algo: str, seed: int | str) -> str:
        return f"{self.train_dir(algo, seed)}/{TRAIN_METRICS}"

    def eval_file(self, algo: str, seed: int | str, benchmark: str, ext: str) -> str:
        return f"{self.root}/eval/{algo}/seed{seed}/{benchmark}.{ext}"

    def report(self) -> str:
        return f"{self.root}/report.md"

    def table_csv(self) -> str:
        return f"{self.root}/{TABLE_CSV}"

    def figures(self) -> str:
        return f"{self.root}/figures"

    def upload_manifest(self) -> str:
        return f"{self.root}/upload.json"

    def report_inputs(self, config: PipelineConfig) -> dict[str, list[str]]:
        """Every file the report of `config` reads, by kind, in a fixed order: the
        report rule declares these as its inputs, and `python -m wmtp report` looks
        for them in a results folder."""
        runs = [(a, s) for a in config.algorithms for s in config.seeds]
        return {
            "evals": [self.eval_file(a, s, b, "json") for a, s in runs for b in config.benchmarks],
            "samples": [self.eval_file(a, s, b, "jsonl") for a, s in runs for b in config.benchmarks],
            "metrics": [self.train_metrics(a, s) for a in config.trained_algorithms for s in config.seeds],
            "critics": [self.critic_metrics(s) for s in config.seeds] if config.critic_rows else [],
        }

    def mlflow_db(self) -> str:
        return f"{self.root}/mlflow.db"

    def cli_run(self, name: str) -> str:
        return f"{self.root}/cli/{name}"


def mlflow_uri(db: str | Path) -> str:
    """The sqlite tracking URI of an MLflow database file (absolute, so any working
    directory reaches the same store)."""
    return f"sqlite:///{Path(db).resolve()}"


def parse_row_file(path: str | Path) -> tuple[str, int, str] | None:
    """(algo, seed, name) of a per-row file (`eval/{algo}/seed{s}/{benchmark}.json`,
    `train/{algo}/seed{s}/metrics.parquet`), or None if `path` is not one."""
    match = _ROW_FILE.search(Path(path).as_posix())
    if match is None:
        return None
    return match["algo"], int(match["seed"]), match["name"]
