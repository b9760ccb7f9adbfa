"""The evaluation's completions, from either engine (`eval.engine`), at every temperature.

`own`: `wmtp.core.sample` on the MTP model itself (continuous batching; with
`eval.speculative` the heads draft). `vllm`: the model exported to a plain Llama
directory in a temporary folder (head 0's path, exactly the next-token model our
sampler decodes; `wmtp.stages.export`) and sampled by vLLM in a process of its
own, every temperature in one engine start (`wmtp.core.vllm_engine`). Either way
the prompts, stop strings, end ids, top-p and temperatures are the same, and so
is what comes out: n completion strings per problem, cut the same way, and the
counts of decoded and kept tokens.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from wmtp.config.schema import EvalSettings
from wmtp.data.problems import Problem
from wmtp.data.prompts import PromptFormat, chat_completion, generation_stops, model_prompt


@dataclass
class Sampled:
    """One temperature's completions (n per problem) and its throughput figures:
    seconds of generation, tokens decoded (stop text and end ids included) and
    tokens kept (the judged completions, re-tokenised), both for the distinct
    generations (greedy decodes one and repeats it)."""

    completions: list[list[str]]
    seconds: float
    decoded: int
    kept: int


def _prompts_and_stop(tokenizer, problems: list[Problem], fmt: PromptFormat):
    prompts = [model_prompt(tokenizer, fmt, p.prompt, p.message) for p in problems]
    stops = {p.stop for p in problems}
    if len(stops) != 1:
        raise ValueError(f"problems of one benchmark must share stop sequences, got {stops}")
    return prompts, generation_stops(fmt, stops.pop())


def _distinct(settings: EvalSettings, temperature: float) -> int:
    """Completions generated per problem: one when greedy (every sample is the same)."""
    return 1 if temperature == 0 else settings.n_samples


def _finished(
    tokenizer,
    problems: list[Problem],
    completions: list[list[str]],
    settings: EvalSettings,
    temperature: float,
    fmt: PromptFormat,
    seconds: float,
    decoded: int,
) -> Sampled:
    """A chat reply becomes the completion its code block gives; greedy completions
    are repeated to n; kept tokens counted."""
    if fmt == "chat":
        completions = [
            [chat_completion(reply, p.stop, p.entry_point) for reply in replies]
            for p, replies in zip(problems, completions, strict=True)
        ]
    kept = sum(
        len(tokenizer(c, add_special_tokens=False)["input_ids"]) for s in completions for c in s
    )
    if temperature == 0:
        completions = [s * settings.n_samples for s in completions]
    return Sampled(completions, seconds, decoded, kept)


def _own_engine(model, tokenizer, prompts, stop, settings, temperature, seed, end_ids):
    """(completions, decoded tokens) of our sampler at one temperature."""
    from wmtp.core.sample import generate, speculative_generate

    sampling = dict(
        n=_distinct(settings, temperature),
        temperature=temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens,
        seed=seed,
        batch_size=settings.batch_size,
        stop=stop,
        progress=True,
        eos_token_ids=end_ids,
    )
    if settings.speculative:
        completions, stats = speculative_generate(model, tokenizer, prompts, **sampling)
        return completions, stats.tokens
    completions, decoded = generate(model, tokenizer, prompts, **sampling, with_decoded_tokens=True)
    return completions, sum(sum(row) for row in decoded)


def sample_own(
    model, tokenizer, problems: list[Problem], settings: EvalSettings, seed: int,
    fmt: PromptFormat, end_ids: list[int],
) -> dict[float, Sampled]:  # fmt: skip
    """Every temperature of `settings.temperatures` with our sampler on `model`."""
    prompts, stop = _prompts_and_stop(tokenizer, problems, fmt)
    out = {}
    for temperature in settings.temperatures:
        started = time.perf_counter()
        completions, decoded = _own_engine(
            model, tokenizer, prompts, stop, settings, temperature, seed, end_ids
        )
        seconds = time.perf_counter() - started
        out[temperature] = _finished(
            tokenizer, problems, completions, settings, temperature, fmt, seconds, decoded
        )
    return out


def sample_vllm(
    model_dir: str | Path, tokenizer, problems: list[Problem], settings: EvalSettings,
    seed: int, fmt: PromptFormat, end_ids: list[int],
) -> dict[float, Sampled]:  # fmt: skip
    """Every temperature of `settings.temperatures` with vLLM on the model of
    `model_dir` (ours), exported to a temporary plain Llama directory first."""
    from wmtp.core.vllm_engine import SamplingPass, check_vllm_python, vllm_generate
    from wmtp.stages.export import export_hf

    check_vllm_python(settings.vllm_python)  # before the export, which takes minutes at 7B
    prompts, stop = _prompts_and_stop(tokenizer, problems, fmt)
    passes = [SamplingPass(t, _distinct(settings, t), seed) for t in settings.temperatures]
    with tempfile.TemporaryDirectory(prefix="wmtp-export-") as tmp:
        exported = export_hf(model_dir, Path(tmp) / "model")
        results = vllm_generate(
            exported, tokenizer, prompts, passes, top_p=settings.top_p,
            max_new_tokens=settings.max_new_tokens, stop=stop, eos_token_ids=end_ids,
            python=settings.vllm_python, progress=True,
        )  # fmt: skip
    return {
        run.temperature: _finished(
            tokenizer, problems, result.completions, settings, run.temperature, fmt,
            result.seconds, sum(map(sum, result.decoded)),
        )  # fmt: skip
        for run, result in zip(passes, results, strict=True)
    }
