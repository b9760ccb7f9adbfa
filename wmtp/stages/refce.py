"""Reference cross-entropy: the reference model's per-token loss over the training set.

Rho-1 weighting needs ce_ref[j] = -log p_ref(x_j | x_<j) for every training token
(the weights are indexed by the target token, docs/design.md). It is computed
once, before training, and stored as a parquet table with one row per
(sample_id, position >= 1):

    sample_id (string), position (int32), token_id (int32), ce_ref (float32)

The logits of position j-1 score token j, so row j is the CE of predicting token
j: the same index as the weight w[j] it feeds. Position 0 has no row: nothing
predicts the first token. All positions are
written, prompt included; trainers apply their loss mask. The schema metadata
records the reference model id, the tokenizer hash and the sample count, and
`RefCETable.lookup` aligns by (sample_id, position) and checks every token id,
so a table from another tokenizer or data build fails loudly instead of shifting.

Work can be split: shard i of n takes examples i::n and writes a part file;
`merge_shards` puts the parts back together in the original order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tqdm import tqdm

from wmtp.config.schema import DataSettings, is_mtp_model_config
from wmtp.core.checkpoints import load_model, verify_model_files
from wmtp.core.model import MTPModel
from wmtp.data.training import (
    PACK_SEPARATOR,
    Example,
    build_examples,
    check_same_vocabulary,
    collate,
    read_split,
    tokenizer_hash,
)
from wmtp.infra.atomic import atomic_file

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("position", pa.int32()),
        ("token_id", pa.int32()),
        ("ce_ref", pa.float32()),
    ]
)
META_MODEL = b"wmtp.ref_model"
META_TOKENIZER = b"wmtp.tokenizer_hash"
META_SAMPLES = b"wmtp.n_samples"
META_SHARD = b"wmtp.shard"  # "i/n" on part files only
META_TOTAL = b"wmtp.n_total_samples"  # samples over all shards


def load_reference(model_dir: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a reference model directory: ours (`is_mtp_model_config`; scored
    with head 0) or any HF causal LM. bf16 on GPU (the CE
    itself is computed in float32), float32 on CPU."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{model_dir}: no config.json; not a model directory")
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if is_mtp_model_config(json.loads(config_path.read_text())):
        model = load_model(model_dir, device=device).to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        verify_model_files(model_dir)  # the download stage's manifest
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device)
    return model.eval()


def next_token_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Next-token logits `(B, S, V)` of our MTP model (head 0) or an HF causal LM."""
    if isinstance(model, MTPModel):
        return model.next_token_logits(input_ids, attention_mask)
    return model(input_ids=input_ids, attention_mask=attention_mask).logits


