"""The code that runs inside a sandbox started by `wmtp.sandbox.runner` (never imported by
wmtp itself: the host sends it, with bridge.py, compiled or as source, in the job's
marshal data, and `runner.BOOT` calls `main`).

It runs under the sandbox's interpreter (often the system python3, not the
project's), so it uses the standard library only. Its steps, in order:

1. take the job (program, limits; stdin cases come later, the tests of assert
   mode on their own fd);
2. as root of its namespaces: join the run's cgroup, build a minimal root
   file system (read-only binds of /usr, /etc, ... ; fresh tmpfs /tmp, /var/tmp,
   /dev/shm; a new /proc) and pivot into it, so the program sees neither the
   project nor any other run's files;
3. assert mode: fork the program's process (its own uid, a plain interpreter),
   then read the tests, become the tests' uid and run them here against the
   program's objects through the bridge (`judge`); stdio mode: stay the
   supervisor (PID 1) and run `python -I program.py` once per case, each as the
   unprivileged uid with a fresh /tmp (`supervise`).

Results go to the host over a pipe only this process holds: JSON lines, and for
stdio each case's stdout bytes after its line. Start-up time is paid once per
program (per case the program's own interpreter start dominates), so this
module imports nothing heavy and JSON is written by hand.
"""

from __future__ import annotations

import marshal
import os
import sys
from _json import encode_basestring_ascii as json_string

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
# statvfs flag -> mount flag; a read-only remount inside a user namespace must keep them.
LOCKED_FLAGS = {2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME, 2048: MS_NODIRATIME,
                4096: MS_RELATIME}
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECUREBITS, PR_CAPBSET_DROP = 4, 38, 28, 24
# SECBIT_NOROOT(+_LOCKED) | SECBIT_NO_CAP_AMBIENT_RAISE(+_LOCKED): uid 0 gains nothing by exec.
SECUREBITS_NO_ROOT = 1 | 2 | 64 | 128
PIVOT_ROOT_SYSCALL = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
CAPSET_SYSCALL = {"x86_64": 126, "aarch64": 91, "riscv64": 91, "ppc64le": 184, "s390x": 185}
DEVICES = ("null", "zero", "full", "random", "urandom")
NEW_ROOT = "/tmp"  # mount point of the new root inside this mount namespace (host /tmp untouched)
PROGRAM_DIR = "/sandbox"
PROGRAM = PROGRAM_DIR + "/program.py"
TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


def json_value(value) -> str:
    if isinstance(value, str):
        return json_string(value)
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)  # int, float


def json_line(record: dict) -> bytes:
    """One JSON object line from str/int/float/bool/None values (no `json`: it
    imports `re`, which costs more than the rest of this module)."""
    fields = ", ".join(f"{json_string(k)}: {json_value(v)}" for k, v in record.items())
    return ("{" + fields + "}\n").encode()


class Kernel:
    """The few system calls Python's os module lacks, through ctypes (root only,
    before any untrusted code runs)."""

    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.machine = os.uname().machine

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            errno = self.ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")

    def mount(self, source, target: str, fstype, flags: int, data=None) -> None:
        args = [None if a is None else a.encode() for a in (source, target, fstype)]
        options = None if data is None else data.encode()
        self._check(self.libc.mount(*args, flags, options), f"mount {target}")

    def umount(self, target: str) -> None:
        self._check(self.libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")

    def prctl(self, option: int, arg: int) -> None:
        self._check(self.libc.prctl(option, arg, 0, 0, 0), f"prctl {option}")

    def pivot_root(self, new_root: str) -> None:
        """pivot_root(".", ".") then detach the old root: nothing outside stays reachable."""
        os.chdir(new_root)
        self._check(self.libc.syscall(PIVOT_ROOT_SYSCALL[self.machine], b".", b"."), "pivot_root")
        self.umount(".")
        os.chdir("/")

    def drop_capabilities(self) -> None:
        """For a user-namespace root: no capabilities now, none regained by exec."""
        self.prctl(PR_SET_SECUREBITS, SECUREBITS_NO_ROOT)
        for cap in range(64):
            if self.libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                break
        header = (self.ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
        data = (self.ctypes.c_uint32 * 6)()
        self._check(self.libc.syscall(CAPSET_SYSCALL[self.machine], header, data), "capset")


def make_kernel() -> Kernel | None:
    """None where ctypes is missing (then no mounts, no uid switch, no prctl)."""
    try:
        return Kernel()
    except (ImportError, OSError):
        return None


def tmpfs(kernel: Kernel, target: str, size_mb: int, mode: str = "1777") -> None:
    os.makedirs(target, exist_ok=True)
    kernel.mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV,
                 f"size={size_mb}m,nr_inodes=16384,mode={mode}")


def bind_readonly(kernel: Kernel, source: str, target: str) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        open(target, "a").close()
    kernel.mount(source, target, None, MS_BIND | MS_REC)
    locked = sum(flag for bit, flag in LOCKED_FLAGS.items() if os.statvfs(target).f_flag & bit)
    kernel.mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | locked)


