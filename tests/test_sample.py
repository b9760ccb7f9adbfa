"""Sampling: determinism, batch-size independence, padding, stops, HF models, and
self-speculative decoding equal to greedy decoding token for token."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from transformers import LlamaConfig, LlamaForCausalLM

from wmtp.loss import weighted_mtp_loss
from wmtp.model import MTPModel
from wmtp.sample import (
    _ExtraHeads,
    _Positions,
    _speculate_one,
    _trunk,
    generate,
    speculative_generate,
)

PROMPTS = ["def add(a, b):\n", "class Model:\n    def forward(self, x", "import"]
TEXT = "def f(x):\n    return x + 1\n\n" * 4 + "for i in range(10):\n    print(i)\n" * 4


@pytest.fixture
def model(tiny_tokenizer) -> MTPModel:
    model = MTPModel(tiny_config(vocab_size=len(tiny_tokenizer), n_future_tokens=3, n_layers=5))
    model.init_weights(seed=0)
    return model


@pytest.fixture
def trained(model, tiny_tokenizer) -> MTPModel:
    """The tiny model after a few hundred milliseconds of MTP training on repetitive
    code, so that its extra heads agree with head 0 often."""
    ids = torch.tensor([tiny_tokenizer(TEXT)["input_ids"][:96]])  # (1, S)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = weighted_mtp_loss(model, ids, torch.ones_like(ids), torch.ones(ids.shape))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def _sample(model, tokenizer, **overrides):
    settings = dict(n=2, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=3, stop=())
    settings.update(overrides)
    return generate(model, tokenizer, PROMPTS, **settings)


def test_same_seed_same_samples_whatever_the_batch_size(model, tiny_tokenizer):
    first = _sample(model, tiny_tokenizer, batch_size=4)
    assert len(first) == len(PROMPTS) and all(len(s) == 2 for s in first)
    assert _sample(model, tiny_tokenizer, batch_size=4) == first
    assert _sample(model, tiny_tokenizer, batch_size=1) == first
    assert _sample(model, tiny_tokenizer, batch_size=6) == first
    assert _sample(model, tiny_tokenizer, batch_size=4, seed=4) != first


def test_greedy_samples_agree_and_padding_does_not_matter(model, tiny_tokenizer):
    batched = _sample(model, tiny_tokenizer, temperature=0.0, n=2, batch_size=6)
    assert all(a == b for a, b in batched)
    alone = [
        generate(model, tiny_tokenizer, [p], n=1, temperature=0.0, top_p=1.0,
                 max_new_tokens=12, seed=0, stop=())[0][0]
        for p in PROMPTS
    ]  # fmt: skip
    assert alone == [a for a, _ in batched]


def test_completions_are_cut_at_stop_sequences(model, tiny_tokenizer):
    free = _sample(model, tiny_tokenizer, n=4, max_new_tokens=24, temperature=2.0, top_p=1.0)
    letter = next(c for s in free for c in s[0] if c.isalpha())
    cut = _sample(model, tiny_tokenizer, n=4, max_new_tokens=24, temperature=2.0, top_p=1.0,
                  stop=(letter,))  # fmt: skip
    for free_row, cut_row in zip(free, cut, strict=True):
        for whole, part in zip(free_row, cut_row, strict=True):
            assert letter not in part and whole.startswith(part)
    assert any(
        len(p) < len(w)
        for fr, cr in zip(free, cut, strict=True)
        for w, p in zip(fr, cr, strict=True)
    )


def test_hf_causal_lm_generates_with_left_padding(tiny_tokenizer):
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config)
    batched = generate(hf, tiny_tokenizer, PROMPTS, n=1, temperature=0.0, top_p=1.0,
                       max_new_tokens=10, seed=0, stop=())  # fmt: skip
    alone = [
        generate(hf, tiny_tokenizer, [p], n=1, temperature=0.0, top_p=1.0, max_new_tokens=10,
                 seed=0, stop=())[0]
        for p in PROMPTS
    ]  # fmt: skip
    assert batched == alone and any(c[0] for c in batched)


def _greedy_without_cache(model: MTPModel, prompt: list[int], steps: int) -> list[int]:
    """Reference greedy decoding: recompute the whole sequence every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model.next_token_logits(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_generation_ends_at_any_of_several_end_ids(model, tiny_tokenizer):
    """Chat models end a turn with a token of their own and list several end ids:
    generation stops at the first of any of them (and counts what it decoded)."""
    prompt = PROMPTS[0]
    ids = _greedy_without_cache(model, tiny_tokenizer(prompt)["input_ids"], 16)
    first_new = [k for k in range(2, 16) if ids[k] not in ids[:k]]
    early, late = first_new[0], first_new[1]
    unused = next(t for t in range(2, len(tiny_tokenizer)) if t not in ids)

    def run(end_ids):
        texts, decoded = generate(model, tiny_tokenizer, [prompt], n=1, temperature=0.0, top_p=1.0,
                                  max_new_tokens=16, seed=0, stop=(), eos_token_ids=end_ids,
                                  with_decoded_tokens=True)  # fmt: skip
        return texts[0][0], decoded[0][0]

    assert run([]) == (tiny_tokenizer.decode(ids), 16)
    assert run([ids[late], unused, ids[early]]) == (tiny_tokenizer.decode(ids[:early]), early + 1)
    assert run({ids[late], unused}) == (tiny_tokenizer.decode(ids[:late]), late + 1)
    default = tiny_tokenizer.eos_token_id  # the tokenizer's EOS when no ids are given
    assert run(None) == run([default])


def _speculate_without_cache(model: MTPModel, prompt: list[int], steps: int) -> list[int]:
    """Reference self-speculative decoding recomputing the whole sequence every step:
    the accepted length of every verification forward."""
    ids, accepted = list(prompt), []
    with torch.no_grad():
        while len(ids) - len(prompt) < steps:
            draft = model(torch.tensor([ids]))[0, -1].argmax(-1).tolist()  # (H,) every head
            greedy = model.next_token_logits(torch.tensor([ids + draft]))[0].argmax(-1).tolist()
            keep = 1
            while keep < len(draft) and draft[keep] == greedy[len(ids) + keep - 1]:
                keep += 1
            ids += draft[:keep]
            accepted.append(keep)
    return accepted


def test_extra_heads_draft_from_an_up_to_date_cache(trained, tiny_tokenizer):
    """Stale or misaligned KV caches of heads 1..H-1 would not change the output
    (head 0 verifies) but would draft worse: the accepted lengths must be those of
    decoding without any cache."""
    for prompt in PROMPTS:
        ids = tiny_tokenizer(prompt)["input_ids"]
        _, accepted = _speculate_one(trained, ids, 30, None, lambda out: False)
        reference = _speculate_without_cache(trained, ids, 30)
        assert accepted == reference and max(accepted) > 1


@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_batched_extra_heads_match_the_per_layer_blocks(n_kv_heads, tiny_tokenizer):
    """`_ExtraHeads` (stacked weights, batched matmuls, own KV, last position only)
    computes what the transformers blocks of heads 1..H-1 compute, over a prefill
    and then chunks of new positions after a growing cache (GQA too)."""
    config = tiny_config(
        vocab_size=len(tiny_tokenizer), n_future_tokens=4, n_layers=6, n_kv_heads=n_kv_heads
    )
    model = MTPModel(config)
    model.init_weights(seed=2)
    ids = torch.tensor([tiny_tokenizer(TEXT)["input_ids"][:40]])  # (1, 40)
    cache, extra = model.new_cache(), _ExtraHeads(model, 40)
    with torch.no_grad():
        for chunk in (ids[:, :31], ids[:, 31:34], ids[:, 34:35], ids[:, 35:]):
            hidden, context = model.trunk(chunk, None, cache)
            reference = torch.cat(
                [model.heads[k](hidden, **context)[:, -1] for k in range(1, 4)]
            )  # (3, D)
            batched = extra.step(hidden, *context["position_embeddings"])
            torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-5)
        assert extra.length == cache.get_seq_length() == 40


