"""One program's effects stay with it: private size-limited /tmp,
/var/tmp and /dev/shm gone when the run ends; no leftover processes; the
project's files invisible; memory and process count capped per run by a cgroup
(or, where none can be made, one warning and per-process rlimits)."""

from __future__ import annotations

import secrets
import warnings
from pathlib import Path

import pytest

from wmtp.sandbox import cgroups
from wmtp.sandbox import runner as sandbox
from wmtp.sandbox.runner import TMP_MB, Job, _isolation, run_job, run_many

REPO = Path(__file__).resolve().parents[2]
ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "assert add(1, 2) == 3\n"


def needs_mount_namespace() -> None:
    if not _isolation().mount:
        pytest.skip("no mount namespace here (degraded sandbox: shared /tmp, said in a warning)")


def test_temporary_files_are_private_size_limited_and_gone():
    needs_mount_namespace()
    name = f"wmtp-leak-{secrets.token_hex(6)}"
    writer = (
        "import os\nwritten = {}\n"
        "for d in ('/tmp', '/var/tmp', '/dev/shm'):\n"
        f"    path = os.path.join(d, {name!r})\n    n = 0\n"
        "    try:\n        with open(path, 'wb') as f:\n"
        "            for _ in range(310):\n                f.write(b'x' * 2**20)\n                n += 1\n"
        "    except OSError:\n        pass\n    written[d] = n\n"
        f"assert all(0 < n <= {TMP_MB} for n in written.values()), written\n" + ADD
    )
    assert run_job(Job(writer, ADD_TESTS, memory_mb=1024)).passed
    for directory in ("/tmp", "/var/tmp", "/dev/shm"):
        assert not (Path(directory) / name).exists(), f"{directory}/{name} outlived its run"


def test_a_file_left_by_one_run_does_not_break_the_next():
    """Run 1 leaves a private file where run 2 writes; run 2 must still pass."""
    needs_mount_namespace()
    squatter = "import os\nfd = os.open('/tmp/answer.txt', os.O_CREAT | os.O_WRONLY, 0o600)\n" + ADD
    user = "open('/tmp/answer.txt', 'w').write('3')\n" + ADD
    outcomes = run_many([Job(squatter, ADD_TESTS), Job(user, ADD_TESTS)], workers=1)
    assert [o.status for o in outcomes] == ["passed", "passed"]


def test_project_files_are_invisible():
    needs_mount_namespace()
    program = (
        f"import os\nassert not os.path.exists({str(REPO)!r})\n"
        f"assert not os.path.exists({str(REPO / 'tests' / 'fixtures' / 'mbpp.jsonl')!r})\n"
        "assert os.listdir('/tmp') == []\n" + ADD
    )
    assert run_job(Job(program, ADD_TESTS)).passed


def test_no_process_outlives_its_run():
    marker = f"wmtp-daemon-{secrets.token_hex(6)}"
    daemon = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        f"        import sys\n        sys.argv[:] = [{marker!r}]\n        time.sleep(60)\n"
        "    os._exit(0)\n" + ADD
    )
    assert run_job(Job(daemon, ADD_TESTS)).passed
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                assert marker.encode() not in (entry / "cmdline").read_bytes()
            except OSError:
                continue


def test_hostile_programs_are_contained_and_fail(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    outside = tmp_path / "written_outside.txt"
    hostile = {
        "delete files": Job(f"import os\nos.remove({str(victim)!r})\n" + ADD, ADD_TESTS),
        "write outside": Job(f"open({str(outside)!r}, 'w').write('x')\n" + ADD, ADD_TESTS),
        "infinite loop": Job("while True:\n    pass\n", ADD_TESTS, timeout=1.0),
        "fork bomb": Job(
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
            ADD_TESTS, timeout=1.0,
        ),
        "memory bomb": Job("x = b'x' * (4 * 1024**3)\n" + ADD, ADD_TESTS, memory_mb=256),
        "stdio fork bomb": Job("import os\nwhile True:\n    try:\n        os.fork()\n"
                               "    except OSError:\n        pass\n", cases=(("", ""),), timeout=1.0),
    }
    honest = Job(ADD, ADD_TESTS)
    outcomes = run_many([honest, *hostile.values(), honest], workers=2)
    assert outcomes[0].passed and outcomes[-1].passed, "the evaluation must survive"
    statuses = dict(zip(hostile, (o.status for o in outcomes[1:-1]), strict=True))
    assert "passed" not in statuses.values(), statuses
    assert statuses["infinite loop"] == statuses["fork bomb"] == "timeout"
    assert statuses["memory bomb"] == "error"
    if _isolation().switch_uid or _isolation().mount:
        assert victim.read_text() == "keep me"
        assert not outside.exists()


def test_memory_is_capped_per_run_not_per_process():
    """Four forked processes of 150 MB each under a 256 MB limit: each is under
    RLIMIT_AS, together they are not. With a cgroup the run is an error."""
    if _isolation().cgroup is None:
        pytest.skip("no cgroup can be made here; the warning is tested below")
    program = (
        "import os, time\npids = []\nfor _ in range(4):\n    pid = os.fork()\n"
        "    if pid == 0:\n        block = b'x' * (150 << 20)\n        time.sleep(2)\n        os._exit(0)\n"
        "    pids.append(pid)\nfor pid in pids:\n    os.waitpid(pid, 0)\n" + ADD
    )
    outcome = run_job(Job(program, ADD_TESTS, memory_mb=256, timeout=20))
    assert outcome.status == "error" and "memory limit" in outcome.detail, outcome


def test_without_a_cgroup_one_warning_and_rlimits(monkeypatch):
    monkeypatch.setattr(cgroups, "detect", lambda: None)
    sandbox._isolation.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            iso = sandbox._isolation()
        assert iso.cgroup is None
        messages = [str(w.message) for w in caught if "cgroup" in str(w.message)]
        assert len(messages) == 1 and "RLIMIT_AS" in messages[0]
        big = run_job(Job("x = b'x' * (600 << 20)\n" + ADD, ADD_TESTS, memory_mb=256))
        assert big.status == "error" and "MemoryError" in big.detail
    finally:
        sandbox._isolation.cache_clear()

