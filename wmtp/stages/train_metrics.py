"""The trainer's metric rows: what a row holds, where it goes, and how it survives a kill.

A row (one per `log_every` steps, and at every validation) is the reduced `Window`
of micro-batches since the last row, the weight diagnostics of wmtp.stages.diagnostics
and, on validation steps, `val_loss`. Rank 0 appends it to `metrics.jsonl` (fsync'd,
so rows written before a crash are kept) and logs it to MLflow; at the end the rows
become `metrics.parquet` (`write_metrics_parquet`). A resumed training reads the
jsonl back (`MetricLog.resume`): rows it holds are never written twice, a torn last
line is dropped, and rows MLflow lacks (a kill between the two writes) are logged.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from wmtp.core import loss as loss_lib
from wmtp.data.training import Batch, Example, batch_indices, collate
from wmtp.infra import tracking as tracking_lib
from wmtp.infra.atomic import atomic_file
from wmtp.stages.diagnostics import COLUMNS as DIAGNOSTIC_COLUMNS

METRICS_JSONL = "metrics.jsonl"
WEIGHT_STATS = ("mean", "std", "min", "max", "frac_zero")


class Window:
    """Sums over the micro-batches since the last metric row (reduced over ranks)."""

    def __init__(self, n_heads: int, device: torch.device) -> None:
        # loss_sum, n_micro, tokens, w_sum, w_sq, w_zero, w_n, head_ce_sum[H]
        self.sums = torch.zeros(7 + n_heads, dtype=torch.float64, device=device)
        self.w_min = torch.full((1,), math.inf, dtype=torch.float64, device=device)
        self.w_max = torch.full((1,), -math.inf, dtype=torch.float64, device=device)
        self.started = time.perf_counter()

    def add(
        self, loss: torch.Tensor, head_ce: torch.Tensor, weights: torch.Tensor, batch: Batch
    ) -> None:
        w = weights.detach()[batch.loss_mask].double()  # (N,) valid tokens
        head = torch.as_tensor(head_ce, dtype=torch.float64, device=self.sums.device)
        stats = torch.stack(
            [
                loss.detach().double(),
                torch.ones((), dtype=torch.float64, device=w.device),
                batch.attention_mask.sum().double(),  # a tensor: no device sync per micro-step
                w.sum(),
                (w * w).sum(),
                (w == 0).sum().double(),
                torch.as_tensor(float(w.numel()), dtype=torch.float64, device=w.device),
            ]
        )
        self.sums += torch.cat([stats.to(self.sums.device), head])
        if w.numel():
            self.w_min = torch.minimum(self.w_min, w.min().reshape(1))
            self.w_max = torch.maximum(self.w_max, w.max().reshape(1))

    def reduce(self, world: int) -> dict:
        """All ranks call this together; returns the window's metrics."""
        if world > 1:
            dist.all_reduce(self.sums)
            dist.all_reduce(self.w_min, op=dist.ReduceOp.MIN)
            dist.all_reduce(self.w_max, op=dist.ReduceOp.MAX)
        loss_sum, n_micro, tokens, w_sum, w_sq, w_zero, w_n = self.sums[:7].tolist()
        head_ce = (self.sums[7:] / max(n_micro, 1)).tolist()
        mean = w_sum / max(w_n, 1)
        elapsed = time.perf_counter() - self.started
        return {
            "train_loss": loss_sum / max(n_micro, 1),
            **{f"head_ce_{k}": v for k, v in enumerate(head_ce)},
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "weight_mean": mean,
            "weight_std": math.sqrt(max(w_sq / max(w_n, 1) - mean * mean, 0.0)),
            "weight_min": float(self.w_min.item()),
            "weight_max": float(self.w_max.item()),
            "weight_frac_zero": w_zero / max(w_n, 1),
        }


@torch.no_grad()
def val_loss(
    model: torch.nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int, device
) -> dict[str, float]:
    """Unweighted CE of every head over the held-out examples: `val_head_ce_k` (head k's
    mean over its valid targets) and `val_loss` (their mean, the unweighted MTP loss).
    The same for every algorithm, so methods with different training objectives can be
    compared on it. Every rank evaluates all examples: the set is small, and ZeRO-3
    needs every rank to run the same forwards."""
    n_heads = model.n_heads
    if not examples:
        return {"val_loss": math.nan, **{f"val_head_ce_{k}": math.nan for k in range(n_heads)}}
    totals = torch.zeros(n_heads, dtype=torch.float64)  # (H,) sum of CE over valid targets
    counts = torch.zeros(n_heads, dtype=torch.float64)  # (H,) valid targets per head
    for first in range(0, len(examples), batch_size):
        batch = collate(examples[first : first + batch_size], pad_id).to(device)
        # looked up at call time: a test spies on the loss by replacing it in wmtp.core.loss
        out = loss_lib.weighted_mtp_loss_details(
            model, batch.input_ids, batch.loss_mask, batch.loss_mask.float(),
            attention_mask=batch.attention_mask,
        )  # fmt: skip
        valid = batch.loss_mask.bool() & batch.attention_mask.bool()  # (B, S) by target
        n = torch.tensor([float(valid[:, k + 1 :].sum()) for k in range(n_heads)], dtype=torch.float64)
        totals += out.head_ce.double().cpu() * n
        counts += n
    per_head = (totals / counts.clamp(min=1)).tolist()
    return {
        "val_loss": float(np.mean(per_head)),
        **{f"val_head_ce_{k}": ce for k, ce in enumerate(per_head)},
    }


