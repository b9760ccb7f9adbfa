"""Multi-token-prediction (MTP) transformer: a shared trunk and H output heads.

Architecture of Gloeckle et al. 2024 ("Better & Faster Large Language Models via
Multi-token Prediction"), as released in `facebook/multi-token-prediction`:

    tokens -> embedding -> trunk (n_layers - H blocks) -> h            # (B, S, D)
    head k (k = 0..H-1):  h -> decoder block_k -> shared norm -> shared unembedding
                          -> logits_k                                  # (B, S, V)

Head 0 is the last ordinary decoder layer (the model's next-token head); heads
1..H-1 are one extra decoder layer each. Head k at position t predicts token
t+k+1. The decoder blocks are transformers' Llama blocks (RMSNorm, RoPE, SwiGLU,
grouped-query attention), so KV caching and SDPA attention come for free and an
HF Llama checkpoint maps onto this model without rewriting any layer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)


@dataclass
class MTPConfig:
    """Model shape, with the field names of Meta's `params.json`.

    `MTPConfig(**json.load(open("params.json")))` works; an unknown key raises
    `TypeError` (a misspelt knob must not be silently ignored).
    """

    dim: int = 4096
    n_layers: int = 32  # every decoder block, heads included (Meta's convention)
    n_heads: int = 32
    n_kv_heads: int | None = None  # None -> n_heads (no grouped-query attention)
    vocab_size: int = 32000
    n_future_tokens: int = 4  # H: number of output heads
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    # Explicit SwiGLU width, for models converted from HF configs whose width is not
    # Meta's formula; None (Meta's checkpoints) -> computed from multiple_of etc.
    intermediate_size: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.n_future_tokens < 1:
            problems.append(f"n_future_tokens must be >= 1, got {self.n_future_tokens}")
        if self.n_layers < self.n_future_tokens:
            problems.append(
                f"n_layers ({self.n_layers}) counts the head blocks too and must be "
                f">= n_future_tokens ({self.n_future_tokens})"
            )
        if self.n_heads < 1 or self.kv_heads < 1:
            problems.append(
                f"n_heads ({self.n_heads}) and n_kv_heads ({self.kv_heads}) must be >= 1"
            )
        else:
            if self.dim % self.n_heads:
                problems.append(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            if self.n_heads % self.kv_heads:
                problems.append(
                    f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})"
                )
        if problems:
            raise ValueError("invalid MTPConfig: " + "; ".join(problems))

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def n_trunk_layers(self) -> int:
        return self.n_layers - self.n_future_tokens

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width exactly as Meta's `FeedForward` computes it (unless overridden)."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_llama_config(self) -> LlamaConfig:
        """The equivalent HF `LlamaConfig`; its layer count covers trunk and heads
        so every block gets its own KV-cache slot."""
        config = LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            intermediate_size=self.ffn_hidden_dim,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.max_seq_len,
            rms_norm_eps=self.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
        )
        config._attn_implementation = "sdpa"
        return config


class MTPModel(nn.Module):
    """Shared trunk + `n_future_tokens` heads + shared final norm and unembedding.

    Parameter names follow Meta's checkpoint at module level (`tok_embeddings`,
    `layers`, `norm`, `output`); `heads[0]` is Meta's last `layers` block and
    `heads[k]` (k >= 1) is Meta's `extra_heads[k-1]`.
    """

    def __init__(self, config: MTPConfig) -> None:
        super().__init__()
        self.config = config
        self.llama_config = config.to_llama_config()
        n_trunk = config.n_trunk_layers
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(LlamaDecoderLayer(self.llama_config, i) for i in range(n_trunk))
        self.heads = nn.ModuleList(
            LlamaDecoderLayer(self.llama_config, n_trunk + k) for k in range(config.n_future_tokens)
        )
        self.norm = LlamaRMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(self.llama_config)

    @property
    def n_heads(self) -> int:
        return self.config.n_future_tokens

    def init_weights(self, seed: int, std: float = 0.02) -> None:
        """Deterministic GPT-style init (normal(0, std), norms at 1) from `seed`."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight") or "layernorm" in name:
                    param.fill_(1.0)
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)

    def attention_context(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
    ) -> dict:
        """Rotary embeddings and causal mask shared by every block for this input.

        `attention_mask` is the usual 2-D padding mask `(B, past + S)` (1 = real
        token); None means no padding, which lets SDPA use its causal kernel.
        Positions continue from the cache, and with a padding mask they skip
        left padding so a left-padded prompt sees the same positions as alone.
        """
        batch, seq = hidden.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + seq]
        else:
            position_ids = torch.arange(past, past + seq, device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.llama_config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        return {
            "attention_mask": mask,
            "position_ids": position_ids,
            "position_embeddings": self.rotary_emb(hidden, position_ids=position_ids),
            "past_key_values": past_key_values,
        }

    def trunk(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Run embedding + trunk blocks. Returns the trunk output `(B, S, D)` and the
        attention context the heads need (pass it to `head_hidden`/`head_logits`)."""
        hidden = self.tok_embeddings(input_ids)  # (B, S, D)
        context = self.attention_context(hidden, attention_mask, past_key_values)
        for layer in self.layers:
            hidden = layer(hidden, **context)
        return hidden, context

    def head_hidden(self, trunk_hidden: torch.Tensor, k: int, context: dict) -> torch.Tensor:
        """Head k's block + the shared final norm: `(B, S, D)`, input to the unembedding."""
        return self.norm(self.heads[k](trunk_hidden, **context))

    def head_logits(self, trunk_hidden: torch.Tensor, k: int, context: dict) -> torch.Tensor:
        """Logits `(B, S, V)` of head k; position t predicts token t+k+1."""
        return self.output(self.head_hidden(trunk_hidden, k, context))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """All heads' logits `(B, S, H, V)`. Costs H times the logits memory of a
        next-token model: training uses `wmtp.core.loss.weighted_mtp_loss` instead."""
        hidden, context = self.trunk(input_ids, attention_mask)
        return torch.stack([self.head_logits(hidden, k, context) for k in range(self.n_heads)], dim=2)

    def next_token_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        """Head 0 only `(B, S, V)`: the model used as an ordinary causal LM.

        With a `past_key_values` cache (see `new_cache`) it decodes incrementally;
        the extra heads' cache slots stay empty.
        """
        hidden, context = self.trunk(input_ids, attention_mask, past_key_values)
        return self.head_logits(hidden, 0, context)

    def new_cache(self) -> DynamicCache:
        """An empty KV cache with one slot per block (trunk and all heads)."""
        return DynamicCache(config=self.llama_config)
