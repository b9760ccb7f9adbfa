"""The value table's metadata keys, and a reader of its gate record: without torch,
so that the report (which must not import torch) reads a critic's gate and lambda
from the table itself (wmtp.stages.value_table writes them)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

META_FORMAT = b"wmtp.format"
FORMAT = "wmtp-value-table"
META_BASE = b"wmtp.base_model"
META_BASE_FINGERPRINT = b"wmtp.base_model_fingerprint"
META_TOKENIZER = b"wmtp.tokenizer_hash"
META_SAMPLES = b"wmtp.n_samples"
META_SEED = b"wmtp.critic_seed"
META_GATE = b"wmtp.critic_gate"  # JSON: {"monte_carlo": gate record, "head": gate record | null}
META_STRENGTH = b"wmtp.auto_strength"  # JSON number: lambda of `strength: auto`


def read_gate(path: str | Path) -> tuple[dict, float]:
    """(gate record, lambda of `strength: auto`) from a value table's metadata alone,
    without reading its rows."""
    raw = pq.read_schema(path).metadata or {}
    if raw.get(META_FORMAT) != FORMAT.encode():
        raise ValueError(f"{path}: not a value table written by wmtp.stages.value_table")
    return json.loads(raw[META_GATE]), float(json.loads(raw[META_STRENGTH]))
