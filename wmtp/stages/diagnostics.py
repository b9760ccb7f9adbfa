"""What each method weights: solution tokens by kind, and one training example's weights.

A weighting method is only as good as the tokens it favours. Every solution
token is put in one class (`CLASSES`):

    first    the first solution token (the one fine-tuning must teach to start)
    eos      the final EOS
    comment  a token whose non-blank characters all lie inside a Python comment
             (a blank token: all its characters)
    code     every other solution token (whitespace included)

Comments are found with Python's own `tokenize` on the solution text and mapped
to tokens through the tokenizer's character offsets, so the same machinery
works on real code, where "comment" just means comments. In the tiny default
every comment of a training solution is a noise comment added by
`wmtp.tiny.data.add_noise` (the generated reference code has none), so there the
comment class *is* the noise.

During training, `WeightDiagnostics` sums the weights per class over each
logged window (extra metric columns `weight_on_<class>`: the mean weight of
that class's tokens in the window) and records the weights one fixed training
example (the probe) got the first and the last time it was in a batch; the
probe goes into metrics.parquet's schema metadata for the report's figure.
(After a resume, "first" means first since the resume: the record is not part
of the checkpoint.)
"""

from __future__ import annotations

import io
import json
import logging
import math
import tokenize
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from wmtp.data.prompts import mbpp_solution

if TYPE_CHECKING:  # imported where training uses them: the report rule reads CLASSES
    import torch  # and probes from this module, and its conda env has no torch

    from wmtp.data.training import Batch, Example

log = logging.getLogger(__name__)

CLASSES = ("comment", "code", "first", "eos")
COMMENT, CODE, FIRST, EOS = range(len(CLASSES))
NOT_SOLUTION = -1
COLUMNS = tuple(f"weight_on_{name}" for name in CLASSES)  # extra metrics.parquet columns
PROBE_META = b"wmtp.weight_probe"  # metrics.parquet schema metadata key
PROBE_MAX_TOKENS = 64  # the probe is picked among examples this short (a readable figure)


def comment_chars(text: str) -> np.ndarray:
    """(len(text),) bool: characters inside a Python comment, by `tokenize`. Text
    that does not tokenize cleanly (not Python, an unterminated string: tokenize
    then reports an error token and may read a '#' in the string as a comment)
    gets no comments at all."""
    inside = np.zeros(len(text), dtype=bool)
    line_starts = np.concatenate([[0], np.cumsum([len(line) for line in text.splitlines(True)])])
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.ERRORTOKEN and token.string.strip():
                raise SyntaxError(f"error token {token.string!r} at {token.start}")
            if token.type == tokenize.COMMENT:
                (row_a, col_a), (row_b, col_b) = token.start, token.end
                inside[line_starts[row_a - 1] + col_a : line_starts[row_b - 1] + col_b] = True
    except (tokenize.TokenError, SyntaxError) as error:
        log.debug("no comment classes for a solution that does not tokenize: %s", error)
        inside[:] = False
    return inside


def solution_classes(tokenizer, solution_text: str, solution_ids: Sequence[int]) -> np.ndarray:
    """Class of each solution token, `solution_ids` being the text's tokens plus EOS
    (as wmtp.data.training.build_examples makes them). Token classes come from the character
    offsets; if the tokenizer gives other ids than `solution_ids` (it never should),
    every middle token is `code`."""
    n = len(solution_ids)
    classes = np.full(n, CODE, dtype=np.int8)
    encoded = tokenizer(solution_text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) == list(solution_ids[:-1]):
        inside = comment_chars(solution_text)
        for i, (a, b) in enumerate(encoded["offset_mapping"]):
            blank = np.array([c.isspace() for c in solution_text[a:b]], dtype=bool)
            chars = inside[a:b][~blank] if (~blank).any() else inside[a:b]  # blank: all inside
            if b > a and chars.all():
                classes[i] = COMMENT
    else:
        log.warning("solution token ids differ from the tokenizer's offsets; no comment class")
    classes[0] = FIRST
    classes[-1] = EOS
    return classes


