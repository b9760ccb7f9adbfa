"""Weighted multi-token-prediction fine-tuning with DeepSpeed: one trainer for every method.

`train(...)` reads top to bottom, as a recipe: set-up (`set_up`: check every
input, join the process group, seed, read the data, load what the method's weights
need, build the DeepSpeed engine), then resume (`wmtp.stages.train_state`), the
loop (`run_loop`, one `optimizer_step` per step, a metric row every `log_every`
steps, a checkpoint every `checkpoint_every`), and `finish` (model +
`metrics.parquet`). The method only decides which inputs
`wmtp.core.weights.algorithm_weights` gets for an optimizer step (`make_weights`;
the weights are statistics of the whole step, every rank and micro-batch:
`wmtp.core.step_weights`; what each method reads is its row of
`wmtp.config.registry`):

    baseline-mtp, ntp  nothing (w = 1)
    rho1-weighted      ce_ref from the reference-CE table, ce_base = head-0 CE of the
    rho1-tokenskip     current model (online: given by the loss, or with gradient
                       accumulation a scoring forward) or of a frozen copy of the
                       initial model (weighting.rho1_base = "frozen")
    critic-wmtp        deltas V_j - V_{j-1} from the critic stage's value table (computed
                       once on the frozen base; no value head runs here)
    <method>-shuffled  the method's inputs and weights, permuted per sequence or
    <method>-matched   across the step (wmtp.core.weights.control_weights)

DeepSpeed config: the JSON template `TrainSettings.deepspeed_config` supplies the
ZeRO bucket knobs and AdamW's betas/eps; the trainer fills in what the recipe owns
(micro batch size, gradient accumulation, clipping, ZeRO stage, bf16, lr, weight
decay). The ZeRO stage is written only as `train.zero_stage`: a template that sets
one is refused (`wmtp.config.preflight.template_problems`). The learning rate
follows `wmtp.core.schedule` (a torch `LambdaLR` stepped by the engine).

A killed training resumes from its last checkpoint to exactly the weights of an
uninterrupted one (`wmtp.stages.train_state`); its metric rows survive the kill
(`wmtp.stages.train_metrics`).

Entry points: `train(...)` (library, the train rule's script) and
`python -m wmtp train ...` (wmtp/cli.py; several processes: `torchrun
--nproc_per_node N -m wmtp train ...`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import AutoTokenizer

from wmtp.config import registry
from wmtp.config.paths import TRAIN_CHECKPOINTS, TRAIN_METRICS, TRAINED_MODEL
from wmtp.config.preflight import template_path, template_problems
from wmtp.config.schema import (
    ConfigError,
    DataSettings,
    Recipe,
    TrackingSettings,
    TrainSettings,
    check_warmup,
    optimizer_steps,
)
from wmtp.core import loss as loss_lib
from wmtp.core.checkpoints import (
    CONFIG_FILE,
    load_model,
    read_config,
    read_generation_config,
    save_model,
    verify_model_files,
)
from wmtp.core.schedule import lr_schedule
from wmtp.core.step_weights import MicroInputs, step_weights
from wmtp.data.training import (
    Batch,
    Example,
    build_examples,
    collate,
    iterate_batches,
    pack,
    read_split,
    split_train_val,
)
from wmtp.infra import tracking as tracking_lib
from wmtp.stages.diagnostics import WeightDiagnostics
from wmtp.stages.refce import RefCETable, require_table
from wmtp.stages.train_metrics import (
    MetricLog,
    Window,
    global_tokens,
    metric_columns,
    val_loss,
    write_metrics_parquet,
)
from wmtp.stages.train_state import (
    ResumePoint,
    last_good_checkpoint,
    resume,
    rng_state,
    run_fingerprint,
    save_checkpoint,
)
from wmtp.stages.value_table import ValueTable

REPO = Path(__file__).resolve().parents[2]
# DeepSpeed JIT-builds a small op on first use (~1 min); a project-local cache keeps
# concurrent builds of other projects out of our way. Must be set before the import.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

log = logging.getLogger(__name__)


class TrainingInterrupted(RuntimeError):
    """Raised by the `stop_after` test hook: the run stops as if killed."""


class NonFiniteLoss(FloatingPointError):
    """A NaN or inf loss stopped training (never skipped silently)."""


@dataclass(frozen=True)
class TrainInputs:
    """The files one training reads besides its settings. Kept as given (str or
    Path): they are part of the training's identity (`run_fingerprint`)."""

    base_model: str | Path
    train_data: str | Path
    refce: str | Path | None = None  # the reference-CE table (methods that need "refce")
    critic: str | Path | None = None  # the critic's value table (methods that need "values")


