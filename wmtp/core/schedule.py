"""The fine-tuning learning-rate schedule: linear warmup, then cosine decay to a floor.

One formula for every fine-tuning, so a comparison of methods cannot differ in its
schedule: the trainer (`wmtp.stages.train`, a torch `LambdaLR` the DeepSpeed engine
steps) and `benchmarks/tiny_quality.py` both read it from here. The tiny
miniature's *pretraining* has a schedule of its own
(`wmtp.tiny.models.pretraining_lr_at`), kept apart because the built-in base model
was trained with it.

Standard library only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup
    over `warmup_steps` (never 0, so the first step learns), then cosine from 1 down
    towards `min_lr_ratio` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min((step - warmup_steps) / max(max_steps - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(*, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """`lr_factor` with the training's settings bound: step -> multiplier of the peak lr
    (the function a `LambdaLR` takes)."""
    return functools.partial(
        lr_factor, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio
    )