def global_tokens(
    examples: Sequence[Example], global_batch: int, seed: int, micro_step: int
) -> int:
    """Tokens (padding excluded) of one micro-step over all ranks: a pure function of
    the step, like the batch order, so the count survives a resume exactly."""
    return sum(
        len(examples[i].input_ids)
        for i in batch_indices(len(examples), global_batch, seed, micro_step)
    )


def metric_columns(n_trained: int, n_heads: int) -> list[str]:
    """Columns of `metrics.parquet`: training CE of the `n_trained` trained heads,
    validation CE of all `n_heads` heads, weight statistics (overall and per token
    class, wmtp.stages.diagnostics)."""
    return [
        "step",
        "tokens",
        "wall_time",
        "train_loss",
        *[f"head_ce_{k}" for k in range(n_trained)],
        "val_loss",
        *[f"val_head_ce_{k}" for k in range(n_heads)],
        "lr",
        "tokens_per_s",
        *[f"weight_{s}" for s in WEIGHT_STATS],
        *DIAGNOSTIC_COLUMNS,
    ]


def write_metrics_parquet(
    rows: list[dict], path: Path, columns: list[str], metadata: dict[bytes, bytes] | None = None
) -> Path:
    """`metrics.parquet` (one row per logged step, `columns` from `metric_columns`),
    written atomically; `metadata` goes into the schema metadata (the weight probe of
    wmtp.stages.diagnostics)."""
    frame = pd.DataFrame(rows, columns=columns).astype({"step": "int64", "tokens": "int64"})
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **(metadata or {})})
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
    return path


def mlflow_metrics(row: dict) -> dict[str, float]:
    """A metric row under its MLflow names (`val/head{k}_ce` only on validation steps)."""
    metrics = {
        "train/loss": row["train_loss"],
        "val/loss": row.get("val_loss", math.nan),
        "train/lr": row["lr"],
        "perf/tokens_per_s": row["tokens_per_s"],
        "train/tokens": row["tokens"],
    }
    for column, value in row.items():
        head = column.removeprefix("val_head_ce_").removeprefix("head_ce_")
        if head.isdigit():
            metrics[f"{'val' if column.startswith('val_') else 'train'}/head{head}_ce"] = value
    metrics.update({f"weight_stats/{s}": row[f"weight_{s}"] for s in WEIGHT_STATS})
    metrics.update(
        {f"weight_by_class/{c.removeprefix('weight_on_')}": row[c] for c in DIAGNOSTIC_COLUMNS}
    )
    return metrics


def _read_rows(path: Path) -> list[dict]:
    """Metric rows of a previous (crashed) attempt; a torn last line is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _append_row(path: Path, row: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


@dataclass
class MetricLog:
    """Rank 0's record of one training's metric rows: `metrics.jsonl` and the MLflow
    run (a disabled `tracking_lib.Run` on other ranks and without MLflow)."""

    jsonl: Path
    rows: list[dict] = field(default_factory=list)
    run: tracking_lib.Run = field(default_factory=tracking_lib.Run)

    @property
    def logged_upto(self) -> int:
        """The last step with a row in the jsonl (0: none): a resumed loop recomputes
        the steps up to it but does not write their rows again."""
        return max((r["step"] for r in self.rows), default=0)

    @classmethod
    def resume(cls, out_dir: Path, *, start_step: int, rank: int) -> MetricLog:
        """The rows an earlier attempt wrote (rank 0; none when training starts over),
        the jsonl rewritten without a torn last line."""
        log = cls(out_dir / METRICS_JSONL)
        if rank == 0:
            if start_step == 0:
                log.jsonl.unlink(missing_ok=True)
            log.rows = _read_rows(log.jsonl)
            if log.rows:
                log.jsonl.write_text("".join(json.dumps(r) + "\n" for r in log.rows))
        return log

    def attach(self, run: tracking_lib.Run) -> None:
        """Log to `run` from now on, first the rows of the jsonl it lacks: a kill
        between a row's append to the jsonl and its MLflow call leaves it in the
        jsonl only, and the loop does not log rows it finds there again."""
        self.run = run
        if not run.enabled or not self.rows:
            return
        in_mlflow = run.last_step("train/loss")
        for row in self.rows:
            if row["step"] > in_mlflow:
                run.log_metrics(mlflow_metrics(row), row["step"])

    def record(self, row: dict) -> None:
        """Append a new row (rank 0) to the jsonl, then to MLflow; a row of a step
        an earlier attempt already wrote is dropped."""
        if row["step"] <= self.logged_upto:
            return
        _append_row(self.jsonl, row)
        self.rows.append(row)
        self.run.log_metrics(mlflow_metrics(row), row["step"])