@dataclass(frozen=True)
class TrackingTarget:
    """Where and under which names the training's MLflow run is logged."""

    mlflow: bool
    uri: str
    experiment: str
    run_name: str
    tags: dict[str, str]


# ---------------------------------------------------------------------------- set-up




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
    recipe: Recipe, data: DataSettings, inputs: TrainInputs, *, max_steps: int | None, device_type: str
) -> None:
    """Every problem that would make the run fail (or silently mean something else),
    collected and raised at once as `ConfigError` before any model work. `max_steps`
    None: the steps follow from the epochs and the data, and warmup is checked once
    the examples are counted (still before any model work)."""
    settings, problems = recipe.train, []
    algorithm = recipe.algorithm
    base_model_dir, train_path = inputs.base_model, inputs.train_data
    refce_path, critic_path = inputs.refce, inputs.critic
    if not (Path(base_model_dir) / CONFIG_FILE).exists():
        problems.append(
            f"base model: {base_model_dir} has no {CONFIG_FILE} (not a wmtp model directory)"
        )
    if not Path(train_path).exists():
        problems.append(f"training data: {train_path} not found")
    if registry.needs(algorithm, "refce") and (refce_path is None or not Path(refce_path).exists()):
        problems.append(
            f"{algorithm} needs the reference-CE table (refce_path={refce_path!s}): "
            "run the refce stage"
        )
    if registry.needs(algorithm, "values") and (critic_path is None or not Path(critic_path).exists()):
        problems.append(
            f"{algorithm} needs the critic stage's value table (critic_path={critic_path!s}): "
            "run the critic stage for this seed"
        )
    if max_steps is not None and (problem := check_warmup(settings, max_steps)):
        problems.append(problem)
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


def check_setup(
    recipe: Recipe, data: DataSettings, inputs: TrainInputs, *, max_steps: int | None, device_type: str
) -> None:
    """`validate_setup`, then the reference-CE table read through (a damaged table
    fails here, not after DeepSpeed has started); an input the method does not read
    is named in the log and ignored."""
    validate_setup(recipe, data, inputs, max_steps=max_steps, device_type=device_type)
    algorithm = recipe.algorithm
    if registry.needs(algorithm, "refce"):
        require_table(inputs.refce)
    elif inputs.refce is not None:
        log.warning("refce_path given but %s does not use it; ignored", algorithm)
    if inputs.critic is not None and not registry.needs(algorithm, "values"):
        log.warning("critic_path given but %s does not use it; ignored", algorithm)


def _init_distributed(device_type: str) -> tuple[int, int]:
    """Join (or, alone, create) the process group; returns (rank, world size).

    A lone process (no launcher set RANK) gets an in-process store instead of a TCP
    rendezvous: a free port picked and released here could be taken by a parallel
    job before gloo binds it (seen as EADDRINUSE with two trainings at once)."""
    import deepspeed  # here, not at the top: importing DeepSpeed probes the accelerator (seconds)

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if not dist.is_initialized():
            backend = "gloo" if device_type == "cpu" else "nccl"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo" if device_type == "cpu" else "nccl")
    return dist.get_rank(), dist.get_world_size()



def _bind_device(device_type: str) -> torch.device:
    """This process's device: its launcher's LOCAL_RANK-th GPU, or the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    return torch.device(f"cuda:{local_rank}" if device_type == "cuda" else "cpu")


def _seed(seed: int) -> None:
    """Every global RNG a training may draw from (the batch order has its own)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class TrainData:
    """The training split as examples, and the optimizer steps it makes."""

    rows: pd.DataFrame  # the split as read (the weight diagnostics classify its tokens)
    train: list[Example]  # packed when data.pack
    val: list[Example]  # the held-out examples of val_loss
    steps: int


