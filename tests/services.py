"""Real services for the end-to-end tests, started on loopback and stopped by PID:
an S3 API server (moto's server mode), an MLflow tracking server, a single-node
Slurm (scripts/slurm-node.sh), and the reduced tiny inputs they serve.

Each is a context manager, so a test or fixture owns exactly what it started.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Dummy credentials in the standard AWS variables: boto3 (and so every job) reads them.
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
RESERVED_PORTS = {5000, 6817, 6818}  # MLflow's and moto's default; Slurm's


def free_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Poll `url` until it answers (any HTTP status) or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise RuntimeError(f"{what} did not start (exit status {proc.poll()})") from None
            time.sleep(0.3)


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server we started (its whole process group), then kill it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=15)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """An S3 API server on a free loopback port; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url, proc, 30, "moto_server")
        yield url
    finally:
        stop(proc)


@contextlib.contextmanager
def mlflow_server(directory: Path) -> Iterator[str]:
    """`mlflow server` with a sqlite backend in `directory` on a free loopback port;
    yields its tracking URI. Job execution (a scheduler the tests do not need) is
    off: 2 processes and ~0.5 GB instead of ~9 and 2 GB."""
    port = free_port()
    log = open(directory / "mlflow-server.log", "w")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
            "--default-artifact-root", str(directory / "artifacts"), "--workers", "2",
        ],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", proc, 90, "mlflow server")
        yield url
    finally:
        stop(proc)
        log.close()


SLURM_NODE = REPO / "scripts" / "slurm-node.sh"


@contextlib.contextmanager
def slurm_node(state_dir: Path) -> Iterator[dict]:
    """A running single-node Slurm with 4 fake A100s (scripts/slurm-node.sh); yields
    {"partition", "cpus", "mem_mb"}. Needs root: elsewhere the test is skipped."""
    if os.geteuid() != 0:
        pytest.skip("a real Slurm needs root (apt-get install slurm-wlm munge, daemons)")
    env = {**os.environ, "SLURM_NODE_DIR": str(state_dir)}
    subprocess.run(["bash", str(SLURM_NODE), "install"], env=env, check=True, timeout=600)
    subprocess.run(["bash", str(SLURM_NODE), "start"], env=env, check=True, timeout=120)
    try:
        line = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%P %c %m"], capture_output=True, text=True, check=True
        ).stdout.split()
        yield {"partition": line[0].rstrip("*"), "cpus": int(line[1]), "mem_mb": int(line[2])}
    finally:
        subprocess.run(["bash", str(SLURM_NODE), "stop"], env=env, timeout=120)


def ci_config() -> dict:
    """config/config.yaml with config/ci.yaml merged over it, as Snakemake merges them."""
    from snakemake.utils import update_config

    merged = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    update_config(merged, yaml.safe_load((REPO / "config" / "ci.yaml").read_text()))
    return merged


def build_ci_inputs(dest: Path) -> Path:
    """The reduced run's models and tiny-mbpp splits, built as its download stage
    builds them, laid out as `models/{base,ref}/` and `data/tiny-mbpp/{split}.parquet`
    under `dest` (ready to upload as an S3 prefix)."""
    from wmtp.config.schema import load_config
    from wmtp.stages.download import download_dataset, download_model

    config, _ = load_config(ci_config(), base_dir=REPO)
    for role in ("base", "ref"):
        download_model(getattr(config.models, role), dest / "models" / role, tiny=config.tiny)
    for split in ("train", "test"):
        download_dataset(
            "tiny-mbpp", split, dest / "data" / "tiny-mbpp" / f"{split}.parquet", tiny=config.tiny
        )
    return dest

