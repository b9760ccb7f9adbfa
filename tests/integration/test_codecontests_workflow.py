"""CodeContests through the real DAG (slow): a train split in deepmind/code_contests'
layout fine-tunes the tiny models for a few steps, with the reference CE of the same
examples for a weighted row, and the trained models are evaluated on a
CodeContests-layout test split, judged on stdin/stdout, with n@k filtered on the
public tests in the report."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.integration.test_workflow import CI, copy_workflow, planned_jobs, snakemake
from wmtp.data.training import read_split

FIXTURES = Path(__file__).parents[1] / "fixtures"
ROWS = ("baseline-mtp", "rho1-weighted")  # the MTP baseline and a method reading reference CE


def contest_train_split(n_problems: int = 8, n_solutions: int = 3) -> pd.DataFrame:
    """Problems 'print a + i' with `n_solutions` correct Python 3 solutions each,
    a C++ one and an incorrect one (neither may be trained on)."""
    rows = []
    for i in range(n_problems):
        correct = [f"print(int(input()) + {i})\n", f"x = int(input())\nprint(x + {i})\n",
                   f"a = int(input())\nb = a + {i}\nprint(b)\n"][:n_solutions]  # fmt: skip
        rows.append({
            "name": f"train_add_{i}",
            "description": f"Read x. Print x + {i}.",
            "public_tests": {"input": ["1\n"], "output": [f"{1 + i}\n"]},
            "private_tests": {"input": ["5\n"], "output": [f"{5 + i}\n"]},
            "generated_tests": {"input": [], "output": []},
            "solutions": {"language": [2, *[3] * len(correct)], "solution": ["int main(){}", *correct]},
            "incorrect_solutions": {"language": [3], "solution": [f"print(int(input()) - {i})\n"]},
        })  # fmt: skip
    return pd.DataFrame(rows)


def contest_test_split() -> pd.DataFrame:
    """The evaluation fixture's problem and one more."""
    frame = pd.read_json(FIXTURES / "codecontests.jsonl", lines=True)
    extra = contest_train_split(1).assign(name="test_add_0")
    return pd.concat([frame, extra[["name", "description", "public_tests", "private_tests", "generated_tests"]]],
                     ignore_index=True)  # fmt: skip


@pytest.mark.slow
def test_codecontests_trains_and_is_evaluated_end_to_end(tmp_path):
    (tmp_path / "work").mkdir()
    workdir = copy_workflow(tmp_path / "work")
    source = tmp_path / "code_contests"
    source.mkdir()
    contest_train_split().to_parquet(source / "train.parquet")
    contest_test_split().to_parquet(source / "test.parquet")
    update = {
        "run": "cc",
        "algorithms": list(ROWS),
        "benchmarks": ["codecontests"],
        "data": {"train_dataset": "codecontests", "max_seq_len": 256, "max_solutions_per_problem": 2,
                 "sources": {"codecontests": str(source)}},
        "tiny": {"max_seq_len": 256},
        "eval": {"ks": {"codecontests": [1, 2]}, "filtered_n_at_k": {"codecontests": [[1, 2]]}},
    }  # fmt: skip
    (workdir / "config" / "cc.yaml").write_text(yaml.safe_dump(update))
    configs = (*CI, "config/cc.yaml")
    result = snakemake(workdir, "all", "--cores", "2", *configs, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    run = workdir / "results" / "cc"

    # the training split kept its source layout, and training read 2 solutions per problem
    downloaded = pd.read_parquet(run / "data" / "codecontests" / "train.parquet")
    assert {"solutions", "incorrect_solutions", "public_tests"} <= set(downloaded.columns)
    assert len(read_split(run / "data" / "codecontests" / "train.parquet", "codecontests", 2)) == 16
    for algo in ROWS:
        metrics = pd.read_parquet(run / "train" / algo / "seed0" / "metrics.parquet")
        # 16 examples, one problem (2) held out for val/loss: 1 epoch of 14 at batch 4
        assert metrics["step"].max() == 3 and metrics["train_loss"].notna().all()
    refce = pd.read_parquet(run / "refce" / "codecontests.parquet")
    assert set(refce["sample_id"]) == {f"train_add_{i}#{j}" for i in range(8) for j in range(2)}

    # evaluation judged stdin/stdout with public verdicts; the report has the 1@2 column
    for algo in ROWS:
        records = [json.loads(line) for line in (run / "eval" / algo / "seed0" / "codecontests.jsonl").open()]
        assert [r["task_id"] for r in records] == ["fixture_sum_of_pairs", "test_add_0"]
        assert all(len(r["public"]) == r["n"] == 2 for r in records)
        summary = json.loads((run / "eval" / algo / "seed0" / "codecontests.json").read_text())
        assert {"pass@1", "pass@2", "1@2"} <= set(summary)
    report = (run / "report.md").read_text()
    assert "### codecontests (2 problems, 1 seed)" in report
    assert "| algorithm | pass@1 | pass@2 | 1@2 | exact_match |" in report
    assert "AlphaCode's n@k filtered on the public tests" in report
    assert "fine-tuned on CodeContests' train split" in report

    again = snakemake(workdir, "all", "-n", *configs)
    assert planned_jobs(again.stdout) == {}, again.stdout[-3000:]