class TokenClasses:
    """Class of every token of every training example (`NOT_SOLUTION` on the prompt),
    by sample id."""

    def __init__(self, classes: dict[str, np.ndarray]) -> None:
        self.classes = classes  # sample_id -> (L,) int8

    @classmethod
    def from_rows(cls, rows, tokenizer, examples: Sequence[Example]) -> TokenClasses:
        """`rows`: the rows (`wmtp.data.training.read_split`: `task_id`, `code`) the `examples` were built from."""
        code = {str(task): text for task, text in zip(rows["task_id"], rows["code"], strict=True)}
        out = {}
        for example in examples:
            for sample_id, start, length in _parts(example):
                mask = np.asarray(example.loss_mask[start : start + length], dtype=bool)
                ids = example.input_ids[start : start + length]
                first = int(np.argmax(mask))
                classes = np.full(length, NOT_SOLUTION, dtype=np.int8)
                classes[first:] = solution_classes(
                    tokenizer, mbpp_solution(code[sample_id]), ids[first:]
                )
                out[sample_id] = classes
        return cls(out)

    def lookup(self, sample_ids: Sequence[str], shape: tuple[int, int]) -> np.ndarray:
        """(B, S) classes of a right-padded, possibly packed batch; `NOT_SOLUTION` on
        prompts and padding."""
        from wmtp.data.training import PACK_SEPARATOR

        out = np.full(shape, NOT_SOLUTION, dtype=np.int8)
        for b, joined in enumerate(sample_ids):
            offset = 0
            for sample_id in joined.split(PACK_SEPARATOR):
                classes = self.classes[sample_id]
                out[b, offset : offset + len(classes)] = classes
                offset += len(classes)
        return out

    def counts(self, sample_id: str) -> np.ndarray:
        return np.bincount(
            self.classes[sample_id][self.classes[sample_id] >= 0], minlength=len(CLASSES)
        )


def _parts(example: Example) -> Iterator[tuple[str, int, int]]:
    """(sample_id, start, length) of each sample in a possibly packed example. Parts
    are split where the loss mask falls from 1 (a solution's EOS) to 0 (next prompt)."""
    from wmtp.data.training import PACK_SEPARATOR

    ids = example.sample_id.split(PACK_SEPARATOR)
    mask = np.asarray(example.loss_mask, dtype=bool)
    ends = [int(i) + 1 for i in np.flatnonzero(mask[:-1] & ~mask[1:])] + [len(mask)]
    if len(ends) != len(ids):
        raise ValueError(
            f"example {example.sample_id}: {len(ids)} samples but {len(ends)} solutions"
        )
    start = 0
    for sample_id, end in zip(ids, ends, strict=True):
        yield sample_id, start, end - start
        start = end


def class_means(
    classes: TokenClasses, examples: Sequence[Example], per_token: Sequence[np.ndarray]
) -> dict[str, float | None]:
    """Mean of a per-token quantity ((L,) per example, NaN ignored) over each class's tokens."""
    sums, counts = np.zeros(len(CLASSES)), np.zeros(len(CLASSES))
    for example, values in zip(examples, per_token, strict=True):
        kinds = classes.lookup([example.sample_id], (1, len(example.input_ids)))[0]
        keep = (kinds >= 0) & np.isfinite(values)
        np.add.at(sums, kinds[keep], values[keep])
        np.add.at(counts, kinds[keep], 1)
    return {
        name: (float(sums[c] / counts[c]) if counts[c] else None) for c, name in enumerate(CLASSES)
    }


def pick_probe(classes: TokenClasses, examples: Sequence[Example]) -> str | None:
    """The probe example: among unpacked examples with at most PROBE_MAX_TOKENS
    solution tokens (all, if none is that short), the one with the most comment
    tokens, then the most code tokens, then the smallest id. A pure function of the
    examples, so every algorithm of a seed shows the same one."""
    from wmtp.data.training import PACK_SEPARATOR

    ids = [e.sample_id for e in examples if PACK_SEPARATOR not in e.sample_id]
    if not ids:
        return None
    short = [i for i in ids if classes.counts(i).sum() <= PROBE_MAX_TOKENS] or ids
    return min(short, key=lambda i: (-classes.counts(i)[COMMENT], -classes.counts(i)[CODE], i))


