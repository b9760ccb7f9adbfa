"""Sampling completions: batched generation with a KV cache, and decoding with the
MTP heads drafting (`speculative_generate`: self-speculative greedy decoding and
lossless speculative sampling, batched; see docs/decoding.md).

`generate` works for our `MTPModel` (head 0 is the next-token model) and for any
Hugging Face causal LM. Each prompt is prefilled once, alone, and its KV cache
copied to its samples. An `MTPModel` then decodes with continuous batching: a
fixed set of cache rows, a finished row taking the next waiting (prompt, sample)
at once (`_generate_slots`, on `_Decoder`'s machinery); other models decode a
chunk of pairs at a time, finished rows leaving the cache (`_generate_chunks`).
Positions count a row's own tokens only (padding and holes skipped), so a
prompt decodes the same alone or in a batch. Tokens are chosen on the model's
device by inverting the nucleus distribution at uniforms that every (prompt,
sample) pair draws from its own `torch.Generator`, seeded from (seed, prompt
index, sample index): the same seed gives the same completions whatever the
batch size or the order pairs are scheduled in (up to floating-point
differences between batch shapes, which can flip a near-tie).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

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


def _end_ids(tokenizer, eos_token_ids: Collection[int] | None) -> frozenset[int]:
    """The ids that end a completion: `eos_token_ids`, else the tokenizer's EOS."""
    if eos_token_ids is not None:
        return frozenset(eos_token_ids)
    return frozenset() if tokenizer.eos_token_id is None else frozenset([tokenizer.eos_token_id])


