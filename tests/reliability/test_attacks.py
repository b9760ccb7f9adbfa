"""Generated programs must not fake a pass: every attack program in
`attacks.py` is a wrong solution plus a trick; judged through the evaluation
entry point (`evaluate_completions`) none may pass, on every sandbox tier this
machine offers (the degraded tiers are what clusters without root get)."""

from __future__ import annotations

import dataclasses
import os

import pytest
from attacks import ATTACKS, TESTS, WRONG

from wmtp.config.schema import EvalSettings
from wmtp.data.problems import Problem
from wmtp.sandbox import runner as sandbox
from wmtp.stages.evaluate import evaluate_completions

RIGHT = WRONG.replace("a - b", "a + b")
SETTINGS = EvalSettings(timeout=5.0, workers=2)


def judge(programs: dict[str, str]) -> dict[str, str]:
    problems = [Problem(task_id=name, prompt="", kind="assert", tests=TESTS) for name in programs]
    records = evaluate_completions(problems, [[p] for p in programs.values()], SETTINGS)
    return {r["task_id"]: r["statuses"][0] for r in records}


def test_no_attack_fakes_a_pass():
    statuses = judge({"honest": RIGHT, **ATTACKS})
    assert statuses.pop("honest") == "passed", "the evaluation must still pass a right solution"
    faked = [name for name, status in statuses.items() if status == "passed"]
    assert faked == []


INTROSPECTION = {
    "sys._getframe": "import sys\nsys._getframe(0).f_back\n",
    "gc.get_objects": "import gc\ngc.get_objects()\n",
    "gc.get_referrers": "import gc\ngc.get_referrers(globals())\n",
    "tb_frame": "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    e.__traceback__.tb_frame.f_back\n",
    "gi_frame": "def g():\n    yield\ng().gi_frame\n",
    "/proc/self/mem": "open('/proc/self/mem', 'rb').close()\n",
    "ctypes": "import ctypes\nctypes.string_at(id(1), 8)\n",
    "sys.settrace": "import sys\nsys.settrace(lambda *a: None)\nsys.settrace(None)\n",
    "signal.signal": "import signal\nsignal.signal(signal.SIGALRM, lambda *a: None)\n",
    "code.__new__": "f = lambda: 0\nf.__code__ = f.__code__.replace(co_consts=(1,))\n",
    "sys.addaudithook": "import sys\nsys.addaudithook(lambda event, args: None)\n",
}


def test_introspection_works_as_in_a_plain_interpreter_and_wins_nothing():
    """Frames, gc walks, ctypes, trace hooks, signal handlers: nothing the verdict
    depends on is in the program's process, so nothing is refused there. A right
    solution that uses them passes, a wrong one fails."""
    right = judge({f"right, {name}": RIGHT + code for name, code in INTROSPECTION.items()})
    wrong = judge({f"wrong, {name}": WRONG + code for name, code in INTROSPECTION.items()})
    assert set(right.values()) == {"passed"}, right
    assert set(wrong.values()) == {"failed"}, wrong


def test_a_program_cannot_watch_the_tests():
    """An audit hook of the program sees its own process only: not the tests'
    code, which lives in the judge."""
    spy = RIGHT.replace("def add", "def _add") + (
        "import sys\nseen = []\nsys.addaudithook(lambda event, args: seen.append(repr(args)))\n"
        "def add(a, b):\n    assert not any('add(-1, 1)' in s or '<tests>' in s for s in seen), seen\n"
        "    return _add(a, b)\n"
    )
    assert judge({"spy": spy}) == {"spy": "passed"}


def test_the_program_reaches_neither_the_tests_nor_the_judge():
    """With a right solution these attacks pass: the tests are nowhere in the
    program's memory, and the judge's memory, fds and process are out of reach."""
    names = ["search own memory for the tests", "read the judge's memory and fds", "ptrace the judge",
             "kill the judge (the program's parent)"]
    statuses = judge({name: ATTACKS[name].replace(WRONG, RIGHT) for name in names})
    assert statuses == {name: "passed" for name in names}


def test_the_tests_import_only_from_read_only_paths():
    """The judge's sys.path holds no directory the program can write (no cwd, no
    /tmp): a planted random.py is not what `import random` in the tests finds."""
    tests = TESTS + (
        "import os, sys, random\nassert '' not in sys.path and os.getcwd() not in sys.path\n"
        "assert not any(p.startswith(('/tmp', '/var/tmp', '/dev/shm')) for p in sys.path), sys.path\n"
        "assert random.randint(5, 5) == 5\n"
    )
    problem = Problem(task_id="planted", prompt="", kind="assert", tests=tests)
    planted = ATTACKS["modules planted where the tests might import them"].replace(WRONG, RIGHT)
    record = evaluate_completions([problem], [[planted]], SETTINGS)[0]
    assert record["statuses"] == ["passed"], record["details"]


def _other_tiers() -> list[tuple[str, sandbox.Isolation]]:
    chosen = sandbox._isolation()
    return [(name, dataclasses.replace(tier, cgroup=chosen.cgroup))
            for name, tier in sandbox._tiers() if tier.launcher != chosen.launcher]


@pytest.mark.parametrize("tier", ["user namespaces", "none"])
def test_degraded_tiers_contain_the_attacks_too(tier):
    tiers = dict(_other_tiers())
    if tier not in tiers:
        pytest.skip(f"tier {tier!r} is the one in use or unavailable here (it is tested above)")
    if tier == "none" and os.geteuid() != 0:
        pytest.skip("without namespaces or root a program can signal the evaluator (documented)")
    iso = tiers[tier]
    faked = [n for n, p in ATTACKS.items() if sandbox._run(iso, sandbox.Job(p, TESTS)).passed]
    assert faked == []
    assert sandbox._run(iso, sandbox.Job(RIGHT, TESTS)).passed
