"""The miniature's tokenizer, corpus and models, built on the machine.

Mirrors the paper's setting at toy scale (docs/tiny.md): a base MTP model
pretrained on code (`build_tiny_base`, our model format), and a reference model
that is a different, plain causal LM sharing the vocabulary and trained on
"high-quality" data (`build_tiny_ref`, a Hugging Face `LlamaForCausalLM`
directory, like CodeLlama in the paper). Both come from one seeded pretraining
loop and are byte-identical across runs with the same seed and thread count.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from wmtp.core.checkpoints import save_model
from wmtp.core.loss import weighted_mtp_loss
from wmtp.core.model import MTPConfig, MTPModel
from wmtp.infra.atomic import atomic_dir
from wmtp.tiny.data import corpus_documents, prompt_documents

PAD, EOS = "<pad>", "<eos>"
INFO_FILE = "tiny.json"


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with `<pad>` = 0 and `<eos>` = 1, trained on `texts` in order.
    Byte-level means any text round-trips, words unseen in training included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)


def corpus_sha256(docs: list[str]) -> str:
    """Hash of the pretraining documents, recorded in every model directory so two
    machines can tell whether they built from the same data."""
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(doc.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def base_corpus(knobs: dict, seed: int) -> list[str]:
    return corpus_documents(knobs["corpus_documents"], seed, knobs["corpus_statement_prob"])


def build_tokenizer(knobs: dict, seed: int) -> PreTrainedTokenizerFast:
    """The miniature's tokenizer: trained on the base corpus plus noisy prompt/solution
    pairs from their own pool, so comment words are in the vocabulary too."""
    pairs = prompt_documents(knobs["corpus_documents"] // 4, seed, noise_comment_prob=0.5)
    return train_tokenizer(
        base_corpus(knobs, seed) + [p + s for p, s in pairs], knobs["vocab_size"]
    )


def pack(docs: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Concatenate documents (each followed by EOS) and cut into rows `(N, seq_len)`;
    the ragged tail is dropped."""
    ids: list[int] = []
    for encoded in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    n_rows = len(ids) // seq_len
    if n_rows == 0:
        raise ValueError(f"corpus of {len(ids)} tokens is shorter than one sequence of {seq_len}")
    return torch.tensor(ids[: n_rows * seq_len], dtype=torch.long).view(n_rows, seq_len)


def mtp_loss(model: MTPModel, ids: torch.Tensor) -> torch.Tensor:
    """Plain (all weights 1) MTP loss on every token: the fine-tuning loss with w = 1."""
    mask = torch.ones_like(ids, dtype=torch.bool)
    return weighted_mtp_loss(model, ids, mask, torch.ones(ids.shape, dtype=torch.float32))


def causal_lm_loss(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a Hugging Face causal LM."""
    logits = model(input_ids=ids).logits  # (B, S, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def pretraining_lr_at(
    step: int, steps: int, peak: float, warmup: int, min_ratio: float = 0.1
) -> float:
    """The miniature's pretraining schedule: linear warmup to `peak` (step `warmup - 1`
    reaches it), then cosine down to `min_ratio * peak`.

    Not the fine-tuning schedule (`wmtp.core.schedule.lr_factor`, whose warmup ends one
    step later): the built-in base and reference models were pretrained with this one,
    and changing it would rebuild them and move every number of the tiny table."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    data: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    desc: str,
) -> list[float]:
    """AdamW + warmup/cosine over random rows of `data` `(N, S)`; returns the losses.
    The batch order comes from a generator seeded with `seed`, nothing global."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    losses = []
    model.train()
    bar = tqdm(range(steps), desc=desc, mininterval=2.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = pretraining_lr_at(step, steps, lr, warmup)
        rows = torch.randint(0, data.shape[0], (batch_size,), generator=generator)
        loss = loss_fn(model, data[rows])  # data[rows]: (B, S)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses


class deterministic_threads:
    """Context: `threads` intra-op threads and deterministic algorithms, restored on
    exit. Bit-identical results need both the seed and the same thread count."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def __enter__(self) -> None:
        self.saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(self.threads)
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.saved[0])
        torch.use_deterministic_algorithms(self.saved[1])


def model_config(knobs: dict, vocab_size: int) -> MTPConfig:
    return MTPConfig(
        dim=knobs["dim"],
        n_layers=knobs["n_layers"],
        n_heads=knobs["n_heads"],
        n_kv_heads=knobs["n_heads"],
        vocab_size=vocab_size,
        n_future_tokens=knobs["n_future_tokens"],
        multiple_of=32,
        max_seq_len=knobs["max_seq_len"],
    )


def _info(knobs: dict, seed: int, role: str, docs: list[str], losses: list[float]) -> dict:
    return {
        "tiny_role": role,
        "tiny_seed": seed,
        "tiny_settings": knobs,
        "corpus_sha256": corpus_sha256(docs),
        "pretrain_final_loss": sum(losses[-10:]) / len(losses[-10:]),
    }


def build_base(out_dir: str | Path, knobs: dict, seed: int, threads: int = 1) -> Path:
    """Pretrain the base MTP model on the code corpus (plain MTP loss, all heads) and
    save it in our model format with the tokenizer."""
    with deterministic_threads(threads):
        tokenizer = build_tokenizer(knobs, seed)
        docs = base_corpus(knobs, seed)
        data = pack(docs, tokenizer, knobs["pretrain_seq_len"])
        model = MTPModel(model_config(knobs, len(tokenizer)))
        model.init_weights(seed)
        losses = pretrain(
            model,
            mtp_loss,
            data,
            steps=knobs["pretrain_steps"],
            batch_size=knobs["pretrain_batch_size"],
            lr=knobs["pretrain_lr"],
            seed=seed,
            desc="tiny base pretraining",
        )
    return save_model(
        model, out_dir, tokenizer=tokenizer, extra=_info(knobs, seed, "base", docs, losses)
    )


def build_ref(out_dir: str | Path, knobs: dict, seed: int, threads: int = 1) -> Path:
    """Pretrain the reference causal LM on the corpus plus clean prompt/solution pairs
    (its "high-quality" data, from a pool disjoint by seed from the benchmark) and
    save it as a Hugging Face `LlamaForCausalLM` directory with the same tokenizer."""
    with deterministic_threads(threads):
        tokenizer = build_tokenizer(knobs, seed)
        pairs = prompt_documents(knobs["ref_prompt_documents"], seed + 1)
        docs = base_corpus(knobs, seed) + [p + s for p, s in pairs]
        data = pack(docs, tokenizer, knobs["pretrain_seq_len"])
        config = model_config(knobs, len(tokenizer)).to_llama_config()
        config.num_hidden_layers = knobs["ref_n_layers"]
        config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        losses = pretrain(
            model,
            causal_lm_loss,
            data,
            steps=knobs["ref_pretrain_steps"],
            batch_size=knobs["pretrain_batch_size"],
            lr=knobs["pretrain_lr"],
            seed=seed + 1,
            desc="tiny reference pretraining",
        )
    return _save_hf(model, tokenizer, out_dir, _info(knobs, seed, "ref", docs, losses))


def _save_hf(model: LlamaForCausalLM, tokenizer, out_dir: str | Path, info: dict) -> Path:
    """`save_pretrained` into a temp dir next to `out_dir`, then rename (atomic)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir
