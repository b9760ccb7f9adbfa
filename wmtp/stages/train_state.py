"""The trainer's checkpoints: what makes a training resumable, and how it resumes.

Every `checkpoint_every` steps (and at the end) a DeepSpeed checkpoint
`out_dir/checkpoints/step{n}` stores model, optimizer, scheduler and a client state
(step, tokens seen, wall time, RNG states, MLflow run id); only the newest is kept.
A checkpoint resumes only a training of the same identity (`run_fingerprint`: the
resolved settings and the input files); one of anything else is deleted and the
training starts over. The data order is a pure function of (seed, step), so a
resumed run ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from wmtp.infra.atomic import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"
LATEST = "latest"


@dataclass(frozen=True)
class ResumePoint:
    """Where the loop starts: step 0 of a fresh training, or a checkpoint's state."""

    step: int = 0
    tokens: int = 0
    wall_time: float = 0.0
    mlflow_run_id: str | None = None
    client: dict = field(default_factory=dict)


def rng_state() -> dict:
    """Every RNG a training step may draw from, for the checkpoint's client state."""
    state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [state[0], state[1].tolist(), *state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_fingerprint(resolved: dict, inputs: Sequence[str | Path | None]) -> str:
    """Identity of a training: resolved settings plus each input file's size and
    mtime (cheap even for 7B weights). A checkpoint of another identity is stale."""
    stats = []
    for path in inputs:
        files = sorted(Path(path).rglob("*")) if path and Path(path).is_dir() else [path]
        for file in files:
            if file is not None and Path(file).is_file():
                info = Path(file).stat()
                stats.append([str(file), info.st_size, info.st_mtime_ns])
    payload = json.dumps({"resolved": resolved, "inputs": stats}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def resumable(ckpt_dir: Path, fingerprint: str, rank: int, world: int) -> bool:
    """True when `ckpt_dir` holds a checkpoint of this very training. A checkpoint
    of other settings or inputs (the workflow reruns a job after a config change)
    is deleted, and training starts over instead of resuming something else."""
    marker = ckpt_dir / FINGERPRINT
    has_checkpoint = (ckpt_dir / LATEST).exists()
    same = marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fingerprint
    if world > 1:
        dist.barrier()  # every rank has looked before rank 0 deletes anything
    if has_checkpoint and same:
        return True
    if ckpt_dir.exists() and rank == 0:
        if has_checkpoint:
            log.warning(
                "%s holds a checkpoint of other settings or inputs: starting over", ckpt_dir
            )
        shutil.rmtree(ckpt_dir)
    if world > 1:
        dist.barrier()
    return False


def resume(
    engine, ckpt_dir: Path, fingerprint: str, rank: int, world: int, *, name: str
) -> ResumePoint:
    """Load this training's checkpoint into `engine` (and the RNGs) if there is one;
    otherwise start over, marking `ckpt_dir` with the training's fingerprint. `name`
    (the algorithm) only labels the log line."""
    if not resumable(ckpt_dir, fingerprint, rank, world):
        if rank == 0:
            write_json_atomic(path=ckpt_dir / FINGERPRINT, payload={"fingerprint": fingerprint})
        return ResumePoint()
    loaded, client = engine.load_checkpoint(str(ckpt_dir))
    if loaded is None:
        raise RuntimeError(f"could not load the DeepSpeed checkpoint in {ckpt_dir}")
    set_rng_state(client["rng"])
    log.info("resuming %s from step %d (%s)", name, client["step"], loaded)
    return ResumePoint(
        step=client["step"],
        tokens=client["tokens"],
        wall_time=client["wall_time"],
        mlflow_run_id=client.get("mlflow_run_id"),
        client=client,
    )


def save_checkpoint(
    engine, ckpt_dir: Path, step: int, rank: int, world: int, client_state: dict
) -> None:
    """DeepSpeed checkpoint `step{n}` (a collective call); then, once every rank has
    written its part, `latest` is pointed at it atomically and older ones are
    dropped. DeepSpeed's own `latest` is written in place: a job killed during that
    write would leave an empty `latest` and a checkpoint that cannot resume."""
    tag = f"step{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    if world > 1:
        dist.barrier()
    if rank == 0:
        write_text_atomic(ckpt_dir / LATEST, tag)
        for old in ckpt_dir.iterdir():
            if old.is_dir() and old.name.startswith("step") and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)


def last_good_checkpoint(ckpt_dir: Path) -> str:
    """Words for an error message: which checkpoint a rerun would resume from."""
    latest = ckpt_dir / LATEST
    if latest.exists():
        return f"the last good checkpoint ({latest.read_text().strip()}) is kept in {ckpt_dir}"
    return f"no checkpoint was written yet ({ckpt_dir})"
