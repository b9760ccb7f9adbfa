"""Storage: checksums, manifests, and an S3 round trip against moto on loopback."""

from __future__ import annotations

import json
import os

import boto3
import pytest

from tests.services import AWS_TEST_ENV, moto_server
from wmtp.infra import storage


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on a free loopback port with dummy credentials in the
    environment; yields its endpoint URL."""
    saved = {key: os.environ.get(key) for key in AWS_TEST_ENV}
    os.environ.update(AWS_TEST_ENV)
    with moto_server() as url:
        yield url
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


def test_upload_results_writes_files_then_a_manifest_download_prefix_checks(
    tmp_path, s3_endpoint, bucket
):
    run = tmp_path / "results" / "ci"
    (run / "figures").mkdir(parents=True)
    (run / "report.md").write_text("# table\n")
    (run / "figures" / "pass_at_k.png").write_bytes(b"\x89PNG fake")
    (run / "eval" / "a" / "seed0").mkdir(parents=True)
    (run / "eval" / "a" / "seed0" / "mbpp.json").write_text('{"pass@1": 0.5}')
    (run / "not-uploaded.txt").write_text("x")
    prefix = f"s3://{bucket}/runs/ci"
    manifest = storage.upload_results(
        run,
        [run / "report.md", run / "figures", run / "eval" / "a" / "seed0" / "mbpp.json"],
        prefix,
        endpoint_url=s3_endpoint,
        info={"run": "ci"},
    )
    assert list(manifest["files"]) == ["eval/a/seed0/mbpp.json", "figures/pass_at_k.png", "report.md"]
    assert manifest["run"] == "ci"
    fetched = storage.download_prefix(prefix, tmp_path / "fetched", endpoint_url=s3_endpoint)
    assert (fetched / "report.md").read_text() == "# table\n"
    assert json.loads((fetched / "manifest.json").read_text()) == manifest
    assert not (fetched / "not-uploaded.txt").exists()
    with pytest.raises(ValueError, match="is not under"):
        storage.upload_results(run, [tmp_path / "elsewhere"], prefix, endpoint_url=s3_endpoint)
