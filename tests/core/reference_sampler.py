"""The sampler as it was before issue 20, frozen: static batches of (prompt, sample)
pairs that run until their longest row ends, the prompt prefilled once per sample,
Hugging Face's cache and layers at every step, and each row's sorted probabilities
copied to the host for `torch.multinomial`.

Kept as the reference `wmtp.core.sample.generate`'s greedy output is tested against
(tests/core/test_sample.py) and as the baseline of benchmarks/sampler_throughput.py.
Do not improve it: its point is to stay what was measured.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import torch
from tqdm import tqdm

from wmtp.core.model import MTPModel
from wmtp.data.prompts import STOP_SEQUENCES, truncate_at_stop


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _new_cache(model: torch.nn.Module):
    if isinstance(model, MTPModel):
        return model.new_cache()
    from transformers.cache_utils import DynamicCache

    return DynamicCache(config=model.config)


def _logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
    """Next-token logits (B, S, V) for `ids` (B, S) after `cache`; `mask` (B, past+S)."""
    if isinstance(model, MTPModel):
        return model.next_token_logits(ids, mask, cache)
    # HF models take positions from the cache length, not the mask: give them
    # explicitly so left padding does not shift a prompt's positions.
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    )
    return out.logits


def _sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    return int(np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1)[0])


def _sorted_nucleus(
    logits: torch.Tensor, temperature: float, top_p: float, top: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The temperature- and top-p-adjusted distribution of `logits` (..., V), in
    descending order: (probabilities, unnormalised, zero outside the nucleus; their
    token ids). The smallest prefix whose mass reaches `top_p` stays. With `top`,
    only the `top` most likely tokens are ranked (`topk`, much cheaper than a full
    sort on a CPU); the nucleus is complete if their kept mass reaches `top_p`."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top is None or top >= probs.shape[-1]:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
    else:
        sorted_probs, order = probs.topk(top, dim=-1)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the first token always stays
    return sorted_probs.masked_fill(outside, 0.0), order


def _choose(
    logits: torch.Tensor, temperature: float, top_p: float, generators: list[torch.Generator]
) -> torch.Tensor:
    """Next token per row from `logits` (B, V): argmax when temperature == 0, else
    nucleus sampling, each row with its own generator."""
    if temperature == 0:
        return logits.argmax(-1)
    sorted_probs, order = _sorted_nucleus(logits, temperature, top_p)  # (B, V) each
    picks = [
        torch.multinomial(row.cpu(), 1, generator=gen)
        for row, gen in zip(sorted_probs, generators, strict=True)
    ]
    picked = torch.cat(picks).to(logits.device)  # (B,) index into the sorted order
    return order.gather(-1, picked.unsqueeze(-1)).squeeze(-1)


def _end_ids(tokenizer, eos_token_ids: Collection[int] | None) -> frozenset[int]:
    """The ids that end a completion: `eos_token_ids`, else the tokenizer's EOS."""
    if eos_token_ids is not None:
        return frozenset(eos_token_ids)
    return frozenset() if tokenizer.eos_token_id is None else frozenset([tokenizer.eos_token_id])


def _finish(
    tokenizer,
    tokens: list[int],
    stop: tuple[str, ...],
    eos_token_ids: Collection[int] | None = None,
) -> str:
    """The completion text: tokens up to the first end id, decoded, cut at the first
    stop sequence."""
    ends = _end_ids(tokenizer, eos_token_ids)
    end = next((i for i, token in enumerate(tokens) if token in ends), len(tokens))
    return truncate_at_stop(tokenizer.decode(tokens[:end], skip_special_tokens=True), stop)


def _stopped(
    tokenizer,
    tokens: list[int],
    stop: tuple[str, ...],
    tail: int = 48,
    eos_token_ids: Collection[int] | None = None,
) -> bool:
    """An end id (any of `eos_token_ids`, default the tokenizer's EOS) generated, or a
    stop sequence in the last `tail` tokens (checked after every step, so a stop is
    always seen while it is recent; decoding only the tail keeps the check O(1) per
    step instead of O(length))."""
    if not _end_ids(tokenizer, eos_token_ids).isdisjoint(tokens[-tail:]):
        return True
    if not stop:
        return False
    text = tokenizer.decode(tokens[-tail:], skip_special_tokens=True)
    return any(s in text for s in stop)


@torch.inference_mode()
def _generate_batch(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    generators,
    *,
    temperature,
    top_p,
    max_new_tokens,
    stop,
    eos_token_ids: Collection[int] | None = None,
) -> list[list[int]]:
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=device)  # (B, L)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    cache = _new_cache(model)
    generated: list[list[int]] = [[] for _ in prompt_ids]
    done = [False] * len(prompt_ids)
    step_ids = ids
    for _ in range(max_new_tokens):
        logits = _logits(model, step_ids, mask, cache)[:, -1]  # (B, V)
        tokens = _choose(logits, temperature, top_p, generators).tolist()
        for row, token in enumerate(tokens):
            if not done[row]:
                generated[row].append(token)
                done[row] = _stopped(tokenizer, generated[row], stop, eos_token_ids=eos_token_ids)
        if all(done):
            break
        step_ids = torch.tensor(tokens, device=device).unsqueeze(-1)  # (B, 1)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=-1)  # (B, past + 1)
    return generated


def old_generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 16,
    stop: tuple[str, ...] = STOP_SEQUENCES,
    progress: bool = False,
    eos_token_ids: Collection[int] | None = None,
    with_decoded_tokens: bool = False,
) -> list[list[str]] | tuple[list[list[str]], list[list[int]]]:
    """`n` completions per prompt (a list per prompt), cut at the first end id and
    at the first stop sequence. Greedy when `temperature == 0` (then the n
    completions agree).

    `eos_token_ids`: every id that ends a completion (chat models have several, e.g.
    end of turn and end of text); default the tokenizer's EOS. With
    `with_decoded_tokens`, also returns how many tokens each completion decoded
    (the model's work, stop text and end id included; a list per prompt), which the
    kept text's length undercounts."""
    if temperature < 0 or not 0 < top_p <= 1 or n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"bad sampling settings: n={n}, temperature={temperature}, top_p={top_p}, "
            f"max_new_tokens={max_new_tokens}, batch_size={batch_size}"
        )
    model.eval()
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    work = [(i, j) for i in range(len(prompts)) for j in range(n)]
    results: list[list[str]] = [[""] * n for _ in prompts]
    decoded: list[list[int]] = [[0] * n for _ in prompts]
    bar = tqdm(total=len(prompts), desc="generate (old)", unit="prompt", disable=not progress)
    for start in range(0, len(work), batch_size):
        chunk = work[start : start + batch_size]
        generators = [torch.Generator().manual_seed(_sample_seed(seed, i, j)) for i, j in chunk]
        tokens = _generate_batch(
            model,
            tokenizer,
            [encoded[i] for i, _ in chunk],
            generators,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            stop=stop,
            eos_token_ids=eos_token_ids,
        )
        for (i, j), row in zip(chunk, tokens, strict=True):
            results[i][j] = _finish(tokenizer, row, stop, eos_token_ids)
            decoded[i][j] = len(row)
        bar.update(sum(j == n - 1 for _, j in chunk))  # prompts whose last sample is done
    bar.close()
    return (results, decoded) if with_decoded_tokens else results