def build_root(kernel: Kernel, config: dict) -> None:
    """A minimal root: read-only system directories, devices, a new /proc, private
    size-limited temporary directories and the program file; then pivot into it."""
    root = NEW_ROOT
    kernel.mount(None, "/", None, MS_REC | MS_PRIVATE)
    kernel.mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=755")
    for path in config["readonly_paths"]:
        target = root + path
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            os.symlink(os.readlink(path), target)
        elif os.path.exists(path):
            bind_readonly(kernel, path, target)
    tmpfs(kernel, root + "/dev", 1, mode="755")
    for name in DEVICES:
        bind_readonly(kernel, "/dev/" + name, root + "/dev/" + name)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, root + "/dev/" + name)
    os.makedirs(root + "/proc")
    kernel.mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for path in TMP_DIRS:
        tmpfs(kernel, root + path, config["tmp_mb"])
    tmpfs(kernel, root + PROGRAM_DIR, 1, mode="755")
    with open(root + PROGRAM, "w", encoding="utf-8") as handle:
        handle.write(config["program"])
    os.chmod(root + PROGRAM, 0o444)
    kernel.mount(None, root + PROGRAM_DIR, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    kernel.pivot_root(root)
    kernel.mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def fresh_tmp(kernel: Kernel, size_mb: int) -> None:
    """Replace /tmp, /var/tmp and /dev/shm by empty tmpfs (between stdio cases)."""
    for path in TMP_DIRS:
        kernel.umount(path)
        kernel.mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV,
                     f"size={size_mb}m,nr_inodes=16384,mode=1777")


def set_limits(limits: dict) -> None:
    import resource

    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def drop_privileges(config: dict, kernel: Kernel | None, uid: int | None) -> None:
    """Become the unprivileged `uid` (root host) or lose every capability
    (user-namespace root); never regain privileges through exec."""
    if kernel is not None:
        kernel.prctl(PR_SET_NO_NEW_PRIVS, 1)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    elif config["drop_capabilities"] and kernel is not None:
        kernel.drop_capabilities()


def setup(config: dict) -> Kernel | None:
    """Everything done as root (or user-namespace root) before untrusted code runs."""
    for procs in config["cgroup_procs"]:
        with open(procs, "w") as handle:
            handle.write("0")
    kernel = make_kernel()
    if config["mount"]:
        build_root(kernel, config)
    os.chdir(config["cwd"])
    return kernel


# ------------------------------------------------------------------- assert mode
#
# Two processes: this one (PID 1 of the run, the judge) and the program's, forked
# from it before the tests are read. The program runs as in a plain interpreter;
# the tests run here and reach the program's objects through the bridge
# (bridge.py); only this process holds the result pipe. Why that makes a forged
# verdict impossible is in the README's threat model and in runner.py.

PROGRAM_MODULE = "__sandbox__"  # the program's module: not "__main__", so guarded code stays off
TESTS_MODULE = "__tests__"  # the tests' module name (classes the tests define carry it)
PROGRAM_STACK = 256 << 20  # main-thread stack the program may grow (deep recursion)