def completion_text(
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


@dataclass
class _Pair:
    """One (prompt, sample) pair of `generate` and the tokens decoded for it."""

    prompt: int
    sample: int
    tokens: list[int] = field(default_factory=list)


def _pair_uniforms(pairs: list[_Pair], seed: int, steps: int, device) -> torch.Tensor:
    """(len(pairs), steps) uniforms: row p from the generator of its (prompt, sample)
    (seeded by `_sample_seed`), one per decoding step; drawn once when a pair starts,
    so its draws depend on nothing else being decoded."""
    rows = [
        torch.rand(
            steps, generator=torch.Generator().manual_seed(_sample_seed(seed, p.prompt, p.sample))
        )
        for p in pairs
    ]
    return torch.stack(rows).to(device)


def _prefill(model: MTPModel, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The keys and values of `ids` (a prompt but its last token) alone, no padding
    (so they do not depend on what else is decoded): (keys, values), (1, n_kv, L,
    head_dim) each, of the trunk blocks and head 0, the blocks of
    `_Decoder(model, draft=False)`; [] for no tokens."""
    if not ids:
        return []
    batch = torch.tensor([ids], device=_device(model))  # (1, L)
    cache = _new_cache(model)
    model.next_token_logits(batch, None, cache)
    return [(layer.keys, layer.values) for layer in cache.layers[: model.config.n_trunk_layers + 1]]


class _Scheduler:
    """Which (prompt, sample) pairs wait, which prompts' prefills are kept for their
    waiting samples, and when a prompt's last sample is done (the progress bar)."""

    def __init__(self, n_prompts: int, n: int, progress: bool) -> None:
        self.waiting = deque(_Pair(i, j) for i in range(n_prompts) for j in range(n))
        self.unstarted = [n] * n_prompts  # samples of each prompt not yet taken
        self.unfinished = [n] * n_prompts
        self.prefills: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.bar = _progress_bar(n_prompts, progress)

    def take(self, count: int, model: MTPModel, encoded: list[list[int]]):
        """Up to `count` waiting pairs (in prompt order) with their prompts' prefills
        (`_prefill` of all but the last token), each prompt prefilled once for all its
        samples."""
        taken = [self.waiting.popleft() for _ in range(min(count, len(self.waiting)))]
        prefills = []
        for pair in taken:
            i = pair.prompt
            if i not in self.prefills:
                self.prefills[i] = _prefill(model, encoded[i][:-1])
            prefills.append(self.prefills[i])
            self.unstarted[i] -= 1
            if not self.unstarted[i]:
                del self.prefills[i]
        return taken, prefills

    def done(self, pair: _Pair) -> None:
        self.unfinished[pair.prompt] -= 1
        if not self.unfinished[pair.prompt]:
            self.bar.update(1)


# Slots a row may leave unused before the slot batch is compacted: every forward's
# attention reads all slots up to the pointer, a compaction moves all of them.
SLOTS_SLACK = 32


@torch.inference_mode()
def _generate_slots(
    model: MTPModel, encoded: list[list[int]], queue: _Scheduler, rule: _Rule, *, seed: int,
    max_new_tokens: int, batch_size: int, finished,
) -> None:  # fmt: skip
    """Decode every pair of `queue` on `_Decoder`'s machinery with continuous batching:
    `batch_size` cache rows, a row whose pair ends (`finished(tokens)` or
    `max_new_tokens`) takes the next waiting pair at once, its prompt's keys and
    values copied from the prefill (`_Decoder.insert`). Rows leave once nothing
    waits. Tokens are chosen on the model's device, a pair's step t from its t-th
    uniform; only the chosen tokens come to the host."""
    decoder, device = _Decoder(model, draft=False), _device(model)
    width = max(len(p) for p in encoded)
    # a row holds at most width + max_new_tokens - 1 slots, and compaction keeps the
    # pointer within SLOTS_SLACK + 1 of the longest row
    decoder.allocate(min(batch_size, len(queue.waiting)), width + max_new_tokens + SLOTS_SLACK)
    size = decoder.valid.shape[0]
    rows: list[_Pair | None] = [None] * size
    token = torch.zeros(size, dtype=torch.long, device=device)  # each row's next input
    uniforms = torch.zeros(size, max_new_tokens, device=device)
    step = torch.zeros(size, dtype=torch.long, device=device)  # each row's next uniform

    while True:
        free = [r for r, pair in enumerate(rows) if pair is None]
        if free and queue.waiting:  # a prompt's last token is its row's first input
            taken, prefills = queue.take(len(free), model, encoded)
            free = free[: len(taken)]
            start = 0
            for end in range(1, len(taken) + 1):  # one insert per prompt
                if end == len(taken) or taken[end].prompt != taken[start].prompt:
                    decoder.insert(free[start:end], prefills[start])
                    start = end
            index = torch.tensor(free, device=device)
            token[index] = torch.tensor([encoded[p.prompt][-1] for p in taken], device=device)
            if rule.sampled:
                uniforms[index] = _pair_uniforms(taken, seed, max_new_tokens, device)
            step[index] = 0
            for r, pair in zip(free, taken, strict=True):
                rows[r] = pair
        live = [r for r, pair in enumerate(rows) if pair is not None]
        if not live:
            return
        if len(live) < len(rows):  # nothing waits: finished rows leave the batch
            decoder.select(live)
            index = torch.tensor(live, device=device)
            rows = [rows[r] for r in live]
            token, uniforms, step = token[index], uniforms[index], step[index]
        longest = max(len(encoded[pair.prompt]) + len(pair.tokens) - 1 for pair in rows)  # slots
        if decoder.pointer - longest > SLOTS_SLACK:  # attention reads every slot
            decoder._compact()
        logits = decoder.forward(token[:, None])[:, 0]  # (B, V)
        decoder.advance()
        token = rule.choose(logits, uniforms.gather(1, step[:, None])[:, 0])
        step += 1
        for r, t in enumerate(token.tolist()):
            pair = rows[r]
            pair.tokens.append(t)
            if len(pair.tokens) >= max_new_tokens or finished(pair.tokens):
                rows[r] = None
                queue.done(pair)


@torch.inference_mode()
def _generate_chunks(
    model, encoded: list[list[int]], queue: _Scheduler, rule: _Rule, *, seed: int,
    max_new_tokens: int, batch_size: int, finished, pad: int,
) -> None:  # fmt: skip
    """Decode every pair of `queue` with any Hugging Face causal LM, `batch_size`
    pairs at a time: the chunk's prompts prefilled once each (left-padded together),
    their caches repeated for their samples, finished rows dropped from the cache."""
    device = _device(model)
    while queue.waiting:
        chunk = [queue.waiting.popleft() for _ in range(min(batch_size, len(queue.waiting)))]
        prompts = sorted({pair.prompt for pair in chunk})
        width = max(len(encoded[i]) for i in prompts)
        ids = torch.tensor(
            [[pad] * (width - len(encoded[i])) + encoded[i] for i in prompts], device=device
        )
        mask = torch.tensor(
            [[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in prompts],
            device=device,
        )
        cache = _new_cache(model)
        logits = _logits(model, ids, mask, cache)[:, -1]  # (P, V)
        index = torch.tensor([prompts.index(pair.prompt) for pair in chunk], device=device)
        cache.batch_select_indices(index)
        mask, logits = mask[index], logits[index]
        uniforms = _pair_uniforms(chunk, seed, max_new_tokens, device) if rule.sampled else None
        for step in range(max_new_tokens):
            token = rule.choose(logits, None if uniforms is None else uniforms[:, step])
            live = []
            for r, (pair, t) in enumerate(zip(chunk, token.tolist(), strict=True)):
                pair.tokens.append(t)
                if len(pair.tokens) < max_new_tokens and not finished(pair.tokens):
                    live.append(r)
                else:
                    queue.done(pair)
            if not live:
                break
            if len(live) < len(chunk):
                keep = torch.tensor(live, device=device)
                cache.batch_select_indices(keep)
                chunk, mask, token = [chunk[r] for r in live], mask[keep], token[keep]
                uniforms = None if uniforms is None else uniforms[keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)  # (B, past + 1)
            logits = _logits(model, token[:, None], mask, cache)[:, -1]


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
    eos_token_ids: Collection[int] | None = None,
    with_decoded_tokens: bool = False,
) -> list[list[str]] | tuple[list[list[str]], list[list[int]]]:
    """`n` completions per prompt (a list per prompt), cut at the first end id and
    at the first stop sequence. Greedy when `temperature == 0` (then the n
    completions agree: one is decoded and repeated).

    An `MTPModel` decodes on `_Decoder`'s machinery with continuous batching
    (`_generate_slots`), any other causal LM chunk by chunk (`_generate_chunks`);
    either way each prompt is prefilled once for all its samples and tokens are
    chosen on the model's device. `batch_size`: rows decoded at once.

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
    ends = _end_ids(tokenizer, eos_token_ids)
    distinct = 1 if temperature == 0 else n
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"prompts {empty} encode to no tokens: nothing to continue")
    pairs = _sample_tokens(
        model, encoded, n=distinct,
        rule=_Rule(temperature, top_p), seed=seed, max_new_tokens=max_new_tokens,
        batch_size=batch_size, progress=progress,
        pad=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        finished=lambda tokens: _stopped(tokenizer, tokens, stop, eos_token_ids=ends),
    )  # fmt: skip
    results: list[list[str]] = [[""] * n for _ in prompts]
    decoded: list[list[int]] = [[0] * n for _ in prompts]
    for pair in pairs:
        for j in range(pair.sample, n, distinct):  # greedy: every sample is sample 0
            results[pair.prompt][j] = completion_text(tokenizer, pair.tokens, stop, ends)
            decoded[pair.prompt][j] = len(pair.tokens)
    return (results, decoded) if with_decoded_tokens else results


def _sample_tokens(
    model: torch.nn.Module, encoded: list[list[int]], *, n: int, rule: _Rule, pad: int,
    progress: bool = False, **settings,
) -> list[_Pair]:  # fmt: skip
    """`generate`'s tokens: n (prompt, sample) pairs per prompt of `encoded` (token
    ids), in prompt order, each with the tokens decoded for it. `settings`: seed,
    max_new_tokens, batch_size and `finished(tokens)`, whether a completion ends."""
    queue = _Scheduler(len(encoded), n, progress)
    pairs = list(queue.waiting)
    if pairs and isinstance(model, MTPModel):
        _generate_slots(model, encoded, queue, rule, **settings)
    elif pairs:
        _generate_chunks(model, encoded, queue, rule, pad=pad, **settings)
    queue.bar.close()
    return pairs


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="prompt", disable=not enabled)


# ---------------------------------------------------------------------------------------
# Decoding with the MTP heads: self-speculative greedy decoding and lossless speculative
# sampling, batched, and plain decoding on the same machinery (the fair baseline).


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: normalised in float32, cast back, then scaled."""
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class _Blocks:
    """K decoder blocks of an `MTPModel` that read the same input, as one computation
    with a preallocated KV cache `(K, B, n_kv_heads, capacity, head_dim)`.

    A trunk layer is K = 1 with its weights used in place (no copy). The heads are
    one stack (`stacked`): their weights copied into `(K, in, out)` tensors (key and
    value, gate and up projections fused) and run with batched matmuls, any
    contiguous `part` of the stack per call. The maths is transformers'
    `LlamaDecoderLayer` (RMSNorm, RoPE, grouped-query SDPA, SwiGLU; tested to float
    rounding) with far less Python per call: a decode step is a few hundred tiny
    ops, and on a CPU (or a GPU at small batch) their dispatch, not their
    arithmetic, is most of its cost.

    Cache slots are shared by every block of a decode and addressed by the caller
    (`start`); which slots a query may see is the caller's `mask`."""

    def __init__(self, blocks: list, config, stacked: bool) -> None:
        self.k, self.stacked = len(blocks), stacked
        self.eps = config.norm_eps
        self.n_q, self.n_kv = config.n_heads, config.kv_heads
        self.head_dim = config.dim // config.n_heads

        def weights(*gets) -> torch.Tensor | list[torch.Tensor]:
            if not stacked:  # (out, in) each, for F.linear
                return [get(blocks[0]).detach() for get in gets]
            return torch.stack(  # (K, in, out_1 + out_2 + ...), for bmm
                [torch.cat([get(block).detach() for get in gets]).t() for block in blocks]
            )

        def norm(get) -> torch.Tensor:  # (K, 1, 1, D): broadcasts over (K, B, S, D)
            return torch.stack([get(block).detach() for block in blocks])[:, None, None]

        self.w_in = norm(lambda b: b.input_layernorm.weight)
        self.w_post = norm(lambda b: b.post_attention_layernorm.weight)
        self.w_q = weights(lambda b: b.self_attn.q_proj.weight)
        self.w_kv = weights(
            lambda b: b.self_attn.k_proj.weight, lambda b: b.self_attn.v_proj.weight
        )
        self.w_o = weights(lambda b: b.self_attn.o_proj.weight)
        self.w_gate_up = weights(lambda b: b.mlp.gate_proj.weight, lambda b: b.mlp.up_proj.weight)
        self.w_down = weights(lambda b: b.mlp.down_proj.weight)
        self.keys = self.values = torch.empty(0)

    def allocate(self, batch: int, capacity: int) -> None:
        """Zeroed caches: a slot never written is masked, but masking cannot undo a
        NaN that uninitialised memory may hold (NaN * 0 and NaN - inf are NaN)."""
        shape = (self.k, batch, self.n_kv, capacity, self.head_dim)
        self.keys = torch.zeros(shape, dtype=self.w_in.dtype, device=self.w_in.device)
        self.values = torch.zeros_like(self.keys)

    def _project(self, x: torch.Tensor, weight, part: slice) -> tuple[torch.Tensor, ...]:
        """(K, N, in) -> one (K, N, out) per projection in `weight` (fused ones are of
        equal width: keys and values, gate and up)."""
        if not self.stacked:
            return tuple(F.linear(x, w) for w in weight)
        n_fused = 2 if weight is self.w_kv or weight is self.w_gate_up else 1
        return torch.bmm(x, weight[part]).chunk(n_fused, dim=-1)

    def __call__(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        start: int,
        mask: torch.Tensor | None,
        causal: bool = False,
        query_at: torch.Tensor | None = None,
        part: slice = slice(None),
    ) -> torch.Tensor:
        """Write the K/V of `x` (B, S, D) into slots `start..start+S-1` and return the
        outputs `(K, B, S, D)` of the blocks `part` of the stack, or `(K, B, 1, D)`
        at position `query_at` (B,) of each row only (queries, attention and MLP
        there alone: the others are needed only as keys and values). `rope` is (cos,
        sin), each (B, 1, S, head_dim); `mask` (B, 1, S or 1, start+S) is True where
        a query may attend, None for all (with `causal`: causal from slot 0)."""
        keys_cache, values_cache = self.keys[part], self.values[part]
        k, hd = keys_cache.shape[0], self.head_dim
        batch, seq, dim = x.shape
        cos, sin = rope
        h = _rms_norm(x, self.w_in[part], self.eps)  # (K, B, S, D)
        flat = h.reshape(k, batch * seq, dim)
        end = start + seq
        keys, values = (
            t.view(k, batch, seq, self.n_kv, hd).transpose(2, 3)  # (K, B, Hkv, S, hd)
            for t in self._project(flat, self.w_kv, part)
        )
        keys_cache[:, :, :, start:end] = _rope(keys, cos, sin)
        values_cache[:, :, :, start:end] = values
        if query_at is not None:
            x = x.gather(1, query_at.view(batch, 1, 1).expand(batch, 1, dim))  # (B, 1, D)
            h = h.gather(2, query_at.view(1, batch, 1, 1).expand(k, batch, 1, dim))
            at = query_at.view(batch, 1, 1, 1).expand(batch, 1, 1, hd)
            cos, sin = cos.gather(2, at), sin.gather(2, at)  # (B, 1, 1, hd)
            seq = 1
        (query,) = self._project(h.reshape(k, batch * seq, dim), self.w_q, part)
        query = _rope(query.view(k, batch, seq, self.n_q, hd).transpose(2, 3), cos, sin)
        if mask is not None and mask.dim() == 4 and k > 1:  # per-row masks, for K*B rows
            mask = mask.expand(k, *mask.shape[1:]) if batch == 1 else mask.repeat(k, 1, 1, 1)
        attn = F.scaled_dot_product_attention(
            query.flatten(0, 1),  # (K*B, Hq, S, hd)
            keys_cache[:, :, :, :end].flatten(0, 1),  # (K*B, Hkv, end, hd)
            values_cache[:, :, :, :end].flatten(0, 1),
            attn_mask=mask,
            is_causal=causal and mask is None,
            enable_gqa=self.n_q != self.n_kv,
        )
        attn = attn.view(k, batch, self.n_q, seq, hd).transpose(2, 3).reshape(k, batch * seq, -1)
        (out,) = self._project(attn, self.w_o, part)
        x = x + out.view(k, batch, seq, dim)  # (K, B, S, D)
        h = _rms_norm(x, self.w_post[part], self.eps).view(k, batch * seq, dim)
        gate, up = self._project(h, self.w_gate_up, part)
        (out,) = self._project(F.silu(gate) * up, self.w_down, part)
        return x + out.view(k, batch, seq, dim)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (finished rows leave the batch)."""
        self.keys, self.values = self.keys[:, rows], self.values[:, rows]

    def gather_slots(self, order: torch.Tensor) -> None:
        """Slot i of row b becomes slot order[b, i] (cache compaction)."""
        index = order.view(1, *order.shape[:1], 1, order.shape[1], 1)
        index = index.expand(self.k, -1, self.n_kv, -1, self.head_dim)
        length = order.shape[1]
        self.keys[:, :, :, :length] = self.keys.gather(3, index)
        self.values[:, :, :, :length] = self.values.gather(3, index)


MERGED_HEADS_MAX_ROWS = 16  # see _Decoder.forward


class _Decoder:
    """An `MTPModel` prepared for decoding a batch: its trunk and head 0 (and, to
    draft, heads 1..H-1) as `_Blocks`, one slot index shared by all their KV caches,
    per-row slot validity and positions, and rotary tables computed once per batch.

    Rows of a batch keep different numbers of tokens per verification forward, so
    every forward appends the same slots to all rows and a row's rejected drafts
    become holes (`valid` False) that its queries never see; positions count valid
    slots only, so a row decodes the same as alone. Left padding is the same kind of
    hole. With no holes (one row, or rows in step) no mask is built at all.

    `generate` decodes plainly on it with continuous batching: `allocate` makes empty
    rows, `insert` starts a row over on a prompt's prefilled keys and values (a
    row's old slots become holes), `advance` keeps each forward's one slot."""

    def __init__(self, model: MTPModel, draft: bool) -> None:
        config = model.config
        self.model, self.eps = model, config.norm_eps
        self.embedding = model.tok_embeddings.weight
        self.norm, self.unembedding = model.norm.weight, model.output.weight
        self.device = self.unembedding.device
        self.trunk = [_Blocks([layer], config, stacked=False) for layer in model.layers]
        self.heads = _Blocks(list(model.heads) if draft else [model.heads[0]], config, stacked=True)
        self.n_draft = self.heads.k - 1

    def _all_blocks(self) -> list[_Blocks]:
        return [*self.trunk, self.heads]

    def allocate(self, batch: int, capacity: int) -> None:
        """Empty caches of `batch` rows and `capacity` slots (every slot invalid), and
        the rotary tables of positions 0..capacity-1."""
        device = self.device
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.n_valid = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)
        self.pointer, self.capacity, self.compactions, self.holes = 0, capacity, 0, False
        positions = torch.arange(capacity, device=device).unsqueeze(0)
        cos, sin = self.model.rotary_emb(self.unembedding, positions)  # (1, capacity, hd)
        self.cos, self.sin = cos[0], sin[0]
        for blocks in self._all_blocks():
            blocks.allocate(batch, capacity)

    def start(self, prompts: list[list[int]], capacity: int, pad: int) -> torch.Tensor:
        """Allocate the caches of a batch of (left-padded) prompts; returns the ids
        (B, width)."""
        width, device = max(len(p) for p in prompts), self.device
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        self.allocate(len(prompts), capacity)
        for row, prompt in enumerate(prompts):
            self.valid[row, width - len(prompt) : width] = True
        self.n_valid = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
        self.holes = any(len(p) != width for p in prompts)
        return ids

    def insert(self, rows: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Rows `rows` start over from one prompt whose keys and values (after rotary,
        as Hugging Face caches them; (1, n_kv, L, head_dim) each) are `layers`, one
        pair per block (trunk, then the heads; [] for L = 0): they fill the L slots
        before the pointer, which first moves up to L if it is lower (other rows get
        holes there). Continuous batching: a finished row takes the next prompt."""
        length = layers[0][0].shape[-2] if layers else 0
        self.pointer = max(self.pointer, length, 1)  # (a forward at slot 0 is a prompt's)
        first, index = self.pointer - length, torch.tensor(rows, device=self.device)
        self.valid[index] = False
        self.valid[index, first : self.pointer] = True
        self.n_valid[index] = length
        for blocks, (keys, values) in zip(self._all_blocks(), layers, strict=False):
            blocks.keys[:, index, :, first : self.pointer] = keys  # broadcast over rows
            blocks.values[:, index, :, first : self.pointer] = values
        self.holes = True

    def advance(self) -> None:
        """Every row keeps the one slot the last forward fed (plain decoding; cheaper
        than `commit`)."""
        self.n_valid += 1
        self.pointer += 1

    def _mask(self, start: int, seq: int, last: torch.Tensor | None = None):
        """(mask, causal) for `seq` queries at slots start..start+seq-1, or for one query
        per row at slot start + last[b]."""
        end = start + seq
        slots = torch.arange(end, device=self.device)
        if last is not None:  # (B,): every valid slot up to the query's own
            return (self.valid[:, :end] & (slots <= start + last[:, None]))[:, None, None], False
        if not self.holes:
            if seq == 1 or start == 0:
                return None, seq > 1
            return (slots <= start + torch.arange(seq, device=self.device)[:, None]), False
        query_slots = start + torch.arange(seq, device=self.device)[:, None]  # (S, 1)
        causal = slots <= query_slots  # (S, end)
        # a padding slot's query sees itself, so it never has nothing to attend to
        mask = (self.valid[:, None, :end] & causal) | (slots == query_slots)
        return mask[:, None], False  # (B, 1, S, end)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms_norm(hidden, self.norm, self.eps), self.unembedding)

    def forward(self, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Feed `ids` (B, S) at the next S slots; returns head 0's logits (B, S, V), or
        (B, 1, V) at the last position with `last_only` (a prompt).

        Heads 1..H-1 run in the same batched call as head 0 (at every position, their
        outputs at the one `draft_logits` picks used) when the batch is small: one
        call instead of two is worth more than the wasted rows, as long as rows cost
        little (`MERGED_HEADS_MAX_ROWS`). Else they run in `draft_logits`, at one
        position per row."""
        start, seq = self.pointer, ids.shape[1]
        if start + seq > self.capacity:
            self._compact()
            start = self.pointer
        if start == 0:  # the prompt: positions skip its left padding
            positions = (self.valid[:, :seq].long().cumsum(-1) - 1).clamp(min=0)
        else:
            self.valid[:, start : start + seq] = True
            positions = self.n_valid[:, None] + torch.arange(seq, device=self.device)  # (B, S)
        rope = (self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))
        mask, causal = self._mask(start, seq)
        x = F.embedding(ids, self.embedding)  # (B, S, D)
        for blocks in self.trunk:
            x = blocks(x, rope, start, mask, causal)[0]
        merged = last_only or ids.numel() <= MERGED_HEADS_MAX_ROWS
        if last_only:
            last = torch.full((ids.shape[0],), seq - 1, device=self.device)
            mask, causal = self._mask(start, seq, last=last)
            out = self.heads(x, rope, start, mask, causal, query_at=last)
        else:
            out = self.heads(x, rope, start, mask, causal, part=slice(None if merged else 1))
        self._last = (x, rope, start, seq, out if merged else None)
        return self._logits(out[0])  # (B, S, V)

    def draft_logits(self, at: torch.Tensor) -> torch.Tensor:
        """Heads 1..H-1's logits (B, H-1, V) at position `at` (B,) of the last forward's
        output (the last token each row keeps). Their caches get every position."""
        trunk, rope, start, seq, out = self._last
        if out is not None:  # computed with head 0: pick each row's position
            index = at.view(1, -1, 1, 1).expand(self.n_draft, -1, 1, out.shape[-1])
            hidden = out[1:].gather(2, index)[:, :, 0]  # (H-1, B, D)
        else:
            mask, _ = self._mask(start, seq, last=at)
            hidden = self.heads(trunk, rope, start, mask, query_at=at, part=slice(1, None))[:, :, 0]
        return self._logits(hidden).transpose(0, 1)

    def commit(self, keep: torch.Tensor, kept: list[int]) -> None:
        """Row b keeps the first keep[b] of the last forward's slots (`kept`: the same
        on the host); the rest become holes."""
        _, _, start, seq, _ = self._last
        if start > 0:  # (a prompt keeps its slots as they are)
            slot = torch.arange(seq, device=self.device)
            self.valid[:, start : start + seq] = slot < keep[:, None]
            self.n_valid += keep
        self.pointer = start + max(kept)
        self.holes |= min(kept) != max(kept)

    def select(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.device)
        self.valid, self.n_valid = self.valid[index], self.n_valid[index]
        for blocks in self._all_blocks():
            blocks.select(index)
        self.holes = bool((self.valid[:, : self.pointer].sum(-1) != self.pointer).any())

    def _compact(self) -> None:
        """Move every row's valid slots to the front, in order (rare: when holes have
        used up the spare capacity)."""
        used = self.valid[:, : self.pointer]
        order = torch.argsort((~used).to(torch.uint8), dim=1, stable=True)  # valid first
        for blocks in self._all_blocks():
            blocks.gather_slots(order)
        self.valid[:, : self.pointer] = used.gather(1, order)
        self.pointer = int(self.n_valid.max())
        self.valid[:, self.pointer :] = False
        self.holes = bool((self.n_valid != self.pointer).any())
        self.compactions += 1


def _nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The sampling distribution of `logits` (..., V) at `temperature` and `top_p`
    (the nucleus: the smallest set of most likely tokens whose mass reaches top_p),
    normalised, in token order: (..., V).

    Ranks each row's 16 most likely tokens first (`topk`: on a CPU a full sort of a
    few rows costs more than a decode step) and more, 4 times as many each round,
    only for the rows whose nucleus is not complete among them."""
    if top_p >= 1:
        return torch.softmax(logits.float() / temperature, dim=-1)
    flat = logits.reshape(-1, logits.shape[-1])  # (R, V)
    probs = torch.zeros(flat.shape, device=flat.device)
    rows, top = torch.arange(flat.shape[0], device=flat.device), 16
    while True:
        kept, order = _sorted_nucleus(flat[rows], temperature, top_p, top)
        # complete: a ranked token fell outside, so every unranked one does too
        complete = kept[:, -1] == 0 if top < flat.shape[-1] else torch.ones_like(rows, dtype=bool)
        probs[rows[complete]] = probs[rows[complete]].scatter(-1, order[complete], kept[complete])
        if bool(complete.all()):
            break
        rows, top = rows[~complete], top * 4
    return (probs / probs.sum(-1, keepdim=True)).view(logits.shape)


