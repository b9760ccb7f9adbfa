"""Run untrusted generated programs against their tests, one sandboxed process each.

Why a sandbox: generated code loops forever, allocates without bound, forks,
calls `exit()` before the tests, deletes files. None of that may crash the
evaluation, touch the machine, or turn into a pass.

What every run gets (`run_program`, `run_stdio`):
- its own interpreter process in its own session / process group, killed as a
  whole (SIGKILL) on a wall-clock timeout;
- RLIMIT_CPU (timeout + 1 s), RLIMIT_AS (`memory_mb`), RLIMIT_FSIZE (32 MB per
  written file, stdout included), RLIMIT_NPROC and RLIMIT_CORE = 0;
- a fresh scratch directory as cwd, HOME and TMPDIR, deleted afterwards;
- a scrubbed environment (PATH=/usr/bin:/bin, LANG, HOME, TMPDIR; nothing else:
  no AWS_*, HF_*, MLFLOW_*, tokens) and `python -I` (no PYTHON* variables, no
  user site, no cwd on sys.path);
- when running as root with working namespaces (this machine): new network,
  PID and mount namespaces (`unshare --net --pid --fork --mount-proc`), so no
  network and no other process is visible; the harness is PID 1 of its
  namespace, and when it dies the kernel kills everything the program forked,
  setsid() or not. The program runs as a fresh random unprivileged uid, so it
  cannot write to the project or kill the evaluator (different uid), and
  RLIMIT_NPROC (per uid) counts only its own processes: a fork bomb hits the
  cap without starving anything else. After the run every process of that uid
  is killed (kill(-1) as that uid).

"Passed" means every test really ran. The parent hands the harness a random
per-run nonce through an inherited file descriptor that is closed before the
program starts; the harness writes it to a dedicated pipe only after the program
*and* the tests returned normally, and the parent needs exit code 0 and that
nonce. `os._exit(0)`, `sys.exit(0)`, printing "passed", killing the parent or
itself all end without the nonce and count as failures (status "error").

Degradation (clusters): without working namespaces the run still gets its own
session, rlimits, scratch dir and scrubbed environment, but has network access
and, if not root, shares RLIMIT_NPROC with every process of the user; a warning
says so once per process. Without root there is no uid switch, so the program
can write wherever the user can.

Limits, honestly: this contains accidents and sloppy cheating, not a deliberate
attacker. The nonce sits in the harness's memory, so a program that walks the
interpreter's frames can find it; world-writable directories (/tmp, /dev/shm)
stay writable; files readable by everyone stay readable; the interpreter must be
readable by the unprivileged uid (when `sys.executable` lives under a private
directory such as /root/.pyenv, the system /usr/bin/python3 is used, so programs
see the standard library only). Results do not depend on the degree of
parallelism except that a heavily loaded machine can push a slow program over
its wall-clock timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

STATUSES = ("passed", "failed", "timeout", "error")
Status = Literal["passed", "failed", "timeout", "error"]

FILE_SIZE_MB = 32  # RLIMIT_FSIZE: cap on every file the program writes (stdout included)
MAX_PROCESSES = 32  # RLIMIT_NPROC for the sandbox uid (threads count too)
TAIL_CHARS = 2000  # how much stdout/stderr an Outcome keeps
UID_RANGE = (1_500_000, 2_500_000)  # random unprivileged uids, far above any real account

# Runs inside the sandbox as `python -I -c HARNESS mode config_fd result_fd`. It reads
# its config (program, tests, nonce, limits) from an inherited fd and closes it before
# running anything, then writes one JSON line to the result fd.
HARNESS = r"""
import builtins, json, os, resource, sys
mode, config_fd, result_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with os.fdopen(config_fd, "rb") as f:
    config = json.loads(f.read())