def close_all_but(keep: set[int]) -> None:
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def program_process(config: dict, bridge, read_fd: int, write_fd: int, kernel: Kernel | None) -> None:
    """The program's process: run the program as a module, then answer the judge's
    requests until it goes. Never returns. Nothing here is trusted: whatever this
    process sends, the judge reads it as data."""
    close_all_but({read_fd, write_fd})
    import resource

    hard = resource.getrlimit(resource.RLIMIT_STACK)[1]
    resource.setrlimit(resource.RLIMIT_STACK, (PROGRAM_STACK if hard < 0 else min(hard, PROGRAM_STACK), hard))
    drop_privileges(config, kernel, config["uid"])
    if kernel is not None:
        kernel.prctl(PR_SET_DUMPABLE, 1)  # its own /proc/self, as for any process
    streams = (sys.stdout, sys.stderr)

    def flush(base_exception=BaseException) -> None:  # the program's output, for the report
        for stream in streams:
            try:
                stream.flush()
            except base_exception:
                pass

    peer = bridge.Peer(read_fd, write_fd, flush=flush)
    module = type(sys)(PROGRAM_MODULE)
    program = config.pop("program")
    module.__file__ = program_file(config, program)
    sys.modules[PROGRAM_MODULE] = sys.modules["__main__"] = module
    del config
    code = None
    try:
        code = compile(program, module.__file__, "exec")
        exec(code, module.__dict__)
    except AssertionError as exc:
        fault = ["failed", bridge.describe(exc)]
    except SystemExit as exc:
        fault = ["error", f"exit({bridge.describe(exc.code, bare=True)}) during the program"]
    except BaseException as exc:  # SyntaxError and ValueError (null bytes) included
        fault = ["error", bridge.describe(exc)]
    else:
        fault = None
    flush()
    try:
        if fault is not None:
            peer.send(peer.encode(["fault", *fault]))
            os._exit(1)
        namespace = module.__dict__
        peer.handlers["names"] = lambda names: {n: namespace[n] for n in names if n in namespace}
        # globals the tests define and the program reads (MBPP's setup code): the judge sends them
        peer.handlers["define"] = lambda values: namespace.update((k, v) for k, v in values.items() if type(k) is str)
        peer.send(peer.encode(["ready", sorted(free_names(code, namespace))]))
        peer.serve_forever()
    except bridge.BridgeBroken:
        pass
    os._exit(0)


def free_names(code, namespace: dict) -> set[str]:
    """Names the program's code reads that it does not define (nor are builtins):
    in a shared namespace the tests' globals would supply them."""
    import builtins

    return {n for n in code_names(code) if n not in namespace and not hasattr(builtins, n)
            and not n.startswith("__")}


def start_program(config: dict, bridge, kernel: Kernel | None) -> tuple[int, int, int]:
    """Fork the program's process; returns its pid and the judge's ends of the bridge."""
    to_program, from_judge = os.pipe()
    to_judge, from_program = os.pipe()
    import gc

    gc.freeze()  # the collector leaves the shared pages alone: fewer copy-on-write faults
    pid = os.fork()
    if pid == 0:
        try:
            program_process(config, bridge, to_program, from_program, kernel)
        finally:
            os._exit(1)
    os.close(to_program)
    os.close(from_program)
    return pid, to_judge, from_judge


def code_names(code) -> set[str]:
    """Every name a code object (nested functions included) may read as a global
    (attribute names too: a superset)."""
    names, stack = set(), [code]
    while stack:
        code = stack.pop()
        names.update(code.co_names)
        stack.extend(c for c in code.co_consts if type(c) is type(code))
    return names


def tests_namespace(peer, bridge, code, interface) -> dict:
    """The tests' globals: the real builtins, and the program's objects that the
    tests name. A program global shadows a builtin only where the problem itself
    defines that name (`interface`: its prompt or reference); a module the tests
    read from the program's globals (`math` of its `import math`) is this
    process's own, whatever the program put under that name."""
    import builtins

    wanted = sorted(code_names(code))
    found = peer.request("names", wanted)
    namespace = {"__name__": TESTS_MODULE, "__builtins__": builtins}
    if type(found) is not dict:
        return namespace
    wanted, builtin_names = set(wanted), vars(builtins)
    for name, value in found.items():
        if type(name) is not str or name not in wanted or name.startswith("__"):
            continue
        if name in sys.stdlib_module_names and name not in interface:
            value = bridge.pristine_module(name)
        if value is not None and (name not in builtin_names or name in interface):
            namespace[name] = value
    return namespace


def shared_globals(peer, namespace: dict, free: list):
    """Before each request to the program: send it the tests' globals it reads
    but does not define (new or rebound ones; containers each time, they may
    have changed), as a shared namespace would give them. Values that cannot
    cross (a module it lacks, an object the tests may not lend) stay here."""
    free = [n for n in free if type(n) is str]
    sent: dict = {}

    def send() -> None:
        changed = {n: namespace[n] for n in free if n in namespace
                   and (sent.get(n, send) is not namespace[n] or type(namespace[n]) in (list, dict, set))}
        for name, value in list(changed.items()):
            try:
                peer.encode(value)
            except (TypeError, ValueError):
                del changed[name]
        if changed:
            sent.update(changed)
            peer.request("define", changed)

    return send if free else None