def read_training_data(
    recipe: Recipe,
    data: DataSettings,
    train_path: str | Path,
    tokenizer,
    *,
    seed: int,
    world: int,
    max_steps: int | None,
) -> TrainData:
    """Tokenised examples, the seeded val hold-out, and the optimizer steps: `max_steps`,
    or what the recipe's epochs give over these examples (a warmup that does not fit
    them is refused here, before any model work)."""
    rows = read_split(train_path, data.train_dataset, data.max_solutions_per_problem)
    examples = build_examples(rows, tokenizer, data.max_seq_len)
    if data.max_train_examples is not None:
        examples = examples[: data.max_train_examples]
    train_examples, val_examples = split_train_val(examples, data.val_fraction, seed)
    if data.pack:
        train_examples = pack(train_examples, data.max_seq_len)
    settings, n = recipe.train, len(train_examples)
    try:
        steps = max_steps or optimizer_steps(settings, n, world)
    except ValueError as error:
        raise ConfigError(f"training set-up for {recipe.algorithm}: {error}") from None
    counted = f"the optimizer steps that {settings.epochs} epochs of {n} examples give"
    if problem := check_warmup(settings, steps, "max_steps" if max_steps else counted):
        raise ConfigError(f"training set-up for {recipe.algorithm}: {problem}")
    return TrainData(rows, train_examples, val_examples, steps)


@dataclass(frozen=True)
class WeightSources:
    """What a method's weights are computed from besides the batch and the model being
    trained: loaded once, checked against every training example before any step."""

    refce: RefCETable | None = None
    frozen: torch.nn.Module | None = None  # the initial model (rho1_base = "frozen")
    value_table: ValueTable | None = None


def load_weight_sources(
    recipe: Recipe,
    inputs: TrainInputs,
    tokenizer,
    examples: Sequence[Example],
    pad_id: int,
    device: torch.device,
    bf16: bool,
) -> WeightSources:
    """The stage outputs this method reads (its registry row's `inputs`)."""
    refce = frozen = value_table = None
    if registry.needs(recipe.algorithm, "refce"):
        refce = RefCETable.from_parquet(inputs.refce, tokenizer=tokenizer)
        for first in range(0, len(examples), 64):  # every sample aligned before any compute
            batch = collate(examples[first : first + 64], pad_id)
            refce.lookup(batch.sample_ids, batch.input_ids, batch.loss_mask)
        if recipe.weighting.rho1_base == "frozen":
            frozen = load_model(inputs.base_model, device=device).eval().requires_grad_(False)
            frozen = frozen.to(torch.bfloat16) if bf16 else frozen  # (its CE is taken in fp32)
    if registry.needs(recipe.algorithm, "values"):
        value_table = load_value_table(inputs.critic, tokenizer, inputs.base_model, examples, pad_id)
    return WeightSources(refce, frozen, value_table)


def load_value_table(
    critic_path, tokenizer, base_model_dir, examples: Sequence[Example], pad_id: int
):
    """critic-wmtp's value table (wmtp.stages.value_table), checked against this tokenizer,
    this base model and every training example before any training compute."""
    try:
        table = ValueTable.from_parquet(
            critic_path, tokenizer=tokenizer, base_model_dir=base_model_dir
        )
        table.check_covers(examples, pad_id)
    except ValueError as error:
        raise ConfigError(f"critic-wmtp: {error}") from None
    log.info(
        "value table %s: gate %s, auto strength %.3f",
        critic_path,
        table.gate,
        table.strength,
    )
    return table


