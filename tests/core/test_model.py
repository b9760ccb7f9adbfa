"""MTPModel: shapes, head wiring, causality, KV cache and padding."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from wmtp.core.model import MTPConfig, MTPModel


def test_config_takes_meta_params_and_rejects_bad_ones():
    params = dict(dim=64, n_layers=6, n_heads=8, n_kv_heads=2, vocab_size=100, n_future_tokens=4,
                  multiple_of=32, ffn_dim_multiplier=1.5, norm_eps=1e-6, rope_theta=5e5)
    config = MTPConfig(**params)
    assert config.n_trunk_layers == 2 and config.kv_heads == 2
    assert config.to_llama_config().num_hidden_layers == 6
    with pytest.raises(TypeError):
        MTPConfig(**params, n_layer=3)
    with pytest.raises(ValueError) as error:
        MTPConfig(dim=30, n_layers=2, n_heads=4, n_future_tokens=3)
    assert "n_layers" in str(error.value) and "divisible" in str(error.value)  # all problems at once
    with pytest.raises(ValueError, match="n_heads"):
        MTPConfig(dim=32, n_layers=2, n_heads=0, n_future_tokens=1)  # not a ZeroDivisionError


def test_forward_shapes_and_heads_agree(tiny_model):
    tokens = torch.randint(0, 97, (3, 10))
    with torch.no_grad():
        logits = tiny_model(tokens)
        hidden, context = tiny_model.trunk(tokens)
        heads = [tiny_model.head_logits(hidden, k, context) for k in range(2)]
        head0 = tiny_model.next_token_logits(tokens)
    assert logits.shape == (3, 10, 2, 97) and hidden.shape == (3, 10, 32)
    for k in range(2):
        assert torch.equal(heads[k], logits[:, :, k])
    assert torch.allclose(head0, logits[:, :, 0])
    assert not torch.allclose(logits[:, :, 0], logits[:, :, 1])


def test_heads_read_the_trunk_output_independently(tiny_model):
    tokens = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        before = tiny_model(tokens)
        tiny_model.heads[1].mlp.down_proj.weight.mul_(3.0)
        after = tiny_model(tokens)
    assert torch.equal(after[:, :, 0], before[:, :, 0])
    assert not torch.allclose(after[:, :, 1], before[:, :, 1])


def test_causal(tiny_model):
    tokens = torch.randint(0, 97, (1, 12))
    changed = tokens.clone()
    changed[0, 7] = (tokens[0, 7] + 1) % 97
    with torch.no_grad():
        a, b = tiny_model(tokens), tiny_model(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_kv_cache_decoding_matches_full_forward(tiny_model):
    tokens = torch.randint(0, 97, (2, 9))
    cache = tiny_model.new_cache()
    with torch.no_grad():
        full = tiny_model.next_token_logits(tokens)
        steps = [tiny_model.next_token_logits(tokens[:, :5], past_key_values=cache)]
        for t in range(5, 9):
            steps.append(tiny_model.next_token_logits(tokens[:, t : t + 1], past_key_values=cache))
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_left_padding_gives_the_same_logits_as_alone(tiny_model):
    prompt = torch.randint(2, 97, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = tiny_model(prompt)
        batched = tiny_model(padded, attention_mask=mask)
    assert torch.allclose(batched[:, 3:], alone, atol=1e-5)


def test_init_weights_is_seeded():
    a, b, c = (MTPModel(tiny_config()) for _ in range(3))
    a.init_weights(3)
    b.init_weights(3)
    c.init_weights(4)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
