"""Monte-Carlo values of gold-solution prefixes: the critic's estimate (VinePPO, Math-Shepherd).

The value of a state is the chance that the frozen base model, continuing from
it, writes a program that passes the problem's tests. For a training solution
cut at its line ends, the value of each prefix is estimated by sampling K
continuations from the base and executing them (Kazemnejad et al. 2024,
"VinePPO", and Wang et al. 2024, "Math-Shepherd", estimate step values the same
way), and a line's advantage is the value after it minus the value before it.

Where a solution is cut (`solution_lines`): in token space, after every token of
the training example whose text holds a newline, so a prefix is exactly the
tokens the trainer sees up to that point (a tokenizer that merges a newline with
the next line's indentation gives a prefix ending in that indentation), and the
sampler, which tokenises the prefix text again, continues from the same ids
(`prefix_prompts` counts the prefixes for which it would not). The boundaries
are 0 (s0, the prompt alone), the line ends (at most `max_lines`, evenly spread
when a solution has more: neighbouring lines then form one segment), and the end
of the example (after EOS), whose value is the reward of the gold solution
itself, executed once.

A continuation's reward is 1 when prefix + continuation passes every test (the
asserts run together in one sandbox program, as evaluation judges), else 0; or a
reward model's score of the prompt and program. Identical programs of a problem
are judged once, and one that does not compile is a fail without a sandbox run
(compiling runs none of it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from wmtp.core.sample import generate
from wmtp.data.prompts import (
    MBPP_STOP,
    chat_completion,
    generation_stops,
    prompt_format,
    training_pair,
)
from wmtp.data.training import Example
from wmtp.sandbox.runner import Job, run_many

log = logging.getLogger(__name__)

# (programs, the solution each one completes) -> reward of each program in [0, 1]
Judge = Callable[[Sequence[str], Sequence["Solution"]], list[float]]


@dataclass(frozen=True)
class Solution:
    """One training example's gold solution, cut at its line ends.

    `boundaries` are offsets into the solution's tokens (EOS included, `n` of
    them): 0 = s0, then each kept line end, then `n` (the finished example).
    Segment l (l = 1..len(boundaries)-1) is the tokens boundaries[l-1]..boundaries[l]-1."""

    sample_id: str
    example: Example
    start: int  # index of the first solution token in example.input_ids
    prompt_text: str
    code: str  # the gold program (what the sandbox runs for the finished example)
    prefixes: tuple[str, ...]  # solution text before each sampled boundary (all but the last)
    boundaries: tuple[int, ...]
    tests: tuple[str, ...]
    setup: str

    @property
    def n_segments(self) -> int:
        return len(self.boundaries) - 1


def _line_ends(tokenizer, target: str, ids: list[int], sample_id: str) -> tuple[list[int], list[int]]:
    """(offsets after each token holding a newline, character end of every token)
    of the solution text `target`, whose tokens in the example are `ids`, from the
    fast tokenizer's offsets."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the critic cuts solutions with token offsets: it needs a fast tokenizer")
    encoded = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
    if encoded["input_ids"] != ids:
        raise ValueError(f"example {sample_id}: its solution tokens are not the tokens of its code")
    offsets = encoded["offset_mapping"]
    ends = [int(end) for _, end in offsets]
    cuts = [j + 1 for j, (begin, end) in enumerate(offsets) if "\n" in target[begin:end]]
    return cuts, ends


def _spread(cuts: list[int], max_lines: int | None) -> list[int]:
    """At most `max_lines` of the line ends, evenly spread, the last one always kept
    (the state before the final segment is where stopping is judged)."""
    if max_lines is None or len(cuts) <= max_lines:
        return cuts
    chosen = np.unique(np.round(np.linspace(0, len(cuts) - 1, max_lines)).astype(int))
    return [cuts[i] for i in chosen]


def solution_lines(tokenizer, example: Example, row, max_lines: int | None) -> Solution:
    """Cut one training example (built by wmtp.data.training.build_examples from
    `row`) at its line ends."""
    tests = [str(t) for t in row.test_list]
    prompt_text, target = training_pair(tokenizer, row.text, tests[0], row.code)
    start = example.loss_mask.index(1)
    n = len(example.input_ids) - start  # solution tokens, EOS included
    cuts, ends = _line_ends(tokenizer, target, example.input_ids[start:-1], example.sample_id)
    cuts = [c for c in _spread(cuts, max_lines) if 0 < c < n]
    boundaries = (0, *cuts, n)
    prefixes = tuple(target[: ends[b - 1]] if b else "" for b in boundaries[:-1])
    setup = getattr(row, "test_setup_code", "") or ""
    code = row.code.replace("\r\n", "\n").strip("\n") + "\n"
    return Solution(
        str(row.task_id), example, start, prompt_text, code, prefixes, boundaries, tuple(tests), str(setup)
    )


def prefix_prompts(tokenizer, solutions: Sequence[Solution]) -> tuple[list[str], int]:
    """The sampler's prompt of every sampled boundary (prompt text + solution prefix),
    in order, and how many of them tokenise to other ids than the training example's
    (the sampler then continues from a slightly different state)."""
    prompts, mismatched = [], 0
    for solution in solutions:
        for b, prefix in zip(solution.boundaries, solution.prefixes, strict=False):
            text = solution.prompt_text + prefix
            ids = tokenizer(text)["input_ids"]
            mismatched += ids != solution.example.input_ids[: solution.start + b]
            prompts.append(text)
    return prompts, int(mismatched)


