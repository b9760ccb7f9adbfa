"""Files in and out of S3, checksums, and the manifests that record them.

Model and data directories travel between machines (a cluster's scratch, an S3
bucket, a laptop); a manifest of sha256 per file lets every stage check it got
exactly the bytes the download stage recorded. S3 goes through boto3 with an
optional `endpoint_url`, so any S3-compatible server (MinIO, moto on loopback in
the tests) works the same as AWS.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from wmtp.infra.atomic import atomic_dir, publish, write_json_atomic

MANIFEST_FILE = "manifest.json"
_CHUNK = 1 << 20


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix") (no trailing slash)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an S3 URI (expected s3://bucket/prefix): {uri!r}")
    return parsed.netloc, parsed.path.strip("/")


def s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client; credentials come from the usual AWS environment/config."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(path: str | Path, exclude: tuple[str, ...] = (MANIFEST_FILE,)) -> dict[str, str]:
    """sha256 of every file under `path`, keyed by POSIX relative path, sorted.

    The manifest itself is excluded by default so that writing it does not change
    the tree it describes. A single file maps to `{its name: sha256}`.
    """
    root = Path(path)
    if root.is_file():
        return {root.name: sha256_file(root)}
    if not root.is_dir():
        raise FileNotFoundError(f"no such file or directory: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {
        rel: sha256_file(p)
        for p in files
        if (rel := p.relative_to(root).as_posix()) not in exclude
    }


def write_manifest(directory: str | Path, info: dict, files: dict[str, str] | None = None) -> Path:
    """Write `directory/manifest.json`: the caller's `info` (source, id, revision...)
    plus `files` (relpath -> sha256; computed from the directory when omitted)."""
    directory = Path(directory)
    payload = {**info, "files": files if files is not None else sha256_tree(directory)}
    return write_json_atomic(directory / MANIFEST_FILE, payload)


def publish_with_manifest(out_dir: str | Path, build: Callable[[Path, Path], dict]) -> Path:
    """A model directory built by `build(directory, scratch)` (which returns the
    manifest's `info`) in a staging folder beside `out_dir`, given its checksum
    manifest and only then renamed onto `out_dir`: a killed job leaves no directory
    that looks finished. `scratch` is for downloads the result does not keep."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        built = stage / "model"
        write_manifest(built, build(built, stage))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        publish(built, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_dir


def verify_manifest(directory: str | Path) -> None:
    """Raise `ValueError` naming every file that is missing, extra or changed
    relative to the directory's manifest."""
    directory = Path(directory)
    recorded = json.loads((directory / MANIFEST_FILE).read_text())["files"]
    actual = sha256_tree(directory)
    problems = [f"missing {k}" for k in recorded if k not in actual]
    problems += [f"unrecorded {k}" for k in actual if k not in recorded]
    problems += [f"changed {k}" for k in recorded if k in actual and actual[k] != recorded[k]]
    if problems:
        raise ValueError(f"{directory} does not match its manifest: " + ", ".join(problems))


def _key(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def upload_dir(local: str | Path, s3_uri: str, endpoint_url: str | None = None) -> dict[str, str]:
    """Upload every file under `local` to `s3_uri/<relpath>`; return the sha256 of
    each uploaded file (relpath -> sha256), manifest included if present."""
    local = Path(local)
    if not local.is_dir():
        raise FileNotFoundError(f"upload_dir: {local} is not a directory")
    bucket, prefix = parse_s3_uri(s3_uri)
    client = s3_client(endpoint_url)
    checksums = sha256_tree(local, exclude=())
    for rel in checksums:
        client.upload_file(str(local / rel), bucket, _key(prefix, rel))
    return checksums


def upload_results(
    root: str | Path,
    paths: list[str | Path],
    s3_uri: str,
    endpoint_url: str | None = None,
    info: dict | None = None,
) -> dict:
    """Upload `paths` (files, or directories: every file below them), all under
    `root`, to `s3_uri/<path relative to root>`, then `s3_uri/manifest.json`.

    The manifest (`info` plus relpath -> sha256 of every uploaded file) goes last, so
    a prefix with a manifest holds a complete upload, and `download_prefix` checks
    the files against it. Keys under the prefix that this upload does not write are
    left alone. Returns the manifest."""
    root = Path(root).resolve()
    files: dict[str, str] = {}
    for path in map(Path, paths):
        try:
            rel = path.resolve().relative_to(root)
        except ValueError:
            raise ValueError(f"upload_results: {path} is not under {root}") from None
        base = rel if path.is_dir() else rel.parent
        for name, digest in sha256_tree(path, exclude=()).items():
            files[(base / name).as_posix()] = digest
    manifest = {**(info or {}), "files": dict(sorted(files.items()))}
    bucket, prefix = parse_s3_uri(s3_uri)
    client = s3_client(endpoint_url)
    for rel in manifest["files"]:
        client.upload_file(str(root / rel), bucket, _key(prefix, rel))
    body = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    client.put_object(Bucket=bucket, Key=_key(prefix, MANIFEST_FILE), Body=body.encode())
    return manifest


def _list_keys(client, bucket: str, prefix: str) -> list[str]:
    paginator = client.get_paginator("list_objects_v2")
    search = f"{prefix}/" if prefix else ""
    keys = []
    for page in paginator.paginate(Bucket=bucket, Prefix=search):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return keys


def download_prefix(s3_uri: str, local: str | Path, endpoint_url: str | None = None) -> Path:
    """Download every object under `s3_uri/` into directory `local`, atomically:
    objects land in a temp dir next to `local`, which is renamed into place only
    when all are there. If the prefix holds a manifest, the files are checked
    against it before the rename."""
    local = Path(local)
    bucket, prefix = parse_s3_uri(s3_uri)
    client = s3_client(endpoint_url)
    keys = [k for k in _list_keys(client, bucket, prefix) if not k.endswith("/")]
    if not keys:
        raise FileNotFoundError(f"no objects under {s3_uri}")
    with atomic_dir(local) as tmp:
        for key in keys:
            rel = key[len(prefix) + 1 :] if prefix else key
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target))
        if (tmp / MANIFEST_FILE).exists():
            verify_manifest(tmp)
    return local
