"""The mutation check (scripts/mutation_check.py): every deliberate fault that would
corrupt the table makes the test suite fail."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("mutation_check", REPO / "scripts" / "mutation_check.py")
mutation_check = sys.modules["mutation_check"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutation_check)


@pytest.mark.parametrize("fault", mutation_check.FAULTS, ids=lambda f: f.name)
def test_every_fault_still_applies_to_the_code(fault):
    """A fault whose target text moved away would test nothing: it must be found once."""
    text = (REPO / fault.path).read_text()
    assert mutation_check.mutated(fault, text) != text
    for test in fault.tests:
        assert (REPO / test.split("::")[0]).exists(), test


def test_a_fault_that_no_longer_applies_stops_the_check():
    fault = mutation_check.FAULTS[0]
    with pytest.raises(SystemExit, match=f"fault {fault.name}: its target text occurs 0 times"):
        mutation_check.mutated(fault, "code that moved")


@pytest.mark.slow
def test_every_deliberate_fault_makes_the_suite_fail():
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "mutation_check.py")],
        cwd=REPO, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    n = len(mutation_check.FAULTS)
    assert done.returncode == 0 and f"{n} of {n} faults caught" in done.stdout, (
        done.stdout + done.stderr[-3000:]
    )