def continuation_program(prefix: str, continuation: str, fmt: str) -> str:
    """The program a continuation completes: the solution prefix and what the base
    wrote after it (in the chat format, the code up to the block's closing fence,
    cut at MBPP's stops like evaluation's)."""
    if fmt == "chat":
        continuation = chat_completion(continuation, MBPP_STOP)
    return prefix + continuation


def _compiles(source: str) -> bool:
    try:
        compile(source, "<candidate>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def execution_judge(*, timeout: float, memory_mb: int, workers: int | None) -> Judge:
    """Reward 1 when the program passes every test (setup and asserts in one sandbox
    program), else 0. Identical (program, tests) pairs run once; a program that
    does not compile with its tests is a fail without a run."""

    def judge(programs: Sequence[str], owners: Sequence[Solution]) -> list[float]:
        keys = [
            (p, "\n".join([o.setup, *o.tests]).strip("\n") + "\n")
            for p, o in zip(programs, owners, strict=True)
        ]
        distinct = list(dict.fromkeys(keys))
        runnable = [k for k in distinct if _compiles(k[0] + "\n" + k[1])]
        jobs = [Job(program=p, tests=t, timeout=timeout, memory_mb=memory_mb) for p, t in runnable]
        outcomes = run_many(jobs, workers=workers, progress=True) if jobs else []
        passed = {k: 0.0 for k in distinct}
        passed.update({k: float(o.passed) for k, o in zip(runnable, outcomes, strict=True)})
        log.info(
            "judged %d programs: %d distinct, %d compiled and ran in the sandbox",
            len(keys), len(distinct), len(runnable),
        )
        return [passed[k] for k in keys]

    return judge


def sample_continuations(
    model, tokenizer, prompts: list[str], *, rollouts: int, temperature: float, top_p: float,
    max_new_tokens: int, seed: int, batch_size: int,
) -> list[list[str]]:
    """`rollouts` continuations of each prompt from the frozen base (wmtp.core.sample.generate,
    head 0, stopped where evaluation of this prompt format stops)."""
    return generate(
        model,
        tokenizer,
        prompts,
        n=rollouts,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        stop=generation_stops(prompt_format(tokenizer), MBPP_STOP),
        progress=True,
    )


@dataclass(frozen=True)
class Estimate:
    """Values of every boundary of each solution ((n_segments + 1,) each, the last
    being the gold's own reward) and what the estimate cost."""

    values: list[np.ndarray]
    n_prompts: int
    n_continuations: int
    n_prefix_mismatch: int

    def line_deltas(self) -> list[np.ndarray]:
        """Each segment's advantage: value after it minus value before it."""
        return [np.diff(v) for v in self.values]


def estimate_values(
    solutions: Sequence[Solution],
    continuations: Callable[[list[str]], list[list[str]]],
    judge: Judge,
    tokenizer,
) -> Estimate:
    """Monte-Carlo value of every boundary: the mean reward of the continuations
    sampled there (`continuations(prompts)` gives K per prompt), and at the end the
    reward of the gold solution itself."""
    fmt = prompt_format(tokenizer)
    prompts, mismatched = prefix_prompts(tokenizer, solutions)
    sampled = continuations(prompts) if prompts else []
    programs, owner = [], []
    index = 0
    for s, solution in enumerate(solutions):
        for b, prefix in enumerate(solution.prefixes):
            for continuation in sampled[index]:
                programs.append(continuation_program(prefix, continuation, fmt))
                owner.append((s, b))
            index += 1
        programs.append(solution.code)
        owner.append((s, len(solution.prefixes)))
    rewards = judge(programs, [solutions[s] for s, _ in owner])
    totals = [np.zeros(len(s.boundaries)) for s in solutions]
    counts = [np.zeros(len(s.boundaries)) for s in solutions]
    for (s, b), reward in zip(owner, rewards, strict=True):
        totals[s][b] += reward
        counts[s][b] += 1
    values = [t / c for t, c in zip(totals, counts, strict=True)]
    return Estimate(values, len(prompts), sum(len(c) for c in sampled), mismatched)


def token_deltas(solution: Solution, line_deltas: np.ndarray) -> np.ndarray:
    """The table's delta at every position of the example (L,): each token of
    segment l gets that segment's advantage (VinePPO gives every token of a step
    the step's advantage), NaN on the prompt."""
    example = solution.example
    out = np.full(len(example.input_ids), np.nan, dtype=np.float32)
    for l, delta in enumerate(line_deltas):
        first, last = solution.boundaries[l], solution.boundaries[l + 1]
        out[solution.start + first : solution.start + last] = delta
    return out


def token_values(solution: Solution, values: np.ndarray) -> np.ndarray:
    """The table's value at every position (L,): V(s0) at the last prompt token and,
    on each solution token, the value of the boundary that ends its segment (a step
    function; the value after the last token is the gold's reward); NaN before s0."""
    example = solution.example
    out = np.full(len(example.input_ids), np.nan, dtype=np.float32)
    out[solution.start - 1] = values[0]
    for l in range(solution.n_segments):
        first, last = solution.boundaries[l], solution.boundaries[l + 1]
        out[solution.start + first : solution.start + last] = values[l + 1]
    return out
