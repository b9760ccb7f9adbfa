"""Benchmark loaders: each format round-trips a fixture, and a known-correct solution
passes in the sandbox while a known-wrong one does not."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from wmtp.benchmarks import (
    CONTEST_STOP,
    load_benchmark,
    load_codecontests,
    load_humaneval,
    load_mbpp,
)
from wmtp.prompts import mbpp_prompt
from wmtp.sandbox import run_job, run_many

FIXTURES = Path(__file__).parent / "fixtures"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


def test_mbpp_fixture_round_trips(tmp_path):
    rows = _rows("mbpp.jsonl")
    problems = load_mbpp(FIXTURES / "mbpp.jsonl")
    assert [p.task_id for p in problems] == [str(r["task_id"]) for r in rows]
    first = problems[0]
    assert first.prompt == mbpp_prompt(rows[0]["text"], rows[0]["test_list"][0])
    assert first.kind == "assert" and first.program("x") == "x"  # the completion is the program
    assert all(t in first.tests for t in rows[0]["test_list"])
    assert "VOWELS = 'aeiou'" in problems[1].tests  # setup code runs before the asserts
    assert "AEIOU" not in problems[1].tests  # challenge tests are not part of MBPP's score
    parquet = tmp_path / "test.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    assert load_benchmark("tiny-mbpp", parquet) == problems


def test_mbpp_reference_passes_and_wrong_solution_fails():
    problems = load_mbpp(FIXTURES / "mbpp.jsonl")
    right = run_many([p.job(p.reference) for p in problems])
    assert [o.status for o in right] == ["passed", "passed"]
    wrong = run_job(problems[0].job("def max_of_two(a, b):\n    return a\n"))
    assert wrong.status == "failed"


def test_humaneval_fixture_round_trips():
    [problem] = load_humaneval(FIXTURES / "humaneval.jsonl")
    assert problem.program(problem.reference).startswith(problem.prompt)
    assert problem.tests.rstrip().endswith("check(double)")
    assert run_job(problem.job(problem.reference)).passed
    assert run_job(problem.job("    return x + 2\n")).status == "failed"


def test_packaged_humaneval_canonical_solutions_pass():
    problems = load_benchmark("humaneval", None)
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    sample = problems[:6]
    outcomes = run_many([p.job(p.reference) for p in sample])
    assert all(o.passed for o in outcomes), [o.detail for o in outcomes]
    assert not run_job(sample[0].job("    return None\n")).passed


def test_codecontests_fixture_round_trips(tmp_path):
    [row] = _rows("codecontests.jsonl")
    [problem] = load_codecontests(FIXTURES / "codecontests.jsonl")
    assert problem.kind == "stdio" and problem.stop == CONTEST_STOP
    assert len(problem.cases) == 3  # public + private + generated
    assert row["description"].strip() in problem.prompt
    assert problem.reference == row["solutions"]["solution"][1]  # the Python 3 one
    assert run_job(problem.job(problem.reference)).passed
    wrong = run_job(problem.job(row["incorrect_solutions"]["solution"][0]))
    assert wrong.status == "failed"
    parquet = tmp_path / "cc.parquet"
    pd.DataFrame([row]).to_parquet(parquet)
    assert load_benchmark("codecontests", parquet) == [problem]


def test_bad_inputs_raise_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("apps", FIXTURES / "mbpp.jsonl")
    with pytest.raises(ValueError, match="lacks columns"):
        load_mbpp(FIXTURES / "humaneval.jsonl")
    with pytest.raises(FileNotFoundError, match="datasets"):
        load_mbpp("google-research-datasets/mbpp")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_mbpp(tmp_path / "missing.parquet")
