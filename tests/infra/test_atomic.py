"""Atomic outputs: the target appears only when the write finished, and a failed
write leaves neither the target nor a temp file/dir behind."""

from __future__ import annotations

import json

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
