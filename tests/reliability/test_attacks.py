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


def test_the_introspection_paths_are_refused_not_just_fruitless():
    """The audit hook makes each path fail outright (the program errors), so a
    cleverer search over the same object graph gets nowhere either."""
    probes = {
        "sys._getframe": "import sys\nsys._getframe(0)\n",
        "gc.get_objects": "import gc\ngc.get_objects()\n",
        "gc.get_referrers": "import gc\ngc.get_referrers(globals())\n",
        "tb_frame": "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    e.__traceback__.tb_frame\n",
        "gi_frame": "def g():\n    yield\ng().gi_frame\n",
        "/proc/self/mem": "open('/proc/self/mem', 'rb')\n",
        "ctypes": "import ctypes\n",
        "sys.settrace": "import sys\nsys.settrace(None)\n",
        "signal.signal": "import signal\nsignal.signal(signal.SIGALRM, lambda *a: None)\n",
    }
    statuses = judge({name: RIGHT + code for name, code in probes.items()})
    assert statuses == {name: "error" for name in probes}


def test_a_second_audit_hook_is_never_added():
    """CPython drops a new hook silently when an existing one refuses it; the
    program's hook must never see an event (it would see the tests' code)."""
    spy = RIGHT + (
        "import sys\nseen = []\nsys.addaudithook(lambda event, args: seen.append(event))\n"
        "open('/dev/null').close()\nassert seen == [], seen\n"
    )
    assert judge({"spy": spy}) == {"spy": "passed"}


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
