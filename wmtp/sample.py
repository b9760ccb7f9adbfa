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

from collections.abc import Collection

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


def _end_ids(tokenizer, eos_token_ids: Collection[int] | None) -> frozenset[int]:
    """The ids that end a completion: `eos_token_ids`, else the tokenizer's EOS."""
    if eos_token_ids is not None:
        return frozenset(eos_token_ids)
    return frozenset() if tokenizer.eos_token_id is None else frozenset([tokenizer.eos_token_id])


def _finish(
    tokenizer, tokens: list[int], stop: tuple[str, ...], eos_token_ids: Collection[int] | None = None
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
    eos_token_ids,
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
            eos_token_ids=eos_token_ids,
        )
        for (i, j), row in zip(chunk, tokens, strict=True):
            results[i][j] = _finish(tokenizer, row, stop, eos_token_ids)
            decoded[i][j] = len(row)
        bar.update(sum(j == n - 1 for _, j in chunk))  # prompts whose last sample is done
    bar.close()
    return (results, decoded) if with_decoded_tokens else results


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="prompt", disable=not enabled)


class _ExtraHeads:
    """Heads 1..H-1 of an `MTPModel` as ONE batched computation for decoding.

    Their decoder blocks (RMSNorm, RoPE attention, SwiGLU) have the same shapes, so
    their weights are stacked along a leading head dim `K = H - 1` and run with
    batched matmuls over one shared input, with their own preallocated KV tensors
    `(K, n_kv_heads, capacity, head_dim)` instead of `DynamicCache` slots.

    Drafting needs a head's output at the last position only, and a one-block head
    needs the other positions only as keys and values, so `step` projects every new
    position to K/V but runs the query, attention, output projection and MLP for the
    last position alone. It agrees with the per-layer transformers blocks to float
    rounding (tested)."""

    def __init__(self, model: MTPModel, capacity: int) -> None:
        config = model.config
        heads = list(model.heads[1:])
        self.n = len(heads)
        self.eps = config.norm_eps
        self.n_q, self.n_kv = config.n_heads, config.kv_heads
        self.head_dim = config.dim // config.n_heads
        if not heads:
            return  # a next-token model: nothing to draft with

        def stack(get) -> torch.Tensor:
            return torch.stack([get(block) for block in heads]).detach()

        self.w_in = stack(lambda b: b.input_layernorm.weight).unsqueeze(1)  # (K, 1, D)
        self.w_post = stack(lambda b: b.post_attention_layernorm.weight).unsqueeze(1)
        self.w_q = stack(lambda b: b.self_attn.q_proj.weight.t())  # (K, D, Hq*hd)
        self.w_kv = stack(  # (K, D, 2*Hkv*hd): keys then values
            lambda b: torch.cat([b.self_attn.k_proj.weight, b.self_attn.v_proj.weight]).t()
        )
        self.w_o = stack(lambda b: b.self_attn.o_proj.weight.t())  # (K, Hq*hd, D)
        self.w_gate_up = stack(  # (K, D, 2F)
            lambda b: torch.cat([b.mlp.gate_proj.weight, b.mlp.up_proj.weight]).t()
        )
        self.w_down = stack(lambda b: b.mlp.down_proj.weight.t())  # (K, F, D)
        shape = (self.n, self.n_kv, capacity, self.head_dim)
        weight = model.output.weight
        self.keys = torch.empty(shape, dtype=weight.dtype, device=weight.device)
        self.values = torch.empty_like(self.keys)
        self.length = 0

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """LlamaRMSNorm, per head."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x.to(dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def step(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Append the trunk outputs `hidden` (1, S, D) at the next S positions (rotary
        `cos`/`sin` (1, S, head_dim)) to every head's KV and return the heads' block
        outputs at the last position `(K, D)` (before the shared final norm)."""
        n, seq, hd = self.n, hidden.shape[1], self.head_dim
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (1, 1, S, hd)
        normed = self._norm(hidden, self.w_in)  # (K, S, D)
        kv = torch.bmm(normed, self.w_kv).view(n, seq, 2, self.n_kv, hd)
        keys = self._rope(kv[:, :, 0].transpose(1, 2), cos, sin)  # (K, Hkv, S, hd)
        end = self.length + seq
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = kv[:, :, 1].transpose(1, 2)
        self.length = end
        query = torch.bmm(normed[:, -1:], self.w_q).view(n, 1, self.n_q, hd).transpose(1, 2)
        query = self._rope(query, cos[:, :, -1:], sin[:, :, -1:])  # (K, Hq, 1, hd)
        attn = torch.nn.functional.scaled_dot_product_attention(
            query,
            self.keys[:, :, :end],
            self.values[:, :, :end],
            enable_gqa=self.n_q != self.n_kv,
        )  # (K, Hq, 1, hd): the last position sees every cached position
        x = hidden[:, -1:] + torch.bmm(attn.transpose(1, 2).reshape(n, 1, -1), self.w_o)
        gate, up = torch.bmm(self._norm(x, self.w_post), self.w_gate_up).chunk(2, dim=-1)
        x = x + torch.bmm(torch.nn.functional.silu(gate) * up, self.w_down)  # (K, 1, D)
        return x[:, 0]