for name, value in config["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
success = json.dumps({"status": "passed", "nonce": config.pop("nonce")}).encode() + b"\n"
write, exit_now, flush = os.write, os._exit, sys.stdout.flush
program, tests = config.pop("program"), config.pop("tests")
del config
def report(status, exc):
    write(result_fd, json.dumps({"status": status, "error": f"{type(exc).__name__}: {exc}"[:500]}).encode() + b"\n")
stage = "program"
try:
    scope = {"__name__": "__main__" if mode == "stdio" else "__sandbox__", "__builtins__": builtins}
    exec(compile(program, "<program>", "exec"), scope)
    stage = "tests"
    if tests:
        exec(compile(tests, "<tests>", "exec"), scope)
    flush()
except SystemExit as exc:
    if mode == "stdio" and exc.code in (None, 0):
        flush()
        write(result_fd, success)
        exit_now(0)
    report("error", RuntimeError(f"exit({exc.code!r}) during the {stage}"))
    exit_now(1)
except AssertionError as exc:
    report("failed", exc)
    exit_now(1)
except BaseException as exc:
    report("error", exc)
    exit_now(1)
write(result_fd, success)
exit_now(0)
"""


@dataclass
class Outcome:
    """Result of one program. `status` is "passed" (every test ran and passed),
    "failed" (an assertion failed or the output was wrong), "timeout" (wall or CPU
    limit) or "error" (crash, exception, early exit, killed)."""

    passed: bool
    status: Status
    detail: str = ""
    stdout: str = ""  # tail
    stderr: str = ""  # tail
    duration: float = 0.0
    returncode: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Job:
    """One program to judge: `tests` (Python asserts run after the program in the
    same interpreter) or `cases` ((stdin, expected stdout) pairs, all must match)."""

    program: str
    tests: str = ""
    cases: tuple[tuple[str, str], ...] = ()
    timeout: float = 3.0
    memory_mb: int = 1024


@dataclass(frozen=True)
class _Isolation:
    namespaces: bool  # unshare --net --pid --mount works
    switch_uid: bool  # we are root: run the program as a random unprivileged uid
    python: str  # interpreter the sandbox runs


def _readable_by_others(path: Path) -> bool:
    """Every ancestor searchable and the path itself readable by 'other'."""
    path = path.resolve()
    for part in [path, *path.parents]:
        mode = part.stat().st_mode
        if not mode & stat.S_IXOTH or (part == path and not mode & stat.S_IROTH):
            return False
    return True


def _interpreter(switch_uid: bool) -> str:
    """An interpreter the sandbox uid can run with its standard library."""
    if not switch_uid:
        return sys.executable
    stdlib = Path(os.__file__).parent
    if _readable_by_others(Path(sys.executable)) and _readable_by_others(stdlib):
        return sys.executable
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system and _readable_by_others(Path(system)):
        return system
    warnings.warn(
        f"wmtp.sandbox: {sys.executable} is not readable by an unprivileged uid and there is "
        "no system python3: programs run as root (they can write anywhere root can)",
        stacklevel=3,
    )
    return sys.executable


@functools.cache
def _isolation() -> _Isolation:
    """Probe once per process what this machine allows, and say what is missing."""
    switch_uid = os.geteuid() == 0
    namespaces = False
    unshare = shutil.which("unshare")
    if unshare and switch_uid:
        probe = subprocess.run(
            [unshare, "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "true"],
            capture_output=True,
        )
        namespaces = probe.returncode == 0
    if not namespaces:
        warnings.warn(
            "wmtp.sandbox: network/PID namespaces unavailable (needs root and a working "
            "`unshare`): programs run with network access, and fork bombs are contained only "
            "by RLIMIT_NPROC and process-group kills",
            stacklevel=3,
        )
    python = _interpreter(switch_uid)
    return _Isolation(namespaces, switch_uid and _readable_by_others(Path(python)), python)


def _tail(handle) -> str:
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    handle.seek(max(0, size - TAIL_CHARS))
    return handle.read().decode("utf-8", "replace")


def _read_all(handle) -> bytes:
    handle.seek(0)
    return handle.read()


def _kill_uid(uid: int, python: str) -> None:
    """Kill every process of the sandbox uid (escaped process groups included):
    kill(-1) from a process running as that uid reaches exactly those."""
    subprocess.run(
        [python, "-I", "-S", "-c", "import os; os.kill(-1, 9)"],
        user=uid,
        group=uid,
        extra_groups=[],
        check=False,
        cwd="/",
    )


def _execute(
    mode: str, program: str, tests: str, stdin: str, timeout: float, memory_mb: int
) -> tuple[Outcome, bytes]:
    """One sandboxed interpreter run; returns the Outcome and the full stdout."""
    iso = _isolation()
    nonce = secrets.token_hex(16)
    uid = UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0])
    limits = {
        "RLIMIT_CPU": int(timeout) + 1,
        "RLIMIT_AS": memory_mb * 2**20,
        "RLIMIT_FSIZE": FILE_SIZE_MB * 2**20,
        "RLIMIT_CORE": 0,
    }
    if iso.switch_uid or not iso.namespaces:
        limits["RLIMIT_NPROC"] = MAX_PROCESSES
    scratch = Path(tempfile.mkdtemp(prefix="wmtp-sandbox-"))
    config = tempfile.TemporaryFile()
    stdin_file, stdout_file, stderr_file = (tempfile.TemporaryFile() for _ in range(3))
    read_end, write_end = os.pipe()
    started = time.monotonic()
    try:
        config.write(
            json.dumps(
                {"program": program, "tests": tests, "nonce": nonce, "limits": limits}
            ).encode()
        )
        config.seek(0)
        stdin_file.write(stdin.encode())
        stdin_file.seek(0)
        command = [iso.python, "-I", "-c", HARNESS, mode, str(config.fileno()), str(write_end)]
        popen_user: dict = {}
        if iso.switch_uid:
            os.chown(scratch, uid, uid)
        if iso.namespaces:
            prefix = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
            if iso.switch_uid:
                prefix += [f"--setgid={uid}", f"--setuid={uid}"]
            command = prefix + command
        elif iso.switch_uid:
            popen_user = {"user": uid, "group": uid, "extra_groups": []}
        os.chmod(scratch, 0o700)
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(scratch),
            "TMPDIR": str(scratch),
        }
        proc = subprocess.Popen(
            command,
            cwd=scratch,
            env=env,
            stdin=stdin_file,
            stdout=stdout_file,
            stderr=stderr_file,
            pass_fds=(config.fileno(), write_end),
            start_new_session=True,
            **popen_user,
        )
        os.close(write_end)
        write_end = -1
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if iso.switch_uid and (not iso.namespaces or _uid_alive(uid)):
            _kill_uid(uid, iso.python)
        duration = time.monotonic() - started
        os.set_blocking(read_end, False)
        try:
            report = os.read(read_end, 1 << 16).decode("utf-8", "replace")
        except BlockingIOError:
            report = ""
        stdout = _read_all(stdout_file)
        outcome = _classify(
            report,
            nonce,
            proc.returncode,
            timed_out,
            mode,
            stdout=_tail(stdout_file),
            stderr=_tail(stderr_file),
            duration=duration,
        )
        return outcome, stdout
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
        for handle in (config, stdin_file, stdout_file, stderr_file):
            handle.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _uid_alive(uid: int) -> bool:
    """Cheap check whether any process of `uid` survives (it should not: the PID
    namespace dies with its init)."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    return True
            except FileNotFoundError:
                continue
    return False


def _classify(
    report: str, nonce: str, returncode: int, timed_out: bool, mode: str, **fields
) -> Outcome:
    records = []
    for line in report.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    ok = any(
        isinstance(r, dict) and r.get("nonce") == nonce and r.get("status") == "passed"
        for r in records
    )
    if timed_out:
        return Outcome(False, "timeout", "wall-clock timeout", returncode=returncode, **fields)
    if (
        returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGKILL)
        and not ok
    ):
        return Outcome(
            False,
            "timeout",
            f"CPU time limit (returncode {returncode})",
            returncode=returncode,
            **fields,
        )
    if ok and returncode == 0:
        return Outcome(True, "passed", "", returncode=returncode, **fields)
    honest = [r for r in records if isinstance(r, dict) and r.get("status") in ("failed", "error")]
    if honest:
        status = honest[0]["status"]
        return Outcome(
            False, status, str(honest[0].get("error", ""))[:500], returncode=returncode, **fields
        )
    what = "the tests" if mode == "assert" else "the program"
    detail = f"exited (returncode {returncode}) before {what} completed"
    return Outcome(False, "error", detail, returncode=returncode, **fields)


