"""Sampling completions: batched generation with a KV cache, and self-speculative
greedy decoding with the MTP heads.

`generate` works for our `MTPModel` (head 0 is the next-token model) and for any
Hugging Face causal LM. Prompts are left-padded so every row's next token sits at
the last column; positions skip the padding, so a prompt decodes the same alone
or in a batch. Every (prompt, sample) pair draws from its own `torch.Generator`
seeded from (seed, prompt index, sample index): the same seed gives the same
completions whatever the batch size (up to floating-point differences between
batch shapes, which can flip a near-tie).
"""

from __future__ import annotations

import numpy as np
import torch

from wmtp.model import MTPModel
from wmtp.prompts import STOP_SEQUENCES, truncate_at_stop


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


def _choose(
    logits: torch.Tensor, temperature: float, top_p: float, generators: list[torch.Generator]
) -> torch.Tensor:
    """Next token per row from `logits` (B, V): argmax when temperature == 0, else
    nucleus sampling, each row with its own generator."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the first token always stays
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    picks = [
        torch.multinomial(row.cpu(), 1, generator=gen)
        for row, gen in zip(sorted_probs, generators, strict=True)
    ]
    picked = torch.cat(picks).to(logits.device)  # (B,) index into the sorted order
    return order.gather(-1, picked.unsqueeze(-1)).squeeze(-1)


def _finish(tokenizer, tokens: list[int], stop: tuple[str, ...]) -> str:
    eos = tokenizer.eos_token_id
    if eos is not None and eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    return truncate_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stop)


def _stopped(tokenizer, tokens: list[int], stop: tuple[str, ...], tail: int = 48) -> bool:
    """EOS generated, or a stop sequence in the last `tail` tokens (checked after
    every step, so a stop is always seen while it is recent; decoding only the tail
    keeps the check O(1) per step instead of O(length))."""
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in tokens[-tail:]:
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
                done[row] = _stopped(tokenizer, generated[row], stop)
        if all(done):
            break
        step_ids = torch.tensor(tokens, device=device).unsqueeze(-1)  # (B, 1)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=-1)  # (B, past + 1)
    return generated


def generate(
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
) -> list[list[str]]:
    """`n` completions per prompt (a list per prompt), cut at EOS and at the first
    stop sequence. Greedy when `temperature == 0` (then the n completions agree)."""
    if temperature < 0 or not 0 < top_p <= 1 or n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"bad sampling settings: n={n}, temperature={temperature}, top_p={top_p}, "
            f"max_new_tokens={max_new_tokens}, batch_size={batch_size}"
        )
    model.eval()
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    work = [(i, j) for i in range(len(prompts)) for j in range(n)]
    results: list[list[str]] = [[""] * n for _ in prompts]
    bar = _progress_bar(len(prompts), progress)
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
        )
        for (i, j), row in zip(chunk, tokens, strict=True):
            results[i][j] = _finish(tokenizer, row, stop)
        bar.update(sum(j == n - 1 for _, j in chunk))  # prompts whose last sample is done
    bar.close()
    return results


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="prompt", disable=not enabled)


def _slice_context(context: dict, keep: int, past: int) -> dict:
    """The attention context of the first `keep` of a forward's positions (those the
    extra heads still have to see), for blocks whose cache holds `past` positions.
    A None mask (no padding, and a prefill or a single token) stays None: it means
    causal attention over everything, which holds for any prefix of the positions."""
    mask = context["attention_mask"]
    cos, sin = context["position_embeddings"]  # (1, S, head_dim) each
    return {
        "attention_mask": None if mask is None else mask[:, :, :keep, : past + keep],
        "position_ids": context["position_ids"][:, :keep],
        "position_embeddings": (cos[:, :keep], sin[:, :keep]),
        "past_key_values": context["past_key_values"],
    }


def _draft(
    model: MTPModel, hidden: torch.Tensor, context: dict, first: torch.Tensor
) -> torch.Tensor:
    """The next proposal (H,): `first` (head 0's token after the last kept position)
    followed by heads 1..H-1's greedy guesses at that position.

    Each extra head's block runs over every kept position `hidden` (1, S, D) so its
    KV cache stays in step with the trunk's, but only the last position is
    normalised and unembedded, all heads in one matmul."""
    last = [
        model.heads[k](hidden, **context)[:, -1] for k in range(1, model.n_heads)
    ]  # (1, D) each
    if not last:
        return first
    guesses = model.output(model.norm(torch.cat(last))).argmax(-1)  # (H-1,)
    return torch.cat([first, guesses])


@torch.inference_mode()
def _speculate_one(model: MTPModel, prompt: list[int], max_new_tokens: int, eos, stop_check):
    """Self-speculative greedy decoding of one prompt. Returns (tokens, accepted
    lengths per verification forward).

    Per verification forward: trunk + head 0 over the H drafted tokens (head 0 at
    draft position i gives the greedy token after draft[: i + 1], so draft[i + 1]
    stands if it matches), one transfer of the draft and the verdict to the host,
    the trunk's and head 0's KV cache cropped to the kept tokens, then heads
    1..H-1 over the kept positions only. A plain greedy step runs trunk + head 0
    over one token, so a forward costs H - 1 blocks more than a greedy step and
    yields 1..H tokens."""
    device = _device(model)
    n_heads = model.n_heads
    n_verified = model.config.n_trunk_layers + 1  # cache slots of the trunk and head 0
    cache = model.new_cache()
    hidden, context = model.trunk(torch.tensor([prompt], device=device), None, cache)  # (1, L, D)
    first = model.output(model.head_hidden(hidden, 0, context)[:, -1]).argmax(-1)  # (1,)
    draft = _draft(model, hidden, context, first)  # (H,)
    out: list[int] = []
    accepted: list[int] = []
    while len(out) < max_new_tokens:
        past = cache.get_seq_length()
        hidden, context = model.trunk(draft.unsqueeze(0), None, cache)  # (1, H, D)
        greedy = model.head_logits(hidden, 0, context)[0].argmax(-1)  # (H,)
        both = torch.cat([draft, greedy]).tolist()  # the step's only transfer to the host
        proposed, verdict = both[:n_heads], both[n_heads:]
        keep = 1
        while keep < n_heads and proposed[keep] == verdict[keep - 1]:
            keep += 1
        out.extend(proposed[:keep])
        accepted.append(keep)
        if len(out) >= max_new_tokens or eos in proposed[:keep] or stop_check(out):
            break
        if keep < n_heads:
            for layer in cache.layers[:n_verified]:
                layer.crop(keep - n_heads)  # drop the rejected drafts' KV
            hidden, context = hidden[:, :keep], _slice_context(context, keep, past)  # (1, keep, D)
        draft = _draft(model, hidden, context, greedy[keep - 1 : keep])
    return out[:max_new_tokens], accepted


def speculative_generate(
    model: MTPModel,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    stop: tuple[str, ...] = STOP_SEQUENCES,
    progress: bool = False,
) -> tuple[list[str], float]:
    """Greedy completions decoded self-speculatively (Stern et al. 2018; Gloeckle
    et al. 2024 sec. 3.2): heads 0..H-1 propose the next H tokens, one forward of
    the model over them verifies the proposals against head 0's greedy choice, the
    longest agreeing prefix is kept (plus head 0's correction, which becomes the
    next proposal's first token) and the KV cache is cropped to it. The output
    equals plain greedy decoding; each forward yields 1..H tokens instead of 1.

    One prompt at a time (accepted lengths differ between rows). Returns the
    completions and the mean accepted length (tokens per verification forward)."""
    if not isinstance(model, MTPModel):
        raise TypeError("speculative_generate needs an MTPModel (its extra heads draft)")
    model.eval()
    completions, accepted = [], []
    bar = _progress_bar(len(prompts), progress)
    for prompt in prompts:
        tokens, lengths = _speculate_one(
            model,
            tokenizer(prompt)["input_ids"],
            max_new_tokens,
            tokenizer.eos_token_id,
            lambda out: _stopped(tokenizer, out, stop),
        )
        completions.append(_finish(tokenizer, tokens, stop))
        accepted.extend(lengths)
        bar.update(1)
    bar.close()
    return completions, float(np.mean(accepted)) if accepted else 0.0
