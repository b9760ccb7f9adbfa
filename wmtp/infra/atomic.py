"""Atomic outputs: write into a temp file or directory next to the target, then
`os.replace` it into place.

Why: a job killed mid-write (OOM, preemption, Ctrl-C) must never leave a file or
directory that looks finished, because Snakemake (and the stages reading each
other's outputs) judge completeness by existence. The temp sits in the target's
own directory so the final rename stays on one filesystem and is atomic; on any
exception it is removed and the exception propagates.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
        os.replace(tmp, path)
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
        os.replace(tmp, path)
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
