"""Sandbox: honest programs pass or fail on their merits; hostile ones are contained,
scored as failures, and do not disturb the rest of the evaluation."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from wmtp.sandbox import Job, _isolation, run_job, run_many, run_program, run_stdio

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def test_correct_program_passes():
    outcome = run_program(ADD, ADD_TESTS)
    assert outcome.passed and outcome.status == "passed"


def test_wrong_program_fails_on_assertion():
    outcome = run_program("def add(a, b):\n    return a - b\n", ADD_TESTS)
    assert not outcome.passed and outcome.status == "failed"
    assert "AssertionError" in outcome.detail


def test_exception_is_an_error_with_detail():
    outcome = run_program("def add(a, b):\n    return a + c\n", ADD_TESTS)
    assert outcome.status == "error" and "NameError" in outcome.detail
    assert run_program("def add(a, b) return", ADD_TESTS).status == "error"


def hostile_jobs(tmp_path: Path) -> dict[str, Job]:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    outside = tmp_path / "written_outside.txt"
    return {
        "os._exit(0) before tests": Job("import os\nos._exit(0)\n" + ADD, ADD_TESTS),
        "sys.exit(0) before tests": Job("import sys\nsys.exit(0)\n" + ADD, ADD_TESTS),
        "fake pass output": Job("print('passed')\nimport os\nos._exit(0)\n", ADD_TESTS),
        "exit inside the tests": Job(ADD, "import sys\nsys.exit(0)\n" + ADD_TESTS),
        "kill the parent": Job(
            "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", ADD_TESTS
        ),
        "delete files": Job(f"import os\nos.remove({str(victim)!r})\n" + ADD, ADD_TESTS),
        "write outside scratch": Job(f"open({str(outside)!r}, 'w').write('x')\n" + ADD, ADD_TESTS),
        "infinite loop": Job("while True:\n    pass\n", ADD_TESTS, timeout=1.0),
        "fork bomb": Job(
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
            ADD_TESTS,
            timeout=1.0,
        ),
        "memory bomb": Job("x = bytearray(4 * 1024**3)\n" + ADD, ADD_TESTS, memory_mb=256),
    }


def test_hostile_programs_are_contained_and_fail(tmp_path):
    hostile = hostile_jobs(tmp_path)
    honest = Job(ADD, ADD_TESTS)
    jobs = [honest, *hostile.values(), honest]
    outcomes = run_many(jobs, workers=2)
    assert outcomes[0].passed and outcomes[-1].passed, "the evaluation must survive"
    for name, outcome in zip(hostile, outcomes[1:-1], strict=True):
        assert not outcome.passed, f"{name} counted as a pass: {outcome}"
    statuses = dict(zip(hostile, (o.status for o in outcomes[1:-1]), strict=True))
    assert statuses["infinite loop"] == "timeout"
    assert statuses["fork bomb"] == "timeout"
    if _isolation().switch_uid:
        assert (tmp_path / "victim.txt").read_text() == "keep me"
        assert not (tmp_path / "written_outside.txt").exists()


def test_results_do_not_depend_on_parallelism():
    jobs = [Job(ADD, ADD_TESTS), Job("def add(a, b):\n    return 0\n", ADD_TESTS)] * 3
    jobs.append(Job("raise ValueError('x')", ""))
    serial = [o.status for o in run_many(jobs, workers=1)]
    parallel = [o.status for o in run_many(jobs, workers=3)]
    assert serial == parallel == ["passed", "failed"] * 3 + ["error"]


def test_environment_is_scrubbed_and_cwd_is_a_fresh_scratch_dir(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("HF_TOKEN", "secret")
    program = "import os\nprint(os.getcwd())\nprint(sorted(os.environ))\n"
    tests = (
        "assert not any(k.startswith(('AWS', 'HF_', 'MLFLOW')) for k in os.environ)\n"
        "assert os.listdir('.') == []\n"
        "open('scratch.txt', 'w').write('ok')\n"
    )
    outcome = run_program(program, tests)
    assert outcome.passed, outcome
    scratch = outcome.stdout.splitlines()[0]
    assert "wmtp-sandbox-" in scratch and not os.path.exists(scratch)


def test_no_network_when_namespaces_work():
    if not _isolation().namespaces:
        pytest.skip("namespaces unavailable on this machine")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
    try:
        outcome = run_program(program, "")
    finally:
        server.close()
    assert outcome.status == "error" and "Error" in outcome.detail


def test_stdio_compares_tokens():
    program = "a, b = map(int, input().split())\nprint(a + b)\n"
    assert run_stdio(program, "1 2\n", "3\n").passed
    assert run_stdio(program, "1 2\n", "3").passed  # trailing whitespace does not matter
    wrong = run_stdio(program, "1 2\n", "4\n")
    assert wrong.status == "failed" and wrong.detail == "wrong output"


def test_stdio_job_needs_every_case():
    program = "n = int(input())\nprint(n * 2 if n < 5 else n)\n"
    cases = (("1\n", "2\n"), ("3\n", "6\n"))
    assert run_job(Job(program, cases=cases)).passed
    failing = run_job(Job(program, cases=(*cases, ("7\n", "14\n"))))
    assert failing.status == "failed" and failing.detail.startswith("case 3/3")
    early_exit = "import sys\nprint(int(input()) * 2)\nsys.exit(0)\n"
    assert run_job(Job(early_exit, cases=cases)).passed  # exit(0) after the output is fine in stdio
