"""Per-run control groups: a memory and a process-count cap on everything one
sandboxed program starts, forks included.

Why: per-process rlimits cap each process alone (four forked processes held
2.4 GB under a 1 GB RLIMIT_AS); a cgroup caps their sum, and its OOM killer
ends the run instead of the machine's. cgroup v2 is used where this process may
create children with the memory and pids controllers enabled; otherwise v1's
memory and pids hierarchies (as on our machines); otherwise `detect()` returns
None and the caller falls back to rlimits (and says so). A run's groups are
created under this process's own groups, so a job scheduler's limits still hold.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "wmtp-sandbox"
CONTROLLERS = ("memory", "pids")


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, super options) of every cgroup mount."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, _, options = right.split(" ")[:3]
        if fstype in ("cgroup", "cgroup2"):
            found.append((left.split(" ")[4], fstype, set(options.split(","))))
    return found


def _own_paths() -> dict[str, str]:
    """controller (or "" for v2) -> this process's cgroup path."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path
    return paths


@dataclass(frozen=True)
class Backend:
    """Where run groups are made: v2 `{"": parent}` or v1 `{"memory": .., "pids": ..}`."""

    version: int
    parents: dict[str, Path]


@dataclass(frozen=True)
class RunGroup:
    """The groups of one run. The sandbox joins them by writing 0 to each
    `procs_files` entry before it starts anything."""

    backend: Backend
    dirs: dict[str, Path]

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of this run for memory."""
        name = "memory.events" if self.backend.version == 2 else "memory.oom_control"
        directory = self.dirs["" if self.backend.version == 2 else "memory"]
        with contextlib.suppress(OSError):
            for line in (directory / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        return False

    def pids(self) -> list[int]:
        found = set()
        for procs in self.procs_files:
            with contextlib.suppress(OSError):
                found.update(int(p) for p in Path(procs).read_text().split())
        return sorted(found)

    def remove(self) -> None:
        """Kill whatever is left and delete the groups (retrying while the dying
        processes leave)."""
        for _ in range(200):
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            left = []
            for directory in self.dirs.values():
                try:
                    directory.rmdir()
                except FileNotFoundError:
                    continue
                except OSError:
                    left.append(directory)
            if not left:
                return
            time.sleep(0.005)


def _write(path: Path, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


def create(backend: Backend, memory_bytes: int, max_pids: int) -> RunGroup:
    """New groups for one run, limits set (swap counted with memory where the
    kernel accounts for it, so a run cannot spill to swap instead)."""
    name = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(4)}"
    dirs = {key: parent / name for key, parent in backend.parents.items()}
    for directory in dirs.values():
        directory.mkdir()
    group = RunGroup(backend, dirs)
    try:
        if backend.version == 2:
            _write(dirs[""] / "memory.max", str(memory_bytes))
            if (dirs[""] / "memory.swap.max").exists():
                _write(dirs[""] / "memory.swap.max", "0")
            _write(dirs[""] / "pids.max", str(max_pids))
        else:
            _write(dirs["memory"] / "memory.limit_in_bytes", str(memory_bytes))
            if (dirs["memory"] / "memory.memsw.limit_in_bytes").exists():
                _write(dirs["memory"] / "memory.memsw.limit_in_bytes", str(memory_bytes))
            _write(dirs["pids"] / "pids.max", str(max_pids))
    except BaseException:
        group.remove()
        raise
    return group


def _candidates() -> list[Backend]:
    own = _own_paths()
    v2, v1 = [], {}
    for mount, fstype, options in _mounts():
        if fstype == "cgroup2" and "" in own:
            v2.append(Backend(2, {"": Path(mount) / own[""].lstrip("/")}))
        for controller in CONTROLLERS:
            if fstype == "cgroup" and controller in options and controller in own:
                v1[controller] = Path(mount) / own[controller].lstrip("/")
    if set(v1) == set(CONTROLLERS):
        v2.append(Backend(1, v1))
    return v2


def _remove_stale(backend: Backend) -> None:
    """Groups left by an evaluator that was killed: remove those whose owner is gone."""
    for parent in backend.parents.values():
        for directory in parent.glob(f"{PREFIX}-*"):
            owner = directory.name.split("-")[2]
            if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                RunGroup(backend, {"": directory}).remove()


def detect() -> Backend | None:
    """The first backend in which a test group with both limits can be made."""
    for backend in _candidates():
        if backend.version == 2:
            controllers = (backend.parents[""] / "cgroup.subtree_control")
            with contextlib.suppress(OSError):
                if not set(CONTROLLERS) <= set(controllers.read_text().split()):
                    _write(controllers, " ".join(f"+{c}" for c in CONTROLLERS))
        try:
            create(backend, 64 << 20, 8).remove()
        except OSError:
            continue
        with contextlib.suppress(OSError):
            _remove_stale(backend)
        return backend
    return None
