"""n@k filtered on the public tests (AlphaCode's 10@k): the estimator, the per-sample
public verdicts evaluation records, the summary and the report's column."""

from __future__ import annotations

import itertools
from fractions import Fraction
from pathlib import Path

import pytest

from wmtp.config.schema import EvalSettings
from wmtp.data.problems import load_codecontests
from wmtp.stages.evaluate import evaluate_completions, filtered_n_at_k, pass_at_k, summarise

FIXTURE = Path(__file__).parents[1] / "fixtures" / "codecontests.jsonl"


def brute_force(kinds: str, submit: int, k: int) -> Fraction:
    """The protocol run literally on every ordered draw: kinds[i] is "A" (passes all
    tests), "B" (passes the public tests only) or "C" (fails them); of each k-subset,
    in each order, the first `submit` that pass the public tests are submitted (a
    uniformly random choice of them, averaged over the orders)."""
    solved = total = 0
    for draw in itertools.permutations(range(len(kinds)), k):
        kept = [i for i in draw if kinds[i] != "C"][:submit]
        solved += any(kinds[i] == "A" for i in kept)
        total += 1
    return Fraction(solved, total)


def test_hand_computed_case():
    """4 samples: one passes everything (A), one only the public tests (B), two fail
    them. 1@2: of the 6 pairs, {A,B} submits one of its two at random (1/2), {A,C1}
    and {A,C2} submit A (1 each), the other three submit nothing that passes:
    (1/2 + 2) / 6 = 5/12."""
    assert filtered_n_at_k(n=4, p=2, c=1, submit=1, k=2) == pytest.approx(5 / 12)
    assert brute_force("ABCC", 1, 2) == Fraction(5, 12)


@pytest.mark.parametrize("kinds", ["AABCC", "ABBBC", "ACCCC", "BBCCC", "AAAAB", "ABBCCC"])
@pytest.mark.parametrize(("submit", "k"), [(1, 1), (1, 3), (2, 3), (2, 4), (3, 5)])
def test_matches_the_protocol_on_every_draw(kinds, submit, k):
    if k > len(kinds):
        pytest.skip("k > n")
    n, p, c = len(kinds), sum(x != "C" for x in kinds), kinds.count("A")
    assert filtered_n_at_k(n, p, c, submit, k) == pytest.approx(float(brute_force(kinds, submit, k)))


def test_limits():
    # submitting every kept sample is pass@k: the public filter never drops a passing one
    assert filtered_n_at_k(200, 30, 4, submit=10, k=10) == pytest.approx(pass_at_k(200, 4, 10))
    # one submission out of all samples: the chance that a random public-passing one passes all
    assert filtered_n_at_k(50, 20, 5, submit=1, k=50) == pytest.approx(5 / 20)
    assert filtered_n_at_k(1000, 0, 0, submit=10, k=1000) == 0.0
    assert 0 <= filtered_n_at_k(1000, 37, 3, submit=10, k=1000) <= 1  # large k: no overflow
    with pytest.raises(ValueError, match="c <= p <= n"):
        filtered_n_at_k(10, 2, 3, 1, 5)
    with pytest.raises(ValueError, match="undefined"):
        filtered_n_at_k(4, 2, 1, 1, 5)


def test_records_carry_public_verdicts_and_the_summary_the_column():
    """On the CodeContests fixture: a right program, one that prints the public
    example's answer (passes the public tests, fails the private ones), a wrong one."""
    [problem] = load_codecontests(FIXTURE)
    assert problem.public_cases == 1
    right = "t = int(input())\nfor _ in range(t):\n    a, b = map(int, input().split())\n    print(a + b)\n"
    memorised = 'print("3\\n7")\n'
    wrong = "print(0)\n"
    settings = EvalSettings(n_samples=4, ks={"codecontests": [1]}, filtered_n_at_k={"codecontests": [[1, 2]]})
    [record] = evaluate_completions([problem], [[right, memorised, wrong, wrong]], settings)
    assert record["public"] == [True, True, False, False]
    assert record["statuses"] == ["passed", "failed", "failed", "failed"]
    summary = summarise([record], [1], settings.filtered_for("codecontests"))
    assert summary["1@2"] == pytest.approx(5 / 12)  # the hand-computed case above
    assert summary["pass@1"] == pytest.approx(0.25)


def test_settings_refuse_what_cannot_be_estimated():
    with pytest.raises(ValueError, match="no public tests"):
        EvalSettings(n_samples=10, filtered_n_at_k={"mbpp": [[1, 5]]})
    with pytest.raises(ValueError, match="n <= k <= n_samples"):
        EvalSettings(n_samples=10, filtered_n_at_k={"codecontests": [[10, 100]]})
    with pytest.raises(ValueError, match="n <= k <= n_samples"):
        EvalSettings(n_samples=10, filtered_n_at_k={"codecontests": [[5, 2]]})
    assert EvalSettings(n_samples=10).filtered_for("codecontests") == []


def test_report_table_has_the_column_with_the_estimators_mean():
    """The report's codecontests table gets a `1@2` column after pass@k whose cell is
    the mean over problems of the estimator (one seed, so no seed resampling)."""
    import pandas as pd

    from wmtp.stages import report

    records = [
        {"task_id": "a", "n": 4, "c": 1, "public": [True, True, False, False]},  # 5/12
        {"task_id": "b", "n": 4, "c": 0, "public": [True, False, False, False]},  # 0
        {"task_id": "c", "n": 4, "c": 2, "public": [True, True, False, False]},  # 1 - 1/6
    ]
    frames = {(algo, 0): pd.DataFrame(records) for algo in ("baseline-mtp", "ntp")}
    table = report.benchmark_table("codecontests", frames, ["baseline-mtp", "ntp"], [0], [1], 200, seed=0,
                                   filtered=[(1, 2)])  # fmt: skip
    assert table.metrics == ["pass@1", "1@2", "exact_match"]
    expected = (5 / 12 + 0 + 5 / 6) / 3
    assert table.cells["ntp"]["1@2"].mean == pytest.approx(expected)
    assert table.cells["ntp"]["exact_match"] is None
    assert table.diffs["ntp"]["1@2"].mean == pytest.approx(0.0)
