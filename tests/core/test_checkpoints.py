"""Checkpoint conversion: Meta's MTP format, HF Llama, our own format.

The Meta test writes a random checkpoint with Meta's key names directly (not via
our writer) and runs a reference forward written here from Meta's published
llama `model.py` (complex rotary embedding on interleaved pairs, RMSNorm,
SwiGLU, causal attention with grouped KV heads) plus the MTP heads of
`facebook/multi-token-prediction` (every head reads the trunk output, then the
shared norm and unembedding).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from transformers import LlamaConfig, LlamaForCausalLM

from wmtp.core.checkpoints import (
    load_meta_mtp,
    load_model,
    meta_params_to_config,
    mtp_from_hf_llama,
    save_meta_mtp,
    save_model,
)
from wmtp.core.model import MTPConfig, MTPModel

# ---- Meta's reference forward ------------------------------------------------


def precompute_freqs_cis(dim: int, end: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, dtype=torch.float32)
    return torch.polar(torch.ones(end, dim // 2), torch.outer(t, freqs))  # (S, hd/2) complex


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x (B, S, nh, hd): rotate interleaved pairs (2i, 2i+1) as complex numbers."""
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_ * freqs_cis[None, :, None, :]).flatten(3).type_as(x)


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def meta_block(w: dict, prefix: str, x, params: dict, freqs_cis):
    batch, seq, dim = x.shape
    n_heads = params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    head_dim = dim // n_heads

    h = rms_norm(x, w[f"{prefix}.attention_norm.weight"], params["norm_eps"])
    q = (h @ w[f"{prefix}.attention.wq.weight"].T).view(batch, seq, n_heads, head_dim)
    k = (h @ w[f"{prefix}.attention.wk.weight"].T).view(batch, seq, n_kv, head_dim)
    v = (h @ w[f"{prefix}.attention.wv.weight"].T).view(batch, seq, n_kv, head_dim)
    q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
    k = k.repeat_interleave(n_heads // n_kv, dim=2)  # repeat_kv
    v = v.repeat_interleave(n_heads // n_kv, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, S, hd)
    scores = q @ k.transpose(2, 3) / math.sqrt(head_dim)
    scores = scores + torch.full((seq, seq), float("-inf")).triu(1)
    attn = (F.softmax(scores.float(), dim=-1) @ v).transpose(1, 2).reshape(batch, seq, dim)
    x = x + attn @ w[f"{prefix}.attention.wo.weight"].T

    h = rms_norm(x, w[f"{prefix}.ffn_norm.weight"], params["norm_eps"])
    gate = F.silu(h @ w[f"{prefix}.feed_forward.w1.weight"].T) * (h @ w[f"{prefix}.feed_forward.w3.weight"].T)
    return x + gate @ w[f"{prefix}.feed_forward.w2.weight"].T


def meta_mtp_forward(w: dict, params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (B, S, H, V) as Meta's MTP Transformer.forward(return_all_heads=True)."""
    dim, n_heads, n_future = params["dim"], params["n_heads"], params["n_future_tokens"]
    freqs_cis = precompute_freqs_cis(dim // n_heads, tokens.shape[1], params.get("rope_theta", 10000.0))
    n_blocks = params["n_layers"] - n_future + 1
    h = w["tok_embeddings.weight"][tokens]
    for i in range(n_blocks - 1):
        h = meta_block(w, f"layers.{i}", h, params, freqs_cis)
    heads = [f"layers.{n_blocks - 1}"] + [f"extra_heads.{k}" for k in range(n_future - 1)]
    latents = torch.stack([meta_block(w, p, h, params, freqs_cis) for p in heads], dim=-2)  # (B, S, H, D)
    return rms_norm(latents, w["norm.weight"], params["norm_eps"]) @ w["output.weight"].T


def meta_ffn_dim(params: dict) -> int:
    hidden = int(2 * (4 * params["dim"]) / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    return params["multiple_of"] * ((hidden + params["multiple_of"] - 1) // params["multiple_of"])


def write_meta_checkpoint(directory, params: dict, seed: int = 0) -> dict:
    """A random checkpoint with Meta's names and shapes; returns its weights."""
    generator = torch.Generator().manual_seed(seed)
    dim, n_heads = params["dim"], params["n_heads"]
    kv_dim = (params.get("n_kv_heads") or n_heads) * (dim // n_heads)
    ffn = meta_ffn_dim(params)
    shapes = {
        "attention.wq.weight": (dim, dim), "attention.wk.weight": (kv_dim, dim),
        "attention.wv.weight": (kv_dim, dim), "attention.wo.weight": (dim, dim),
        "feed_forward.w1.weight": (ffn, dim), "feed_forward.w2.weight": (dim, ffn),
        "feed_forward.w3.weight": (ffn, dim), "attention_norm.weight": (dim,), "ffn_norm.weight": (dim,),
    }

    def rand(*shape):
        return torch.randn(shape, generator=generator) * (0.3 if len(shape) == 1 else 0.1) + (
            1.0 if len(shape) == 1 else 0.0
        )

    w = {"tok_embeddings.weight": rand(params["vocab_size"], dim), "norm.weight": rand(dim),
         "output.weight": rand(params["vocab_size"], dim)}
    n_blocks = params["n_layers"] - params["n_future_tokens"] + 1
    prefixes = [f"layers.{i}" for i in range(n_blocks)]
    prefixes += [f"extra_heads.{k}" for k in range(params["n_future_tokens"] - 1)]
    for prefix in prefixes:
        for name, shape in shapes.items():
            w[f"{prefix}.{name}"] = rand(*shape)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(w, directory / "consolidated.pth")
    (directory / "params.json").write_text(json.dumps(params))
    return w


META_PARAMS = [
    dict(dim=32, n_layers=5, n_heads=4, vocab_size=61, n_future_tokens=3, multiple_of=16,
         ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=10000.0),
    dict(dim=48, n_layers=4, n_heads=6, n_kv_heads=2, vocab_size=50, n_future_tokens=2, multiple_of=32,
         ffn_dim_multiplier=1.3, norm_eps=1e-6, rope_theta=500.0, max_batch_size=8),
    dict(dim=16, n_layers=1, n_heads=2, vocab_size=40, n_future_tokens=1, multiple_of=8,
         norm_eps=1e-5, rope_theta=10000.0),
]


@pytest.mark.parametrize("params", META_PARAMS, ids=["mha-h3", "gqa-ffnmult-h2", "one-block"])
def test_load_meta_mtp_matches_reference_forward(tmp_path, params):
    w = write_meta_checkpoint(tmp_path, params)
    model = load_meta_mtp(tmp_path)
    assert model.config.ffn_hidden_dim == meta_ffn_dim(params)
    assert len(model.layers) == params["n_layers"] - params["n_future_tokens"]
    tokens = torch.randint(0, params["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = meta_mtp_forward(w, params, tokens)
        got = model(tokens)
        head0 = model.next_token_logits(tokens)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert torch.allclose(head0, expected[:, :, 0], atol=1e-4)


def test_rotary_permutation_matters(tmp_path):
    """Without the q/k permutation the logits differ: the test above can fail."""
    params = META_PARAMS[0]
    w = write_meta_checkpoint(tmp_path, params)
    model = load_meta_mtp(tmp_path)
    with torch.no_grad():
        for block in [*model.layers, *model.heads]:
            block.self_attn.q_proj.weight.copy_(block.self_attn.q_proj.weight.flip(0))
        tokens = torch.randint(0, params["vocab_size"], (1, 9))
        assert not torch.allclose(model(tokens), meta_mtp_forward(w, params, tokens), atol=1e-3)


def test_save_meta_mtp_round_trip(tmp_path, tiny_model):
    save_meta_mtp(tiny_model, tmp_path / "meta")
    loaded = load_meta_mtp(tmp_path / "meta")
    tokens = torch.randint(0, 97, (2, 10))
    w = torch.load(tmp_path / "meta" / "consolidated.pth")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    with torch.no_grad():
        assert torch.equal(loaded(tokens), tiny_model(tokens))
        assert torch.allclose(meta_mtp_forward(w, params, tokens), tiny_model(tokens), atol=1e-4)


def test_load_meta_mtp_rejects_inconsistent_checkpoint(tmp_path):
    params = dict(META_PARAMS[0])
    write_meta_checkpoint(tmp_path, params)
    (tmp_path / "params.json").write_text(json.dumps({**params, "n_layers": 6}))
    with pytest.raises(ValueError, match="layers"):
        load_meta_mtp(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({**params, "dim": 64}))
    with pytest.raises(ValueError, match="shape"):
        load_meta_mtp(tmp_path)
    with pytest.raises(ValueError, match="unknown keys"):
        meta_params_to_config({**params, "n_layer": 4})


def test_meta_params_vocab_size_minus_one_taken_from_embedding():
    config = meta_params_to_config({**META_PARAMS[0], "vocab_size": -1}, max_seq_len=64, vocab_size=61)
    assert config.vocab_size == 61 and config.max_seq_len == 64


def test_meta_7b_shapes():
    """Meta's 7B MTP params give Llama-2-7B block shapes (SwiGLU width 11008)."""
    config = meta_params_to_config(
        dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-5,
             n_future_tokens=4)
    )
    assert config.ffn_hidden_dim == 11008 and config.n_trunk_layers == 28


@pytest.mark.parametrize("tie", [False, True])
def test_mtp_from_hf_llama_head0_reproduces_hf(tmp_path, tie):
    hf_config = LlamaConfig(
        vocab_size=53, hidden_size=32, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_config).eval()
    tokens = torch.randint(0, 53, (2, 12))
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, 8:] = 0
    model = mtp_from_hf_llama(hf, n_future_tokens=3)
    with torch.no_grad():
        expected = hf(tokens, attention_mask=attention_mask).logits
        got = model.next_token_logits(tokens, attention_mask)
        all_heads = model(tokens, attention_mask)
    assert model.config.n_layers == 5 and len(model.layers) == 2
    assert torch.allclose(got[attention_mask.bool()], expected[attention_mask.bool()], atol=1e-5)
    assert torch.allclose(all_heads[:, :, 1], all_heads[:, :, 0])  # extra heads start as copies
    # The converted model shares no storage with the HF one: training it leaves hf untouched.
    hf_before = {name: t.clone() for name, t in hf.state_dict().items()}
    with torch.no_grad():
        logits_before = hf(tokens).logits
        for p in model.parameters():
            p.add_(1.0)
        model.heads[1].mlp.up_proj.weight.add_(1.0)  # head 1 must not share head 0's storage
        assert torch.equal(hf(tokens).logits, logits_before)
    assert all(torch.equal(t, hf_before[name]) for name, t in hf.state_dict().items())
    assert not torch.allclose(hf.lm_head.weight, model.output.weight)
    assert not torch.equal(model.heads[0].mlp.up_proj.weight, model.heads[1].mlp.up_proj.weight)

    hf.save_pretrained(tmp_path / "hf")
    from_dir = mtp_from_hf_llama(tmp_path / "hf", n_future_tokens=2)
    with torch.no_grad():
        assert torch.allclose(from_dir.next_token_logits(tokens), hf(tokens).logits, atol=1e-5)


def test_mtp_from_hf_llama_rejects_unsupported():
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, attention_bias=True))
    with pytest.raises(ValueError, match="bias"):
        mtp_from_hf_llama(hf, 2)


def test_our_format_round_trip(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "m", extra={"note": "x"})
    loaded = load_model(tmp_path / "m")
    assert loaded.config == tiny_model.config
    assert all(p.requires_grad for p in loaded.parameters())
    tokens = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), tiny_model(tokens))
    save_model(tiny_model, tmp_path / "m")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left behind


def test_explicit_intermediate_size_round_trips(tmp_path):
    model = MTPModel(MTPConfig(**{**tiny_config().to_dict(), "intermediate_size": 40}))
    model.init_weights(1)
    assert model.heads[0].mlp.up_proj.weight.shape == (40, 32)
    save_model(model, tmp_path / "m")
    assert load_model(tmp_path / "m").config.intermediate_size == 40
    with pytest.raises(ValueError, match="intermediate_size"):
        save_meta_mtp(model, tmp_path / "meta")


def test_tokenizer_of_our_directories_loads_quietly(tmp_path, tiny_model, tiny_tokenizer, caplog):
    """AutoTokenizer reads config.json first: a model_type transformers does not know
    made every load of our directories warn."""
    import logging

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    save_model(tiny_model, tmp_path / "m", tokenizer=tiny_tokenizer)
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    finally:
        hf_logging.disable_propagation()
    assert tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_a_plain_causal_lm_is_not_taken_for_an_mtp_model(tmp_path, tiny_model):
    hf = LlamaForCausalLM(tiny_config(n_future_tokens=1).to_llama_config())
    hf.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"not an MTP model directory.*models\.base\.n_future_tokens"):
        load_model(tmp_path / "plain")
    save_model(tiny_model, tmp_path / "old")  # written before the wmtp_format key (and manifests)
    payload = json.loads((tmp_path / "old" / "config.json").read_text())
    payload["model_type"] = "wmtp-mtp"
    del payload["wmtp_format"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(payload))
    (tmp_path / "old" / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="no manifest.json"):
        assert load_model(tmp_path / "old").config == tiny_model.config