def program_end(pid: int, reason: str) -> tuple[str, str]:
    """Status and detail when the bridge to the program's process broke: it left,
    or it sent what the bridge refuses (`reason`)."""
    import signal

    status = wait_with_timeout(pid, 0.5)
    if status is None:
        return "error", f"the program's process broke the bridge: {reason}"
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU:
        return "timeout", "CPU time limit"
    if os.WIFSIGNALED(status):
        return "error", f"the program was killed by signal {os.WTERMSIG(status)}"
    return "error", f"exited (returncode {os.WEXITSTATUS(status)}) before the tests completed"


def run_tests(bridge, peer, pid: int, job: dict) -> tuple[str, str]:
    """(status, detail) of the tests against the program's process."""
    describe = bridge.describe
    try:
        code = compile(job["tests"], "<tests>", "exec")
    except (SyntaxError, ValueError) as exc:  # ValueError: null bytes in the source
        return "error", f"tests: {describe(exc)}"
    stage = "program"
    try:
        message = peer.receive()
        while message[0] == "q":  # nothing of ours is lent yet: each is refused
            peer.serve(message)
            message = peer.receive()
        if message[0] == "fault" and len(message) == 3:
            return ("failed" if message[1] == "failed" else "error"), describe(message[2], bare=True)
        if message[0] != "ready" or len(message) != 2 or type(message[1]) is not list:
            return "error", "the program's process sent no result"
        stage = "tests"
        namespace = tests_namespace(peer, bridge, code, set(job["interface"]))
        peer.before_request = shared_globals(peer, namespace, message[1])
        exec(code, namespace)
    except bridge.BridgeBroken as broken:
        return program_end(pid, bridge.describe(broken, bare=True))
    except AssertionError as exc:
        return "failed", describe(exc)
    except SystemExit as exc:
        return "error", f"exit({describe(exc.code, bare=True)}) during the {stage}"
    except BaseException as exc:
        return "error", describe(exc)
    return program_end(pid, "a test swallowed its failure") if peer.broken else ("passed", "")


def judge(config: dict, bridge, result_fd: int, tests_fd: int, kernel: Kernel | None) -> None:
    """Assert mode: fork the program's process, then read the tests (the program
    never had them in its memory), run them here and write the verdict."""
    set_limits(config["limits"])
    pid, read_fd, write_fd = start_program(config, bridge, kernel)
    os.write(result_fd, b'{"event": "start"}\n')
    with os.fdopen(tests_fd, "rb") as handle:
        job = marshal.load(handle)
    if kernel is not None:
        kernel.prctl(PR_SET_DUMPABLE, 0)  # the program cannot trace this process or open its fds
    drop_privileges(config, kernel, config["tests_uid"])
    if kernel is not None:
        kernel.prctl(PR_SET_DUMPABLE, 0)  # a uid change may have reset it
    peer = bridge.Peer(read_fd, write_fd, bridge.JUDGE_OPERATIONS, bridge.judge_may_export)
    status, detail = run_tests(bridge, peer, pid, job)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os.write(result_fd, json_line({"status": status, "error": detail}))
    os._exit(0 if status == "passed" else 1)


def program_file(config: dict, program: str) -> str:
    """The file name the program's code carries (tracebacks, inspect, linecache
    read its lines): the program file of the minimal root, or, without one, a
    name whose lines linecache holds (no file in the program's cwd)."""
    if config["mount"]:
        return PROGRAM
    import linecache

    linecache.cache["<program>"] = (len(program), None, program.splitlines(True), "<program>")
    return "<program>"


# -------------------------------------------------------------------- stdio mode


def read_exact(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the host closed the control pipe")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def wait_with_timeout(pid: int, timeout: float) -> int | None:
    """Exit status of `pid` if it ends within `timeout` seconds, else None: a pidfd
    where the kernel has them (5.3+), else polling with a growing interval."""
    import select
    import time

    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        deadline, delay = time.monotonic() + timeout, 0.0005
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.01)
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            return None
        return os.waitpid(pid, 0)[1]
    finally:
        os.close(pidfd)


def private_file(name: str) -> int:
    """An unnamed read-write file no program can open by path: a memfd (Linux
    3.17+), else an O_TMPFILE in /tmp."""
    try:
        return os.memfd_create(name)
    except (AttributeError, OSError):
        return os.open("/tmp", os.O_TMPFILE | os.O_RDWR, 0o600)


