"""Token weights of one optimizer step, computed over the whole step.

Normalisation (z-score, softmax, mean 1, clip), tokenskip's threshold and a
matched control's permutation are statistics of a set of tokens. Taken per
micro-batch, a token's weight (and whether it is dropped) would depend on the few
sequences that happen to share its micro-batch and so on the GPU count and the
gradient accumulation: 4 sequences per GPU in the paper setting. Here they are
taken over every rank and every accumulation micro-batch of the optimizer step:

1. each rank hands over its micro-batches' raw inputs (`MicroInputs`: mask,
   ce_base / ce_ref / deltas, sample ids);
2. they are concatenated (sequence length padded, mask False there) and gathered
   from every rank (`all_gather_object`, gloo or nccl; CPU tensors);
3. the step's sequences are put in a canonical order, by sample id (a stable
   sort, so a sequence that occurs twice, possible only in a step that spans two
   epochs, keeps the order of the gather), which does not depend on the split;
4. the method's weight function (`wmtp.core.weights.algorithm_weights`) runs once
   on that `(N, S)` step, on the CPU in every rank (each gets the same numbers);
5. each micro-batch gets its rows back, cut to its own length, on its device.

So 1 process x 4 micro-batches, 2 x 2 and 4 x 1 give the same weights for the
same sequences and the same inputs (tests/core/test_step_weights.py). Inputs that
come from a model forward (ce_base) can still differ by float rounding between
splits, since a sequence is padded to its micro-batch's length.

A uniform method (baseline-mtp, ntp) has no statistics: its weights are the mask,
per micro-batch, with no collective. The cost for the others is one small
all-gather per step (a few floats per token); what it costs to have every
micro-batch's inputs before the first backward is the trainer's business
(wmtp.stages.train.make_weights: online rho1 with accumulation > 1 needs a
scoring forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from wmtp.config import registry
from wmtp.config.schema import WeightingSettings
from wmtp.core.weights import Draw, algorithm_weights

# The per-token inputs a weight function may read, by keyword.
SCORE_NAMES = ("ce_base", "ce_ref", "deltas")


@dataclass(frozen=True)
class MicroInputs:
    """One micro-batch's raw inputs to its weights, each `(B, S)` and indexed by
    target token (None where the method does not read it)."""

    sample_ids: Sequence[str]
    mask: torch.Tensor  # (B, S) bool: valid targets
    ce_base: torch.Tensor | None = None
    ce_ref: torch.Tensor | None = None
    deltas: torch.Tensor | None = None


def _pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """`(B, S)` right-padded with zeros (False) to `(B, length)`."""
    return torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]))


def _concat(parts: Sequence[MicroInputs]) -> MicroInputs:
    """The parts' rows one after another (in order), padded to the longest, on the CPU."""
    length = max(part.mask.shape[1] for part in parts)
    joined = {
        name: None
        if getattr(parts[0], name) is None
        else torch.cat([_pad(getattr(part, name).detach().float().cpu(), length) for part in parts])
        for name in SCORE_NAMES
    }
    return MicroInputs(
        sample_ids=[sample_id for part in parts for sample_id in part.sample_ids],
        mask=torch.cat([_pad(part.mask.detach().bool().cpu(), length) for part in parts]),
        **joined,
    )


def _check_same_inputs(parts: Sequence[MicroInputs]) -> None:
    given = [tuple(getattr(part, name) is not None for name in SCORE_NAMES) for part in parts]
    if len(set(given)) > 1:
        raise ValueError(f"micro-batches give different inputs ({given}, for {SCORE_NAMES})")
    for part in parts:
        for name in SCORE_NAMES:
            tensor = getattr(part, name)
            if tensor is not None and tensor.shape != part.mask.shape:
                raise ValueError(
                    f"{name} {tuple(tensor.shape)} and mask {tuple(part.mask.shape)} must have the same shape"
                )
        if len(part.sample_ids) != part.mask.shape[0]:
            raise ValueError(f"{len(part.sample_ids)} sample ids for {part.mask.shape[0]} rows")


def _gather(local: MicroInputs) -> list[MicroInputs]:
    """Every rank's concatenated inputs, in rank order (just `local` without a
    process group). A collective: every rank calls it at the same point."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    everyone: list[MicroInputs | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return everyone  # type: ignore[return-value]


def canonical_order(sample_ids: Sequence[str]) -> list[int]:
    """Row indices sorted by sample id; rows with the same id keep their order."""
    return sorted(range(len(sample_ids)), key=lambda row: sample_ids[row])


@torch.no_grad()
def step_weights(
    algorithm: str,
    settings: WeightingSettings,
    micro_batches: Sequence[MicroInputs],
    *,
    seed: int,
    step: int,
    auto_strength: float | None = None,
) -> list[torch.Tensor]:
    """The `(B_i, S_i)` float32 weights of each of this rank's micro-batches (on
    each one's device), computed over the whole optimizer step `step` of all ranks.

    Every rank must call it at the same step with its own micro-batches (the
    same number of them on every rank, as the trainer's are). `seed` and `step`
    seed a control row's permutation (`wmtp.core.weights.control_weights`)."""
    if not micro_batches:
        raise ValueError("an optimizer step has at least one micro-batch")
    if not registry.method(algorithm).weighted:  # w = 1 on the mask: no statistic to share
        return [algorithm_weights(algorithm, part.mask, settings) for part in micro_batches]
    _check_same_inputs(micro_batches)
    local = _concat(micro_batches)
    everyone = _gather(local)
    rank = dist.get_rank() if len(everyone) > 1 else 0
    whole = _concat(everyone)
    order = canonical_order(whole.sample_ids)
    index = torch.tensor(order, dtype=torch.long)
    scores = {name: None if (s := getattr(whole, name)) is None else s[index] for name in SCORE_NAMES}
    sample_ids = [whole.sample_ids[row] for row in order]
    ordered = algorithm_weights(
        algorithm,
        whole.mask[index],
        settings,
        auto_strength=auto_strength,
        draw=Draw(seed, step, sample_ids),
        **scores,
    )  # (N, S) in canonical order
    weights = torch.empty_like(ordered)
    weights[index] = ordered  # (N, S) back in gather order
    first = sum(len(part.sample_ids) for part in everyone[:rank])
    out = []
    for part in micro_batches:
        rows, length = part.mask.shape
        out.append(weights[first : first + rows, :length].to(part.mask.device))
        first += rows
    return out