def _draft(
    model: MTPModel, extra: _ExtraHeads, hidden: torch.Tensor, context: dict, keep: int,
    first: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """The next proposal (H,): `first` (head 0's token after the last kept position)
    followed by heads 1..H-1's greedy guesses there. The heads see the first `keep`
    positions of `hidden` (1, S, D) (their KV stays in step with the trunk's); all
    guesses come from one batched head computation and one unembedding matmul."""
    if extra.n == 0:
        return first
    cos, sin = context["position_embeddings"]  # (1, S, head_dim) each
    last = extra.step(hidden[:, :keep], cos[:, :keep], sin[:, :keep])  # (K, D)
    guesses = model.output(model.norm(last)).argmax(-1)  # (H-1,)
    return torch.cat([first, guesses])


class _Positions:
    """Rotary cos/sin and causal masks of one decode, computed once for positions
    `0..capacity-1` and sliced per forward (instead of `MTPModel.attention_context`
    recomputing them and building the mask through transformers every forward).
    No padding (one prompt), so position = cache index."""

    def __init__(self, model: MTPModel, capacity: int, device: torch.device) -> None:
        weight = model.output.weight
        positions = torch.arange(capacity, device=device).unsqueeze(0)  # (1, capacity)
        self.cos, self.sin = model.rotary_emb(weight, positions)  # (1, capacity, head_dim)
        self.causal = torch.ones(capacity, capacity, dtype=torch.bool, device=device).tril()

    def context(self, cache, past: int, seq: int) -> dict:
        """The attention context of `seq` new positions after `past` cached ones."""
        end = past + seq
        return {
            # SDPA's causal kernel needs no mask for a prefill or one query; else a
            # boolean (1, 1, seq, past + seq) mask, True = attend
            "attention_mask": None
            if past == 0 or seq == 1
            else self.causal[None, None, past:end, :end],
            "position_ids": None,
            "position_embeddings": (self.cos[:, past:end], self.sin[:, past:end]),
            "past_key_values": cache,
        }


def _trunk(model: MTPModel, ids: torch.Tensor, cache, positions: _Positions):
    """`model.trunk(ids, None, cache)` with the precomputed attention context."""
    hidden = model.tok_embeddings(ids)  # (1, S, D)
    context = positions.context(cache, cache.get_seq_length(), ids.shape[1])
    for layer in model.layers:
        hidden = layer(hidden, **context)
    return hidden, context


@torch.inference_mode()
def _speculate_one(model: MTPModel, prompt: list[int], max_new_tokens: int, eos, stop_check):
    """Self-speculative greedy decoding of one prompt. Returns (tokens, accepted
    lengths per verification forward).

    Per verification forward: trunk + head 0 over the H drafted tokens (head 0 at
    draft position i gives the greedy token after draft[: i + 1], so draft[i + 1]
    stands if it matches), one transfer of the draft and the verdict to the host,
    the trunk's and head 0's KV cache cropped to the kept tokens, then heads
    1..H-1 as one batched computation (`_ExtraHeads`: K/V of the kept positions,
    everything else at the last one only). Rotary tables and causal masks are
    computed once per prompt (`_Positions`). A plain greedy step runs trunk + head
    0 over one token; a forward costs that plus H - 1 more tokens through the trunk
    and the batched heads, and yields 1..H tokens."""
    device = _device(model)
    n_heads = model.n_heads
    n_verified = model.config.n_trunk_layers + 1  # cache slots of the trunk and head 0
    cache = model.new_cache()
    capacity = len(prompt) + max_new_tokens + n_heads
    extra = _ExtraHeads(model, capacity)
    positions = _Positions(model, capacity, device)
    hidden, context = _trunk(model, torch.tensor([prompt], device=device), cache, positions)
    first = model.output(model.head_hidden(hidden, 0, context)[:, -1]).argmax(-1)  # (1,)
    draft = _draft(model, extra, hidden, context, hidden.shape[1], first)  # (H,)
    out: list[int] = []
    accepted: list[int] = []
    while len(out) < max_new_tokens:
        hidden, context = _trunk(model, draft.unsqueeze(0), cache, positions)  # (1, H, D)
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
        draft = _draft(model, extra, hidden, context, keep, greedy[keep - 1 : keep])
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
