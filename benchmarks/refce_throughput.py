"""Throughput of the ref-CE stage against a bare forward pass of the same model.

    python benchmarks/refce_throughput.py [--examples 96] [--batch-size 8] [--repeats 5] [--dims 128 256]

`compute_refce` (length-sorted batching, collate, forward, float32 CE, copies to
numpy, parquet write) is timed end to end; the bare pass runs only
`next_token_logits` over the very same pre-collated batches under
inference_mode. Goal: ref-CE tokens/s >= 0.9 of the bare pass. The model is a
small random MTP model (a few seconds per run on one CPU core); real tokens do
not matter for speed, so examples are random ids with MBPP-like lengths.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wmtp.core.model import MTPConfig, MTPModel
from wmtp.data.training import Example, collate
from wmtp.stages.refce import compute_refce, next_token_logits
from wmtp.tiny.models import train_tokenizer


def make_tokenizer(vocab_size: int):
    """A byte-level BPE trained on this package's own source (realistic code tokens)."""
    package = Path(__file__).resolve().parents[1] / "wmtp"
    return train_tokenizer(
        ["".join(p.read_text() for p in sorted(package.glob("*.py")))], vocab_size
    )


def make_examples(n: int, vocab: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        length = int(rng.integers(64, 320))
        prompt = int(rng.integers(20, 60))
        ids = rng.integers(2, vocab, length).tolist()
        examples.append(Example(str(i), ids, [0] * prompt + [1] * (length - prompt)))
    return examples


@torch.inference_mode()
def bare_forward(model: MTPModel, examples: list[Example], batch_size: int, pad_id: int) -> float:
    """Seconds for the forward passes alone over the batches compute_refce forms."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    batches = [
        collate([examples[i] for i in order[k : k + batch_size]], pad_id)
        for k in range(0, len(order), batch_size)
    ]
    start = clocks()
    for batch in batches:
        padded = bool((batch.attention_mask == 0).any())
        next_token_logits(model, batch.input_ids, batch.attention_mask if padded else None)
    return elapsed(start)


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def elapsed(start: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds since `start`. CPU time of this process is what to
    compare on a machine shared with other jobs: wall time there mostly measures
    the neighbours."""
    wall, cpu = clocks()
    return wall - start[0], cpu - start[1]


def measure(dim: int, tokenizer, args) -> dict:
    """Best-of-`repeats` seconds of both passes for one model width."""
    config = MTPConfig(
        dim=dim,
        n_layers=6,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=len(tokenizer),
        n_future_tokens=2,
        multiple_of=32,
        max_seq_len=512,
    )
    model = MTPModel(config)
    model.init_weights(seed=0)
    model.eval()
    examples = make_examples(args.examples, len(tokenizer), seed=0)
    bare_forward(
        model, examples[: args.batch_size], args.batch_size, tokenizer.pad_token_id
    )  # warm-up
    bare_times, refce_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            bare_times.append(
                bare_forward(model, examples, args.batch_size, tokenizer.pad_token_id)
            )
            start = clocks()
            compute_refce(
                model,
                tokenizer,
                examples,
                Path(tmp) / f"ce{r}.parquet",
                batch_size=args.batch_size,
                model_id="bench",
            )
            refce_times.append(elapsed(start))
    return {
        "tokens": sum(len(e.input_ids) for e in examples),
        "bare": min(t[0] for t in bare_times),
        "refce": min(t[0] for t in refce_times),
        "bare_cpu": min(t[1] for t in bare_times),
        "refce_cpu": min(t[1] for t in refce_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--dims",
        type=int,
        nargs="+",
        default=[128, 256],
        help="model widths; 128 is the tiny pipeline's default base/ref model",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = make_tokenizer(2048)
    rows = [(dim, measure(dim, tokenizer, args)) for dim in args.dims]
    print(
        f"\n6 blocks, vocab {len(tokenizer)}, {args.examples} examples, batch {args.batch_size}, "
        f"{args.threads} thread(s), best of {args.repeats}; tokens/s from wall time, ratios from "
        "wall and from CPU time"
    )
    header = ("dim", "tokens", "bare s", "bare tok/s", "ref-CE s", "ref-CE tok/s", "wall", "cpu")
    print("".join(f"{h:>13}" for h in header))
    for dim, r in rows:
        cells = (
            dim,
            r["tokens"],
            f"{r['bare']:.3f}",
            f"{r['tokens'] / r['bare']:.0f}",
            f"{r['refce']:.3f}",
            f"{r['tokens'] / r['refce']:.0f}",
            f"{r['bare'] / r['refce']:.3f}",
            f"{r['bare_cpu'] / r['refce_cpu']:.3f}",
        )
        print("".join(f"{c:>13}" for c in cells))
    print("ratio = ref-CE tokens/s / bare-forward tokens/s (goal >= 0.9)")


if __name__ == "__main__":
    main()