def run_program(program: str, tests: str, timeout: float = 3.0, memory_mb: int = 1024) -> Outcome:
    """Run `program`, then the Python test code `tests` (asserts) in the same
    interpreter. Passed only if both returned normally."""
    outcome, _ = _execute("assert", program, tests, "", timeout, memory_mb)
    return outcome


def outputs_match(actual: str, expected: str) -> bool:
    """CodeContests-style comparison: equal sequences of whitespace-separated tokens."""
    return actual.split() == expected.split()


def run_stdio(
    program: str, stdin: str, expected_stdout: str, timeout: float = 3.0, memory_mb: int = 1024
) -> Outcome:
    """Run `program` as __main__ with `stdin`; passed if it exits normally and its
    stdout matches `expected_stdout` token for token."""
    outcome, stdout = _execute("stdio", program, "", stdin, timeout, memory_mb)
    if outcome.status != "passed":
        return outcome
    if not outputs_match(stdout.decode("utf-8", "replace"), expected_stdout):
        return dataclasses.replace(outcome, passed=False, status="failed", detail="wrong output")
    return outcome


def run_job(job: Job) -> Outcome:
    """Judge one job; stdin/stdout cases run one after another (each in its own
    sandbox) and stop at the first that does not pass."""
    if not job.cases:
        return run_program(job.program, job.tests, job.timeout, job.memory_mb)
    duration = 0.0
    outcome = Outcome(False, "error", "no test cases")
    for index, (stdin, expected) in enumerate(job.cases):
        outcome = run_stdio(job.program, stdin, expected, job.timeout, job.memory_mb)
        duration += outcome.duration
        if not outcome.passed:
            detail = f"case {index + 1}/{len(job.cases)}: {outcome.detail}"
            return dataclasses.replace(outcome, detail=detail, duration=duration)
    return dataclasses.replace(outcome, duration=duration)


def run_many(
    jobs: Sequence[Job], workers: int | None = None, progress: bool = False
) -> list[Outcome]:
    """Judge `jobs` in parallel; outcomes are in the order of `jobs`.

    Threads are enough: each job is its own subprocess and the threads only wait
    on them (a process pool would fork the caller, which may hold a model and
    torch's threads)."""
    workers = workers or os.cpu_count() or 1
    _isolation()  # probe (and warn) once before the threads start
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(run_job, jobs)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(jobs), desc="sandbox", unit="program")
        return list(results)
