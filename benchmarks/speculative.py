"""Self-speculative vs plain greedy decoding: tokens/s and mean accepted length.

Trains a small MTP model (H heads) for a few hundred steps on Python standard
library source (byte-level BPE trained on the spot), then decodes the same
prompts with batch size 1 both ways, checks the outputs are identical and prints
a table. Takes a few minutes on two CPU cores.

    python benchmarks/speculative.py [--steps 300] [--heads 4] [--new-tokens 128]

Why the speed-up is below the mean accepted length: a verification forward runs
every head's block over H drafted tokens (so each head keeps its KV cache),
while a plain greedy step runs the trunk and head 0 over one token.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from wmtp.loss import weighted_mtp_loss
from wmtp.model import MTPConfig, MTPModel
from wmtp.sample import generate, speculative_generate


def corpus(max_bytes: int) -> str:
    """Python standard library source, deterministic order, tests skipped."""
    stdlib = Path(os.__file__).parent
    texts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        texts.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return "\n".join(texts)


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def train(model: MTPModel, ids: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> float:
    """Plain MTP training (all weights 1) on random windows of the token stream."""
    rng = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, 3e-3, total_steps=steps, pct_start=0.1
    )
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in (bar := tqdm(range(steps), desc="train", unit="step")):
        starts = torch.randint(0, len(ids) - seq, (batch,), generator=rng)
        window = torch.stack([ids[s : s + seq] for s in starts.tolist()])  # (B, S)
        loss = weighted_mtp_loss(model, window, torch.ones_like(window), torch.ones(window.shape))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--trunk-layers", type=int, default=6)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--corpus-bytes", type=int, default=100_000)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    text = corpus(args.corpus_bytes)
    tokenizer = train_tokenizer(text, 2048)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    config = MTPConfig(
        dim=args.dim, n_layers=args.trunk_layers + args.heads, n_heads=4, vocab_size=len(tokenizer),
        n_future_tokens=args.heads, multiple_of=32, max_seq_len=512,
    )  # fmt: skip
    model = MTPModel(config)
    model.init_weights(args.seed)
    started = time.perf_counter()
    final_loss = train(model, ids, args.steps, batch=16, seq=64, seed=args.seed)
    train_seconds = time.perf_counter() - started

    # Prompts: starts of lines inside the corpus (the model has seen this code).
    lines = [i for i, c in enumerate(text) if c == "\n" and text[i + 1 : i + 5] == "    "]
    picks = random.Random(args.seed).sample(lines, args.prompts)
    prompts = [text[max(0, i - 300) : i + 1] for i in picks]

    model.eval()
    timings, outputs = {}, {}
    for name in ("greedy", "speculative"):
        started = time.perf_counter()
        if name == "greedy":
            completions = [c[0] for c in generate(
                model, tokenizer, prompts, n=1, temperature=0.0, top_p=1.0,
                max_new_tokens=args.new_tokens, seed=0, batch_size=1, stop=(),
            )]  # fmt: skip
            accepted = 1.0
        else:
            completions, accepted = speculative_generate(
                model, tokenizer, prompts, args.new_tokens, stop=()
            )
        seconds = time.perf_counter() - started
        tokens = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions)
        timings[name] = (tokens, seconds, accepted)
        outputs[name] = completions

    identical = outputs["greedy"] == outputs["speculative"]
    print(
        f"\nmodel: dim {args.dim}, {args.trunk_layers} trunk layers + {args.heads} heads, "
        f"vocab {len(tokenizer)}; trained {args.steps} steps in {train_seconds:.0f} s, "
        f"final loss {final_loss:.3f}; {args.prompts} prompts x {args.new_tokens} new tokens, "
        f"batch size 1, {args.threads} threads"
    )
    print(f"{'decoding':<12} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'accepted/fwd':>13}")
    for name, (tokens, seconds, accepted) in timings.items():
        print(f"{name:<12} {tokens:>7} {seconds:>8.2f} {tokens / seconds:>9.1f} {accepted:>13.2f}")
    speedup = (timings["speculative"][0] / timings["speculative"][1]) / (
        timings["greedy"][0] / timings["greedy"][1]
    )
    print(f"speed-up {speedup:.2f}x; outputs identical to greedy: {identical}")
    if not identical:
        sys.exit("speculative output differs from greedy decoding")


if __name__ == "__main__":
    main()