def kill_case(config: dict, pid: int) -> None:
    """Kill every process the case started (daemonised, setsid()'d or not): as
    PID 1 of the namespace, kill(-1) reaches all of them; without a PID namespace,
    the process group and (as root) every process of the run's uid."""
    import signal

    if config["pid_namespace"]:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if config["uid"] is not None:
        killer = os.fork()
        if killer == 0:  # kill(-1) as that uid reaches exactly its processes
            try:
                os.setresuid(config["uid"], config["uid"], config["uid"])
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)


def reap_children() -> None:
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break


def start_case(config: dict, fds: list[int], kernel: Kernel | None) -> int:
    """fork + exec of `python -I program.py` as the run's uid, in its own session,
    with the case's limits; returns the pid."""
    pid = os.fork()
    if pid:
        return pid
    try:
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, 65536)
        set_limits({**config["limits"], "RLIMIT_CPU": config["cpu_seconds"]})
        drop_privileges(config, kernel, config["uid"])  # no_new_privs already set by the supervisor, inherited
        os.chdir(config["cwd"])
        os.execve(config["python"], [config["python"], "-I", config["program_path"]], config["env"])
    finally:
        os._exit(127)


def run_case(config: dict, stdin: bytes, kernel: Kernel | None) -> tuple[dict, bytes]:
    """One `python -I program.py` with `stdin`; returns its record and stdout."""
    import time

    fds = [private_file(name) for name in ("stdin", "stdout", "stderr")]
    os.write(fds[0], stdin)
    os.lseek(fds[0], 0, os.SEEK_SET)
    started = time.monotonic()
    pid = start_case(config, fds, kernel)
    status = wait_with_timeout(pid, config["timeout"])
    seconds = time.monotonic() - started
    timed_out = status is None
    kill_case(config, pid)  # its leftovers, or itself after a timeout
    if timed_out:
        status = os.waitpid(pid, 0)[1]
    reap_children()
    outputs = []
    for fd, cap in ((fds[1], config["max_output_bytes"]), (fds[2], 2000)):
        size = os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, max(0, size - cap) if fd == fds[2] else 0, os.SEEK_SET)
        outputs.append(os.read(fd, min(size, cap)))
    for fd in fds:
        os.close(fd)
    record = {"returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out,
              "seconds": seconds, "stderr": outputs[1].decode("utf-8", "replace"),
              "stdout_bytes": len(outputs[0])}
    return record, outputs[0]


def supervise(config: dict, result_fd: int, control_fd: int, kernel: Kernel | None) -> None:
    """Stdio mode: for each case the host sends (8-byte length + stdin), run the
    program once as a plain program and send back a JSON line plus its stdout.
    A length of 2**64 - 1 means stop."""
    write = os.write
    program_path = PROGRAM if config["mount"] else os.path.join(config["cwd"], "program.py")
    if not config["mount"]:
        with open(program_path, "w", encoding="utf-8") as handle:
            handle.write(config["program"])
    config["program_path"] = program_path
    if kernel is not None:
        kernel.prctl(PR_SET_NO_NEW_PRIVS, 1)
        kernel.prctl(PR_SET_DUMPABLE, 0)  # programs of the same uid (user namespace) cannot ptrace it
    first = True
    while True:
        size = int.from_bytes(read_exact(control_fd, 8), "little")
        if size == (1 << 64) - 1:
            os._exit(0)
        stdin = read_exact(control_fd, size)
        if config["mount"] and not first:
            fresh_tmp(kernel, config["tmp_mb"])
        first = False
        record, stdout = run_case(config, stdin, kernel)
        write(result_fd, json_line(record))
        view = memoryview(stdout)
        while view:
            view = view[write(result_fd, view):]


def main(config: dict, bridge, result_fd: int, control_fd: int, tests_fd: int) -> None:
    """Entry point, called by the host's start-up code (`runner.BOOT`) with the job
    and the bridge module it loaded."""
    try:
        kernel = setup(config)
    except BaseException as exc:  # the host reports it as a sandbox failure, not the program's
        os.write(result_fd, json_line({"status": "sandbox", "error": bridge.describe(exc)}))
        os._exit(3)
    if config["mode"] == "assert":
        os.close(control_fd)
        judge(config, bridge, result_fd, tests_fd, kernel)
    else:
        os.close(tests_fd)
        supervise(config, result_fd, control_fd, kernel)
