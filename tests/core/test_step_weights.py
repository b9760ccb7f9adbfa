"""Weights over the whole optimizer step: the same for every split of the step.

The step's 8 sequences are dealt out as the trainer deals them
(`wmtp.data.training.iterate_batches`: rank r takes every world-th example of a
micro-step's global batch) to 1 process x 4 accumulation micro-batches, 2 x 2,
4 x 1, and a few more; the 2- and 4-process splits run as real processes joined by
a gloo process group (marked slow: each process imports torch, ~10 s on a busy
2-core machine). Each process hands `step_weights` its own micro-batches'
inputs, as the trainer does, and every split must give every sequence the same
weights, bit for bit: the method's formula (`algorithm_weights`) applied once to
the whole step, which differs from the formula applied per micro-batch.

The inputs (ce_base, ce_ref, deltas) are a fixed function of (sample id,
position) here, as the reference-CE and value tables are; a model's CE can differ
by float rounding between paddings, which is not what this test is about.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from wmtp.config import registry
from wmtp.config.schema import WeightingSettings
from wmtp.core.step_weights import MicroInputs, canonical_order, step_weights
from wmtp.core.weights import Draw, algorithm_weights
from wmtp.data.training import Batch, Example, collate, iterate_batches

N_EXAMPLES, STEP_SIZE, SEED, PAD = 16, 8, 5, 0
STEPS = (1, 2)  # optimizer steps (1-based), as the trainer numbers them
AUTO_STRENGTH = 0.6  # critic-wmtp with strength: auto
ALGORITHMS = registry.TRAINED  # every trained row, controls included
# (processes, accumulation micro-batches); micro batch size = STEP_SIZE / (processes * accumulation)
ONE_PROCESS = ((1, 4), (1, 1), (1, 8))
SEVERAL = ((2, 2), (4, 1))  # real gloo process groups: slow (a torch import per process)


def examples() -> list[Example]:
    """Sequences of 12..49 tokens: a prompt of 2..7, the rest targets (loss mask 1)."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for i in range(N_EXAMPLES):
        n = int(torch.randint(12, 50, (1,), generator=generator))
        prompt = int(torch.randint(2, 8, (1,), generator=generator))
        ids = torch.randint(1, 90, (n,), generator=generator).tolist()
        out.append(Example(f"task-{i:02d}", ids, [0] * prompt + [1] * (n - prompt)))
    return out


def scores_of(sample_id: str, n: int) -> dict[str, torch.Tensor]:
    """Per-token inputs of one sample, `(n,)` each: a table's values for it."""
    generator = torch.Generator().manual_seed(int(sample_id.split("-")[1]) + 100)
    return {
        "ce_base": torch.rand(n, generator=generator) * 4,
        "ce_ref": torch.rand(n, generator=generator) * 2,
        "deltas": torch.randn(n, generator=generator),
    }


def micro_inputs(batch: Batch) -> MicroInputs:
    """What the trainer's table look-ups give for `batch`: `(B, S)`, 0 on padding."""
    rows, length = batch.input_ids.shape
    given = {name: torch.zeros(rows, length) for name in ("ce_base", "ce_ref", "deltas")}
    for b, sample_id in enumerate(batch.sample_ids):
        n = int(batch.attention_mask[b].sum())
        for name, values in scores_of(sample_id, n).items():
            given[name][b, :n] = values
    return MicroInputs(batch.sample_ids, batch.loss_mask, **given)


def settings_of(algorithm: str) -> WeightingSettings:
    return WeightingSettings(strength="auto" if registry.method(algorithm).has_critic else 1.0)


def weights_of_this_rank(rank: int, world: int, accum: int) -> dict:
    """(algorithm, step, sample id) -> its weights, for this rank's sequences."""
    micro = STEP_SIZE // (world * accum)
    stream = iterate_batches(examples(), micro, SEED, PAD, rank=rank, world_size=world)
    out = {}
    for step in STEPS:
        parts = [micro_inputs(next(stream)[1]) for _ in range(accum)]
        for algorithm in ALGORITHMS:
            got = step_weights(
                algorithm, settings_of(algorithm), parts, seed=SEED, step=step,
                auto_strength=AUTO_STRENGTH,
            )  # fmt: skip
            for part, weights in zip(parts, got, strict=True):
                assert weights.shape == part.mask.shape and weights.dtype == torch.float32
                for b, sample_id in enumerate(part.sample_ids):
                    n = int(part.mask[b].nonzero().max()) + 1
                    assert torch.all(weights[b, n:] == 0)
                    out[(algorithm, step, sample_id)] = weights[b, :n].clone()
    return out


