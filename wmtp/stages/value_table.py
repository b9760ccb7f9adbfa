"""The critic's value table: V and delta for every training token, computed once on the frozen base.

critic-wmtp weights token j by the critic's delta_j. The critic stage
(wmtp.stages.critic) estimates the value of each line boundary of a training
solution by Monte Carlo on the frozen base model and gives every token of a
line that line's advantage (value after it minus value before it); the table
holds those numbers so that training only reads them (the values belong to the
frozen base, never to the model being fine-tuned). Layout, like the
reference-CE table (wmtp.stages.refce), one row per (sample_id, position >= 1)
of every training example:

    sample_id (string), position (int32), token_id (int32),
    value (float32): the critic's value at this position; NaN on the prompt
                     except its last token, whose value is V(s0), the state
                     before the solution
    delta (float32): the score training weights on the solution tokens and EOS
                     (the advantage of the token's line), NaN elsewhere

The schema metadata records the base model (path and fingerprint), the
tokenizer hash, the critic's seed, its gate (wmtp.stages.critic_gate: the
statistic, its interval and n) and the strength lambda that
`weighting.strength: auto` stands for.

`table_values` and `compute_values` serve a table whose values come from a
value head on the frozen trunk (delta_j = V_j - V_{j-1}); the tests' tables are
built that way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from wmtp.core.weights import critic_deltas
from wmtp.data.training import PACK_SEPARATOR, Example, collate, tokenizer_hash
from wmtp.infra.atomic import atomic_file
from wmtp.stages.refce import align_to_batch, read_per_token
from wmtp.stages.value_table_meta import (
    FORMAT,
    META_BASE,
    META_BASE_FINGERPRINT,
    META_FORMAT,
    META_GATE,
    META_SAMPLES,
    META_SEED,
    META_STRENGTH,
    META_TOKENIZER,
)

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("position", pa.int32()),
        ("token_id", pa.int32()),
        ("value", pa.float32()),
        ("delta", pa.float32()),
    ]
)


def base_model_fingerprint(model_dir: str | Path) -> str:
    """sha256 of the base model's config.json plus the name and size of each weight
    file: cheap even for 7B weights, and it changes when the base is rebuilt with
    other settings (the tiny base records its corpus hash and settings in config.json)."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.pth")):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()


def solution_start(example: Example) -> int:
    """Position of the first solution token (the first loss-mask 1); s0 is the one before."""
    if PACK_SEPARATOR in example.sample_id:
        raise ValueError("value tables are computed on unpacked examples (one sample per row)")
    mask = np.asarray(example.loss_mask, dtype=bool)
    if not mask.any() or not mask[np.argmax(mask) :].all():
        raise ValueError(
            f"example {example.sample_id}: loss mask is not one solution span at the end"
        )
    start = int(np.argmax(mask))
    if start < 1:
        raise ValueError(f"example {example.sample_id}: no prompt token before the solution")
    return start


