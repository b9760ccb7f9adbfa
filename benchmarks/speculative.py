"""Decoding with the MTP heads against plain decoding on the same machinery:
greedy, self-speculative greedy, plain sampling and speculative sampling, at
batch 1 and batch 16: tokens/s, accepted tokens per forward, cost per forward.

Trains a small MTP model (a deep trunk and H one-block heads, as in the 7B
models: 28 trunk blocks + 4 heads) with the plain MTP loss (all weights 1) on a
predictable code corpus: tiny-mbpp training problems in the MBPP prompt format
with their solutions and ~10 KB of Python standard library source (optionally
also generated functions with asserts/prints, `--corpus-functions`), joined by
blank lines like the functions of a code file. Then it decodes held-out tiny-mbpp
test prompts every way, checks that speculative greedy decoding equals greedy
decoding and prints a table.

    python benchmarks/speculative.py --model-dir /tmp/spec-model   # ~20 min, then ~6

(`--model-dir` keeps the trained model: a second run only decodes.)

The baseline is fair: plain decoding is `speculative_generate(..., draft=False)`,
the same decoder (own blocks and KV cache, rotary tables computed once, no masks
without holes) minus the drafting; `wmtp.core.sample.generate` (the generic decoder,
any HF model) is timed too, for reference. Sampling is at temperature 0.8, top-p
0.95. Batch 1: each prompt alone; batch 16: greedy over the prompts 16 at a time,
sampling 16 samples of each of the first `--sampled-prompts` prompts.

Timing is honest about noise on a shared machine: one warm-up call of every
setting first, then unit by unit (a prompt or a batch) every setting runs, in an
order that rotates, so load changes hit all alike; wall time and CPU time (less
sensitive to other processes) are both reported, with the load average. Prefill
is included. No stop sequences: a completion runs to `--new-tokens` or EOS, so
after the solution the model goes on writing the next function of the "file".
Measured figures and where the time of a forward goes: docs/decoding.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from wmtp.core.loss import weighted_mtp_loss
from wmtp.core.model import MTPConfig, MTPModel
from wmtp.core.sample import DecodeStats, generate, speculative_generate
from wmtp.data.prompts import mbpp_prompt, mbpp_solution
from wmtp.tiny.data import corpus_documents, make_tiny_mbpp
from wmtp.tiny.models import train_tokenizer


def stdlib_files(max_bytes: int) -> list[str]:
    """Python standard library modules, deterministic order, up to `max_bytes`."""
    texts, size = [], 0
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        if size >= max_bytes:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        texts.append(text[: max_bytes - size])
        size += len(texts[-1])
    return texts


def documents(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(training documents, held-out prompts). Test problems are drawn before and
    excluded from the training problems (`make_tiny_mbpp`)."""
    splits = make_tiny_mbpp(args.train_problems, args.prompts, args.seed, 0.0)
    train, test = splits["train"], splits["test"]
    solved = [
        mbpp_prompt(row.text, row.test_list[0]) + mbpp_solution(row.code)
        for row in train.itertuples()
    ]
    docs = (
        solved
        + corpus_documents(args.corpus_functions, args.seed)
        + stdlib_files(args.stdlib_bytes)
    )
    random.Random(args.seed).shuffle(docs)
    prompts = [mbpp_prompt(row.text, row.test_list[0]) for row in test.itertuples()]
    return docs, prompts


def train(model: MTPModel, ids: torch.Tensor, args: argparse.Namespace) -> float:
    """Plain MTP training (all weights 1) on random windows of the token stream;
    returns the mean loss of the last 20 steps."""
    rng = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, args.lr, total_steps=args.steps, pct_start=0.1
    )
    model.train()
    losses = []
    for _ in (bar := tqdm(range(args.steps), desc="train", unit="step")):
        starts = torch.randint(0, len(ids) - args.seq, (args.train_batch,), generator=rng)
        window = torch.stack([ids[s : s + args.seq] for s in starts.tolist()]).to(args.device)
        weights = torch.ones(window.shape, device=window.device)
        loss = weighted_mtp_loss(model, window, torch.ones_like(window), weights)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


TRAINING_ARGS = (
    "dim", "trunk_layers", "heads", "vocab", "train_problems", "corpus_functions", "stdlib_bytes",
    "steps", "train_batch", "seq", "lr", "seed", "train_threads", "prompts",
)  # fmt: skip


