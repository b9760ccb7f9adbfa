"""Sampling: determinism whatever the batch size and scheduling, greedy output equal
to the sampler before continuous batching (`reference_sampler.py`), padding,
stops, HF models; and decoding with the MTP heads: speculative greedy decoding equal to greedy decoding
token for token, speculative sampling distributed as plain sampling (chi-square
tests that also catch broken acceptance rules), and the batched KV bookkeeping."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import tiny_config
from reference_sampler import old_generate
from transformers import LlamaConfig, LlamaForCausalLM

from wmtp.core import sample
from wmtp.core.checkpoints import mtp_from_hf_llama
from wmtp.core.loss import weighted_mtp_loss
from wmtp.core.model import MTPModel
from wmtp.core.sample import (
    _accept_sampled,
    _decode_batch,
    _Decoder,
    _draw,
    _Rule,
    _sample_seed,
    _sample_tokens,
    generate,
    speculative_generate,
)

PROMPTS = ["def add(a, b):\n", "class Model:\n    def forward(self, x", "import"]
# prompts of many lengths (one of a single token), and stops that end completions at
# different steps: rows of a batch finish apart, so finished rows are replaced by
# waiting ones mid-batch
MORE_PROMPTS = PROMPTS + [
    "x = 1\n", "def main():\n    for i in range(3):\n        print(", "while True:\n",
    "x", "# a comment\nimport os\n\n\ndef path(name):\n    ",
]  # fmt: skip
STOPS = ("\n", ")")
TEXT = "def f(x):\n    return x + 1\n\n" * 4 + "for i in range(10):\n    print(i)\n" * 4


@pytest.fixture
def model(tiny_tokenizer) -> MTPModel:
    model = MTPModel(tiny_config(vocab_size=len(tiny_tokenizer), n_future_tokens=3, n_layers=5))
    model.init_weights(seed=0)
    return model


@pytest.fixture(scope="module")
def hf_llama(tiny_tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def trained(tiny_tokenizer) -> MTPModel:
    """A tiny 3-head model after a second or two of MTP training on repetitive code,
    so that its extra heads agree with head 0 often (but far from always)."""
    model = MTPModel(tiny_config(vocab_size=len(tiny_tokenizer), n_future_tokens=3, n_layers=5))
    model.init_weights(seed=0)
    ids = torch.tensor([tiny_tokenizer(TEXT)["input_ids"][:96]])  # (1, S)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = weighted_mtp_loss(model, ids, torch.ones_like(ids), torch.ones(ids.shape))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _sample(model, tokenizer, speculative=False, **overrides):
    settings = dict(n=2, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=3, stop=())
    settings.update(overrides)
    if speculative:
        return speculative_generate(model, tokenizer, PROMPTS, **settings)[0]
    return generate(model, tokenizer, PROMPTS, **settings)


@pytest.mark.parametrize("speculative", [False, True])
def test_same_seed_same_samples_whatever_the_batch_size(speculative, trained, tiny_tokenizer):
    sample_ = functools.partial(_sample, trained, tiny_tokenizer, speculative)
    first = sample_(batch_size=4)
    assert len(first) == len(PROMPTS) and all(len(s) == 2 for s in first)
    assert sample_(batch_size=4) == first
    for batch_size in (1, 3, 6, 16):
        assert sample_(batch_size=batch_size) == first
    assert sample_(batch_size=4, seed=4) != first


class _CountCompactions:
    def __init__(self, monkeypatch) -> None:
        self.count, compact = 0, _Decoder._compact

        def counted(decoder) -> None:
            self.count += 1
            compact(decoder)

        monkeypatch.setattr(_Decoder, "_compact", counted)


@pytest.mark.parametrize("kind", ["mtp", "hf"])
@pytest.mark.parametrize("slack", [0, 1000])
def test_samples_do_not_depend_on_scheduling(kind, slack, trained, hf_llama, tiny_tokenizer,
                                             monkeypatch):  # fmt: skip
    """A (prompt, sample) pair's completion is the same whatever the batch size, however
    many samples are drawn per prompt (so how a prompt's samples fall into batches and
    which rows they replace), whenever the rows are compacted, for our model
    (continuous batching) and a Hugging Face one (chunks)."""
    monkeypatch.setattr(sample, "SLOTS_SLACK", slack)
    compactions = _CountCompactions(monkeypatch)
    model = trained if kind == "mtp" else hf_llama
    settings = dict(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=3, stop=STOPS,
                    with_decoded_tokens=True)  # fmt: skip
    first, decoded = generate(model, tiny_tokenizer, MORE_PROMPTS, n=4, batch_size=16, **settings)
    assert len({d for row in decoded for d in row}) > 3, "rows should end at different steps"
    for batch_size in (1, 3):
        assert generate(model, tiny_tokenizer, MORE_PROMPTS, n=4, batch_size=batch_size,
                        **settings) == (first, decoded)  # fmt: skip
    fewer = generate(model, tiny_tokenizer, MORE_PROMPTS, n=3, batch_size=5, **settings)
    assert fewer == ([row[:3] for row in first], [row[:3] for row in decoded])
    assert any(len(set(row)) > 1 for row in first), "samples should differ"
    if kind == "mtp":
        assert (compactions.count > 0) == (slack == 0)


@pytest.mark.parametrize("kind", ["random", "trained", "hf"])
@pytest.mark.parametrize("slack", [0, None])
def test_greedy_equals_the_old_sampler(kind, slack, request, hf_llama, tiny_tokenizer,
                                       monkeypatch):  # fmt: skip
    """Greedy completions and their decoded lengths are the old sampler's
    (`reference_sampler.py`: static batches, HF layers), at every batch size."""
    if slack is not None:
        monkeypatch.setattr(sample, "SLOTS_SLACK", slack)
    model = {"random": "model", "trained": "trained", "hf": "hf_llama"}[kind]
    model = request.getfixturevalue(model)
    settings = dict(n=2, temperature=0.0, top_p=1.0, max_new_tokens=24, seed=0, stop=STOPS,
                    with_decoded_tokens=True)  # fmt: skip
    expected = old_generate(model, tiny_tokenizer, MORE_PROMPTS, batch_size=16, **settings)
    assert len({d for row in expected[1] for d in row}) > 1, "rows should end at different steps"
    for batch_size in (1, 3, 16):
        got = generate(model, tiny_tokenizer, MORE_PROMPTS, batch_size=batch_size, **settings)
        assert got == expected


def test_both_decoding_paths_sample_alike(hf_llama, tiny_tokenizer):
    """The same weights as a Hugging Face Llama (decoded in chunks) and as our model
    (continuous batching on `_Decoder`) give the same samples: the same logits,
    the same uniforms per (prompt, sample), the same rule."""
    ours = mtp_from_hf_llama(hf_llama, n_future_tokens=1)
    settings = dict(n=3, temperature=1.0, top_p=0.9, max_new_tokens=16, seed=5, stop=STOPS,
                    batch_size=4, with_decoded_tokens=True)  # fmt: skip
    theirs = generate(hf_llama, tiny_tokenizer, MORE_PROMPTS, **settings)
    assert generate(ours, tiny_tokenizer, MORE_PROMPTS, **settings) == theirs


def test_greedy_samples_agree_and_padding_does_not_matter(model, tiny_tokenizer):
    batched = _sample(model, tiny_tokenizer, temperature=0.0, n=2, batch_size=6)
    assert all(a == b for a, b in batched)
    alone = [
        generate(model, tiny_tokenizer, [p], n=1, temperature=0.0, top_p=1.0,
                 max_new_tokens=12, seed=0, stop=())[0][0]
        for p in PROMPTS
    ]  # fmt: skip
    assert alone == [a for a, _ in batched]


@pytest.mark.parametrize("speculative", [False, True])
def test_completions_are_cut_at_stop_sequences(speculative, trained, tiny_tokenizer):
    sample_ = functools.partial(_sample, trained, tiny_tokenizer, speculative, n=4,
                                max_new_tokens=24, temperature=2.0, top_p=1.0)  # fmt: skip
    free = sample_()
    letter = next(c for s in free for c in s[0] if c.isalpha())
    cut = sample_(stop=(letter,))
    for free_row, cut_row in zip(free, cut, strict=True):
        for whole, part in zip(free_row, cut_row, strict=True):
            assert letter not in part and whole.startswith(part)
    assert any(
        len(p) < len(w)
        for fr, cr in zip(free, cut, strict=True)
        for w, p in zip(fr, cr, strict=True)
    )


def test_hf_causal_lm_generates_with_left_padding(hf_llama, tiny_tokenizer):
    hf = hf_llama
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


def _decode(model, prompts: list[list[int]], *, draft=True, steps=30, temperature=0.0,
            top_p=1.0, seed=0, spare=None, decoder=None):  # fmt: skip
    """`_decode_batch` over token prompts, one sample each: (tokens, accepted) per row."""
    generators = [torch.Generator().manual_seed(_sample_seed(seed, 0, j)) for j in range(len(prompts))]
    return _decode_batch(
        decoder or _Decoder(model, draft), prompts, generators, temperature=temperature,
        top_p=top_p, max_new_tokens=steps, pad=0, finished=lambda tokens: False, spare=spare,
    )  # fmt: skip


@pytest.mark.parametrize(("n_kv_heads", "merged_rows"), [(2, 8), (4, 8), (2, 0)])
def test_decoder_computes_what_the_model_computes(n_kv_heads, merged_rows, monkeypatch,
                                                  tiny_tokenizer):  # fmt: skip
    """`_Decoder` (its own blocks, KV caches and rotary tables) gives `MTPModel`'s
    head-0 logits, and heads 1..H-1's at the drafting position, over a prompt and then
    chunks after a growing cache; grouped-query attention too, and heads 1..H-1 run
    with head 0 or apart."""
    monkeypatch.setattr(sample, "MERGED_HEADS_MAX_ROWS", merged_rows)
    config = tiny_config(
        vocab_size=len(tiny_tokenizer), n_future_tokens=4, n_layers=6, n_kv_heads=n_kv_heads
    )
    model = MTPModel(config)
    model.init_weights(seed=2)
    ids = tiny_tokenizer(TEXT)["input_ids"][:40]
    decoder, cache = _Decoder(model, draft=True), model.new_cache()
    decoder.start([ids[:31]], capacity=40, pad=0)
    with torch.no_grad():
        for chunk in (ids[:31], ids[31:34], ids[34:35], ids[35:]):
            prompt = decoder.pointer == 0
            logits = decoder.forward(torch.tensor([chunk]), last_only=prompt)
            reference, context = model.trunk(torch.tensor([chunk]), None, cache)
            expected = model.head_logits(reference, 0, context)
            torch.testing.assert_close(logits, expected[:, -1:] if prompt else expected)
            last = torch.tensor([0 if prompt else len(chunk) - 1])
            drafts = decoder.draft_logits(last)[0]  # (3, V)
            expected = torch.stack([model.head_logits(reference, k, context)[0, -1] for k in (1, 2, 3)])
            torch.testing.assert_close(drafts, expected, rtol=1e-5, atol=1e-5)
            decoder.commit(torch.tensor([len(chunk)]), [len(chunk)])
    assert decoder.pointer == cache.get_seq_length() == 40


@pytest.mark.parametrize("heads_trained", [False, True])
def test_speculative_greedy_equals_greedy_token_for_token(heads_trained, request, tiny_tokenizer):
    """Alone and in a left-padded batch, drafting or not: plain greedy decoding."""
    model = request.getfixturevalue("trained" if heads_trained else "model")
    prompts = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]
    reference = [_greedy_without_cache(model, p, 30) for p in prompts]
    for draft in (True, False):
        assert _decode(model, prompts, draft=draft)[0] == reference
        assert [_decode(model, [p], draft=draft)[0][0] for p in prompts] == reference
    completions, stats = speculative_generate(
        model, tiny_tokenizer, PROMPTS, max_new_tokens=30, batch_size=2, stop=()
    )
    greedy = generate(model, tiny_tokenizer, PROMPTS, n=1, temperature=0.0, top_p=1.0,
                      max_new_tokens=30, seed=0, batch_size=1, stop=())  # fmt: skip
    assert completions == greedy
    assert 1 <= stats.accepted_per_forward <= model.n_heads
    if heads_trained:
        assert stats.accepted_per_forward > 1.3, "trained heads should get drafts accepted"


@pytest.mark.parametrize("spare", [None, 0])
def test_drafts_come_from_up_to_date_caches_in_a_batch(spare, trained, tiny_tokenizer):
    """Stale or misaligned KV caches of heads 1..H-1 would not change greedy output
    (head 0 verifies) but would draft worse: in a batch whose rows keep different
    numbers of tokens (holes in the shared cache slots, rows leaving when done, the
    cache compacted when out of room), every row's accepted lengths must be those
    of decoding it alone without any cache."""
    prompts = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]
    decoder = _Decoder(trained, draft=True)
    tokens, accepted = _decode(trained, prompts, spare=spare, decoder=decoder)
    for prompt, row, lengths in zip(prompts, tokens, accepted, strict=True):
        reference = _speculate_without_cache(trained, prompt, 30)
        assert lengths == reference[: len(lengths)] and 1 + sum(lengths) >= 30
        assert row == _greedy_without_cache(trained, prompt, 30)
    assert max(max(a) for a in accepted) > 1
    assert (decoder.compactions > 0) == (spare == 0)


def test_speculative_with_a_single_head_is_plain_greedy(tiny_tokenizer):
    model = MTPModel(tiny_config(vocab_size=len(tiny_tokenizer), n_future_tokens=1))
    model.init_weights(seed=1)
    ids = tiny_tokenizer(PROMPTS[0])["input_ids"]
    tokens, accepted = _decode(model, [ids], steps=7)
    assert tokens[0] == _greedy_without_cache(model, ids, 7) and accepted[0] == [1] * 6


def test_speculative_completions_end_at_any_of_the_eos_ids(trained, tiny_tokenizer):
    settings = dict(n=2, temperature=2.0, top_p=1.0, max_new_tokens=16, seed=3, stop=())
    free = speculative_generate(trained, tiny_tokenizer, PROMPTS, **settings)[0]
    # sample 0 of prompt 0, as token ids: its generator is seeded from (seed, 0, 0)
    tokens = _decode(trained, [tiny_tokenizer(PROMPTS[0])["input_ids"]], steps=16,
                     temperature=2.0, seed=3)[0][0]  # fmt: skip
    assert tiny_tokenizer.decode(tokens) == free[0][0]
    eos = tokens[5]
    ended = speculative_generate(trained, tiny_tokenizer, PROMPTS, **settings,
                                 eos_token_ids=[eos, tiny_tokenizer.eos_token_id])[0]  # fmt: skip
    assert ended[0][0] == tiny_tokenizer.decode(tokens[: tokens.index(eos)])


# ---- speculative sampling is plain sampling: chi-square tests at a fixed seed budget

TEMPERATURE, TOP_P, LENGTH, DRAWS = 0.8, 0.9, 3, 1500
ALPHA = 1e-3  # significance level: a sampler passes when a test's p-value is above it


@pytest.fixture(scope="module")
def exact(trained, tiny_tokenizer) -> tuple[list[int], dict[tuple[int, ...], float]]:
    """(prompt, P(first LENGTH tokens)) under plain sampling from head 0 at TEMPERATURE
    and TOP_P, by enumerating every continuation with nonzero probability (one model
    call per level over all of them, the nucleus written out here)."""
    prompt = tiny_tokenizer("def f(x):\n")["input_ids"]
    level: dict[tuple[int, ...], float] = {(): 1.0}
    with torch.no_grad():
        for _ in range(LENGTH):
            prefixes = list(level)
            logits = trained.next_token_logits(torch.tensor([prompt + list(p) for p in prefixes]))
            probs = torch.softmax(logits[:, -1].float() / TEMPERATURE, dim=-1).double()
            ranked, order = probs.sort(dim=-1, descending=True)
            inside = ranked.cumsum(-1) - ranked < TOP_P
            following = {}
            for prefix, p, ids, keep in zip(prefixes, ranked, order, inside, strict=True):
                mass = p[keep].sum().item()
                for prob, token in zip(p[keep].tolist(), ids[keep].tolist(), strict=True):
                    following[prefix + (token,)] = level[prefix] * prob / mass
            level = following
    return prompt, level


def _p_value(statistic: float, dof: int) -> float:
    """P(a chi-square variable with `dof` degrees of freedom >= `statistic`)."""
    half = torch.tensor([dof / 2, statistic / 2], dtype=torch.float64)
    return torch.special.gammaincc(half[0], half[1]).item()


def _goodness_of_fit_p(samples: list[list[int]], exact: dict) -> float:
    """p-value of Pearson's chi-square test of `samples` against the exact
    distribution; continuations expected fewer than 5 times are pooled."""
    counts: dict = {}
    for tokens in samples:
        counts[tuple(tokens)] = counts.get(tuple(tokens), 0) + 1
    n = len(samples)
    cells = [c for c in exact if exact[c] * n >= 5]
    observed = [counts.get(c, 0) for c in cells] + [n - sum(counts.get(c, 0) for c in cells)]
    expected = [exact[c] * n for c in cells] + [n - sum(exact[c] * n for c in cells)]
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True) if e > 0)
    return _p_value(statistic, len(cells) - (expected[-1] <= 0))


def _homogeneity_p(first: list[list[int]], second: list[list[int]]) -> float:
    """p-value of Pearson's chi-square test that two samplers draw from one
    distribution (2 x continuations table; continuations seen fewer than 10 times in
    all are pooled)."""
    keys = [tuple(t) for t in first + second]
    common = {k for k in set(keys) if keys.count(k) >= 10}
    table = [[sum(tuple(t) == k for t in rows) for k in sorted(common)] for rows in (first, second)]
    for row, rows in zip(table, (first, second), strict=True):
        row.append(len(rows) - sum(row))
    counts = torch.tensor(table, dtype=torch.float64)  # (2, cells)
    expected = counts.sum(1, keepdim=True) * counts.sum(0, keepdim=True) / counts.sum()
    statistic = ((counts - expected) ** 2 / expected).sum().item()
    return _p_value(statistic, counts.shape[1] - 1)


def _sampled(model, prompt: list[int], draft: bool) -> list[list[int]]:
    return _decode(model, [prompt] * DRAWS, draft=draft, steps=LENGTH,
                   temperature=TEMPERATURE, top_p=TOP_P, seed=11)[0]  # fmt: skip


@pytest.fixture(scope="module")
def plain_samples(trained, tiny_tokenizer, exact) -> list[list[int]]:
    """DRAWS continuations from `generate`'s sampler (the evaluation's reference)."""
    pairs = _sample_tokens(trained, [exact[0]], n=DRAWS, rule=_Rule(TEMPERATURE, TOP_P), pad=0,
                           seed=5, max_new_tokens=LENGTH, batch_size=64,
                           finished=lambda tokens: False)  # fmt: skip
    return [pair.tokens for pair in pairs]


def test_speculative_sampling_is_plain_sampling(trained, exact, plain_samples):
    """The continuations of speculative sampling fit the exact distribution of plain
    sampling from head 0 (as `generate`'s do, which validates the test) and are
    indistinguishable from `generate`'s; drafting on this model is neither always
    right nor always wrong, so both the acceptance and the residual are exercised."""
    prompt, distribution = exact
    speculative = _sampled(trained, prompt, draft=True)
    assert _goodness_of_fit_p(plain_samples, distribution) > ALPHA
    assert _goodness_of_fit_p(speculative, distribution) > ALPHA
    assert _homogeneity_p(speculative, plain_samples) > ALPHA
    assert _goodness_of_fit_p(_sampled(trained, prompt, draft=False), distribution) > ALPHA
    accepted = [a for row in _decode(trained, [prompt] * 200, steps=LENGTH, temperature=TEMPERATURE,
                                     top_p=TOP_P)[1] for a in row]  # fmt: skip
    assert 0.1 < accepted.count(1) / len(accepted) < 0.9 and max(accepted) == trained.n_heads


def _accept_all(p, q, drafts, u_accept, u_next):
    """Broken: every draft stands, so the drafting heads' distributions leak through."""
    keep = torch.full((p.shape[0],), p.shape[1], dtype=torch.long)
    return keep, _draw(p[:, -1], u_next)


def _no_residual(p, q, drafts, u_accept, u_next):
    """Broken: the right acceptance test, but a rejected draft is replaced by a
    sample from p instead of from norm(max(0, p - q))."""
    keep, _ = _accept_sampled(p, q, drafts, u_accept, u_next)
    at = (keep - 1).view(-1, 1, 1).expand(-1, 1, p.shape[-1])
    return keep, _draw(p.gather(1, at).squeeze(1), u_next)


@pytest.mark.parametrize("rule", [_accept_all, _no_residual])
def test_a_broken_acceptance_rule_is_caught(rule, monkeypatch, trained, exact, plain_samples):
    prompt, distribution = exact
    monkeypatch.setattr(sample, "_accept_sampled", rule)
    broken = _sampled(trained, prompt, draft=True)
    assert _goodness_of_fit_p(broken, distribution) < ALPHA
    assert _homogeneity_p(broken, plain_samples) < ALPHA


def test_bad_settings_raise(model, tiny_tokenizer):
    with pytest.raises(ValueError, match="sampling settings"):
        _sample(model, tiny_tokenizer, top_p=0.0)
    with pytest.raises(ValueError, match="sampling settings"):
        speculative_generate(model, tiny_tokenizer, PROMPTS, max_new_tokens=4, temperature=-1.0)
    with pytest.raises(TypeError, match="MTPModel"):
        speculative_generate(torch.nn.Linear(2, 2), tiny_tokenizer, PROMPTS, max_new_tokens=4)
