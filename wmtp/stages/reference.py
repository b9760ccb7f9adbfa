"""The reference fine-tuning stage: `models.ref` trained on a clean split before refce.

Rho-1 (Lin et al. 2024) scores tokens by the excess loss CE_base - CE_ref of a
reference trained on curated data of the target distribution, so a token the
reference finds easy and the base hard is one worth learning. A reference that
has never seen the fine-tuning prompt format, nor where a solution ends, finds
the format tokens and EOS hard for the wrong reason. This stage gives it that
format: full fine-tuning of the HF causal LM with plain next-token CE on the
solution tokens (the training stage's loss mask) of problems the methods neither
train on nor are judged on (`reference_finetune.splits`, checked by the config and
again here against the training split's rows).

The machinery is the trainer's: examples built by `wmtp.data.training` with the
base tokenizer (the pipeline's prompt format, which the refce stage scores with
too), the step count and DeepSpeed config from the same functions, the same lr
schedule. The output is a HF model directory with the download stage's checksum
manifest (plus what it was fine-tuned on and its losses), written atomically.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from tqdm import tqdm

from wmtp.config.schema import (
    DataSettings,
    ReferenceFinetuneSettings,
    is_mtp_model_config,
    optimizer_steps,
)
from wmtp.core.checkpoints import verify_model_files
from wmtp.core.schedule import lr_schedule
from wmtp.data.training import (
    Batch,
    Example,
    build_examples,
    check_same_vocabulary,
    iterate_batches,
    read_split,
)
from wmtp.infra import storage
from wmtp.stages.refce import token_ce
from wmtp.stages.train import _bind_device, _init_distributed, _seed, deepspeed_config

log = logging.getLogger(__name__)


def read_finetune_rows(paths: Sequence[str | Path], exclude: Sequence[str | Path] = ()) -> pd.DataFrame:
    """The fine-tuning splits' rows, refused when one shares a task id, or a problem
    statement with its solution, with a row of an `exclude` split (the training split):
    the config checks split names, this checks the data behind them."""
    rows = pd.concat([read_split(p) for p in paths], ignore_index=True)
    for path in exclude:
        other = read_split(path)
        shared_ids = sorted(set(rows["task_id"].astype(str)) & set(other["task_id"].astype(str)))
        pairs = set(zip(other["text"], other["code"], strict=True))
        shared_text = [t for t, c in zip(rows["text"], rows["code"], strict=True) if (t, c) in pairs]
        if shared_ids or shared_text:
            raise ValueError(
                f"reference_finetune.splits share problems with {path}: task ids {shared_ids[:5]}, "
                f"{len(shared_text)} identical problem+solution pairs; fine-tune on other problems"
            )
    return rows


def masked_ce(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token CE over the loss-mask targets (solution tokens and EOS): the
    loss of a plain fine-tuning, in float32 whatever the model dtype."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    ce = token_ce(logits, batch.input_ids)  # (B, S-1): entry j-1 scores token j
    mask = batch.loss_mask[:, 1:].float()  # (B, S-1)
    return (ce * mask).sum() / mask.sum().clamp(min=1.0)


def _load_causal_lm(ref_dir: str | Path) -> torch.nn.Module:
    """The reference as a trainable HF causal LM in float32 (DeepSpeed casts for bf16);
    our MTP format is refused: its reference is scored, not fine-tuned, here."""
    from transformers import AutoModelForCausalLM

    config = json.loads((Path(ref_dir) / "config.json").read_text())
    if is_mtp_model_config(config):
        raise ValueError(f"{ref_dir}: an MTP model; reference_finetune fine-tunes a HF causal LM only")
    verify_model_files(ref_dir)
    return AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32)


def _engine(model: torch.nn.Module, settings: ReferenceFinetuneSettings, steps: int, device_type: str):
    """The model under a DeepSpeed engine configured as the trainer configures one."""
    import deepspeed  # here, not at the top: importing DeepSpeed probes the accelerator (seconds)

    train = settings.train_settings()
    bf16 = train.precision == "bf16" or (train.precision == "auto" and device_type == "cuda")
    schedule = lr_schedule(warmup_steps=train.warmup_steps, max_steps=steps, min_lr_ratio=train.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(train, bf16=bf16, device_type=device_type),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    return engine


def _train(engine, stream: Iterator[tuple[int, Batch]], steps: int, accum: int, device) -> list[float]:
    """`steps` optimizer steps of `accum` micro-batches each; the mean loss of each step."""
    losses = []
    engine.train()
    for _ in tqdm(range(steps), desc="reference fine-tuning", unit="step"):
        total = 0.0
        for _ in range(accum):
            _, batch = next(stream)
            loss = masked_ce(engine, batch.to(device))
            engine.backward(loss)
            engine.step()
            total += float(loss.detach()) / accum
        losses.append(total)
    return losses


def _save(model: torch.nn.Module, tokenizer, out_dir: Path, info: dict) -> Path:
    """The model and tokenizer as a HF directory with a checksum manifest (`info`
    recorded in it), staged beside `out_dir` and renamed onto it."""

    def build(built: Path, _scratch: Path) -> dict:
        model.save_pretrained(str(built), safe_serialization=True)
        tokenizer.save_pretrained(str(built))
        return info

    return storage.publish_with_manifest(out_dir, build)


def finetune_reference(
    ref_dir: str | Path,
    base_dir: str | Path,
    split_paths: Sequence[str | Path],
    out_dir: str | Path,
    settings: ReferenceFinetuneSettings,
    data: DataSettings,
    *,
    exclude: Sequence[str | Path] = (),
    model_id: str | None = None,
    device: str | None = None,
) -> Path:
    """The whole stage: examples of `split_paths` (checked against `exclude`) in the
    base tokenizer's prompt format, `settings`' optimizer steps of full fine-tuning,
    and the model written to `out_dir` by rank 0. Returns `out_dir`."""
    from transformers import AutoTokenizer

    base_tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    ref_tokenizer = AutoTokenizer.from_pretrained(str(ref_dir))
    check_same_vocabulary(base_tokenizer, ref_tokenizer, str(base_dir), str(ref_dir))
    examples: list[Example] = build_examples(read_finetune_rows(split_paths, exclude), base_tokenizer, data.max_seq_len)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    rank, world = _init_distributed(device_type)
    run_device = _bind_device(device_type)
    _seed(settings.seed)
    steps = optimizer_steps(settings.train_settings(), len(examples), world)
    pad_id = base_tokenizer.pad_token_id if base_tokenizer.pad_token_id is not None else base_tokenizer.eos_token_id
    engine = _engine(_load_causal_lm(ref_dir), settings, steps, device_type)
    stream = iterate_batches(examples, settings.micro_batch_size, settings.seed, pad_id, rank=rank, world_size=world)
    losses = _train(engine, stream, steps, settings.grad_accum_steps, run_device)
    log.info("reference fine-tuned: %d steps on %d examples, loss %.4f -> %.4f", steps, len(examples), losses[0], losses[-1])
    info = {
        "kind": "model",
        "written_by": "wmtp.stages.reference.finetune_reference",
        "fine_tuned_from": model_id or str(ref_dir),
        "splits": [str(p) for p in split_paths],
        "examples": len(examples),
        "steps": steps,
        "world_size": world,
        "settings": settings.model_dump(mode="json"),
        "loss_first_step": losses[0],
        "loss_last_step": losses[-1],
    }
    if rank == 0:
        _save(engine.module, ref_tokenizer, Path(out_dir), info)
    if world > 1:
        dist.barrier()
    return Path(out_dir)