def build_engine(
    recipe: Recipe,
    base_model_dir: str | Path,
    *,
    n_heads: int,
    steps: int,
    bf16: bool,
    device_type: str,
) -> tuple[Any, int, dict]:
    """The base model (`n_heads` heads) under a DeepSpeed engine: AdamW over what the
    method trains, the lr schedule of `wmtp.core.schedule`. Returns the engine, the
    number of trained heads and the DeepSpeed config."""
    import deepspeed  # here, not at the top: importing DeepSpeed probes the accelerator (seconds)

    settings = recipe.train
    model = load_model(base_model_dir)
    n_trained = registry.trained_heads(recipe.algorithm, n_heads)
    for head in model.heads[n_trained:]:  # ntp: heads 1..H-1 keep the base's weights
        head.requires_grad_(False)
    ds_config = deepspeed_config(settings, bf16=bf16, device_type=device_type)
    schedule = lr_schedule(
        warmup_steps=settings.warmup_steps, max_steps=steps, min_lr_ratio=settings.min_lr_ratio
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    return engine, n_trained, ds_config


@dataclass
class Trainer:
    """One training, set up: everything the loop reads, built before its first step."""

    recipe: Recipe
    inputs: TrainInputs
    seed: int
    out_dir: Path
    rank: int
    world: int
    device: torch.device
    tokenizer: Any
    pad_id: int
    data: TrainData
    sources: WeightSources
    diagnostics: WeightDiagnostics
    engine: Any  # deepspeed.DeepSpeedEngine
    n_trained: int  # heads 0..n_trained-1 are trained (registry.trained_heads)
    columns: list[str]  # of metrics.parquet
    resolved: dict  # the training's settings as run: MLflow params, the fingerprint, the model's config

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / TRAIN_CHECKPOINTS


def set_up(
    recipe: Recipe,
    data: DataSettings,
    inputs: TrainInputs,
    *,
    seed: int,
    out_dir: Path,
    max_steps: int | None,
    device: str | None,
) -> Trainer:
    """Check every input, then join the process group, seed, and build the data, the
    weight sources and the engine, in this order (the RNG draws of a resumed run
    depend on it)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    check_setup(recipe, data, inputs, max_steps=max_steps, device_type=device_type)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = _init_distributed(device_type)
    run_device = _bind_device(device_type)
    settings = recipe.train
    bf16 = settings.precision == "bf16" or (settings.precision == "auto" and device_type == "cuda")
    _seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(inputs.base_model))
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    n_heads = read_config(inputs.base_model).n_future_tokens
    train_data = read_training_data(
        recipe, data, inputs.train_data, tokenizer, seed=seed, world=world, max_steps=max_steps
    )
    sources = load_weight_sources(
        recipe, inputs, tokenizer, train_data.train, pad_id, run_device, bf16
    )
    diagnostics = WeightDiagnostics.for_training(
        train_data.rows, tokenizer, train_data.train, run_device
    )
    engine, n_trained, ds_config = build_engine(
        recipe,
        inputs.base_model,
        n_heads=n_heads,
        steps=train_data.steps,
        bf16=bf16,
        device_type=device_type,
    )
    resolved = resolved_settings(
        recipe, data, inputs, seed=seed, steps=train_data.steps, world=world, ds_config=ds_config
    )
    return Trainer(
        recipe, inputs, seed, out_dir, rank, world, run_device, tokenizer, pad_id, train_data,
        sources, diagnostics, engine, n_trained, metric_columns(n_trained, n_heads), resolved,
    )  # fmt: skip


def resolved_settings(
    recipe: Recipe,
    data: DataSettings,
    inputs: TrainInputs,
    *,
    seed: int,
    steps: int,
    world: int,
    ds_config: dict,
) -> dict:
    """The training's settings as run (MLflow params, part of its fingerprint, and
    recorded in the trained model's config)."""
    return {
        "algorithm": recipe.algorithm,
        "seed": seed,
        "dataset": data.train_dataset,
        "max_steps": steps,
        "world_size": world,
        "base_model": str(inputs.base_model),
        "train_path": str(inputs.train_data),
        "refce_path": str(inputs.refce) if inputs.refce else None,
        "critic_path": str(inputs.critic) if inputs.critic else None,
        "recipe": recipe.model_dump(mode="json"),
        "data": data.model_dump(mode="json"),
        "deepspeed": ds_config,
    }


# ------------------------------------------------------------------ weights per step


@torch.no_grad()
def head0_ce(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Per-target-token head-0 CE `(B, S)` of `model` (0 at position 0 and off the
    loss mask), computed as the training loss computes it (the trunk, head 0 and
    the unembedding in chunks of valid rows: no full logits): the frozen-base
    CE_base of rho1, and the online one's scoring forward."""
    return loss_lib.weighted_mtp_loss_details(
        model, batch.input_ids, batch.loss_mask, batch.loss_mask.float(),
        attention_mask=batch.attention_mask, n_heads=1,
    ).ce_head0  # fmt: skip


def make_weights(
    recipe: Recipe,
    batches: Sequence[Batch],
    sources: WeightSources,
    *,
    model: torch.nn.Module | None,
    seed: int,
    step: int,
) -> list[torch.Tensor | loss_lib.WeightFn]:
    """The loss's `weights` for each micro-batch of optimizer step `step`: the
    method's weights (wmtp.core.weights) over the whole step, every rank's
    micro-batches together (wmtp.core.step_weights), from the inputs its registry
    row names. A collective for a weighted method: every rank calls it at each step.

    rho1's CE_base is head 0's CE of the model being trained, `model` (online, the
    default) or of the frozen initial model (`sources.frozen`). Online with one
    micro-batch per step, the training forward's own CE is used: the returned
    callable gets it from the loss, at no extra cost. Online with several (the
    paper setting accumulates 2), the first micro-batch's weights need every
    micro-batch's CE before its backward, so each micro-batch first gets a
    no-grad scoring forward (`head0_ce`: the trunk and head 0). That adds about a
    fifth to the step's compute on the tiny model (0.21 of a training micro-step,
    measured on a CPU) and, estimated, a third on the paper's 7B (a forward of 29
    of its 32 blocks against a forward and backward of all 32). The model does not
    change within a step, so both give the same CE up to float rounding."""
    algorithm, settings = recipe.algorithm, recipe.weighting
    given: dict[str, list[torch.Tensor]] = {}  # MicroInputs field -> one (B, S) per micro-batch
    auto_strength = None
    if registry.needs(algorithm, "values"):
        given["deltas"] = _looked_up(sources.value_table, batches)
        auto_strength = sources.value_table.strength
    if registry.needs(algorithm, "refce"):
        frozen = sources.frozen
        if (frozen is not None) != (settings.rho1_base == "frozen"):  # the recipe decides
            raise ValueError(
                f"weighting.rho1_base is {settings.rho1_base!r} but a frozen base model was "
                f"{'given' if frozen is not None else 'not given'}"
            )
        given["ce_ref"] = _looked_up(sources.refce, batches)
        if frozen is not None or len(batches) > 1:
            given["ce_base"] = [head0_ce(frozen if frozen is not None else model, b) for b in batches]
    parts = [
        MicroInputs(b.sample_ids, b.loss_mask, **{name: values[i] for name, values in given.items()})
        for i, b in enumerate(batches)
    ]
    weigh = partial(step_weights, algorithm, settings, seed=seed, step=step, auto_strength=auto_strength)
    if registry.needs(algorithm, "refce") and "ce_base" not in given:  # online, one micro-batch
        return [lambda ce_head0, trunk_hidden: weigh([replace(parts[0], ce_base=ce_head0.float())])[0]]
    return weigh(parts)


def _looked_up(table: RefCETable | ValueTable, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """A stage table's `(B, S)` values for each micro-batch, on its device."""
    return [table.lookup(b.sample_ids, b.input_ids, b.loss_mask).to(b.loss_mask.device) for b in batches]


def check_finite_loss(
    loss: torch.Tensor, step: int, micro: int, batch: Batch, world: int, ckpt_dir: Path
) -> None:
    """Raise `NonFiniteLoss` naming the step, the micro-batch and its sample ids when
    any rank's loss is NaN or inf, before it reaches backward and the optimizer.
    All ranks call it together (one all-reduce), so all stop at the same point;
    the checkpoints on disk are untouched. Costs one device sync per micro-step."""
    bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)  # (1,)
    if world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() == 0:
        return
    raise NonFiniteLoss(
        f"loss is {float(loss)} on this rank (non-finite on at least one rank) at step {step}, "
        f"micro-batch {micro + 1}, samples {list(batch.sample_ids)}; "
        f"{last_good_checkpoint(ckpt_dir)}. A rerun with the "
        "same settings resumes there and meets the same batch: lower train.lr, check those "
        "samples, or (rho1) the reference-CE table"
    )


# ----------------------------------------------------------------------------- loop


def open_metrics(t: Trainer, start: ResumePoint, target: TrackingTarget) -> MetricLog:
    """The metric rows of an earlier attempt, and (rank 0, MLflow on) the MLflow run:
    a new one, or the resumed training's own."""
    metrics = MetricLog.resume(t.out_dir, start_step=start.step, rank=t.rank)
    if t.rank == 0 and target.mlflow:
        run = tracking_lib.start_run(
            target.uri,
            target.experiment,
            run_name=target.run_name,
            tags=target.tags,
            params=t.resolved,
            run_id=start.mlflow_run_id,
        )
        metrics.attach(run)
    return metrics


def optimizer_step(t: Trainer, stream: Iterator[tuple[int, Batch]], step: int, window: Window) -> int:
    """One optimizer step: its `grad_accum_steps` micro-batches drawn, their weights
    computed over the whole step (`make_weights`), then each one forward and
    backward (the engine steps the optimizer and the lr at the last). Returns the
    tokens seen."""
    settings = t.recipe.train
    drawn = [next(stream) for _ in range(settings.grad_accum_steps)]
    per_micro_step = settings.micro_batch_size * t.world
    tokens = sum(global_tokens(t.data.train, per_micro_step, t.seed, micro_step) for micro_step, _ in drawn)
    batches = [batch.to(t.device) for _, batch in drawn]
    weights = make_weights(
        t.recipe, batches, t.sources, model=t.engine.module, seed=t.seed, step=step
    )  # fmt: skip
    for micro, (batch, micro_weights) in enumerate(zip(batches, weights, strict=True)):
        # looked up at call time: a test spies on the loss by replacing it in wmtp.core.loss
        out = loss_lib.weighted_mtp_loss_details(
            t.engine.module,
            batch.input_ids,
            batch.loss_mask,
            micro_weights,
            attention_mask=batch.attention_mask,
            n_heads=t.n_trained,
        )
        check_finite_loss(out.loss, step, micro, batch, t.world, t.ckpt_dir)
        t.engine.backward(out.loss)
        t.engine.step()
        window.add(out.loss, out.head_ce, out.weights, batch)
        t.diagnostics.add(out.weights, batch, step)
    return tokens


def metric_row(
    t: Trainer, step: int, *, tokens: int, started: float, lr: float, window: Window, validate: bool
) -> dict:
    """The row of `step` (every rank calls this: the reductions are collective)."""
    metrics = window.reduce(t.world)
    row = {
        "step": step,
        "tokens": tokens,
        "wall_time": time.perf_counter() - started,
        "lr": lr,
        **metrics,
        **t.diagnostics.reduce(t.world),
    }
    if validate:
        settings = t.recipe.train
        row |= val_loss(t.engine.module, t.data.val, settings.micro_batch_size, t.pad_id, t.device)
    return row


def run_loop(t: Trainer, start: ResumePoint, metrics: MetricLog, stop_after: int | None) -> None:
    """Steps `start.step + 1 .. steps`: a metric row every `log_every` steps and on
    every validation step, a checkpoint every `checkpoint_every` steps and at the end.
    The batches of a step are a pure function of (seed, step), so a resumed loop
    meets the same batches as an uninterrupted one."""
    settings, steps = t.recipe.train, t.data.steps
    stream = iterate_batches(
        t.data.train,
        settings.micro_batch_size,
        t.seed,
        t.pad_id,
        start_step=start.step * settings.grad_accum_steps,
        rank=t.rank,
        world_size=t.world,
    )
    t.engine.train()
    window = Window(t.n_trained, t.device)
    started, tokens = time.perf_counter() - start.wall_time, start.tokens
    bar = tqdm(
        total=steps, initial=start.step, disable=t.rank != 0, desc=f"train {t.recipe.algorithm}",
        unit="step",
    )  # fmt: skip
    for step in range(start.step + 1, steps + 1):
        lr = float(t.engine.get_lr()[0])
        tokens += optimizer_step(t, stream, step, window)
        bar.update(1)
        validate = step % settings.val_every == 0 or step == steps
        if step % settings.log_every == 0 or validate:
            row = metric_row(
                t, step, tokens=tokens, started=started, lr=lr, window=window, validate=validate
            )
            window = Window(t.n_trained, t.device)
            if t.rank == 0:
                metrics.record(row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if step % settings.checkpoint_every == 0 or step == steps:
            client = {"step": step, "tokens": tokens, "wall_time": time.perf_counter() - started,
                      "rng": rng_state(), "mlflow_run_id": metrics.run.run_id}  # fmt: skip
            save_checkpoint(t.engine, t.ckpt_dir, step, t.rank, t.world, client)
        if stop_after is not None and step >= stop_after:
            bar.close()
            raise TrainingInterrupted(f"stopped after step {step} (stop_after={stop_after})")
    bar.close()


def finish(t: Trainer, metrics: MetricLog, target: TrackingTarget) -> Path:
    """Rank 0 writes the model (+ tracking.json naming its MLflow run) and
    `metrics.parquet`, and closes the run; every rank waits for it."""
    model_dir = t.out_dir / TRAINED_MODEL
    probe = t.diagnostics.probe_metadata(t.world)  # a collective call
    if t.rank == 0:
        extra = {"algorithm": t.recipe.algorithm, "seed": t.seed, "resolved config": t.resolved}
        save_model(t.engine.module, model_dir, tokenizer=t.tokenizer, extra=extra,
                   generation_config=read_generation_config(t.inputs.base_model))  # fmt: skip
        run = metrics.run
        tracking_lib.write_tracking_file(
            model_dir,
            target.uri if run.enabled else None,
            run.run_id,
            target.experiment if run.enabled else None,
        )
        write_metrics_parquet(metrics.rows, t.out_dir / TRAIN_METRICS, t.columns, metadata=probe)
        run.finish()
        if not t.recipe.train.keep_checkpoints:
            drop_checkpoints(model_dir, t.ckpt_dir)
    if t.world > 1:
        dist.barrier()
    return model_dir


def drop_checkpoints(model_dir: Path, ckpt_dir: Path) -> None:
    """Remove the resumable state once the final model reads back as saved (its
    checksums): at 7B it is some 100 GB per training, 1.5 TB for the paper table,
    and nothing reads it after the model exists. A failed check raises and keeps it."""
    verify_model_files(model_dir)
    shutil.rmtree(ckpt_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- train


def train(
    *,
    inputs: TrainInputs,
    out_dir: str | Path,
    recipe: Recipe,
    data: DataSettings,
    seed: int,
    tracking: TrackingSettings,
    study: str = "default",
    run_name: str | None = None,
    tags: Sequence[tuple[str, str]] | dict = (),
    max_steps: int | None = None,
    device: str | None = None,
    stop_after: int | None = None,
) -> Path:
    """Fine-tune the MTP model `inputs.base_model` with `recipe` on `inputs.train_data`
    (MBPP-format parquet, the dataset `data.train_dataset`); write `out_dir/model/`
    (+ tracking.json) and `out_dir/metrics.parquet`. Returns the model directory.

    The optimizer steps follow from `recipe.train.epochs` and the number of training
    examples (`wmtp.config.schema.optimizer_steps`); `max_steps` replaces that number
    (smoke tests, the CLI's `--max-steps`). With `tracking.tracking_uri` None the
    MLflow store is `sqlite:///<out_dir>/mlflow.db` (the workflow passes
    `results/{run}/mlflow.db`); the run is in the study's experiment `wmtp/{study}`
    (`study`: the config's `run`), tagged with the study, algorithm and seed
    (`tracking_lib.run_tags`) and `tags` (callers add `tracking_lib.provenance_tags`).
    `stop_after=n` (tests) raises `TrainingInterrupted` right after step n, as if the
    job had been killed there.
    """
    out_dir = Path(out_dir)
    t = set_up(recipe, data, inputs, seed=seed, out_dir=out_dir, max_steps=max_steps, device=device)
    fingerprint = run_fingerprint(
        t.resolved, [inputs.base_model, inputs.train_data, inputs.refce, inputs.critic]
    )
    start = resume(t.engine, t.ckpt_dir, fingerprint, t.rank, t.world, name=recipe.algorithm)
    target = TrackingTarget(
        mlflow=tracking.mlflow,
        uri=tracking.tracking_uri or tracking_lib.default_tracking_uri(out_dir),
        experiment=tracking_lib.experiment_name(study),
        run_name=run_name or tracking_lib.run_name(recipe.algorithm, seed),
        tags={**tracking_lib.run_tags(study, "training", recipe.algorithm, seed), **dict(tags)},
    )
    metrics = open_metrics(t, start, target)
    try:  # an attempt that raised (or got Ctrl-C) shows as FAILED in MLflow until resumed
        run_loop(t, start, metrics, stop_after)
    except BaseException:
        metrics.run.finish("FAILED")
        raise
    return finish(t, metrics, target)
