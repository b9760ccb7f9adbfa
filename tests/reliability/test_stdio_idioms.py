"""Correct stdin/stdout programs must pass: each idiom in
`stdio_idioms.py` prints the right answer under plain `python` (checked here, so
the fixture cannot rot) and must pass through `evaluate_completions`; outputs a
CodeContests checker accepts pass, wrong ones fail."""

from __future__ import annotations

import subprocess
import sys
import tempfile

import pytest
from stdio_idioms import CASES, EQUIVALENT_OUTPUTS, IDIOMS, WRONG_OUTPUTS

from wmtp.config.schema import EvalSettings
from wmtp.data.problems import Problem
from wmtp.stages.evaluate import evaluate_completions

SETTINGS = EvalSettings(timeout=10.0, workers=2)


def plain_python(program: str, stdin: str) -> subprocess.CompletedProcess:
    """`python -I program` with stdin from a file, as judges (and we) give it."""
    with tempfile.TemporaryFile() as handle:
        handle.write(stdin.encode())
        handle.seek(0)
        return subprocess.run([sys.executable, "-I", "-c", program], stdin=handle,
                              capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", IDIOMS)
def test_idiom_is_right_under_plain_python(name):
    for stdin, expected in CASES:
        done = plain_python(IDIOMS[name], stdin)
        assert done.returncode == 0 and done.stdout.split() == expected.split(), done


def judge(items: dict[str, tuple[str, tuple]]) -> dict[str, dict]:
    problems = [Problem(task_id=n, prompt="", kind="stdio", cases=c) for n, (_, c) in items.items()]
    records = evaluate_completions(problems, [[p] for p, _ in items.values()], SETTINGS)
    return {r["task_id"]: r for r in records}


def test_every_idiom_passes():
    records = judge({name: (program, CASES) for name, program in IDIOMS.items()})
    failing = {n: r["details"][0] for n, r in records.items() if r["statuses"][0] != "passed"}
    assert failing == {}


def test_checker_equivalent_outputs_pass_and_wrong_ones_fail():
    items = {n: (p, ((i, o),)) for n, (p, i, o) in {**EQUIVALENT_OUTPUTS, **WRONG_OUTPUTS}.items()}
    statuses = {n: r["statuses"][0] for n, r in judge(items).items()}
    assert {n: statuses[n] for n in EQUIVALENT_OUTPUTS} == {n: "passed" for n in EQUIVALENT_OUTPUTS}
    assert all(statuses[n] in ("failed", "error") for n in WRONG_OUTPUTS), statuses