def _draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` (..., V) (nonnegative, any total) by inverting the
    cumulative distribution at `uniform` (...) in [0, 1): vectorised, so a batch
    costs a few ops instead of a loop of `torch.multinomial` calls."""
    cumulative = probs.cumsum(-1)
    total = cumulative[..., -1:].contiguous()
    index = torch.searchsorted(cumulative, uniform.unsqueeze(-1) * total, right=True)
    last = torch.searchsorted(cumulative, total)  # the last token with probability > 0
    return torch.minimum(index, last).squeeze(-1)


def _accept_greedy(logits: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification: the fed tokens are (first, drafts (B, S-1)) and `logits`
    (B, S, V) head 0's at them. Draft i stands while every draft up to it equals head
    0's argmax after the tokens before it. Returns (keep (B,) in 1..S, the greedy
    token after the kept ones (B,))."""
    best = logits.argmax(-1)  # (B, S)
    keep = 1 + (drafts == best[:, :-1]).long().cumprod(-1).sum(-1)
    return keep, best.gather(1, (keep - 1)[:, None]).squeeze(1)


def _accept_sampled(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u_accept: torch.Tensor,
    u_next: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Speculative sampling's rule (Leviathan et al. 2023, Chen et al. 2023).

    `p` (B, S, V): head 0's temperature/top-p distributions at the S fed tokens (first,
    drafts); `q` (B, S-1, V): the distributions the drafts (B, S-1) were drawn from;
    uniforms `u_accept` (B, S-1) and `u_next` (B,). Draft i stands with probability
    min(1, p_{i-1}(d_i) / q_i(d_i)), in order, until one fails; the token after the
    kept ones is drawn from norm(max(0, p - q)) at the failed draft, or from p after
    the last draft when all stand. Each token is then distributed exactly as p
    (whatever q is, as long as the draft was really drawn from q), so the output is
    plain sampling from head 0. Returns (keep (B,) in 1..S, next token (B,))."""
    batch, seq, vocab = p.shape
    keep = torch.ones(batch, dtype=torch.long, device=p.device)
    if seq > 1:
        p_draft = p[:, :-1].gather(-1, drafts[..., None]).squeeze(-1)  # (B, S-1)
        q_draft = q.gather(-1, drafts[..., None]).squeeze(-1)  # > 0: drawn from q
        keep = keep + (u_accept * q_draft < p_draft).long().cumprod(-1).sum(-1)
    at = (keep - 1).view(batch, 1, 1)
    target = p.gather(1, at.expand(batch, 1, vocab)).squeeze(1)  # (B, V)
    if seq > 1:
        draft_q = q.gather(1, at.clamp(max=seq - 2).expand(batch, 1, vocab)).squeeze(1)
        residual = (target - draft_q).clamp(min=0)
        use = (keep < seq)[:, None] & (residual.sum(-1, keepdim=True) > 0)
        target = torch.where(use, residual, target)
    return keep, _draw(target, u_next)


def _uniforms(generators: list[torch.Generator], count: int, device) -> torch.Tensor:
    """(B, count) uniforms, row b from its own generator (so a row's draws do not
    depend on the rest of its batch)."""
    return torch.stack([torch.rand(count, generator=g) for g in generators]).to(device)


@dataclass
class _Rule:
    """How tokens are chosen: argmax (temperature 0) or drawn from the temperature-
    and top-p-adjusted distribution, by inverting it at uniforms the caller draws."""

    temperature: float
    top_p: float

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    def choose(self, logits: torch.Tensor, uniform: torch.Tensor | None) -> torch.Tensor:
        """Head 0's token (B,) from its logits (B, V), plainly."""
        if not self.sampled:
            return logits.argmax(-1)
        return _draw(_nucleus(logits, self.temperature, self.top_p), uniform)

    def draft(self, logits: torch.Tensor, uniforms: torch.Tensor | None):
        """Drafts (B, K) from heads 1..K's logits (B, K, V), and the distributions q
        (B, K, V) they were drawn from (None when greedy)."""
        if not self.sampled:
            return logits.argmax(-1), None
        q = _nucleus(logits, self.temperature, self.top_p)
        return _draw(q, uniforms), q

    def verify(self, logits, drafts, q, u_accept, u_next) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep (B,), next token (B,)) from head 0's logits (B, S, V) at the fed
        tokens (the next token and the drafts (B, S-1))."""
        if drafts.shape[1] == 0:  # plain decoding
            keep = torch.ones(len(drafts), dtype=torch.long, device=drafts.device)
            return keep, self.choose(logits[:, 0], u_next)
        if not self.sampled:
            return _accept_greedy(logits, drafts)
        p = _nucleus(logits, self.temperature, self.top_p)
        return _accept_sampled(p, q, drafts, u_accept, u_next)


@torch.inference_mode()
def _decode_batch(
    decoder: _Decoder,
    prompts: list[list[int]],
    generators: list[torch.Generator],
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    pad: int,
    finished,
    spare: int | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Decode a batch of prompts; returns (tokens, tokens per forward) per row.

    A forward feeds every row's next token and its drafts (heads 1..H-1's guesses
    from the last forward, none without drafting): head 0 over all of them verifies
    the drafts and gives the token after the kept ones, heads 1..H-1 then draft the
    next tokens at the last kept position, and one transfer to the host brings back
    the verdict. `finished(tokens)` says when a row is done (EOS, stop text); done
    rows leave the batch. The caches hold `spare` slots (default max_new_tokens // 2)
    beyond what a row can use, for holes; when they run out, they are compacted."""
    rule, n_draft = _Rule(temperature, top_p), decoder.n_draft
    width = max(len(p) for p in prompts)
    # a live row holds < width + max_new_tokens - 1 valid slots before a forward of 1 + n_draft
    spare = max_new_tokens // 2 if spare is None else spare
    ids = decoder.start(prompts, width + max_new_tokens + 1 + n_draft + spare, pad)
    out: list[list[int]] = [[] for _ in prompts]
    accepted: list[list[int]] = [[] for _ in prompts]
    rows = list(range(len(prompts)))  # the prompts still decoding, in batch order

    def draws():
        """Uniforms for (accepting the drafts, the next token, the new drafts)."""
        if not rule.sampled:
            return None, None, None
        u = _uniforms(generators, 2 * n_draft + 1, decoder.device)
        return u[:, :n_draft], u[:, n_draft], u[:, n_draft + 1 :]

    def propose(at: torch.Tensor, uniforms):
        """(drafts (B, H-1), q) at position `at` (B,) of the last forward."""
        if n_draft == 0:
            return torch.zeros(len(rows), 0, dtype=torch.long, device=decoder.device), None
        return rule.draft(decoder.draft_logits(at), uniforms)

    def take(row: int, tokens: list[int]) -> bool:
        out[row].extend(tokens)
        return len(out[row]) >= max_new_tokens or finished(out[row])

    _, u_next, u_drafts = draws()
    token = rule.choose(decoder.forward(ids, last_only=True)[:, 0], u_next)  # (B,)
    drafts, q = propose(torch.zeros_like(token), u_drafts)
    decoder.commit(None, [width])
    done = [take(row, [t]) for row, t in zip(rows, token.tolist(), strict=True)]
    while not all(done):
        if any(done):
            live = [i for i, d in enumerate(done) if not d]
            rows, generators = [rows[i] for i in live], [generators[i] for i in live]
            index = torch.tensor(live, device=decoder.device)
            token, drafts, q = token[index], drafts[index], None if q is None else q[index]
            decoder.select(live)
        fed = torch.cat([token[:, None], drafts], dim=1)  # (B, 1 + n_draft)
        logits = decoder.forward(fed)  # (B, 1 + n_draft, V)
        u_accept, u_next, u_drafts = draws()
        keep, token = rule.verify(logits, drafts, q, u_accept, u_next)
        drafts, q = propose(keep - 1, u_drafts)
        verdict = torch.cat([fed[:, 1:], keep[:, None], token[:, None]], dim=1).tolist()
        kept = [v[n_draft] for v in verdict]
        decoder.commit(keep, kept)
        done = []
        for row, v, k in zip(rows, verdict, kept, strict=True):
            accepted[row].append(k)
            done.append(take(row, v[: k - 1] + [v[-1]]))
    return [tokens[:max_new_tokens] for tokens in out], accepted


@dataclass
class DecodeStats:
    """What a decode cost: `tokens` decoded over all rows; `forwards`, the model calls
    after the prompts'; `row_forwards`, each row counted in every forward it took part
    in; `accepted`, the tokens those row-forwards yielded. `accepted_per_forward` is
    1 for plain decoding and 1..H for speculative decoding."""

    tokens: int = 0
    forwards: int = 0
    row_forwards: int = 0
    accepted: int = 0

    @property
    def accepted_per_forward(self) -> float:
        return self.accepted / self.row_forwards if self.row_forwards else 0.0


def speculative_generate(
    model: MTPModel,
    tokenizer,
    prompts: list[str],
    *,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 16,
    stop: tuple[str, ...] = STOP_SEQUENCES,
    progress: bool = False,
    eos_token_ids: Collection[int] | None = None,
    draft: bool = True,
) -> tuple[list[list[str]], DecodeStats]:
    """`n` completions per prompt, like `generate`, decoded with the MTP heads: heads
    1..H-1 draft the tokens after head 0's next one and one forward of the model
    over them verifies the drafts (Stern et al. 2018; Gloeckle et al. 2024 sec. 3.2).

    Greedy (`temperature == 0`): a draft stands while it equals head 0's argmax, so
    the output is plain greedy decoding token for token. Sampling: the rejection rule
    of speculative sampling on the temperature- and top-p-adjusted distributions
    (`_accept_sampled`), so every completion is distributed exactly as plain sampling
    from head 0 with the same settings (tested statistically). Each forward yields
    1..H tokens per row instead of 1; rows of a batch keep different numbers
    (`_Decoder`). `draft=False` decodes plainly on the same machinery (the fair
    baseline of a speed comparison).

    Every (prompt, sample) draws from its own generator seeded from (seed, prompt
    index, sample index), as in `generate`: the same seed gives the same completions
    whatever the batch size (up to floating-point differences between batch shapes).
    Completions are cut at the first of `eos_token_ids` (default: the tokenizer's
    EOS) and at stop sequences. Returns the completions (a list per prompt) and what
    the decoding cost (`DecodeStats`)."""
    if not isinstance(model, MTPModel):
        raise TypeError("speculative_generate needs an MTPModel (its extra heads draft)")
    if temperature < 0 or not 0 < top_p <= 1 or n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"bad sampling settings: n={n}, temperature={temperature}, top_p={top_p}, "
            f"max_new_tokens={max_new_tokens}, batch_size={batch_size}"
        )
    model.eval()
    decoder = _Decoder(model, draft)
    ends = _end_ids(tokenizer, eos_token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def finished(tokens: list[int]) -> bool:
        return _stopped(tokenizer, tokens, stop, eos_token_ids=ends)

    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    work = [(i, j) for i in range(len(prompts)) for j in range(n)]
    results: list[list[str]] = [[""] * n for _ in prompts]
    stats = DecodeStats()
    bar = _progress_bar(len(prompts), progress)
    for first in range(0, len(work), batch_size):
        chunk = work[first : first + batch_size]
        generators = [torch.Generator().manual_seed(_sample_seed(seed, i, j)) for i, j in chunk]
        tokens, accepted = _decode_batch(
            decoder, [encoded[i] for i, _ in chunk], generators, temperature=temperature,
            top_p=top_p, max_new_tokens=max_new_tokens, pad=pad, finished=finished,
        )  # fmt: skip
        for (i, j), row in zip(chunk, tokens, strict=True):
            results[i][j] = completion_text(tokenizer, row, stop, ends)
        stats.tokens += sum(len(row) for row in tokens)
        stats.row_forwards += sum(len(a) for a in accepted)
        stats.accepted += sum(sum(a) for a in accepted)
        stats.forwards += max(len(a) for a in accepted)
        bar.update(sum(j == n - 1 for _, j in chunk))
    bar.close()
    return results, stats