def trained_model(docs: list[str], args: argparse.Namespace):
    """(model, tokenizer, corpus tokens, final loss, training seconds): trained here, or
    loaded from `--model-dir` when a model trained with the same settings is there."""
    from transformers import AutoTokenizer

    from wmtp.core.checkpoints import CONFIG_FILE, load_model, save_model

    settings = {name: getattr(args, name) for name in TRAINING_ARGS}
    saved = Path(args.model_dir or "", CONFIG_FILE)
    if args.model_dir and saved.exists():
        info = json.loads(saved.read_text())
        if info.get("benchmark_settings") != settings:
            sys.exit(f"{args.model_dir} holds a model trained with other settings: "
                     f"{info.get('benchmark_settings')}")  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        model = load_model(args.model_dir, args.device).eval()
        return model, tokenizer, *info["benchmark_trained"]
    text = "\n\n".join(docs)
    tokenizer = train_tokenizer([text], args.vocab)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])  # (N,)
    config = MTPConfig(
        dim=args.dim, n_layers=args.trunk_layers + args.heads, n_heads=4,
        vocab_size=len(tokenizer), n_future_tokens=args.heads, multiple_of=32,
        max_seq_len=max(args.seq, 1024),
    )  # fmt: skip
    model = MTPModel(config)
    model.init_weights(args.seed)
    model.to(args.device)
    torch.set_num_threads(args.train_threads)
    started = time.perf_counter()
    final_loss = train(model, ids, args)
    trained = [len(ids), final_loss, time.perf_counter() - started]
    if args.model_dir:
        extra = {"benchmark_settings": settings, "benchmark_trained": trained}
        save_model(model, args.model_dir, tokenizer, extra=extra)
    return model, tokenizer, *trained


SETTINGS = {  # name -> (temperature, draft with heads 1..H-1)
    "greedy": (0.0, False),
    "speculative greedy": (0.0, True),
    "sampling": (0.8, False),
    "speculative sampling": (0.8, True),
}
PLAIN = {  # the plain counterpart of each setting, on the same machinery
    "speculative greedy": "greedy",
    "speculative sampling": "sampling",
    "generate greedy": "greedy",
    "generate sampling": "sampling",
}


@dataclass
class Tally:
    """Totals of one (setting, batch size) over the interleaved units."""

    tokens: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    forwards: int = 0
    row_forwards: int = 0
    accepted: int = 0
    outputs: list = field(default_factory=list)


def run_unit(model, tokenizer, name: str, prompts: list[str], n: int, batch: int, args, tally):
    """Decode one unit of work (a prompt or a batch of prompts) with one setting."""
    temperature, draft = SETTINGS[name.removeprefix("generate ")]
    wall, cpu = time.perf_counter(), time.process_time()
    if name.startswith("generate"):  # the generic decoder (any HF model), for reference
        completions = generate(
            model, tokenizer, prompts, n=n, temperature=temperature, top_p=args.top_p,
            max_new_tokens=args.new_tokens, seed=args.seed, batch_size=batch, stop=(),
        )  # fmt: skip
        stats = DecodeStats()
    else:
        completions, stats = speculative_generate(
            model, tokenizer, prompts, n=n, temperature=temperature, top_p=args.top_p,
            max_new_tokens=args.new_tokens, seed=args.seed, batch_size=batch, stop=(),
            draft=draft,
        )  # fmt: skip
    tally.wall += time.perf_counter() - wall
    tally.cpu += time.process_time() - cpu
    texts = [c for per_prompt in completions for c in per_prompt]
    tally.tokens += sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    tally.forwards += stats.forwards
    tally.row_forwards += stats.row_forwards
    tally.accepted += stats.accepted
    tally.outputs.extend(texts)


