"""Weighted multi-token-prediction fine-tuning with DeepSpeed: one trainer, four algorithms.

Reads top to bottom: set-up (validate everything, distributed init, seeds) ->
model and data -> loop -> save. The algorithm only decides which inputs
`wmtp.core.weights.algorithm_weights` gets for a batch (DESIGN.md section 3):

    baseline-mtp     nothing (w = 1)
    rho1-weighted    ce_ref from the reference-CE table, ce_base = head-0 CE of the
    rho1-tokenskip   current model (online, given by the loss) or of a frozen copy
                     of the initial model (weighting.rho1_base = "frozen")
    critic-wmtp      deltas V_j - V_{j-1} from the critic stage's value table (computed
                     once on the frozen base; no value head runs here)

DeepSpeed config: the JSON template `TrainSettings.deepspeed_config` supplies the
ZeRO bucket knobs and AdamW's betas/eps; the trainer fills in what the recipe owns
(micro batch size, gradient accumulation, clipping, ZeRO stage, bf16, lr, weight
decay). The ZeRO stage is written only as `train.zero_stage`: a template that sets
one is refused (`wmtp.config.preflight.template_problems`). The learning rate
follows linear warmup then cosine decay to `min_lr_ratio * lr` (a torch `LambdaLR`
stepped by the engine).

Resume: every `checkpoint_every` steps (and at the end) a DeepSpeed checkpoint
`out_dir/checkpoints/step{n}` stores model, optimizer, scheduler and a client
state (step, tokens seen, RNG states, MLflow run id); only the newest is kept.
If `out_dir/checkpoints` holds a checkpoint of the same training (fingerprint of
the resolved settings and input files), training resumes there; a checkpoint of
anything else is deleted and training starts over. The data order
is a pure function of (seed, step) (`wmtp.data.training.iterate_batches`), so a resumed
run ends with exactly the weights of an uninterrupted one. Metric rows go to
`out_dir/metrics.jsonl` as they are produced (rows written before a crash are
kept, never written twice) and become `metrics.parquet` at the end.

Entry points: `train(...)` (library, Snakemake script) and
`python -m wmtp.stages.train --config ... --algorithm ... --seed ... --out ...` (one or
several processes: `torchrun --nproc_per_node N -m wmtp.stages.train ...`).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from wmtp.infra import tracking as tracking_lib
from wmtp.infra.atomic import atomic_file, write_text_atomic
from wmtp.core.checkpoints import (
    CONFIG_FILE,
    load_model,
    read_config,
    read_generation_config,
    save_model,
)
from wmtp.config.preflight import template_path, template_problems
from wmtp.config.schema import (
    ConfigError,
    DataSettings,
    Recipe,
    TrackingSettings,
    TrainSettings,
    optimizer_steps,
)
from wmtp.data.training import (
    Batch,
    Example,
    batch_indices,
    build_examples,
    collate,
    iterate_batches,
    pack,
    read_split,
    split_train_val,
)
from wmtp.stages.diagnostics import COLUMNS as DIAGNOSTIC_COLUMNS
from wmtp.stages.diagnostics import WeightDiagnostics

REPO = Path(__file__).resolve().parents[2]
# DeepSpeed JIT-builds a small op on first use (~1 min); a project-local cache keeps
# concurrent builds of other projects out of our way. Must be set before the import.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

log = logging.getLogger(__name__)

RHO1 = ("rho1-weighted", "rho1-tokenskip")
UNWEIGHTED = ("baseline-mtp", "ntp")  # weights need no input (w = 1)
CHECKPOINTS = "checkpoints"
METRICS_JSONL = "metrics.jsonl"
FINGERPRINT = "fingerprint.json"
METRICS_PARQUET = "metrics.parquet"
WEIGHT_STATS = ("mean", "std", "min", "max", "frac_zero")


class TrainingInterrupted(RuntimeError):
    """Raised by the `stop_after` test hook: the run stops as if killed."""


class NonFiniteLoss(FloatingPointError):
    """A NaN or inf loss stopped training (never skipped silently)."""


# ---------------------------------------------------------------------------- set-up


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup
    over `warmup_steps` (never 0, so the first step learns), then cosine from 1 down
    towards `min_lr_ratio` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min((step - warmup_steps) / max(max_steps - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(settings: TrainSettings, *, bf16: bool, device_type: str) -> dict:
    """The DeepSpeed config dict: the JSON template with the recipe's values filled in.
    Template paths are relative to the working directory (the workflow root), falling
    back to the repository."""
    config = json.loads(template_path(settings.deepspeed_config).read_text())
    optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    optimizer["type"] = "AdamW"
    params = optimizer.setdefault("params", {})
    params.update(lr=settings.lr, weight_decay=settings.weight_decay)
    if device_type == "cpu":
        params["torch_adam"] = True  # DeepSpeed's fused Adam needs compiled CUDA ops
    config.update(
        train_micro_batch_size_per_gpu=settings.micro_batch_size,
        gradient_accumulation_steps=settings.grad_accum_steps,
        gradient_clipping=settings.grad_clip,
        bf16={"enabled": bf16},
    )
    config.pop("train_batch_size", None)  # derived by DeepSpeed from the two above
    config["zero_optimization"] = {"stage": settings.zero_stage, **config.get("zero_optimization", {})}
    return config


def validate_setup(
    *,
    recipe: Recipe,
    data: DataSettings,
    max_steps: int | None,
    base_model_dir: str | Path,
    train_path: str | Path,
    refce_path: str | Path | None,
    critic_path: str | Path | None,
    device_type: str,
) -> None:
    """Every problem that would make the run fail (or silently mean something else),
    collected and raised at once as `ConfigError` before any model work. `max_steps`
    None: the steps follow from the epochs and the data, and warmup is checked once
    the examples are counted (still before any model work)."""
    settings, problems = recipe.train, []
    algorithm = recipe.algorithm
    if not (Path(base_model_dir) / CONFIG_FILE).exists():
        problems.append(
            f"base model: {base_model_dir} has no {CONFIG_FILE} (not a wmtp model directory)"
        )
    if not Path(train_path).exists():
        problems.append(f"training data: {train_path} not found")
    if algorithm in RHO1 and (refce_path is None or not Path(refce_path).exists()):
        problems.append(
            f"{algorithm} needs the reference-CE table (refce_path={refce_path!s}): "
            "run the refce stage"
        )
    if algorithm == "critic-wmtp" and (critic_path is None or not Path(critic_path).exists()):
        problems.append(
            f"critic-wmtp needs the critic stage's value table (critic_path={critic_path!s}): "
            "run the critic stage for this seed"
        )
    if max_steps is not None and settings.warmup_steps >= max_steps:
        problems.append(f"warmup_steps ({settings.warmup_steps}) must be < max_steps ({max_steps})")
    problems += template_problems("deepspeed_config", settings.deepspeed_config)
    if (
        settings.precision == "bf16"
        and device_type == "cuda"
        and not torch.cuda.is_bf16_supported()
    ):
        problems.append("precision = bf16 but this GPU has no bf16 support: use fp32")
    if problems:
        raise ConfigError(
            f"training set-up for {algorithm}: {len(problems)} problem(s)\n  - "
            + "\n  - ".join(problems)
        )


def _init_distributed(device_type: str) -> tuple[int, int]:
    """Join (or, alone, create) the process group; returns (rank, world size).

    A lone process (no launcher set RANK) gets an in-process store instead of a TCP
    rendezvous: a free port picked and released here could be taken by a parallel
    job before gloo binds it (seen as EADDRINUSE with two trainings at once)."""
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if not dist.is_initialized():
            backend = "gloo" if device_type == "cpu" else "nccl"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo" if device_type == "cpu" else "nccl")
    return dist.get_rank(), dist.get_world_size()


def _rng_state() -> dict:
    state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [state[0], state[1].tolist(), *state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_value_table(
    critic_path, tokenizer, base_model_dir, examples: Sequence[Example], pad_id: int
):
    """critic-wmtp's value table (wmtp.stages.value_table), checked against this tokenizer,
    this base model and every training example before any training compute."""
    from wmtp.stages.value_table import ValueTable

    try:
        table = ValueTable.from_parquet(
            critic_path, tokenizer=tokenizer, base_model_dir=base_model_dir
        )
        table.check_covers(examples, pad_id)
    except ValueError as error:
        raise ConfigError(f"critic-wmtp: {error}") from None
    log.info(
        "value table %s: explained variance %s, auto strength %.3f",
        critic_path,
        table.explained_variance,
        table.strength,
    )
    return table


# ------------------------------------------------------------------ weights per batch


@torch.no_grad()
def head0_ce(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Per-target-token head-0 CE `(B, S)` of `model` (0 at position 0 and off the
    loss mask): the frozen-base CE_base of rho1."""
    logits = model.next_token_logits(batch.input_ids, batch.attention_mask).float()  # (B, S, V)
    ce = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch.input_ids[:, 1:], reduction="none"
    )  # (B, S-1)
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=ce.device)  # (B, S)
    out[:, 1:] = ce * batch.loss_mask[:, 1:]
    return out