def token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-target CE `(B, S-1)`: entry j-1 is -log p(x_j | x_<j), from the logits
    at position j-1. Computed in float32 whatever the model dtype, one row at a
    time, so the float32 log-softmax temporary is (S, V), not (B, S, V) (800 MB for
    a 49k vocabulary at B=8, S=512)."""
    # Targets shifted left with an ignored last slot: the logits are used in place
    # (no copy of a sliced (B, S-1, V) tensor).
    targets = F.pad(input_ids[:, 1:], (0, 1), value=-100)  # (B, S)
    rows = [
        F.cross_entropy(logits[b].float(), targets[b], reduction="none", ignore_index=-100)
        for b in range(input_ids.shape[0])
    ]
    return torch.stack(rows)[:, :-1]  # (B, S-1)


def _write_parquet(table: pa.Table, out_path: str | Path) -> Path:
    """Atomic parquet write: temp file in the target directory, then rename. Every
    page carries a CRC, so a damaged byte is caught when the table is read."""
    out_path = Path(out_path)
    with atomic_file(out_path) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)
    return out_path


def read_table(path: str | Path) -> pa.Table:
    """The whole table, page checksums verified; any unreadable, truncated or
    damaged file raises ValueError naming `path` (pyarrow's own messages do not)."""
    try:
        return pq.read_table(path, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as error:
        raise ValueError(
            f"{path}: not a readable reference-CE table ({error}); recompute it (rerun the refce stage)"
        ) from None


def check_table(path: str | Path) -> list[str]:
    """Problems of the reference-CE table at `path` that would stop (or silently
    distort) training, each naming the path: unreadable or damaged file, wrong
    columns, missing metadata, a part file, non-finite ce_ref. Trainers call it
    before any training work."""
    try:
        table = read_table(path)
    except ValueError as error:
        return [str(error)]
    problems = []
    if table.schema.remove_metadata() != SCHEMA:
        problems.append(f"{path}: columns {table.schema.remove_metadata()} are not {SCHEMA}")
    meta = table.schema.metadata or {}
    if META_TOKENIZER not in meta:
        problems.append(f"{path}: not a reference-CE table (no {META_TOKENIZER.decode()} metadata)")
    if META_SHARD in meta:
        problems.append(f"{path} is shard {meta[META_SHARD].decode()}; merge the parts first")
    if "ce_ref" in table.column_names:
        ce = table.column("ce_ref").to_numpy(zero_copy_only=False)
        if not np.isfinite(ce).all():
            problems.append(f"{path}: {int((~np.isfinite(ce)).sum())} ce_ref values are NaN or inf")
    return problems


def require_table(path: str | Path) -> None:
    """`check_table`, raising ValueError with every problem."""
    problems = check_table(path)
    if problems:
        raise ValueError("reference-CE table unusable:\n  - " + "\n  - ".join(problems))


def _table(
    sample_ids: list[str], token_rows: list[np.ndarray], ce_rows: list[np.ndarray], meta: dict
) -> pa.Table:
    """Rows for positions 1..L-1 of each sample, in the given sample order."""
    lengths = np.array([len(c) for c in ce_rows], dtype=np.int64)
    columns = {
        "sample_id": pa.array(np.repeat(np.array(sample_ids, dtype=object), lengths), pa.string()),
        "position": pa.array(
            np.concatenate([np.arange(1, n + 1, dtype=np.int32) for n in lengths])
            if len(lengths)
            else [],
            pa.int32(),
        ),
        "token_id": pa.array(np.concatenate(token_rows) if token_rows else [], pa.int32()),
        "ce_ref": pa.array(np.concatenate(ce_rows) if ce_rows else [], pa.float32()),
    }
    return pa.Table.from_pydict(columns, schema=SCHEMA).replace_schema_metadata(
        {k: str(v).encode() for k, v in meta.items()}
    )


@torch.inference_mode()
def compute_refce(
    ref_model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    out_path: str | Path,
    *,
    batch_size: int,
    device: str | torch.device = "cpu",
    model_id: str,
    shard: tuple[int, int] = (0, 1),
) -> Path:
    """Score `examples` (built with the pipeline's tokenizer, `tokenizer`) with the
    reference model and write the ce_ref table to `out_path`.

    Batches are formed from length-sorted examples so little compute goes to
    padding; rows are written in the examples' order. With `shard=(i, n)`, only
    examples i::n are scored and the file is a part for `merge_shards`.
    """
    index, n_shards = shard
    if not 0 <= index < n_shards:
        raise ValueError(f"shard {index}/{n_shards}: need 0 <= i < n")
    for example in examples:
        if PACK_SEPARATOR in example.sample_id:
            raise ValueError("compute reference CE on unpacked examples (one sample per row)")
    part = list(examples)[index::n_shards]
    ref_model.eval()
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    order = sorted(range(len(part)), key=lambda i: -len(part[i].input_ids))
    tokens_out: list[np.ndarray | None] = [None] * len(part)
    ce_out: list[np.ndarray | None] = [None] * len(part)
    total = sum(len(e.input_ids) for e in part)
    start = time.perf_counter()
    with tqdm(total=total, unit="tok", unit_scale=True, desc=f"ref CE {index}/{n_shards}") as bar:
        for first in range(0, len(order), batch_size):
            chosen = order[first : first + batch_size]
            batch = collate([part[i] for i in chosen], pad_id).to(device)
            padded = bool((batch.attention_mask == 0).any())
            logits = next_token_logits(
                ref_model, batch.input_ids, batch.attention_mask if padded else None
            )
            ce = token_ce(logits, batch.input_ids).cpu().numpy()  # (B, S-1)
            for row, i in enumerate(chosen):
                n = len(part[i].input_ids)
                ce_out[i] = ce[row, : n - 1].astype(np.float32)
                tokens_out[i] = np.asarray(part[i].input_ids[1:], dtype=np.int32)
            bar.update(batch.n_tokens)
            bar.set_postfix(tok_per_s=f"{bar.n / max(time.perf_counter() - start, 1e-9):.0f}")
    meta = {
        META_MODEL: model_id,
        META_TOKENIZER: tokenizer_hash(tokenizer),
        META_SAMPLES: len(part),
        META_TOTAL: len(examples),
    }
    if n_shards > 1:
        meta[META_SHARD] = f"{index}/{n_shards}"
    return _write_parquet(_table([e.sample_id for e in part], tokens_out, ce_out, meta), out_path)


def _metadata(path: str | Path) -> dict[bytes, bytes]:
    try:
        return pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as error:
        raise ValueError(f"{path}: not a readable parquet file ({error})") from None


def merge_shards(parts: Sequence[str | Path], out_path: str | Path) -> Path:
    """Concatenate the part files of one sharded run into the table an unsharded
    run writes (same rows, same order). Checks that every shard 0..n-1 is there
    once, that all parts agree on model and tokenizer, and that no sample appears
    twice or is missing."""
    if not parts:
        raise ValueError("merge_shards needs at least one part file")
    metas = [_metadata(p) for p in parts]
    problems = []
    for key in (META_MODEL, META_TOKENIZER, META_TOTAL):
        values = {m.get(key) for m in metas}
        if len(values) != 1:
            problems.append(f"parts disagree on {key.decode()}: {sorted(str(v) for v in values)}")
    shards = {}
    for path, meta in zip(parts, metas, strict=True):
        if META_SHARD not in meta:
            if len(parts) == 1:
                shards[(0, 1)] = path
                continue
            problems.append(f"{path} is not a part file (no {META_SHARD.decode()} metadata)")
            continue
        i, n = (int(x) for x in meta[META_SHARD].decode().split("/"))
        if (i, n) in shards:
            problems.append(f"shard {i}/{n} given twice: {shards[(i, n)]} and {path}")
        shards[(i, n)] = path
    counts = {n for _, n in shards}
    if len(counts) > 1:
        problems.append(f"parts come from different shard counts {sorted(counts)}")
    elif counts:
        n = counts.pop()
        missing = sorted(set(range(n)) - {i for i, _ in shards})
        if missing:
            problems.append(f"missing shard(s) {missing} of {n}")
    if problems:
        raise ValueError("cannot merge reference-CE parts:\n  " + "\n  ".join(problems))

    n_shards = len(shards)
    by_shard = []
    for i in range(n_shards):
        frame = read_table(shards[(i, n_shards)]).to_pandas()
        by_shard.append([g for _, g in frame.groupby("sample_id", sort=False)])
    # Shard i held examples i, i+n, i+2n, ...: interleave back to the original order.
    ordered = [
        by_shard[i][r]
        for r in range(max(len(s) for s in by_shard))
        for i in range(n_shards)
        if r < len(by_shard[i])
    ]
    merged = (
        pd.concat(ordered, ignore_index=True) if ordered else pd.DataFrame(columns=SCHEMA.names)
    )
    ids = [g["sample_id"].iloc[0] for g in ordered]
    duplicates = sorted({s for s in ids if ids.count(s) > 1})
    n_total = int(metas[0][META_TOTAL])
    if duplicates or len(ids) != n_total:
        raise ValueError(
            f"merged parts hold {len(ids)} samples, expected {n_total}"
            + (f"; duplicated sample ids {duplicates[:10]}" if duplicates else "")
        )
    meta = {
        META_MODEL: metas[0][META_MODEL].decode(),
        META_TOKENIZER: metas[0][META_TOKENIZER].decode(),
        META_SAMPLES: n_total,
        META_TOTAL: n_total,
    }
    table = pa.Table.from_pandas(merged, schema=SCHEMA, preserve_index=False)
    return _write_parquet(
        table.replace_schema_metadata({k: str(v).encode() for k, v in meta.items()}), out_path
    )


class RefCETable:
    """In-memory ce_ref table for trainers: `lookup` turns a batch into a (B, S)
    tensor aligned with its tokens."""

    def __init__(
        self, tokens: dict[str, np.ndarray], ce: dict[str, np.ndarray], model_id: str, tok_hash: str
    ):
        self.tokens = tokens  # sample_id -> token ids of positions 1..L-1
        self.ce = ce  # sample_id -> ce_ref of positions 1..L-1
        self.model_id = model_id
        self.tokenizer_hash = tok_hash

    @classmethod
    def from_parquet(cls, path: str | Path, tokenizer=None) -> RefCETable:
        """Load a table; with `tokenizer`, refuse one computed with another tokenizer."""
        meta = _metadata(path)
        if META_TOKENIZER not in meta:
            raise ValueError(
                f"{path}: not a reference-CE table (no {META_TOKENIZER.decode()} metadata)"
            )
        if META_SHARD in meta:
            raise ValueError(f"{path} is shard {meta[META_SHARD].decode()}; merge the parts first")
        tok_hash = meta[META_TOKENIZER].decode()
        if tokenizer is not None and tokenizer_hash(tokenizer) != tok_hash:
            raise ValueError(
                f"{path} was computed with tokenizer {tok_hash[:12]}, but the training tokenizer is "
                f"{tokenizer_hash(tokenizer)[:12]}: recompute the reference CE"
            )
        tokens, ce = read_per_token(path, "ce_ref")
        return cls(tokens, ce, meta[META_MODEL].decode(), tok_hash)

    def __len__(self) -> int:
        return len(self.ce)

    def lookup(
        self, sample_ids: Sequence[str], input_ids: torch.Tensor, loss_mask: torch.Tensor
    ) -> torch.Tensor:
        """ce_ref `(B, S)` float32 for a (right-padded, possibly packed) batch; 0 where
        there is no value (first token of a sample, padding).

        Raises ValueError when a sample is missing, when a stored token id differs
        from the batch's token at the same position, or when a loss-mask token gets
        no value: each would otherwise silently mis-weight tokens.
        """
        return align_to_batch(
            self.tokens, self.ce, sample_ids, input_ids, loss_mask, "reference-CE table", "ce_ref"
        )


def read_per_token(
    path: str | Path, column: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A per-token table (sample_id, position 1..L-1, token_id, `column`) as two
    dicts by sample id: token ids (int64) and `column` (float32), in position order.
    Read with `read_table`: page checksums verified, the path in every error."""
    frame = read_table(path).select(["sample_id", "position", "token_id", column]).to_pandas()
    frame = frame.sort_values(["sample_id", "position"], kind="stable")
    tokens, values = {}, {}
    for sample_id, group in frame.groupby("sample_id", sort=False):
        positions = group["position"].to_numpy()
        if not np.array_equal(positions, np.arange(1, len(positions) + 1)):
            raise ValueError(f"{path}: sample {sample_id} positions are not 1..{len(positions)}")
        tokens[sample_id] = group["token_id"].to_numpy(np.int64)
        values[sample_id] = group[column].to_numpy(np.float32)
    return tokens, values


def align_to_batch(
    tokens: dict[str, np.ndarray],
    values: dict[str, np.ndarray],
    sample_ids: Sequence[str],
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    table: str,
    column: str,
) -> torch.Tensor:
    """Per-token values of a table stored by (sample_id, position 1..L-1) -> `(B, S)`
    float32 aligned with a right-padded, possibly packed batch; 0 where there is no
    value (position 0 of a sample, padding, or a NaN in the table).

    `tokens[s]` / `values[s]` hold sample s's token ids and values of positions
    1..L-1. Raises ValueError when a sample is missing, when a stored token id
    differs from the batch's token at the same position, or when a loss-mask token
    gets no finite value (`table` and `column` name them in the message).
    """
    ids = input_ids.detach().cpu().numpy()  # (B, S)
    mask = loss_mask.detach().cpu().numpy().astype(bool)  # (B, S)
    out = np.zeros(ids.shape, dtype=np.float32)  # (B, S)
    covered = np.zeros(ids.shape, dtype=bool)
    for b, joined in enumerate(sample_ids):
        offset = 0
        for sample_id in joined.split(PACK_SEPARATOR):
            if sample_id not in values:
                raise ValueError(
                    f"sample {sample_id!r} is not in the {table} ({len(values)} samples)"
                )
            stored = tokens[sample_id]
            end = offset + 1 + len(stored)
            if end > ids.shape[1]:
                raise ValueError(
                    f"sample {sample_id!r}: table has {len(stored) + 1} tokens, batch row {b} has "
                    f"only {ids.shape[1] - offset} from offset {offset}"
                )
            actual = ids[b, offset + 1 : end]
            if not np.array_equal(actual, stored):
                j = int(np.flatnonzero(actual != stored)[0])
                raise ValueError(
                    f"token mismatch for sample {sample_id!r} at position {j + 1}: batch has "
                    f"{int(actual[j])}, {table} has {int(stored[j])} (different data build "
                    "or tokenizer?)"
                )
            finite = np.isfinite(values[sample_id])
            out[b, offset + 1 : end] = np.where(finite, values[sample_id], 0.0)
            covered[b, offset + 1 : end] = finite
            offset = end
    uncovered = mask & ~covered
    if uncovered.any():
        b, j = (int(x) for x in np.argwhere(uncovered)[0])
        raise ValueError(
            f"loss-mask token at row {b}, position {j} ({sample_ids[b]!r}) has no {column}"
        )
    return torch.from_numpy(out).to(input_ids.device)


def refce_stage(
    ref_dir: str | Path,
    base_dir: str | Path,
    data_path: str | Path,
    out_path: str | Path,
    data: DataSettings,
    *,
    model_id: str | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    shard: tuple[int, int] = (0, 1),
) -> Path:
    """The whole refce stage: check that the reference model shares the base
    tokenizer's vocabulary, build the training examples with the base tokenizer
    (the pipeline's tokenizer, so ids match what the trainer sees) and score them."""
    from transformers import AutoTokenizer

    base_tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    ref_tokenizer = AutoTokenizer.from_pretrained(str(ref_dir))
    check_same_vocabulary(base_tokenizer, ref_tokenizer, str(base_dir), str(ref_dir))
    rows = read_split(data_path, data.train_dataset, data.max_solutions_per_problem)
    examples = build_examples(rows, base_tokenizer, data.max_seq_len)
    model = load_reference(ref_dir, device=device)
    return compute_refce(
        model,
        base_tokenizer,
        examples,
        out_path,
        batch_size=batch_size,
        device=device,
        model_id=model_id or str(ref_dir),
        shard=shard,
    )
