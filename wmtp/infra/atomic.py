"""Atomic outputs: write into a temp file or directory next to the target, then
`os.replace` it into place.

Why: a job killed mid-write (OOM, preemption, Ctrl-C) must never leave a file or
directory that looks finished, because Snakemake (and the stages reading each
other's outputs) judge completeness by existence. The temp sits in the target's
own directory so the final rename stays on one filesystem and is atomic; on any
exception it is removed and the exception propagates.

Two more things a shared cluster needs. Permissions: `mkstemp`/`mkdtemp` create
0600/0700, which would keep group members (and an MLflow or web server reading
the results) out whatever the user's umask says; outputs get the modes a plain
`open`/`mkdir` would give (0666 / 0777 less the umask). Durability: the data is
fsync'd before the rename and the directory after it, so a node that crashes
right after a job "finished" cannot leave a complete-looking empty file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """The process's umask (reading it means setting it: set and restore at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory, deepest first."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            if not os.path.islink(os.path.join(dirpath, name)):
                _fsync(Path(dirpath, name))
        _fsync(Path(dirpath))


def publish(tmp: Path, path: Path) -> None:
    """Make a finished temp file or directory durable, give it the umask's modes,
    and rename it onto `path` (which, for a directory, must not exist)."""
    mask = current_umask()
    os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~mask)
    if tmp.is_dir():
        _fsync_tree(tmp)
    else:
        _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


@contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path next to `path` (created empty and closed) for the caller
    to write; on normal exit it replaces `path`, on an exception it is removed.

    `suffix` is for writers that infer the format from the name (e.g. ".png")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temp directory next to `path` for the caller to fill; on normal
    exit an existing `path` directory is removed and the temp dir renamed onto it,
    on an exception the temp dir is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return path


def write_json_atomic(
    path: str | Path, payload: dict, *, indent: int | None = 2, sort_keys: bool = True
) -> Path:
    """Write `payload` as JSON plus a newline to `path` atomically: the one JSON
    writer of the package, so every JSON output is complete or absent.

    Indented and key-sorted by default (manifests: the same bytes whatever order
    the dict was built in); `sort_keys=False` keeps the payload's insertion order,
    the order a reader should see (evaluation summaries, critic metrics)."""
    return write_text_atomic(path, json.dumps(payload, indent=indent, sort_keys=sort_keys) + "\n")