@dataclass
class ProbeRecord:
    sample_id: str
    tokens: list[str]
    classes: list[int]
    early: dict | None = None  # {"step": int, "weights": [float]} of the first sighting
    late: dict | None = None  # the same, of the last


class WeightDiagnostics:
    """Per-window mean weight of each token class, and the probe's weights."""

    def __init__(self, classes: TokenClasses, probe: ProbeRecord | None, device) -> None:
        import torch

        self.classes = classes
        self.probe = probe
        self.device = device
        self.sums = torch.zeros(2, len(CLASSES), dtype=torch.float64, device=device)  # sum, count

    @classmethod
    def for_training(
        cls, rows, tokenizer, examples: Sequence[Example], device
    ) -> WeightDiagnostics:
        classes = TokenClasses.from_rows(rows, tokenizer, examples)
        probe_id = pick_probe(classes, examples)
        probe = None
        if probe_id is not None:
            example = next(e for e in examples if e.sample_id == probe_id)
            kinds = classes.classes[probe_id]
            solution = [t for t, k in zip(example.input_ids, kinds, strict=True) if k >= 0]
            probe = ProbeRecord(
                probe_id,
                [tokenizer.decode([t]) for t in solution],
                [int(k) for k in kinds if k >= 0],
            )
        return cls(classes, probe, device)

    def add(self, weights: torch.Tensor, batch: Batch, step: int) -> None:
        """Accumulate one micro-batch's `(B, S)` weights (indexed by target token)."""
        import torch

        kinds = torch.from_numpy(
            self.classes.lookup(batch.sample_ids, tuple(batch.input_ids.shape))
        )
        kinds = kinds.to(weights.device).long()
        valid = (kinds >= 0) & batch.loss_mask.bool()
        w = weights.detach().double()[valid]
        index = kinds[valid]
        sums = torch.zeros_like(self.sums)
        sums[0].index_add_(0, index.to(sums.device), w.to(sums.device))
        sums[1].index_add_(0, index.to(sums.device), torch.ones_like(w).to(sums.device))
        self.sums += sums
        if self.probe is not None and self.probe.sample_id in batch.sample_ids:
            row = batch.sample_ids.index(self.probe.sample_id)
            seen = {"step": step, "weights": weights[row][kinds[row] >= 0].float().cpu().tolist()}
            self.probe.early = self.probe.early or seen
            self.probe.late = seen

    def reduce(self, world: int) -> dict[str, float]:
        """All ranks call this together at each logged row; returns the row's extra
        columns (NaN for a class with no token in the window) and starts a new window."""
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(self.sums)
        sums, counts = self.sums.tolist()
        self.sums.zero_()
        return {
            col: (s / c if c else math.nan) for col, s, c in zip(COLUMNS, sums, counts, strict=True)
        }

    def probe_metadata(self, world: int) -> dict[bytes, bytes]:
        """The probe record as parquet schema metadata (all ranks call this; the
        earliest and latest sightings over ranks are kept)."""
        records = [self.probe]
        if world > 1:
            import torch.distributed as dist

            records = [None] * world
            dist.all_gather_object(records, self.probe)
        seen = [r for r in records if r is not None and r.early is not None]
        if not seen:
            return {}
        merged = ProbeRecord(seen[0].sample_id, seen[0].tokens, seen[0].classes)
        merged.early = min((r.early for r in seen), key=lambda s: s["step"])
        merged.late = max((r.late for r in seen), key=lambda s: s["step"])
        return {PROBE_META: json.dumps(merged.__dict__).encode()}


def read_probe(metadata: dict[bytes, bytes] | None) -> ProbeRecord | None:
    """The probe record of a metrics.parquet's schema metadata, or None."""
    if not metadata or PROBE_META not in metadata:
        return None
    return ProbeRecord(**json.loads(metadata[PROBE_META]))
