"""Shared fixtures: a tiny MTP model and a tiny byte-level BPE tokenizer.

Tests keep torch to one thread (the CI machine has two cores) and DeepSpeed's
JIT-built ops in a project-local cache so concurrent runs do not collide.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
torch.set_num_threads(1)

from wmtp.core.model import MTPConfig, MTPModel  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_environ():
    """Undo what a test (or library code it runs in-process, like a lone trainer
    setting RANK) does to os.environ: a leaked RANK/MASTER_PORT makes later
    subprocess trainings rendezvous over one TCP port and collide (EADDRINUSE)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def tiny_config(**overrides) -> MTPConfig:
    fields = dict(
        dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=97, n_future_tokens=2,
        multiple_of=16, max_seq_len=128,
    )
    fields.update(overrides)
    return MTPConfig(**fields)


@pytest.fixture
def tiny_model() -> MTPModel:
    model = MTPModel(tiny_config())
    model.init_weights(seed=0)
    return model


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a plain HF directory (`smollm2.py`), built
    once into the repository's git-ignored .cache/ (benchmarks/smol_stages.py uses
    the same copy)."""
    from smollm2 import cached_hf_dir

    return cached_hf_dir(REPO / ".cache")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 300-token byte-level BPE trained in memory on a little Python source, as a
    `transformers.PreTrainedTokenizerFast` with pad and eos tokens.

    The source is the standard library's `os.py`, not this project's: tests' numbers
    must not move because an unrelated module of ours was edited."""
    from wmtp.tiny.models import train_tokenizer

    return train_tokenizer([Path(os.__file__).read_text(encoding="utf-8")], 300)


@pytest.fixture(scope="session")
def chat_tokenizer(tiny_tokenizer):
    """The tiny tokenizer made a chat model's: turn markers as special tokens, a
    chat template, end of turn as EOS (the plain `<eos>` still ends a document)."""
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tokenizer.eos_token = "<|end|>"
    tokenizer.chat_template = (
        "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tokenizer
