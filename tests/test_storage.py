"""Storage: checksums, manifests, and an S3 round trip against moto on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request

import boto3
import pytest

from wmtp import storage


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on a free loopback port (never 5000, MLflow's) with dummy
    credentials in the environment; yields its endpoint URL."""
    port = _free_port()
    while port == 5000:
        port = _free_port()
    dummy = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in dummy}
    os.environ.update(dummy)
    proc = subprocess.Popen(
        ["moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def bucket(s3_endpoint, request):
    name = "wmtp-" + request.node.name.lower().replace("_", "-")[:40]
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


def _make_tree(root):
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    (root / "sub" / "deeper" / "c.json").write_text('{"x": 1}')
    return root


def test_sha256_tree_matches_hashlib_and_ignores_manifest(tmp_path):
    import hashlib

    root = _make_tree(tmp_path / "t")
    tree = storage.sha256_tree(root)
    assert list(tree) == ["a.txt", "sub/b.bin", "sub/deeper/c.json"]
    assert tree["a.txt"] == hashlib.sha256(b"alpha\n").hexdigest()
    storage.write_manifest(root, {"source": "test"})
    assert storage.sha256_tree(root) == tree
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["source"] == "test" and manifest["files"] == tree


def test_verify_manifest_names_changed_file(tmp_path):
    root = _make_tree(tmp_path / "t")
    storage.write_manifest(root, {})
    storage.verify_manifest(root)
    (root / "a.txt").write_text("tampered\n")
    with pytest.raises(ValueError, match="changed a.txt"):
        storage.verify_manifest(root)


def test_parse_s3_uri_rejects_non_s3():
    assert storage.parse_s3_uri("s3://bkt/x/y/") == ("bkt", "x/y")
    with pytest.raises(ValueError, match="not an S3 URI"):
        storage.parse_s3_uri("/local/path")


def test_s3_round_trip_preserves_checksums(tmp_path, s3_endpoint, bucket):
    root = _make_tree(tmp_path / "src")
    storage.write_manifest(root, {"source": "test"})
    uploaded = storage.upload_dir(root, f"s3://{bucket}/runs/model", endpoint_url=s3_endpoint)
    assert "manifest.json" in uploaded
    out = storage.download_prefix(f"s3://{bucket}/runs/model", tmp_path / "dst", endpoint_url=s3_endpoint)
    assert storage.sha256_tree(out) == storage.sha256_tree(root)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst.")]


def test_download_prefix_rejects_tampered_object(tmp_path, s3_endpoint, bucket):
    root = _make_tree(tmp_path / "src")
    storage.write_manifest(root, {})
    storage.upload_dir(root, f"s3://{bucket}/m", endpoint_url=s3_endpoint)
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(Bucket=bucket, Key="m/a.txt", Body=b"evil")
    with pytest.raises(ValueError, match="changed a.txt"):
        storage.download_prefix(f"s3://{bucket}/m", tmp_path / "dst", endpoint_url=s3_endpoint)
    assert not (tmp_path / "dst").exists()
    assert not list(tmp_path.glob(".dst.*"))


def test_download_prefix_empty_prefix_is_clear_error(tmp_path, s3_endpoint, bucket):
    with pytest.raises(FileNotFoundError, match="no objects under"):
        storage.download_prefix(f"s3://{bucket}/nothing", tmp_path / "dst", endpoint_url=s3_endpoint)