def _worker(rank: int, world: int, accum: int, store: str, out_dir: str) -> None:
    """One rank of a gloo process group: its weights, saved for the parent."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save(weights_of_this_rank(rank, world, accum), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def weights_of_split(world: int, accum: int, tmp_path: Path) -> dict:
    """Every sequence's weights under `world` processes x `accum` micro-batches."""
    if world == 1:
        return weights_of_this_rank(0, 1, accum)
    out_dir = tmp_path / f"{world}x{accum}"
    out_dir.mkdir()
    env = {key: os.environ.pop(key) for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if key in os.environ}
    try:
        mp.start_processes(
            _worker, args=(world, accum, str(out_dir / "store"), str(out_dir)), nprocs=world,
            start_method="spawn",
        )  # fmt: skip
    finally:
        os.environ.update(env)
    merged: dict = {}
    for rank in range(world):
        part = torch.load(out_dir / f"rank{rank}.pt")
        assert not merged.keys() & part.keys(), "a sequence on two ranks"
        merged |= part
    return merged


def step_examples(step: int) -> list[Example]:
    """The step's sequences (the union over every split), as one batch would hold them."""
    stream = iterate_batches(examples(), STEP_SIZE, SEED, PAD)
    batch = [next(stream)[1] for _ in range(step)][-1]
    by_id = {e.sample_id: e for e in examples()}
    return [by_id[sample_id] for sample_id in batch.sample_ids]


def formula(algorithm: str, batch: Batch, step: int) -> torch.Tensor:
    """The method's weights of the sequences of `batch` taken as one batch."""
    inputs = micro_inputs(batch)
    return algorithm_weights(
        algorithm, inputs.mask, settings_of(algorithm), ce_base=inputs.ce_base, ce_ref=inputs.ce_ref,
        deltas=inputs.deltas, auto_strength=AUTO_STRENGTH, draw=Draw(SEED, step, batch.sample_ids),
    )  # fmt: skip


@pytest.fixture(scope="module")
def splits() -> dict[tuple[int, int], dict]:
    return {split: weights_of_split(*split, Path()) for split in ONE_PROCESS}


def assert_same_weights(splits: dict[tuple[int, int], dict]) -> None:
    reference = splits[(1, 4)]
    assert len(reference) == len(ALGORITHMS) * len(STEPS) * STEP_SIZE
    for split, got in splits.items():
        assert got.keys() == reference.keys(), split
        different = [key for key in reference if not torch.equal(got[key], reference[key])]
        assert different == [], f"{split[0]} processes x {split[1]} micro-batches: {different[:5]}"


def test_every_accumulation_of_the_step_gives_the_same_weights(splits):
    assert_same_weights(splits)


@pytest.mark.slow
def test_two_and_four_processes_give_the_same_weights_as_one(splits, tmp_path):
    """1 x 4, 2 x 2 and 4 x 1 (and 1 x 1, 1 x 8): gloo process groups for 2 and 4."""
    several = {split: weights_of_split(*split, tmp_path) for split in SEVERAL}
    assert_same_weights(splits | several)
    test_the_weights_are_the_formula_over_the_whole_step(several, 1, split=(2, 2))
    test_controls_permute_the_methods_weights_of_the_step(several, split=(4, 1))


@pytest.mark.parametrize("step", STEPS)
def test_the_weights_are_the_formula_over_the_whole_step(splits, step, split=(1, 4)):
    """The step's sequences in sample-id order as one batch: the formula there is
    what every split gave; per micro-batch of 2 it would be something else."""
    got = splits[split]
    whole = step_examples(step)
    ordered = [whole[i] for i in canonical_order([e.sample_id for e in whole])]
    batch = collate(ordered, PAD)
    for algorithm in ALGORITHMS:
        expected = formula(algorithm, batch, step)
        for b, sample_id in enumerate(batch.sample_ids):
            mine = got[(algorithm, step, sample_id)]
            assert torch.equal(mine, expected[b, : len(mine)]), (algorithm, sample_id)
            assert torch.all(expected[b, len(mine) :] == 0)
        if not registry.method(algorithm).weighted:
            continue
        pair = collate(ordered[:2], PAD)  # what a micro-batch of 2 would have given alone
        alone = formula(algorithm, pair, step)
        assert any(
            not torch.equal(alone[b, : len(got[(algorithm, step, i)])], got[(algorithm, step, i)])
            for b, i in enumerate(pair.sample_ids)
        ), f"{algorithm}: per-micro-batch statistics would give the same weights"


def test_controls_permute_the_methods_weights_of_the_step(splits, split=(1, 1)):
    """Per sequence (shuffled) or per step (matched), a control has exactly its
    method's values, not at the same tokens; mean 1 over the step's valid tokens."""
    got = splits[split]
    for step in STEPS:
        whole = step_examples(step)
        ids, n_valid = sorted(e.sample_id for e in whole), sum(sum(e.loss_mask) for e in whole)
        for name in ALGORITHMS:
            method = registry.method(name)
            if method.control is None:
                continue
            own = [got[(method.control_of, step, i)] for i in ids]
            control = [got[(name, step, i)] for i in ids]
            if method.control == "shuffled":
                for a, b in zip(own, control, strict=True):
                    assert torch.equal(a.sort().values, b.sort().values), name
            else:
                assert torch.equal(torch.cat(own).sort().values, torch.cat(control).sort().values), name
            assert not all(torch.equal(a, b) for a, b in zip(own, control, strict=True)), name
            assert sum(float(w.sum()) for w in control) / n_valid == pytest.approx(1.0, abs=1e-5)
