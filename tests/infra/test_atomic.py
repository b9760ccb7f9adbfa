"""Atomic outputs: the target appears only when the write finished, and a failed
write leaves neither the target nor a temp file/dir behind."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from wmtp.infra import storage
from wmtp.infra.atomic import atomic_dir, atomic_file, write_json_atomic, write_text_atomic


class Boom(Exception):
    pass


def test_atomic_file_success_writes_target_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp.exists() and tmp != target
        assert not target.exists()  # nothing looks finished while writing
        tmp.write_text("hello")
    assert target.read_text() == "hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_file_keeps_suffix(tmp_path):
    with atomic_file(tmp_path / "fig.png", suffix=".png") as tmp:
        assert tmp.suffix == ".png"
        tmp.write_bytes(b"png")
    assert (tmp_path / "fig.png").read_bytes() == b"png"


def test_atomic_file_exception_leaves_nothing(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(Boom), atomic_file(target) as tmp:
        tmp.write_text("partial")
        raise Boom
    assert list(tmp_path.iterdir()) == []


def test_atomic_file_exception_keeps_existing_target(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(Boom), atomic_file(target) as tmp:
        tmp.write_text("new")
        raise Boom
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_file_replaces_existing_and_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    write_text_atomic(target, "one")
    assert target.read_text() == "one"
    write_text_atomic(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_atomic_dir_success(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        assert tmp.is_dir() and tmp.parent == tmp_path and not target.exists()
        (tmp / "weights").write_text("w")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text("x")
    assert (target / "weights").read_text() == "w"
    assert (target / "sub" / "x").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_dir_replaces_existing_dir(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "fresh").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["fresh"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_dir_exception_leaves_nothing(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(Boom), atomic_dir(target) as tmp:
        (tmp / "weights").write_text("partial")
        raise Boom
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_exception_keeps_existing_dir(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(Boom), atomic_dir(target) as tmp:
        (tmp / "new").write_text("new")
        raise Boom
    assert sorted(p.name for p in target.iterdir()) == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_dir_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "model"
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("f")
    assert (target / "f").read_text() == "f"


def test_write_json_atomic_format_and_storage_reexport(tmp_path):
    path = write_json_atomic(tmp_path / "x" / "m.json", {"b": 1, "a": [1, 2]})
    assert path.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"
    kept = write_json_atomic(path=tmp_path / "k.json", payload={"b": 1, "a": 2}, sort_keys=False)
    assert kept.read_text() == '{\n  "b": 1,\n  "a": 2\n}\n'
    assert write_json_atomic(tmp_path / "c.json", {"a": 1}, indent=None).read_text() == '{"a": 1}\n'
    assert storage.write_json_atomic is write_json_atomic


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_get_the_users_umask(tmp_path, umask):
    """Not mkstemp's 0600 / mkdtemp's 0700: what open() and mkdir() would give."""
    with atomic_file(tmp_path / "a.txt") as tmp:
        tmp.write_text("x")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "inner").mkdir()
        (tmp / "inner" / "f.bin").write_bytes(b"y")
    assert _mode(tmp_path / "a.txt") == 0o666 & ~umask
    assert _mode(tmp_path / "d") == 0o777 & ~umask
    assert _mode(tmp_path / "d" / "inner") == 0o777 & ~umask
    assert _mode(tmp_path / "d" / "inner" / "f.bin") == 0o666 & ~umask


def test_a_stage_output_is_group_readable_under_umask_022(tmp_path, umask):
    """A real stage's parquet and manifest (the download of tiny-mbpp)."""
    from wmtp.config.schema import TinySettings
    from wmtp.stages import download

    out = download.download_dataset("tiny-mbpp", "test", tmp_path / "data" / "test.parquet",
                                    tiny=TinySettings(n_train_problems=4, n_test_problems=2, n_validation_problems=2))
    for path in (out, download.manifest_path(out)):
        assert _mode(path) == 0o666 & ~umask, path
    assert bool(_mode(out) & stat.S_IRGRP) == (umask == 0o022)


def test_data_is_fsynced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b))[1])
    with atomic_file(tmp_path / "out.txt") as tmp:
        tmp.write_text("data")
    assert events == [("fsync", str(tmp)), ("replace", str(tmp)), ("fsync", str(tmp_path))]
    events.clear()
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "w.bin").write_bytes(b"w")
    assert events == [("fsync", str(tmp / "w.bin")), ("fsync", str(tmp)), ("replace", str(tmp)),
                      ("fsync", str(tmp_path))]
