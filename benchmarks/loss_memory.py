"""Peak memory and step time of the weighted MTP loss.

Compares, on one model and batch where the logits dominate memory (default:
vocab 32000, seq 1024, H = 4, dim 256, batch 1, CPU):

- `plain-ce`:  next-token CE of head 0 only (`model.next_token_logits` + CE):
               what a next-token model costs; the memory yardstick.
- `naive-mtp`: the weighted MTP loss written directly on `model(input_ids)`,
               i.e. all H heads' logits `(B, S, H, V)` at once; the time yardstick.
- `wmtp-loss`: `wmtp.core.loss.weighted_mtp_loss`.
- `wmtp-loss-h1`: the same loss on the same trunk with ONE head: the sequential-head
               scheme should make H heads cost one head's logits plus the extra
               heads' parameter gradients (printed beside the measured difference).

Each step is forward + backward (gradients into `.grad`, set to None before each
step, so the gradient buffers count too).

How memory is measured: every variant runs in a fresh Python process, so no
allocator cache or high-water mark carries over. The process builds the model
and batch, records `ru_maxrss` (peak resident set size), runs one step, and
reports the growth of `ru_maxrss`: the peak extra memory of one training step
above the model and batch. That step runs with glibc's mmap threshold pinned at
64 KiB (`mallopt`), so every tensor above it is its own mapping, handed back to the
OS when freed, and RSS tracks live tensors. glibc's default threshold is dynamic:
after the first large free (a 16 MB logits chunk) it rises to that size, later
tensors come from the heap, and freed heap memory stays in RSS; the figure then
measures the heap's fragmentation (H=4 vs H=1 reads 1.17-1.38x that way, and
one H=1 step alone 119 MB in one run and 153 MB in another). Step time is
the median of `--steps` further steps in the same process with the threshold
raised to glibc's dynamic maximum (32 MiB), as the default allocator settles, since
a page-faulting mmap per tensor would skew the times. Goals: wmtp-loss peak
<= 1.15x plain-ce, time <= 1.3x naive-mtp.

    python benchmarks/loss_memory.py                      # the table, ~2 min on 2 idle cores
    python benchmarks/loss_memory.py --prompt-fraction 0.5  # half the targets are prompt
    python benchmarks/loss_memory.py --dim 128            # the H=4 vs H=1 comparison's setting
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from wmtp.core.loss import weighted_mtp_loss
from wmtp.core.model import MTPConfig, MTPModel

VARIANTS = ("plain-ce", "naive-mtp", "wmtp-loss", "wmtp-loss-h1")
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def naive_mtp_loss(model, input_ids, loss_mask, weights):
    """The loss of wmtp.core.loss written literally on the full `(B, S, H, V)` logits."""
    logits = model(input_ids)  # (B, S, H, V)
    batch, seq, n_heads, vocab = logits.shape
    total = 0.0
    for k in range(n_heads):
        valid = loss_mask[:, k + 1 :]  # (B, S-k-1)
        ce = F.cross_entropy(
            logits[:, : seq - k - 1, k].reshape(-1, vocab), input_ids[:, k + 1 :].reshape(-1), reduction="none"
        ).view(batch, -1)
        total = total + (weights[:, k + 1 :] * ce * valid).sum() / valid.sum().clamp(min=1)
    return total / n_heads


def plain_ce_loss(model, input_ids, loss_mask, weights):
    """Ordinary next-token CE over the valid targets (head 0 only, unweighted)."""
    logits = model.next_token_logits(input_ids)  # (B, S, V)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")  # (B, S-1)
    valid = loss_mask[:, 1:]
    return (ce * valid).sum() / valid.sum()


LOSSES = {
    "plain-ce": plain_ce_loss, "naive-mtp": naive_mtp_loss, "wmtp-loss": weighted_mtp_loss,
    "wmtp-loss-h1": weighted_mtp_loss,
}  # fmt: skip


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def set_mmap_threshold(nbytes: int) -> None:
    """glibc: allocations of at least `nbytes` get their own mapping, returned to the
    OS when freed (setting it also ends glibc's dynamic adjustment)."""
    if not ctypes.CDLL(ctypes.util.find_library("c")).mallopt(M_MMAP_THRESHOLD, nbytes):
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: this benchmark needs glibc")


def build_model(args, heads: int) -> MTPModel:
    """`args.trunk_layers` trunk blocks and `heads` head blocks, seeded."""
    config = MTPConfig(
        dim=args.dim, n_layers=args.trunk_layers + heads, n_heads=max(1, args.dim // 64), vocab_size=args.vocab,
        n_future_tokens=heads, multiple_of=256, max_seq_len=args.seq,
    )
    model = MTPModel(config)
    model.init_weights(args.seed)
    return model


def extra_heads_grad_mb(args) -> float:
    """Size of the gradients of heads 1..H-1 (fp32): what H heads may cost over one."""
    model = build_model(args, args.heads)
    return sum(p.numel() for head in model.heads[1:] for p in head.parameters()) * 4 / 2**20


def measure(args) -> dict:
    """Run in a fresh process: peak RSS growth of one step and the median step time."""
    set_mmap_threshold(64 * 1024)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = build_model(args, 1 if args.variant == "wmtp-loss-h1" else args.heads)
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    loss_mask = torch.ones(args.batch, args.seq, dtype=torch.bool)
    loss_mask[:, : int(args.prompt_fraction * args.seq)] = False
    weights = (torch.rand(args.batch, args.seq, generator=generator) * 2).where(loss_mask, 0.0)
    loss_fn = LOSSES[args.variant]

    def step() -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = loss_fn(model, input_ids, loss_mask, weights)
        loss.backward()
        return time.perf_counter() - start, loss.item()

    baseline = max_rss_mb()
    _, loss = step()
    peak = max_rss_mb() - baseline
    set_mmap_threshold(32 * 2**20)
    times = [step()[0] for _ in range(args.steps)]
    return {"variant": args.variant, "peak_mb": peak, "step_s": statistics.median(times), "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--trunk-layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-fraction", type=float, default=0.0, help="share of each row that is prompt")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the measured one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=VARIANTS, help="internal: measure one variant, print JSON")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args)))
        return

    rows = {}
    for variant in VARIANTS:
        argv = [*sys.argv[1:], "--variant", variant]
        out = subprocess.run([sys.executable, __file__, *argv], check=True, capture_output=True, text=True)
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"measured {variant}", file=sys.stderr)
    print(
        f"vocab={args.vocab} seq={args.seq} heads={args.heads} dim={args.dim} trunk_layers={args.trunk_layers} "
        f"batch={args.batch} prompt_fraction={args.prompt_fraction} threads={args.threads}"
    )
    print(f"{'variant':<12} {'peak MB':>9} {'x plain-ce':>10} {'step s':>8} {'x naive':>8} {'loss':>8}")
    for variant, row in rows.items():
        print(
            f"{variant:<12} {row['peak_mb']:>9.1f} {row['peak_mb'] / rows['plain-ce']['peak_mb']:>10.2f} "
            f"{row['step_s']:>8.2f} {row['step_s'] / rows['naive-mtp']['step_s']:>8.2f} {row['loss']:>8.4f}"
        )
    extra = rows["wmtp-loss"]["peak_mb"] - rows["wmtp-loss-h1"]["peak_mb"]
    print(
        f"wmtp-loss H={args.heads} vs H=1: {rows['wmtp-loss']['peak_mb'] / rows['wmtp-loss-h1']['peak_mb']:.2f}x, "
        f"{extra:+.1f} MB (gradients of the {args.heads - 1} extra heads: {extra_heads_grad_mb(args):.1f} MB)"
    )


if __name__ == "__main__":
    main()