def make_weights(
    recipe: Recipe,
    batch: Batch,
    *,
    refce=None,
    frozen: torch.nn.Module | None = None,
    value_table=None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The `weights(ce_head0, trunk_hidden)` callable the loss calls for this batch."""
    from wmtp.core.weights import algorithm_weights

    algorithm, settings, mask = recipe.algorithm, recipe.weighting, batch.loss_mask
    if algorithm in UNWEIGHTED:
        return lambda ce_head0, trunk_hidden: algorithm_weights(algorithm, mask, settings)
    if algorithm in RHO1:
        if (frozen is not None) != (settings.rho1_base == "frozen"):  # the recipe decides
            raise ValueError(
                f"weighting.rho1_base is {settings.rho1_base!r} but a frozen base model was "
                f"{'given' if frozen is not None else 'not given'}"
            )
        ce_ref = refce.lookup(batch.sample_ids, batch.input_ids, mask).to(mask.device)  # (B, S)
        if frozen is not None:
            ce_base = head0_ce(frozen, batch)  # (B, S)
            return lambda ce_head0, trunk_hidden: algorithm_weights(
                algorithm, mask, settings, ce_base=ce_base, ce_ref=ce_ref
            )
        return lambda ce_head0, trunk_hidden: algorithm_weights(
            algorithm, mask, settings, ce_base=ce_head0.float(), ce_ref=ce_ref
        )

    deltas = value_table.lookup(batch.sample_ids, batch.input_ids, mask).to(mask.device)  # (B, S)
    return lambda ce_head0, trunk_hidden: algorithm_weights(
        algorithm, mask, settings, deltas=deltas, auto_strength=value_table.strength
    )


def check_finite_loss(
    loss: torch.Tensor, step: int, micro: int, batch: Batch, world: int, ckpt_dir: Path
) -> None:
    """Raise `NonFiniteLoss` naming the step, the micro-batch and its sample ids when
    any rank's loss is NaN or inf, before it reaches backward and the optimizer.
    All ranks call it together (one all-reduce), so all stop at the same point;
    the checkpoints on disk are untouched. Costs one device sync per micro-step."""
    bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)  # (1,)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() == 0:
        return
    latest = ckpt_dir / "latest"
    kept = f"the last good checkpoint ({latest.read_text().strip()}) is kept in {ckpt_dir}" if (
        latest.exists()) else f"no checkpoint was written yet ({ckpt_dir})"
    raise NonFiniteLoss(
        f"loss is {float(loss)} on this rank (non-finite on at least one rank) at step {step}, "
        f"micro-batch {micro + 1}, samples {list(batch.sample_ids)}; {kept}. A rerun with the "
        "same settings resumes there and meets the same batch: lower train.lr, check those "
        "samples, or (rho1) the reference-CE table"
    )


# --------------------------------------------------------------------------- metrics


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
            import torch.distributed as dist

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
    from wmtp.core.loss import weighted_mtp_loss_details

    n_heads = model.n_heads
    if not examples:
        return {"val_loss": math.nan, **{f"val_head_ce_{k}": math.nan for k in range(n_heads)}}
    totals = torch.zeros(n_heads, dtype=torch.float64)  # (H,) sum of CE over valid targets
    counts = torch.zeros(n_heads, dtype=torch.float64)  # (H,) valid targets per head
    for first in range(0, len(examples), batch_size):
        batch = collate(examples[first : first + batch_size], pad_id).to(device)
        out = weighted_mtp_loss_details(
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


def _log_missing_rows(run, rows: list[dict]) -> None:
    """Log the metrics.jsonl rows a resumed MLflow run lacks: a kill between a row's
    append to the jsonl and its MLflow call leaves it in the jsonl only, and the loop
    does not log rows it finds there again."""
    if not run.enabled or not rows:
        return
    in_mlflow = run.last_step("train/loss")
    for row in rows:
        if row["step"] > in_mlflow:
            run.log_metrics(mlflow_metrics(row), row["step"])


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


# ----------------------------------------------------------------------------- train


def train(
    *,
    base_model_dir: str | Path,
    train_path: str | Path,
    out_dir: str | Path,
    recipe: Recipe,
    data: DataSettings,
    seed: int,
    dataset_name: str,
    tracking: TrackingSettings,
    tracking_uri: str | None,
    refce_path: str | Path | None = None,
    critic_path: str | Path | None = None,
    run_name: str | None = None,
    tags: Sequence[tuple[str, str]] | dict = (),
    max_steps: int | None = None,
    device: str | None = None,
    stop_after: int | None = None,
) -> Path:
    """Fine-tune the MTP model in `base_model_dir` with `recipe` on `train_path`
    (MBPP-format parquet); write `out_dir/model/` (+ tracking.json) and
    `out_dir/metrics.parquet`. Returns the model directory.

    The optimizer steps follow from `recipe.train.epochs` and the number of training
    examples (`wmtp.config.schema.optimizer_steps`); `max_steps` replaces that number (smoke
    tests, the CLI's `--max-steps`). `tracking_uri` overrides
    `tracking.tracking_uri`, and with both None the store is
    `sqlite:///<out_dir>/mlflow.db` (the workflow passes `results/{run}/mlflow.db`).
    `stop_after=n` (tests) raises `TrainingInterrupted` right after step n, as if
    the job had been killed there.
    """
    # ---- set-up: validate, distributed, seeds
    settings, algorithm = recipe.train, recipe.algorithm
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    validate_setup(
        recipe=recipe,
        data=data,
        max_steps=max_steps,
        base_model_dir=base_model_dir,
        train_path=train_path,
        refce_path=refce_path,
        critic_path=critic_path,
        device_type=device_type,
    )
    if algorithm in RHO1:  # a damaged table fails here, not after DeepSpeed has started
        from wmtp.stages.refce import require_table

        require_table(refce_path)
    if refce_path is not None and algorithm not in RHO1:
        log.warning("refce_path given but %s does not use it; ignored", algorithm)
    if critic_path is not None and algorithm != "critic-wmtp":
        log.warning("critic_path given but %s does not use it; ignored", algorithm)
    import deepspeed
    from transformers import AutoTokenizer

    from wmtp.core.loss import weighted_mtp_loss_details
    from wmtp.core.weights import trained_heads

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = _init_distributed(device_type)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    run_device = torch.device(f"cuda:{local_rank}" if device_type == "cuda" else "cpu")
    bf16 = settings.precision == "bf16" or (settings.precision == "auto" and device_type == "cuda")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    # ---- model and data
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    model_config = read_config(base_model_dir)
    train_rows = read_split(train_path)
    examples = build_examples(train_rows, tokenizer, data.max_seq_len)
    if data.max_train_examples is not None:
        examples = examples[: data.max_train_examples]
    train_examples, val_examples = split_train_val(examples, data.val_fraction, seed)
    if data.pack:
        train_examples = pack(train_examples, data.max_seq_len)
    per_micro_step = settings.micro_batch_size * world
    try:
        steps = max_steps or optimizer_steps(settings, len(train_examples), world)
    except ValueError as error:
        raise ConfigError(f"training set-up for {algorithm}: {error}") from None
    if settings.warmup_steps >= steps:
        raise ConfigError(
            f"training set-up for {algorithm}: warmup_steps ({settings.warmup_steps}) must be < "
            f"the {steps} optimizer steps that {settings.epochs} epochs of "
            f"{len(train_examples)} examples give"
        )
    refce = frozen = value_table = None
    if algorithm in RHO1:
        from wmtp.stages.refce import RefCETable

        refce = RefCETable.from_parquet(refce_path, tokenizer=tokenizer)
        for first in range(0, len(train_examples), 64):  # every sample aligned before any compute
            batch = collate(train_examples[first : first + 64], pad_id)
            refce.lookup(batch.sample_ids, batch.input_ids, batch.loss_mask)
        if recipe.weighting.rho1_base == "frozen":
            frozen = load_model(base_model_dir, device=run_device).eval().requires_grad_(False)
            frozen = frozen.to(torch.bfloat16) if bf16 else frozen  # (its CE is taken in fp32)
    if algorithm == "critic-wmtp":
        value_table = load_value_table(
            critic_path, tokenizer, base_model_dir, train_examples, pad_id
        )
    diagnostics = WeightDiagnostics.for_training(train_rows, tokenizer, train_examples, run_device)

    model = load_model(base_model_dir)
    n_trained = trained_heads(algorithm, model_config.n_future_tokens)
    for head in model.heads[n_trained:]:  # ntp: heads 1..H-1 keep the base's weights
        head.requires_grad_(False)
    columns = metric_columns(n_trained, model_config.n_future_tokens)
    ds_config = deepspeed_config(settings, bf16=bf16, device_type=device_type)
    schedule = functools.partial(
        lr_factor,
        warmup_steps=settings.warmup_steps,
        max_steps=steps,
        min_lr_ratio=settings.min_lr_ratio,
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    resolved = {
        "algorithm": algorithm,
        "seed": seed,
        "dataset": dataset_name,
        "max_steps": steps,
        "world_size": world,
        "base_model": str(base_model_dir),
        "train_path": str(train_path),
        "refce_path": str(refce_path) if refce_path else None,
        "critic_path": str(critic_path) if critic_path else None,
        "recipe": recipe.model_dump(mode="json"),
        "data": data.model_dump(mode="json"),
        "deepspeed": ds_config,
    }

    # ---- resume
    ckpt_dir = out_dir / CHECKPOINTS
    fingerprint = run_fingerprint(resolved, [base_model_dir, train_path, refce_path, critic_path])
    start_step, tokens_seen, wall_before, client = 0, 0, 0.0, {}
    if not _resumable(ckpt_dir, fingerprint, rank, world):
        if rank == 0:
            _write_json_atomic(ckpt_dir / FINGERPRINT, {"fingerprint": fingerprint})
    else:
        loaded, client = engine.load_checkpoint(str(ckpt_dir))
        if loaded is None:
            raise RuntimeError(f"could not load the DeepSpeed checkpoint in {ckpt_dir}")
        start_step, tokens_seen, wall_before = client["step"], client["tokens"], client["wall_time"]
        _set_rng_state(client["rng"])
        log.info("resuming %s from step %d (%s)", algorithm, start_step, loaded)
    jsonl = out_dir / METRICS_JSONL
    rows: list[dict] = []
    if rank == 0:
        if start_step == 0:
            jsonl.unlink(missing_ok=True)
        rows = _read_rows(jsonl)
        if rows:  # rewrite without a torn last line
            jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    logged_upto = max((r["step"] for r in rows), default=0)
    run = tracking_lib.Run()
    uri = tracking_uri or tracking.tracking_uri or tracking_lib.default_tracking_uri(out_dir)
    experiment = tracking_lib.experiment_name(algorithm, dataset_name)
    if rank == 0 and tracking.mlflow:
        run = tracking_lib.start_run(
            uri,
            experiment,
            run_name=run_name or f"{algorithm}-seed{seed}",
            tags=dict(tags),
            params=resolved,
            run_id=client.get("mlflow_run_id"),
        )
        _log_missing_rows(run, rows)

    # ---- loop
    from tqdm import tqdm

    try:  # an attempt that raised (or got Ctrl-C) shows as FAILED in MLflow until resumed
        accum = settings.grad_accum_steps
        stream = iterate_batches(
            train_examples,
            settings.micro_batch_size,
            seed,
            pad_id,
            start_step=start_step * accum,
            rank=rank,
            world_size=world,
        )
        engine.train()
        window = Window(n_trained, run_device)
        started = time.perf_counter() - wall_before
        bar = tqdm(
            total=steps,
            initial=start_step,
            disable=rank != 0,
            desc=f"train {algorithm}",
            unit="step",
        )
        for step in range(start_step + 1, steps + 1):
            lr = float(engine.get_lr()[0])
            for micro in range(accum):
                micro_step, batch = next(stream)
                tokens_seen += global_tokens(train_examples, per_micro_step, seed, micro_step)
                batch = batch.to(run_device)
                weights = make_weights(
                    recipe, batch, refce=refce, frozen=frozen, value_table=value_table
                )
                out = weighted_mtp_loss_details(
                    engine.module,
                    batch.input_ids,
                    batch.loss_mask,
                    weights,
                    attention_mask=batch.attention_mask,
                    n_heads=n_trained,
                )
                check_finite_loss(out.loss, step, micro, batch, world, ckpt_dir)
                engine.backward(out.loss)
                engine.step()
                window.add(out.loss, out.head_ce, out.weights, batch)
                diagnostics.add(out.weights, batch, step)
            bar.update(1)
            is_val = step % settings.val_every == 0 or step == steps
            if step % settings.log_every == 0 or is_val:
                metrics = window.reduce(world)
                row = {
                    "step": step,
                    "tokens": tokens_seen,
                    "wall_time": time.perf_counter() - started,
                    "lr": lr,
                    **metrics,
                    **diagnostics.reduce(world),
                }
                if is_val:
                    row |= val_loss(
                        engine.module, val_examples, settings.micro_batch_size, pad_id, run_device
                    )
                window = Window(n_trained, run_device)
                if rank == 0 and step > logged_upto:
                    _append_row(jsonl, row)
                    rows.append(row)
                    run.log_metrics(mlflow_metrics(row), step)
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if step % settings.checkpoint_every == 0 or step == steps:
                _save_checkpoint(
                    engine,
                    ckpt_dir,
                    step,
                    rank,
                    world,
                    {
                        "step": step,
                        "tokens": tokens_seen,
                        "wall_time": time.perf_counter() - started,
                        "rng": _rng_state(),
                        "mlflow_run_id": run.run_id,
                    },
                )
            if stop_after is not None and step >= stop_after:
                bar.close()
                raise TrainingInterrupted(f"stopped after step {step} (stop_after={stop_after})")
        bar.close()
    except BaseException:
        run.finish("FAILED")
        raise

    # ---- save
    model_dir = out_dir / "model"
    probe = diagnostics.probe_metadata(world)  # a collective call
    if rank == 0:
        extra = {"algorithm": algorithm, "seed": seed, "resolved config": resolved}
        save_model(engine.module, model_dir, tokenizer=tokenizer, extra=extra,
                   generation_config=read_generation_config(base_model_dir))
    if rank == 0:
        tracking_lib.write_tracking_file(
            model_dir, uri if run.enabled else None, run.run_id, experiment if run.enabled else None
        )
        write_metrics_parquet(rows, out_dir / METRICS_PARQUET, columns, metadata=probe)
        run.finish()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return model_dir


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


def _write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload) + "\n")


def _resumable(ckpt_dir: Path, fingerprint: str, rank: int, world: int) -> bool:
    """True when `ckpt_dir` holds a checkpoint of this very training. A checkpoint
    of other settings or inputs (the workflow reruns a job after a config change)
    is deleted, and training starts over instead of resuming something else."""
    import torch.distributed as dist

    marker = ckpt_dir / FINGERPRINT
    has_checkpoint = (ckpt_dir / "latest").exists()
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


def _save_checkpoint(
    engine, ckpt_dir: Path, step: int, rank: int, world: int, client_state: dict
) -> None:
    """DeepSpeed checkpoint `step{n}` (a collective call); then, once every rank has
    written its part, `latest` is pointed at it atomically and older ones are
    dropped. DeepSpeed's own `latest` is written in place: a job killed during that
    write would leave an empty `latest` and a checkpoint that cannot resume."""
    tag = f"step{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank == 0:
        write_text_atomic(ckpt_dir / "latest", tag)
        for old in ckpt_dir.iterdir():
            if old.is_dir() and old.name.startswith("step") and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> Path:
    """`python -m wmtp.stages.train --config config/config.yaml --algorithm rho1-weighted --seed 0
    --out results/tiny/train/rho1-weighted/seed0`; input paths default to the
    pipeline's layout under `--results/{run}/`."""
    from wmtp.config.schema import load_config, load_recipe

    parser = argparse.ArgumentParser(
        prog="python -m wmtp.stages.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--config", required=True, help="pipeline config YAML (recipes resolved from it)"
    )
    parser.add_argument("--base-dir", default=".", help="directory recipe paths are relative to")
    parser.add_argument("--algorithm", required=True)
    parser.add_argument(
        "--recipe", help="recipe YAML to use instead of the config's for --algorithm"
    )
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument(
        "--out", required=True, help="output dir: model/, metrics.parquet, checkpoints/"
    )
    parser.add_argument(
        "--results", default="results", help="results root; inputs default to <results>/<run>/..."
    )
    parser.add_argument("--base-model", help="default <results>/<run>/models/base")
    parser.add_argument("--train-data", help="default <results>/<run>/data/<dataset>/train.parquet")
    parser.add_argument(
        "--refce", help="default <results>/<run>/refce/<dataset>.parquet (rho1 only)"
    )
    parser.add_argument(
        "--critic",
        help="default <results>/<run>/critic/seed<seed>/values.parquet (critic-wmtp only)",
    )
    parser.add_argument(
        "--tracking-uri", help="default: config tracking.tracking_uri or <results>/<run>/mlflow.db"
    )
    parser.add_argument(
        "--max-steps", type=int, help="train exactly this many optimizer steps (instead of the epochs)"
    )
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)

    config, recipes = load_config(args.config, args.base_dir)
    recipe = load_recipe(args.recipe, config) if args.recipe else recipes.get(args.algorithm)
    if recipe is None or recipe.algorithm != args.algorithm:
        raise ConfigError(
            f"no recipe for {args.algorithm!r}: the config's algorithms are {list(recipes)}"
            + (f" and {args.recipe} is a {recipe.algorithm} recipe" if args.recipe else "")
        )
    run_dir = Path(args.results) / config.run
    dataset = config.data.train_dataset
    return train(
        base_model_dir=args.base_model or run_dir / "models" / "base",
        train_path=args.train_data or run_dir / "data" / dataset / "train.parquet",
        out_dir=args.out,
        recipe=recipe,
        data=config.data,
        seed=args.seed,
        dataset_name=dataset,
        tracking=config.tracking,
        tracking_uri=args.tracking_uri
        or config.tracking.tracking_uri
        or tracking_lib.default_tracking_uri(run_dir),
        refce_path=args.refce
        or (run_dir / "refce" / f"{dataset}.parquet" if args.algorithm in RHO1 else None),
        critic_path=args.critic
        or (
            run_dir / "critic" / f"seed{args.seed}" / "values.parquet"
            if args.algorithm == "critic-wmtp"
            else None
        ),
        run_name=f"{args.algorithm}-seed{args.seed}",
        tags={"run": config.run},
        max_steps=args.max_steps,
        device=args.device,
    )


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    main()