def table_values(values: np.ndarray, loss_mask: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """V at positions 0..L-1 of one example (L,) and its loss mask -> the table's
    (value, delta) columns for positions 1..L-1, (L-1,) each: V from s0 (the last
    prompt token) on, delta = wmtp.core.weights.critic_deltas on the solution tokens
    (the first one's is V(first) - V(s0)), NaN elsewhere."""
    mask = np.asarray(loss_mask, dtype=bool)
    start = int(np.argmax(mask))
    value = values.astype(np.float32).copy()
    value[: start - 1] = np.nan  # the critic never learned prompt states before s0
    delta = critic_deltas(torch.from_numpy(value)[None], torch.from_numpy(mask)[None])[0].numpy()
    delta = np.where(mask, delta, np.nan).astype(np.float32)
    return value[1:], delta[1:]


@torch.inference_mode()
def compute_values(
    model,
    head: torch.nn.Module,
    examples: Sequence[Example],
    *,
    pad_id: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> list[np.ndarray]:
    """V at every position of each example, (L_i,) float32: the value head applied
    to the frozen trunk's output, as when it was fitted (wmtp.stages.critic)."""
    out: list[np.ndarray] = []
    for first in tqdm(range(0, len(examples), batch_size), desc="value table", unit="batch"):
        chunk = examples[first : first + batch_size]
        batch = collate(chunk, pad_id).to(device)
        padded = bool((batch.attention_mask == 0).any())
        hidden = model.trunk(batch.input_ids, batch.attention_mask if padded else None)[
            0
        ]  # (B, S, D)
        values = head(hidden).float().cpu().numpy()  # (B, S)
        out.extend(values[b, : len(e.input_ids)] for b, e in enumerate(chunk))
    return out


def write_value_table(
    examples: Sequence[Example],
    values: Sequence[np.ndarray],
    out_path: str | Path,
    meta: dict,
    deltas: Sequence[np.ndarray] | None = None,
) -> Path:
    """Atomic parquet write of the table (module docstring) with `meta` as schema
    metadata. `values` (and `deltas`) hold one (L,) array per example, position 0..L-1;
    without `deltas` the deltas are the value differences (`table_values`)."""
    ids, positions, tokens, value_col, delta_col = [], [], [], [], []
    for i, (example, v) in enumerate(zip(examples, values, strict=True)):
        solution_start(example)  # checks one solution span after a prompt
        if deltas is None:
            value, delta = table_values(np.asarray(v), example.loss_mask)
        else:
            value, delta = _given_columns(example, np.asarray(v), np.asarray(deltas[i]))
        n = len(example.input_ids) - 1
        ids.append(np.full(n, example.sample_id, dtype=object))
        positions.append(np.arange(1, n + 1, dtype=np.int32))
        tokens.append(np.asarray(example.input_ids[1:], dtype=np.int32))
        value_col.append(value)
        delta_col.append(delta)

    def joined(parts: list, dtype) -> np.ndarray:
        return np.concatenate(parts) if parts else np.array([], dtype=dtype)

    table = pa.Table.from_pydict(
        {
            "sample_id": pa.array(joined(ids, object), pa.string()),
            "position": pa.array(joined(positions, np.int32), pa.int32()),
            "token_id": pa.array(joined(tokens, np.int32), pa.int32()),
            "value": pa.array(joined(value_col, np.float32), pa.float32()),
            "delta": pa.array(joined(delta_col, np.float32), pa.float32()),
        },
        schema=SCHEMA,
    ).replace_schema_metadata(
        {META_FORMAT: FORMAT, **{k: str(v).encode() for k, v in meta.items()}}
    )
    out_path = Path(out_path)
    with atomic_file(out_path) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)  # read back with checks (refce.read_table)
    return out_path


def _given_columns(
    example: Example, value: np.ndarray, delta: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Positions 1..L-1 of given (L,) value and delta arrays, checked: a finite delta on
    every solution token (the trainer reads each one) and NaN off the solution."""
    mask = np.asarray(example.loss_mask, dtype=bool)
    if value.shape != mask.shape or delta.shape != mask.shape:
        raise ValueError(f"example {example.sample_id}: values/deltas do not match its {len(mask)} tokens")
    if not np.isfinite(delta[mask]).all():
        raise ValueError(f"example {example.sample_id}: a solution token has no finite delta")
    delta = np.where(mask, delta, np.nan).astype(np.float32)
    return value.astype(np.float32)[1:], delta[1:]


def table_metadata(
    base_model_dir: str | Path,
    tokenizer,
    n_samples: int,
    seed: int,
    statistic: float | None,
    *,
    gate: dict | None = None,
    strength: float | None = None,
) -> dict[bytes, str]:
    """The table's metadata: `gate` is the critic's gate record (wmtp.stages.critic_gate;
    default: just `statistic`), `strength` the lambda of `strength: auto` (default
    `auto_strength(statistic)`)."""
    gate = gate if gate is not None else {"value": statistic}
    return {
        META_BASE: str(base_model_dir),
        META_BASE_FINGERPRINT: base_model_fingerprint(base_model_dir),
        META_TOKENIZER: tokenizer_hash(tokenizer),
        META_SAMPLES: str(n_samples),
        META_SEED: str(seed),
        META_GATE: json.dumps(gate),
        META_STRENGTH: json.dumps(strength if strength is not None else auto_strength(statistic)),
    }


def auto_strength(statistic: float | None, interval: Sequence[float] | None = None) -> float:
    """lambda of `weighting.strength: auto`: the critic's gate statistic (Spearman's rho
    of its per-line deltas against fresh Monte-Carlo ones, wmtp.stages.critic_gate)
    clipped to [0, 1], and 0 when its interval reaches 0 or below. Not measurable
    (None) counts as 0: a critic of unknown worth gets no weight."""
    if statistic is None or not np.isfinite(statistic):
        return 0.0
    if interval is not None and not interval[0] > 0:
        return 0.0
    return float(np.clip(statistic, 0.0, 1.0))


class ValueTable:
    """In-memory value table for the trainer: `lookup` gives a batch's deltas."""

    def __init__(
        self,
        tokens: dict[str, np.ndarray],
        deltas: dict[str, np.ndarray],
        meta: dict[str, str],
    ) -> None:
        self.tokens = tokens  # sample_id -> token ids of positions 1..L-1
        self.deltas = deltas  # sample_id -> delta of positions 1..L-1 (NaN off the solution)
        self.meta = meta

    @property
    def gate(self) -> dict:
        """The critic's gate record (statistic, interval, n; wmtp.stages.critic_gate)."""
        return json.loads(self.meta[META_GATE.decode()])

    @property
    def strength(self) -> float:
        """The weight strength `auto` resolves to for this critic."""
        return float(json.loads(self.meta[META_STRENGTH.decode()]))

    @classmethod
    def from_parquet(
        cls, path: str | Path, *, tokenizer=None, base_model_dir: str | Path | None = None
    ) -> ValueTable:
        """Load a table; with `tokenizer` / `base_model_dir`, refuse one computed with
        another tokenizer or on another base model."""
        raw = pq.read_schema(path).metadata or {}
        if raw.get(META_FORMAT) != FORMAT.encode():
            raise ValueError(f"{path}: not a value table written by wmtp.stages.value_table")
        meta = {k.decode(): v.decode() for k, v in raw.items()}
        problems = []
        if tokenizer is not None and tokenizer_hash(tokenizer) != meta[META_TOKENIZER.decode()]:
            problems.append("it was computed with another tokenizer")
        if base_model_dir is not None and (
            base_model_fingerprint(base_model_dir) != meta[META_BASE_FINGERPRINT.decode()]
        ):
            problems.append(
                f"it was computed on base model {meta[META_BASE.decode()]}, whose fingerprint "
                f"differs from {base_model_dir}"
            )
        if problems:
            raise ValueError(f"{path}: {'; '.join(problems)}: rerun the critic stage")
        tokens, deltas = read_per_token(path, "delta")
        return cls(tokens, deltas, meta)

    def __len__(self) -> int:
        return len(self.deltas)

    def lookup(
        self, sample_ids: Sequence[str], input_ids: torch.Tensor, loss_mask: torch.Tensor
    ) -> torch.Tensor:
        """delta `(B, S)` float32 indexed by target token for a (right-padded, possibly
        packed) batch, 0 off the solution. Raises ValueError on a missing sample, a
        token id that differs from the table's, or a loss-mask token without a delta."""
        return align_to_batch(
            self.tokens, self.deltas, sample_ids, input_ids, loss_mask, "value table", "delta"
        )

    def check_covers(self, examples: Sequence[Example], pad_id: int, chunk: int = 64) -> None:
        """Look up every example once, before any training compute: a table of another
        data build fails here, not hours into training."""
        for first in range(0, len(examples), chunk):
            batch = collate(examples[first : first + chunk], pad_id)
            self.lookup(batch.sample_ids, batch.input_ids, batch.loss_mask)
