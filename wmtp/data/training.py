"""Training data: rows of a train split -> tokenised (prompt, solution) examples -> batches.

Two layouts (`read_split`): MBPP's (mbpp, tiny-mbpp: one reference solution per
problem) and deepmind/code_contests' (codecontests: every problem's correct Python 3
solutions, up to a cap, each an example; the paper fine-tunes on these, conditioned
on correctness by leaving `incorrect_solutions` out). Each example is in the prompt
format evaluation uses for its benchmark.

The loss is computed on solution tokens only (the model is tuned to write code,
not to reproduce problem statements), so every example carries a loss mask
that is 1 exactly on the solution tokens and the final EOS. Prompt and solution
are tokenised separately and concatenated, so the boundary between them is exact
and identical to what evaluation feeds the model (the prompt alone, then the
model's continuation).

Batch order is a pure function of (seed, step): the trainer's "data position" is
just the number of optimizer steps taken, and a resumed run sees the same batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from wmtp.config.schema import CONTEST_BENCHMARKS
from wmtp.data.problems import PYTHON3, python3_solutions
from wmtp.data.prompts import contest_training_pair, training_pair

log = logging.getLogger(__name__)

MBPP_COLUMNS = ("task_id", "text", "code", "test_list")
# A CodeContests training row: one correct solution of one problem. `task_id` is
# "{problem name}#{j}" (j-th kept solution); `name` is the problem's.
CONTEST_TRAIN_COLUMNS = ("task_id", "name", "description", "code")
SOLUTION_SEPARATOR = "#"
CONTEST_TRAIN_SOURCE = ("name", "description", "solutions")  # what those rows are made of
# Joins the sample ids of examples packed into one row; `RefCETable.lookup` splits on it.
PACK_SEPARATOR = "+"
# Code with unicode, indentation, digits, and mixed quotes: two tokenizers that give
# the same ids here and have the same size are taken to be the same vocabulary.
VOCAB_PROBE = (
    'def f(x: int) -> str:\n    """Zählt 123 Äpfel → π ≈ 3.14159"""\n'
    "\tif x >= 10_000:\n        return f'{x!r:>8}'  # 日本語 🙂\n    return \"\"\n"
)


@dataclass(frozen=True)
class Example:
    """One training sequence. `loss_mask[j]` is 1 when token j is a target that
    counts (solution tokens and EOS), 0 on the prompt. A packed example's
    `sample_id` joins its parts' ids with PACK_SEPARATOR."""

    sample_id: str
    input_ids: list[int]
    loss_mask: list[int]