def workloads(prompts: list[str], args) -> list[tuple[int, int, tuple[str, ...], list]]:
    """(batch size, samples per prompt, kinds of setting, units): batch 1 = each prompt
    alone, greedy and sampled; batch 16 greedy = the prompts 16 rows at a time, as
    many rounds as batch 16 sampling has units (one batch timed once would be at the
    mercy of one load spike); batch 16 sampling = 16 samples of each of the first
    `--sampled-prompts` prompts."""
    batched = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
    rounds = -(-args.sampled_prompts // len(batched))
    return [
        (1, 1, ("greedy", "sampling"), [[p] for p in prompts]),
        (args.batch, 1, ("greedy",), batched * rounds),
        (args.batch, args.batch, ("sampling",), [[p] for p in prompts[: args.sampled_prompts]]),
    ]


def decode_all(model, tokenizer, prompts: list[str], args, loads: list[float]):
    """Every setting on every unit, interleaved: unit by unit, the settings in an order
    that rotates, so load changes on the shared machine hit all of them alike (the load
    average after each unit goes to `loads`). One untimed warm-up call of each first."""
    tallies: dict[tuple[str, int], Tally] = {}
    warm = argparse.Namespace(**{**vars(args), "new_tokens": 8})
    for batch, n, kinds, units in workloads(prompts, args):
        names = [k for k in SETTINGS if k.split()[-1] in kinds]
        names += [f"generate {k}" for k in kinds] if args.generate else []
        for name in names:
            run_unit(model, tokenizer, name, units[0][:1], 1, 1, warm, Tally())
        for i, unit in enumerate(tqdm(units, desc=f"decode, batch {batch}", unit="unit")):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                tally = tallies.setdefault((name, batch), Tally())
                run_unit(model, tokenizer, name, unit, n, batch, args, tally)
            loads.append(os.getloadavg()[0])
    return tallies


def report(tallies: dict[tuple[str, int], Tally], loads: list[float]) -> bool:
    """Print the table (markdown); returns whether speculative greedy equals greedy."""
    print(
        "\n| decoding | batch | tokens | tok/s | tok/CPU-s | accepted/fwd | ms/fwd | cost/fwd "
        "| x plain | x plain (CPU) |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    )
    identical = True
    for (name, batch), t in tallies.items():
        plain = tallies[(PLAIN.get(name, name), batch)]
        cells = ["-"] * 3
        if t.forwards:  # not the generic decoder: it does not count forwards
            per_forward = t.wall / t.forwards * 1e3
            cost = per_forward / (plain.wall / plain.forwards * 1e3)
            cells = [f"{t.accepted / t.row_forwards:.2f}", f"{per_forward:.2f}", f"{cost:.2f}"]
        print(
            f"| {name} | {batch} | {t.tokens} | {t.tokens / t.wall:.1f} | {t.tokens / t.cpu:.1f} | "
            + " | ".join(cells)
            + f" | {(t.tokens / t.wall) / (plain.tokens / plain.wall):.2f}"
            f" | {(t.tokens / t.cpu) / (plain.tokens / plain.cpu):.2f} |"
        )
        if name == "speculative greedy":
            identical &= t.outputs == plain.outputs
    print(
        "\ncost/fwd: wall time per forward (prefill included) in units of the plain "
        "decoder's; x plain: tokens/s over the plain counterpart on the same machinery "
        "(CPU: per CPU-second of this process)\n"
        f"load average (1 min) during decoding: {min(loads):.2f}-{max(loads):.2f}\n"
        f"speculative greedy outputs identical to greedy: {identical}"
    )
    return identical


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--trunk-layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--train-problems", type=int, default=3000)
    parser.add_argument("--corpus-functions", type=int, default=0)
    parser.add_argument("--stdlib-bytes", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--batch-size", dest="train_batch", type=int, default=8,
                        help="training sequences per step")  # fmt: skip
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--prompts", type=int, default=16, help="held-out tiny-mbpp problems")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="the larger decoding batch")
    parser.add_argument("--sampled-prompts", type=int, default=4,
                        help="prompts sampled --batch times each at the larger batch")  # fmt: skip
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--no-generate", dest="generate", action="store_false",
                        help="skip the reference rows of wmtp.core.sample.generate")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-threads", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads while decoding")
    parser.add_argument(
        "--model-dir", help="reuse the model trained with these settings from here (trained "
        "and saved there when missing)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu or cuda (training and decoding)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    docs, prompts = documents(args)
    model, tokenizer, n_tokens, final_loss, train_seconds = trained_model(docs, args)
    torch.set_num_threads(args.threads)
    print(
        f"model: dim {args.dim}, {args.trunk_layers} trunk blocks + {args.heads} heads, vocab "
        f"{len(tokenizer)}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params; "
        f"corpus {n_tokens / 1e3:.0f} k tokens; trained {args.steps} steps x {args.train_batch} "
        f"x {args.seq} tokens in {train_seconds:.0f} s ({args.train_threads} threads), loss of "
        f"the last 20 steps {final_loss:.3f}\ndecoding: {len(prompts)} held-out tiny-mbpp "
        f"prompts, up to {args.new_tokens} new tokens, no stop sequences, {args.threads} "
        f"threads, sampling at temperature 0.8, top-p {args.top_p}"
    )
    loads = [os.getloadavg()[0]]
    tallies = decode_all(model, tokenizer, prompts, args, loads)
    identical = report(tallies, loads)
    print("first completion:\n" + prompts[0] + tallies[("greedy", 1)].outputs[0])
    if not identical:
        sys.exit("speculative greedy output differs from greedy decoding")


if __name__ == "__main__":
    main()