def test_precomputed_positions_give_the_trunk_of_the_model(model, tiny_tokenizer):
    """`_trunk` (rotary tables and causal masks computed once) equals `model.trunk`
    over a prefill, multi-token chunks after a cache and single tokens."""
    ids = torch.tensor([tiny_tokenizer(TEXT)["input_ids"][:30]])  # (1, 30)
    cache, reference_cache = model.new_cache(), model.new_cache()
    positions = _Positions(model, 30, ids.device)
    with torch.no_grad():
        for chunk in (ids[:, :20], ids[:, 20:24], ids[:, 24:25], ids[:, 25:]):
            hidden, _ = _trunk(model, chunk, cache, positions)
            reference, _ = model.trunk(chunk, None, reference_cache)
            torch.testing.assert_close(hidden, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("heads_trained", [False, True])
def test_speculative_equals_greedy_token_for_token(heads_trained, request, tiny_tokenizer):
    model = request.getfixturevalue("trained" if heads_trained else "model")
    for prompt in PROMPTS:
        ids = tiny_tokenizer(prompt)["input_ids"]
        tokens, accepted = _speculate_one(model, ids, 30, None, lambda out: False)
        assert tokens == _greedy_without_cache(model, ids, 30)
        assert all(1 <= a <= model.n_heads for a in accepted)
    completions, mean_accepted = speculative_generate(model, tiny_tokenizer, PROMPTS, 30, stop=())
    greedy = generate(model, tiny_tokenizer, PROMPTS, n=1, temperature=0.0, top_p=1.0,
                      max_new_tokens=30, seed=0, batch_size=1, stop=())  # fmt: skip
    assert completions == [g[0] for g in greedy]
    if heads_trained:
        assert mean_accepted > 1.3, "trained heads should get drafts accepted"


def test_speculative_with_a_single_head_is_plain_greedy(tiny_tokenizer):
    model = MTPModel(tiny_config(vocab_size=len(tiny_tokenizer), n_future_tokens=1))
    model.init_weights(seed=1)
    ids = tiny_tokenizer(PROMPTS[0])["input_ids"]
    tokens, accepted = _speculate_one(model, ids, 7, None, lambda out: False)
    assert tokens == _greedy_without_cache(model, ids, 7) and accepted == [1] * 7


def test_bad_settings_raise(model, tiny_tokenizer):
    with pytest.raises(ValueError, match="sampling settings"):
        _sample(model, tiny_tokenizer, top_p=0.0)
    with pytest.raises(TypeError, match="MTPModel"):
        speculative_generate(torch.nn.Linear(2, 2), tiny_tokenizer, PROMPTS, 4)