@dataclass
class Batch:
    """Right-padded batch. Padding has attention_mask 0 and loss_mask False."""

    input_ids: torch.Tensor  # (B, S) long
    loss_mask: torch.Tensor  # (B, S) bool
    attention_mask: torch.Tensor  # (B, S) long
    sample_ids: list[str]

    def to(self, device: str | torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.loss_mask.to(device),
            self.attention_mask.to(device),
            self.sample_ids,
        )

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def read_split(
    path: str | Path, dataset: str = "mbpp", max_solutions_per_problem: int | None = None
) -> pd.DataFrame:
    """Read a train split in its dataset's layout.

    MBPP-format (mbpp, tiny-mbpp): the rows as they are, `test_list` a list of
    strings. CodeContests (`CONTEST_BENCHMARKS`): one row per kept solution
    (`CONTEST_TRAIN_COLUMNS`): the problem's Python 3 `solutions` (never
    `incorrect_solutions`), duplicates dropped, the first `max_solutions_per_problem`
    in the dataset's order (None = all); problems without one contribute nothing."""
    if dataset in CONTEST_BENCHMARKS:
        return contest_rows(_contest_columns(path), max_solutions_per_problem, str(path))
    frame = pd.read_parquet(path)
    missing = [c for c in MBPP_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing MBPP column(s) {missing}; has {list(frame.columns)}")
    frame = frame.copy()
    frame["test_list"] = [[str(t) for t in tests] for tests in frame["test_list"]]
    return frame


def _contest_columns(path: str | Path) -> pd.DataFrame:
    """The columns of a CodeContests split that training reads: the train split's
    tests (hundreds of generated cases per problem) would cost gigabytes of memory."""
    names = pq.read_schema(path).names
    missing = [c for c in CONTEST_TRAIN_SOURCE if c not in names]
    if missing:
        raise ValueError(
            f"{path}: missing CodeContests column(s) {missing} (deepmind/code_contests layout, "
            f"needs {list(CONTEST_TRAIN_SOURCE)}); has {names}"
        )
    return pd.read_parquet(path, columns=list(CONTEST_TRAIN_SOURCE))


def contest_rows(frame: pd.DataFrame, max_solutions: int | None, source: str = "the split") -> pd.DataFrame:
    """deepmind/code_contests rows -> one training row per kept correct Python 3
    solution (`read_split`)."""
    missing = [c for c in CONTEST_TRAIN_SOURCE if c not in frame.columns]
    if missing:
        raise ValueError(f"{source}: missing CodeContests column(s) {missing}; has {list(frame.columns)}")
    rows = []
    for problem in frame.to_dict("records"):
        # the separators of sample ids may not occur in a problem's part of one
        name = str(problem["name"]).replace(SOLUTION_SEPARATOR, "_").replace(PACK_SEPARATOR, "_")
        kept = python3_solutions(problem["solutions"])[:max_solutions]
        rows += [
            (f"{name}{SOLUTION_SEPARATOR}{j}", name, str(problem["description"]), code)
            for j, code in enumerate(kept)
        ]
    if not rows:
        raise ValueError(f"{source}: no problem has a correct Python 3 solution (language {PYTHON3})")
    frame_out = pd.DataFrame(rows, columns=list(CONTEST_TRAIN_COLUMNS))
    log.info(
        "%s: %d correct Python 3 solutions of %d of its %d problems (at most %s per problem)",
        source, len(frame_out), frame_out["name"].nunique(), len(frame), max_solutions or "all",
    )  # fmt: skip
    return frame_out


def training_text(tokenizer, row) -> tuple[str, str]:
    """(prompt, target) of one row of `read_split` in its layout and the tokenizer's
    prompt format (`wmtp.data.prompts`)."""
    if hasattr(row, "description"):
        return contest_training_pair(tokenizer, row.description, row.code)
    tests = list(row.test_list)
    if not tests:
        raise ValueError(f"task {row.task_id}: empty test_list; the prompt shows the first test")
    return training_pair(tokenizer, row.text, tests[0], row.code)


def special_prefix(tokenizer) -> list[int]:
    """Tokens the tokenizer puts before any text by default (e.g. Llama's BOS), so
    training sees the same prompt start as generation, which tokenises with
    defaults."""
    with_special = tokenizer("x")["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def build_examples(rows: pd.DataFrame, tokenizer, max_seq_len: int) -> list[Example]:
    """Turn `read_split` rows into examples: prompt = the problem as evaluation shows
    it (MBPP: statement + first test; CodeContests: statement + stdin/stdout
    instruction), solution = the row's code + EOS, both in the prompt format the
    tokenizer records (`training_text`: the one evaluation of this model uses).
    Examples longer than `max_seq_len` are dropped (and counted in the log), never
    truncated: a cut solution teaches the model to stop mid-function."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; training targets end with EOS")
    prefix = special_prefix(tokenizer)
    examples, dropped = [], 0
    for row in rows.itertuples(index=False):
        prompt_text, target = training_text(tokenizer, row)
        prompt = prefix + tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        solution = tokenizer(target, add_special_tokens=False)["input_ids"]
        solution = solution + [tokenizer.eos_token_id]
        if len(prompt) + len(solution) > max_seq_len:
            dropped += 1
            continue
        examples.append(
            Example(
                sample_id=str(row.task_id),
                input_ids=list(prompt) + list(solution),
                loss_mask=[0] * len(prompt) + [1] * len(solution),
            )
        )
    if dropped:
        log.warning(
            "dropped %d of %d examples longer than max_seq_len=%d", dropped, len(rows), max_seq_len
        )
    ids = [e.sample_id for e in examples]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate task_id in the training rows; sample ids must be unique")
    return examples


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad a list of examples into tensors (any batch size >= 1)."""
    if not examples:
        raise ValueError("collate needs at least one example")
    seq = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), seq), pad_id, dtype=torch.long)  # (B, S)
    loss_mask = torch.zeros((len(examples), seq), dtype=torch.bool)  # (B, S)
    attention_mask = torch.zeros((len(examples), seq), dtype=torch.long)  # (B, S)
    for b, example in enumerate(examples):
        n = len(example.input_ids)
        if len(example.loss_mask) != n:
            raise ValueError(
                f"example {example.sample_id}: {n} tokens but {len(example.loss_mask)} mask entries"
            )
        input_ids[b, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        loss_mask[b, :n] = torch.tensor(example.loss_mask, dtype=torch.bool)
        attention_mask[b, :n] = 1
    return Batch(input_ids, loss_mask, attention_mask, [e.sample_id for e in examples])


def pack(examples: Sequence[Example], max_seq_len: int) -> list[Example]:
    """Greedily concatenate consecutive examples into rows of at most `max_seq_len`
    tokens (fewer pad tokens). Loss masks are kept; attention crosses examples
    (`DataSettings.pack` documents this). Sample ids are joined with PACK_SEPARATOR
    so reference CE can still be aligned part by part."""
    packed: list[Example] = []
    ids: list[str] = []
    tokens: list[int] = []
    mask: list[int] = []
    for example in examples:
        if PACK_SEPARATOR in example.sample_id:
            raise ValueError(f"sample id {example.sample_id!r} contains {PACK_SEPARATOR!r}")
        if len(example.input_ids) > max_seq_len:
            raise ValueError(
                f"example {example.sample_id} ({len(example.input_ids)} tokens) > {max_seq_len}"
            )
        if tokens and len(tokens) + len(example.input_ids) > max_seq_len:
            packed.append(Example(PACK_SEPARATOR.join(ids), tokens, mask))
            ids, tokens, mask = [], [], []
        ids.append(example.sample_id)
        tokens = tokens + list(example.input_ids)
        mask = mask + list(example.loss_mask)
    if tokens:
        packed.append(Example(PACK_SEPARATOR.join(ids), tokens, mask))
    return packed


def problem_of(sample_id: str) -> str:
    """The problem a sample id belongs to: a CodeContests id "{name}#{j}" -> name;
    an MBPP task id is its own problem."""
    return sample_id.split(SOLUTION_SEPARATOR, 1)[0]


def split_train_val(
    examples: Sequence[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Seeded hold-out of `val_fraction` of the examples (at least one when the
    fraction is > 0) for val/loss; order within each part is kept.

    Whole problems are held out (`problem_of`): the solutions of one CodeContests
    problem are all in train or all in val, so val/loss is measured on problems
    the model was not fine-tuned on. With one example per problem (MBPP) this is a
    plain seeded choice of examples."""
    n_val = int(round(len(examples) * val_fraction))
    if val_fraction > 0:
        n_val = max(n_val, 1)
    if n_val >= len(examples):
        raise ValueError(
            f"val_fraction={val_fraction} leaves no training examples out of {len(examples)}"
        )
    problems = list(dict.fromkeys(problem_of(e.sample_id) for e in examples))
    sizes = Counter(problem_of(e.sample_id) for e in examples)
    held, count = set(), 0
    for index in np.random.default_rng(seed).permutation(len(problems)).tolist():
        if count >= n_val:
            break
        held.add(problems[index])
        count += sizes[problems[index]]
    if count >= len(examples):
        raise ValueError(
            f"val_fraction={val_fraction}: holding out whole problems leaves no training examples "
            f"({len(problems)} problems, {len(examples)} examples)"
        )
    train = [e for e in examples if problem_of(e.sample_id) not in held]
    val = [e for e in examples if problem_of(e.sample_id) in held]
    return train, val


def batch_indices(n_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of global batch number `step` (0-based).

    Each epoch is a fresh permutation seeded by (seed, epoch); an epoch has
    `n_examples // batch_size` full batches (the remainder waits for the next
    epoch's shuffle), so every step has exactly `batch_size` examples. A pure
    function of its arguments: resuming at step s needs only s.
    """
    if batch_size > n_examples:
        raise ValueError(f"batch size {batch_size} > {n_examples} examples")
    per_epoch = n_examples // batch_size
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return order[index * batch_size : (index + 1) * batch_size].tolist()


def iterate_batches(
    examples: Sequence[Example],
    batch_size: int,
    seed: int,
    pad_id: int,
    start_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[int, Batch]]:
    """Endless `(step, batch)` stream from `start_step` on. The global batch of a
    step has `batch_size * world_size` examples; rank r takes every world_size-th
    one, so the union over ranks does not depend on how the step was resumed."""
    step = start_step
    while True:
        indices = batch_indices(len(examples), batch_size * world_size, seed, step)
        yield step, collate([examples[i] for i in indices[rank::world_size]], pad_id)
        step += 1


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's definition (vocabulary, merges, normaliser,
    special tokens), ignoring its runtime padding/truncation state. Ref-CE files
    record it so a table computed with another tokenizer is refused."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("padding", None)
        definition.pop("truncation", None)
    else:
        definition = {"vocab": sorted(tokenizer.get_vocab().items())}
    definition["special"] = {"eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()


def check_same_vocabulary(base_tokenizer, ref_tokenizer, base_name: str, ref_name: str) -> None:
    """Raise ValueError unless both tokenizers have the same size and give the same
    ids for VOCAB_PROBE: ce_ref is looked up by token id, so a reference model with
    another vocabulary would score different tokens."""
    problems = []
    if len(base_tokenizer) != len(ref_tokenizer):
        problems.append(f"vocabulary size {len(base_tokenizer)} vs {len(ref_tokenizer)}")
    base_ids = base_tokenizer(VOCAB_PROBE, add_special_tokens=False)["input_ids"]
    ref_ids = ref_tokenizer(VOCAB_PROBE, add_special_tokens=False)["input_ids"]
    if base_ids != ref_ids:
        first = next(
            (i for i, (a, b) in enumerate(zip(base_ids, ref_ids, strict=False)) if a != b), None
        )
        first = min(len(base_ids), len(ref_ids)) if first is None else first
        problems.append(
            f"probe text ids differ from token {first}: {base_ids[first : first + 5]} vs "
            f"{ref_ids[first : first + 5]} ({len(base_ids)} vs {len(ref_ids)} tokens)"
        )
    if problems:
        raise ValueError(
            f"base model {base_name!r} and reference model {ref_name!r} do not share a vocabulary: "
            + "; ".join(problems)
        )
