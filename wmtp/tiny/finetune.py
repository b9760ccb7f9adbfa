"""Fine-tune a tiny model in one process, without DeepSpeed: the trainer's loss and
schedule with every weight 1 (what baseline-mtp does).

For the checks that need a model that has learnt the tiny benchmark's format
(benchmarks/tiny_quality.py, the vLLM tests) but not the whole training stage
with its DeepSpeed start-up: a couple of hundred steps take about a minute on
two cores.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from wmtp.config.schema import TrainSettings, optimizer_steps
from wmtp.core.loss import weighted_mtp_loss
from wmtp.core.schedule import lr_factor
from wmtp.data.training import build_examples, iterate_batches


def finetune(
    model, tokenizer, train_df, settings: TrainSettings, *, max_seq_len: int, steps: int | None,
    seed: int,
) -> list[float]:
    """The trainer's loop without DeepSpeed: weighted MTP loss with w = 1 on the
    solution tokens (prompt masked), AdamW, the trainer's warmup + cosine schedule;
    lr, warmup, floor, weight decay, clipping and batch size from `settings`, the
    length from its epochs unless `steps` is given."""
    examples = build_examples(train_df, tokenizer, max_seq_len=max_seq_len)
    batch_size = settings.micro_batch_size * settings.grad_accum_steps  # one process
    steps = steps or optimizer_steps(settings, len(examples))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    batches = iterate_batches(examples, batch_size, seed, tokenizer.pad_token_id)
    model.train()
    losses = []
    for step, batch in tqdm(batches, total=steps, desc="fine-tune"):
        if step >= steps:
            break
        factor = lr_factor(step, warmup_steps=settings.warmup_steps, max_steps=steps,
                           min_lr_ratio=settings.min_lr_ratio)  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * factor
        weights = batch.loss_mask.float()  # (B, S) all ones on valid tokens
        loss = weighted_mtp_loss(
            model, batch.input_ids, batch.loss_mask, weights, batch.attention_mask
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses
